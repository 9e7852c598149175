"""Tokenizer vs independent references: transformers (GGUF files and saved directories) and sentencepiece.

Tiny vocabularies are trained here (sentencepiece BPE, byte-level BPE with `tokenizers`) and written to
GGUF files with `gguf.GGUFWriter`; the real embedded SmolLM2 vocabulary runs in the `slow` tests.
"""

import io
import itertools
import json
import random
from functools import partial
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm

from llamaherd.errors import CheckpointError, InputError
from llamaherd.tokenizer import Tokenizer

# At least 2,000 characters mixing everything a tokenizer trips on. Whitespace runs are never directly
# followed by a digit here: see test_embedded_splits_digits_like_published_smollm2 for why.
ENGLISH = (
    "The llama (Lama glama) is a domesticated South American camelid, widely used as a meat and pack animal "
    "by Andean cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. "
    "Their wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few "
    "repetitions. When using a pack, they can carry about 25 to 30% of their body weight for 8 to 13 km "
    "(5 to 8 miles). The name llama was adopted by European settlers from native Peruvians. "
    "Isn't it remarkable? They're calm, we've heard, and I'd say you'll like them; she'll agree, won't she?"
)
CODE = (
    "def fibonacci(n: int) -> list[int]:\n"
    '    """Return the first n Fibonacci numbers."""\n'
    "    seq = [0, 1]\n"
    "    while len(seq) < n:\n"
    "        seq.append(seq[-1] + seq[-2])\n"
    "    return seq[:n]\n"
    "\n"
    "\n"
    "class Herd:\n"
    "\tdef __init__(self, size=12):\n"
    "\t\tself.size = size  # tabs, not spaces\n"
    "\t\tself.names = {'alpaca': 3, 'vicuna': 7, 'guanaco': 11}\n"
    "\n"
    "if __name__ == '__main__':\n"
    "    print(fibonacci(20), Herd().size ** 3 // 7, f\"{3.14159:.2f}\")\n"
)
NUMBERS = (
    "In 2023 the population was 8,045,311,447 and pi is 3.14159265358979323846. "
    "Call +1-555-0199 or 0044 20 7946 0958; the invoice total was $1,234,567.89 (VAT 20%). "
    "Dates: 2024-06-01T12:34:56Z, 31/12/1999, 1e-12, 0xDEADBEEF, 0b1010, 123456789012345678901234567890."
)
UNICODE = (
    "Emoji: 🦙🐪 llama herd 🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇵🇪🇧🇴 and ✨sparkles✨. "
    "中文：羊驼是一种驯养的南美骆驼科动物。日本語：ラマは南米のラクダ科の動物です。한국어: 라마는 낙타과 동물입니다. "
    "Accents: naïve café, façade, jalapeño, Ångström, Øresund, crème brûlée, São Paulo, Dvořák, Łódź, "
    "Straße, ÉCOLE, résumé. Greek: λάμα. Russian: лама — домашнее животное. Arabic: اللاما حيوان."
)
SPACING = (
    "Runs   of   spaces,\ttabs\t\tand\t\t\tmore,\n\nblank lines\n\n\n\nand   trailing spaces   \n"
    "  leading spaces, \t mixed \t\t whitespace\r\nwindows line ends\r\n    indented text\n        deeper\n"
)
CHAT = "<|im_start|>user\nHow many llamas?<|im_end|>\n<|im_start|>assistant\nSeven.<|im_end|>\n"
PARTS = (ENGLISH, CODE, NUMBERS, UNICODE, SPACING, ENGLISH.upper(), CODE, UNICODE)
LONG_TEXT = "\n\n".join(PARTS)
STREAM_TEXT = "Hi 🦙! 羊驼 und Lamas — naïve 👨‍👩‍👧‍👦 ok ✨\n\t終わり"


def test_long_text_is_long_enough():
    assert len(LONG_TEXT) >= 2000


# ---- shared references ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer


def _train_spm(tmp: Path, name: str, **options) -> Path:
    """A tiny sentencepiece BPE model with LLaMA's options (byte fallback, digits split) unless overridden."""
    lines = [s for part in (ENGLISH, CODE, NUMBERS, ENGLISH.lower()) for s in part.replace(". ", ".\n").split("\n")]
    model = io.BytesIO()
    settings = {
        "model_type": "bpe", "vocab_size": 420, "byte_fallback": True, "split_digits": True,
        "character_coverage": 1.0, "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True, "user_defined_symbols": ["<sep>"],
    }
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for s in lines if s.strip()] * 4), model_writer=model,
        **(settings | options), minloglevel=2,
    )
    path = tmp / name / "tokenizer.model"
    path.parent.mkdir(parents=True)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    return _train_spm(tmp_path_factory.mktemp("spm"), "llama-like")


def _sp(path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


def _write_spm_gguf(model_path: Path, out: Path) -> Path:
    """The vocabulary of a sentencepiece model as llama.cpp's convert script stores it: tokens, scores, types."""
    sp = _sp(model_path)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.id_to_piece(i) == "<sep>":
            kind = gguf.TokenType.USER_DEFINED
        types.append(int(kind))
    w = gguf.GGUFWriter(out, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    _close(w)
    return out


def _close(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- GGUF `llama` (sentencepiece) vocabulary vs sentencepiece itself ------------------------------------------
SPM_TEXTS = [LONG_TEXT, ENGLISH, " leading space", "  two leading", "trailing  ", "", "x", "\n", "🦙"]


@pytest.fixture(scope="module")
def spm_gguf(spm_model, tmp_path_factory) -> Path:
    return _write_spm_gguf(spm_model, tmp_path_factory.mktemp("gguf") / "spm.gguf")


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_gguf_matches_sentencepiece(spm_model, spm_gguf, text):
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, add_bos=True) == sp.encode(text, add_bos=True)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text


def test_spm_gguf_special_tokens(spm_model, spm_gguf):
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (sp.bos_id(), sp.eos_id(), None)
    assert (tok.bos_token, tok.eos_token) == (sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.add_bos_default is True
    assert tok.stop_ids == {sp.eos_id()}
    assert tok.chat_template.startswith("{{ bos_token }}")
    assert tok.token_to_id("<0x41>") == sp.piece_to_id("<0x41>")
    assert tok.id_to_token(sp.piece_to_id("▁the")) == "▁the"
    assert tok.token_to_id("no-such-token") is None
    # special tokens written in the text are recognised and can be skipped on decode
    ids = tok.encode("</s>the")
    assert ids[0] == sp.eos_id()
    assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode("the"))


def test_spm_user_defined_and_control_tokens_cut_the_text(spm_model, spm_gguf):
    """Like llama.cpp (and Meta's chat code, which encodes each segment on its own), text after a control or
    user-defined token starts a new SentencePiece segment with its own dummy prefix."""
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    sep = sp.piece_to_id("<sep>")
    assert tok.encode("the llama<sep>is calm") == [*sp.encode("the llama"), sep, *sp.encode("is calm")]
    assert tok.encode("<s>[INST] hi", add_bos=True) == sp.encode("[INST] hi", add_bos=True)


@pytest.mark.parametrize(
    "options", [{}, {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True}], ids=["llama", "nfkc"]
)
def test_tokenizer_model_dir_matches_sentencepiece(tmp_path, options):
    model = _train_spm(tmp_path, "hf", **options)
    sp, tok = _sp(model), Tokenizer.from_path(model.parent)
    for text in SPM_TEXTS + ["  Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ  ", "x   y\t\tz"]:
        assert tok.encode(text) == sp.encode(text), text
    assert tok.bos_id == sp.bos_id() and tok.eos_id == sp.eos_id()
    assert tok.add_bos_default is True  # a bare tokenizer.model: LLaMA's convention


def test_meta_layout_reads_tokenizer_model_from_parent(tmp_path, spm_model):
    root = tmp_path / "llama-2-7b-download"
    (root / "llama-2-7b").mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(spm_model.read_bytes())
    (root / "llama-2-7b" / "params.json").write_text('{"dim": 4096}')
    tok = Tokenizer.from_path(root / "llama-2-7b")
    assert tok.encode(ENGLISH, add_bos=True) == _sp(spm_model).encode(ENGLISH, add_bos=True)


# ---- GGUF `gpt2` (byte-level BPE) vocabularies vs transformers' GGUF loader ------------------------------------
def _train_byte_level() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([ENGLISH, CODE, NUMBERS, UNICODE, SPACING] * 20, trainer)
    model = json.loads(backend.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]


@pytest.fixture(scope="module")
def byte_level_vocab():
    return _train_byte_level()


def _write_byte_level_gguf(path: Path, vocab, pre: str | None) -> Path:
    tokens, merges = vocab
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(gguf.TokenType.CONTROL if t.startswith("<|") else gguf.TokenType.NORMAL) for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    _close(w)
    return path


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_gguf_matches_transformers(tmp_path, byte_level_vocab, auto_tokenizer, pre):
    path = _write_byte_level_gguf(tmp_path / f"{pre}.gguf", byte_level_vocab, pre)
    ref = auto_tokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = Tokenizer.from_gguf(path)
    for text in (LONG_TEXT, CHAT, "  42 and  ½ or\n  7", "don'T WE'LL", ""):
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.stop_ids == {tok.eos_id, tok.token_to_id("<|im_end|>")}
    assert tok.add_bos_default is False


@pytest.mark.parametrize("pre", ["falcon", None])
def test_byte_level_gguf_unknown_pre_tokenizer_is_named(tmp_path, byte_level_vocab, pre):
    path = _write_byte_level_gguf(tmp_path / "x.gguf", byte_level_vocab, pre)
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre") as err:
        Tokenizer.from_gguf(path)
    assert str(path) in str(err.value) and (pre is None or repr(pre) in str(err.value))


# ---- BOS / EOS ----------------------------------------------------------------------------------------------
def test_bos_is_explicit_and_never_doubled(spm_model, spm_gguf):
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    plain = sp.encode("Hello there")
    assert tok.encode("Hello there") == plain
    assert tok.encode("Hello there", add_bos=True) == [sp.bos_id(), *plain]
    # a rendered chat template that already starts with the BOS string gets no second BOS
    with_bos = tok.encode("<s>Hello there", add_bos=True)
    assert with_bos == tok.encode("<s>Hello there") == [sp.bos_id(), *plain]
    assert tok.encode("Hello there</s>", add_eos=True).count(sp.eos_id()) == 1
    assert tok.encode("Hello there", add_eos=True) == [*plain, sp.eos_id()]


def test_text_that_is_not_utf8_is_an_input_error(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    argv_text = b"Hi \xc3".decode("utf-8", "surrogateescape")  # how Python hands over a non-UTF-8 argument
    with pytest.raises(InputError, match="not valid UTF-8 .* at character 3"):
        tok.encode(argv_text)


def test_add_bos_without_a_bos_token_is_an_error(tmp_path, byte_level_vocab):
    tokens, merges = byte_level_vocab
    w = gguf.GGUFWriter(tmp_path / "nobos.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    _close(w)
    tok = Tokenizer.from_gguf(tmp_path / "nobos.gguf")
    assert tok.bos_id is None and tok.bos_token is None and tok.add_bos_default is False
    with pytest.raises(InputError, match="no BOS"):
        tok.encode("hi", add_bos=True)


# ---- streaming ----------------------------------------------------------------------------------------------
def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_spm_byte_fallback(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    ids = tok.encode(STREAM_TEXT, add_bos=True)
    assert len(ids) > len(STREAM_TEXT)  # emoji and CJK went through byte tokens, several per character
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("") > 4  # held back while a character was incomplete


def test_stream_decoder_flush_releases_an_incomplete_character(spm_gguf):
    tok = Tokenizer.from_gguf(spm_gguf)
    first_byte = tok.token_to_id("<0xF0>")  # the first of four bytes of an emoji
    decoder = tok.stream_decoder()
    assert decoder.push(tok.token_to_id("▁the")) == "the"
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == tok.decode([tok.token_to_id("▁the"), first_byte])[len("the") :]


# ---- broken byte runs: decode() vs sentencepiece / tokenizers, and the stream vs decode() --------------------------
# Characters of 1 to 4 UTF-8 bytes (with the edges of each length), and byte strings that are never UTF-8:
# a surrogate, overlong forms, a code point past U+10FFFF, a 5-byte form and bytes that start nothing.
CHARS = "aé½€中🦙\x7f\x80\u0800\uffff\U00010000\U0010ffff"
NEVER_UTF8 = (b"\xed\xa0\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf", b"\xf4\x90\x80\x80",
              b"\xf8\x88\x80\x80\x80", b"\xc1", b"\xfe", b"\xff", b"\x80\xbf")


def _random_ids(rng: random.Random, words: list[int], byte_ids: list[int], specials: list[int]) -> list[int]:
    """A sequence a sampler could produce: word tokens, special tokens, and byte tokens that spell whole
    characters, characters cut short (also at the very end), stray bytes and byte strings that are never UTF-8."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.25:
            ids.append(rng.choice(words))
            continue
        if kind < 0.35:
            ids.append(rng.choice(specials))
            continue
        if rng.random() < 0.5:
            char = rng.choice(CHARS)
        else:
            char = chr(rng.choice((rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000))))
        data = char.encode()
        if kind < 0.55:
            data = data[: rng.randrange(1, len(data))] if len(data) > 1 else data  # cut short
        elif kind < 0.65:
            data = bytes([rng.randrange(256)])
        elif kind < 0.75:
            data = rng.choice(NEVER_UTF8)
        ids += [byte_ids[b] for b in data]
    return ids


def _sequences(seed: int, n: int, words: list[int], byte_ids: list[int], specials: list[int], edge: list[int]):
    """Every sequence of up to three `edge` tokens (where the start and byte runs meet special tokens, spaces
    and words), then `n` random ones."""
    rng = random.Random(seed)
    short = [list(ids) for k in (1, 2, 3) for ids in itertools.product(edge, repeat=k)]
    return short + [_random_ids(rng, words, byte_ids, specials) for _ in range(n)]


def _check_stream(tok: Tokenizer, ids: list[int], skip: bool, reference, held: int | None) -> None:
    """The pieces join to decode(ids); after each push what came out is a prefix of the reference's decoding of
    the ids so far (so nothing is taken back), short of at most `held` U+FFFD (an incomplete character)."""
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    out = ""
    for k, token_id in enumerate(ids, 1):
        out += decoder.push(token_id)
        so_far = reference(ids[:k])
        assert so_far.startswith(out), (ids[:k], out, so_far)
        if held is not None:
            assert so_far[len(out) :] == "\ufffd" * len(so_far[len(out) :]) and len(so_far) - len(out) <= held
    out += decoder.flush()
    assert out == tok.decode(ids, skip_special_tokens=skip) == reference(ids), ids


def _spm_ids(sp: spm.SentencePieceProcessor) -> tuple[list[int], list[int], list[int]]:
    """Word, byte (by value) and special ids of a sentencepiece model; the unknown piece is left out, as
    sentencepiece writes it " ⁇ " where `transformers` writes "<unk>" (or skips it)."""
    n = sp.get_piece_size()
    words = [i for i in range(n) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    return words, [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)], [sp.bos_id(), sp.eos_id(),
                                                                       sp.piece_to_id("<sep>")]


def test_decode_broken_byte_run_like_sentencepiece(spm_model, spm_gguf):
    """The reported case: "é" then a lone lead byte, as when generation stops mid-character."""
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    ids = [tok.token_to_id(t) for t in ("<0xC3>", "<0xA9>", "<0xE4>")]
    assert tok.decode(ids) == sp.decode(ids) == "é\ufffd"
    assert _stream(tok, ids) == ["", "é", "", "\ufffd"]
    # sentencepiece: one U+FFFD per byte that starts no whole character (Python's "replace" gives one per
    # maximal invalid subpart instead: b"\xe4\xb8A" -> "\ufffdA")
    ids = [tok.token_to_id(t) for t in ("<0xE4>", "<0xB8>", "<0x41>")]
    assert tok.decode(ids) == sp.decode(ids) == "\ufffd\ufffdA"


SPM_EDGE = ("▁", "▁the", "<0x20>", "<0xC3>", "<0xA9>", "<0xE4>")


@pytest.mark.parametrize("source", ["gguf", "tokenizer.model", "tokenizer.model-nfkc"])
def test_spm_decode_and_stream_of_random_byte_runs(tmp_path, spm_model, spm_gguf, source):
    """decode() equals sentencepiece's DecodeIds, and the stream equals decode() (special tokens skipped:
    sentencepiece never shows them; shown, only the stream is compared)."""
    model = spm_model
    if source == "tokenizer.model-nfkc":  # also drops every leading "▁" until text comes out
        model = _train_spm(tmp_path, "nfkc", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True)
    sp = _sp(model)
    tok = Tokenizer.from_gguf(spm_gguf) if source == "gguf" else Tokenizer.from_path(model.parent)
    words, byte_ids, specials = _spm_ids(sp)
    edge = [*specials, *(sp.piece_to_id(p) for p in SPM_EDGE)]
    for n, ids in enumerate(_sequences(11, 3000 if source == "gguf" else 800, words, byte_ids, specials, edge)):
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids), ids
        _check_stream(tok, ids, True, sp.decode, held=3)
        if n % 4 == 0:
            _check_stream(tok, ids, False, tok.decode, held=3)


def test_spm_tokenizer_json_stream_of_random_byte_runs(tmp_path, spm_gguf, auto_tokenizer):
    """A Llama 2 style tokenizer.json decodes with `tokenizers`' ByteFallback (an invalid run is one U+FFFD per
    byte token), as transformers does; the stream holds a byte run back until it ends, and equals decode()."""
    out = Tokenizer.from_gguf(spm_gguf).save_pretrained(tmp_path / "hf")
    tok, ref = Tokenizer.from_dir(out), auto_tokenizer.from_pretrained(out)
    c3, a9, e4 = (tok.token_to_id(t) for t in ("<0xC3>", "<0xA9>", "<0xE4>"))
    assert tok.decode([c3, a9, e4]) == ref.decode([c3, a9, e4]) == "\ufffd" * 3
    specials = [*ref.all_special_ids, tok.token_to_id("<sep>")]
    words = [i for i in range(len(ref)) if i not in specials and not ref.convert_ids_to_tokens(i).startswith("<0x")]
    byte_ids = [tok.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    edge = [*specials, *(tok.token_to_id(p) for p in SPM_EDGE)]
    for ids in _sequences(12, 1000, words, byte_ids, specials, edge):
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
            _check_stream(tok, ids, skip, partial(ref.decode, skip_special_tokens=skip), held=None)


def _byte_level_ids(ref) -> tuple[list[int], list[int], list[int]]:
    """Word, byte (by value) and special ids of a transformers byte-level BPE tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ref.all_special_ids + [i for i, t in ref.added_tokens_decoder.items() if t.special]
    words = [i for i in range(len(ref)) if i not in specials]
    spelling = bytes_to_unicode()
    return words, [ref.convert_tokens_to_ids(spelling[b]) for b in range(256)], sorted(set(specials))


@pytest.mark.parametrize("source", ["gguf", "tokenizer.json"])
def test_byte_level_decode_and_stream_of_random_byte_runs(tmp_path, byte_level_vocab, auto_tokenizer, source):
    """decode() equals transformers' (the `tokenizers` ByteLevel decoder: one U+FFFD per maximal invalid
    subpart; skipped special tokens do not end a byte run), and the stream equals decode()."""
    path = _write_byte_level_gguf(tmp_path / "bpe.gguf", byte_level_vocab, "gpt-2")
    ref = auto_tokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = Tokenizer.from_gguf(path)
    if source == "tokenizer.json":
        tok = Tokenizer.from_dir(tok.save_pretrained(tmp_path / "hf"))
    words, byte_ids, specials = _byte_level_ids(ref)
    edge = [*specials, ref.convert_tokens_to_ids("Ġthe"), *(byte_ids[b] for b in (0x20, 0xC3, 0xA9, 0xED, 0xA0))]
    for n, ids in enumerate(_sequences(13, 3000 if source == "gguf" else 800, words, byte_ids, specials, edge)):
        for skip in (True, False) if n % 2 else (False,):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
            _check_stream(tok, ids, skip, partial(ref.decode, skip_special_tokens=skip), held=1)


class _CountingBackend:
    """A `tokenizers` backend that records how many ids each decode call gets."""

    def __init__(self, backend) -> None:
        self.backend, self.decoded = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def decode(self, ids, **kwargs) -> str:
        self.decoded.append(len(ids))
        return self.backend.decode(ids, **kwargs)


def test_stream_step_cost_does_not_grow_with_the_text(tmp_path, spm_gguf, byte_level_vocab):
    """No step re-decodes the sequence: SentencePiece and byte-level vocabularies decode id by id, and other
    tokenizer.json decoders a window of the last two emissions: each at most a byte run and the token ending it."""
    spm = Tokenizer.from_gguf(spm_gguf)
    byte_level = Tokenizer.from_gguf(_write_byte_level_gguf(tmp_path / "bpe.gguf", byte_level_vocab, "gpt-2"))
    llama2_json = Tokenizer.from_dir(spm.save_pretrained(tmp_path / "hf"))
    pieces = [llama2_json.id_to_token(i) for i in llama2_json.encode(LONG_TEXT)]
    longest_run = max(len(run) for run in "".join("b" if p.startswith("<0x") else " " for p in pieces).split())
    for tok, window in ((spm, 0), (byte_level, 0), (llama2_json, 2 * (longest_run + 1))):
        ids = tok.encode(LONG_TEXT * 3)
        tok.backend = _CountingBackend(tok.backend)
        assert "".join(_stream(tok, ids)) == LONG_TEXT * 3 and len(ids) > 20 * window
        assert max(tok.backend.decoded, default=0) <= window


def test_stream_text_stopping_mid_character_equals_decode(monkeypatch, spm_model, spm_gguf):
    """`stream_text` (what `herd chat` and `herd generate` print) flushes the held bytes when generation ends
    mid-character, at max_new_tokens or at a stop token, so the reply is decode() of the generated ids. The
    engine's sampler is scripted to return these ids from a tiny model over the same vocabulary."""
    import torch

    from llamaherd.config import Config
    from llamaherd.engine import engine
    from llamaherd.generate import SamplingParams, stream_text
    from llamaherd.model import GPT

    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    model = GPT(Config(name="tiny", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=8, intermediate_size=8,
                       block_size=32)).eval()
    reply = [tok.token_to_id(t) for t in ("▁the", "<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>")]  # "theé" + half an emoji

    def stream(generated: list[int], params: SamplingParams) -> str:
        script = iter(generated)
        monkeypatch.setattr(engine, "sample_next", lambda *args: torch.tensor([next(script)]))
        return "".join(stream_text(model, tok, [1], params))

    at_length, at_stop_id = SamplingParams(max_new_tokens=len(reply)), SamplingParams(max_new_tokens=8)
    assert stream(reply, at_length) == sp.decode(reply) == "theé\ufffd\ufffd"
    assert stream([*reply, tok.eos_id, tok.token_to_id("▁the")], at_stop_id) == sp.decode(reply)
    assert stream(reply, SamplingParams(max_new_tokens=8, stop_strings=["é"])) == "the"


# ---- save_pretrained -> transformers ------------------------------------------------------------------------
def test_save_pretrained_spm_loads_in_transformers(tmp_path, spm_model, spm_gguf, auto_tokenizer):
    sp, tok = _sp(spm_model), Tokenizer.from_gguf(spm_gguf)
    out = tok.save_pretrained(tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    ref = auto_tokenizer.from_pretrained(out)
    for text in SPM_TEXTS:
        assert ref(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert ref(text).input_ids == sp.encode(text, add_bos=True), text
    assert ref.chat_template == tok.chat_template
    assert (ref.bos_token, ref.eos_token) == (tok.bos_token, tok.eos_token)
    # and our own reader of Hugging Face directories agrees with transformers on the same files
    again = Tokenizer.from_dir(out)
    assert again.encode(LONG_TEXT, add_bos=True) == ref(LONG_TEXT).input_ids
    assert (again.add_bos_default, again.chat_template, again.stop_ids) == (True, tok.chat_template, tok.stop_ids)


def test_hf_dir_configs(tmp_path, spm_gguf):
    out = Tokenizer.from_gguf(spm_gguf).save_pretrained(tmp_path)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["eos_token"] = {"content": "</s>", "__type": "AddedToken"}
    del cfg["add_bos_token"]  # then the post-processor decides
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "chat_template.jinja").write_text("{{ messages }}")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_dir(out)
    assert tok.eos_token == "</s>" and tok.stop_ids == {2, 5}
    assert tok.chat_template == "{{ messages }}"
    assert tok.add_bos_default is True
    cfg["bos_token"] = "<not-in-vocab>"
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="<not-in-vocab>"):
        Tokenizer.from_dir(out)


# ---- errors ------------------------------------------------------------------------------------------------
def test_clear_errors_for_non_tokenizer_paths(tmp_path, byte_level_vocab):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    w = gguf.GGUFWriter(tmp_path / "weights-only.gguf", "llama")
    _close(w)
    w = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.add_tokenizer_model("bert")
    w.add_token_list(byte_level_vocab[0])
    _close(w)
    (tmp_path / "bad-spm").mkdir()
    (tmp_path / "bad-spm" / "tokenizer.model").write_bytes(b"\xff\xff garbage")
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    cases = {
        "bad-spm": "not a SentencePiece model",
        "bad-json": "not a valid tokenizer.json",
        "missing": "no such file",
        "empty": "no tokenizer found",
        "notes.txt": "no tokenizer found",
        "fake.gguf": "not a GGUF file",
        "weights-only.gguf": "no embedded tokenizer",
        "bert.gguf": "'bert' is not supported",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as err:
            Tokenizer.from_path(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


# ---- the real embedded SmolLM2 vocabulary ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded() -> Path:
    from llamaherd.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="module")
def embedded_ref(embedded, auto_tokenizer):
    return auto_tokenizer.from_pretrained(embedded.parent, gguf_file=embedded.name)


@pytest.mark.slow
def test_embedded_matches_transformers(embedded, embedded_ref):
    tok = Tokenizer.from_path(embedded)
    for text in (LONG_TEXT, CHAT + LONG_TEXT):
        ids = tok.encode(text)
        assert ids == embedded_ref(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == embedded_ref.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == embedded_ref.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(embedded_ref)
    assert (tok.bos_token, tok.eos_token) == (embedded_ref.bos_token, embedded_ref.eos_token)
    assert tok.pad_id == embedded_ref.pad_token_id
    assert tok.chat_template == embedded_ref.chat_template
    assert tok.stop_ids == {embedded_ref.eos_token_id, embedded_ref.convert_tokens_to_ids("<|endoftext|>")}
    assert tok.add_bos_default is False


@pytest.mark.slow
def test_embedded_splits_digits_like_published_smollm2(embedded, embedded_ref):
    """llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own tokenizer.json) isolates every digit before
    GPT-2's split; transformers' GGUF loader skips that step, which only shows when whitespace runs precede
    a digit or around non-ASCII numerals. The reference here is transformers' vocabulary with the published
    pre-tokenizer: Digits(individual_digits=True) then ByteLevel."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    published = Backend.from_str(embedded_ref.backend_tokenizer.to_str())
    published.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok = Tokenizer.from_gguf(embedded)
    for text in ("x =  42", "items:\n    1,\n    2", "½ cup, ① first, Ⅻ o'clock, ²", LONG_TEXT):
        assert tok.encode(text) == published.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
def test_embedded_bos_and_streaming(embedded, embedded_ref):
    tok = Tokenizer.from_gguf(embedded)
    bos = embedded_ref.bos_token_id
    rendered = embedded_ref.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.startswith(embedded_ref.bos_token)
    ids = tok.encode(rendered, add_bos=True)
    assert ids == embedded_ref(rendered, add_special_tokens=False).input_ids and ids[1] != bos
    assert tok.encode("Hi", add_bos=True) == [bos, *embedded_ref("Hi", add_special_tokens=False).input_ids]
    ids = tok.encode(STREAM_TEXT + LONG_TEXT)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT + LONG_TEXT
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_embedded_decode_and_stream_of_random_ids(embedded, embedded_ref):
    """The real SmolLM2 vocabulary (byte-level BPE) from the GGUF file: decode() equals transformers' on random
    ids, words among them that hold part of a character, and the stream equals decode()."""
    tok = Tokenizer.from_gguf(embedded)
    words, byte_ids, specials = _byte_level_ids(embedded_ref)
    edge = [*specials[:3], embedded_ref.convert_tokens_to_ids("Ġthe"), *(byte_ids[b] for b in (0x20, 0xC3, 0xA9, 0xED))]
    for n, ids in enumerate(_sequences(14, 1500, words, byte_ids, specials, edge)):
        for skip in (True, False) if n % 2 else (False,):
            assert tok.decode(ids, skip_special_tokens=skip) == embedded_ref.decode(ids, skip_special_tokens=skip)
            _check_stream(tok, ids, skip, partial(embedded_ref.decode, skip_special_tokens=skip), held=1)


@pytest.mark.slow
def test_embedded_save_pretrained_round_trip(tmp_path, embedded, embedded_ref, auto_tokenizer):
    tok = Tokenizer.from_gguf(embedded)
    ref = auto_tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "hf"))
    for text in (LONG_TEXT, CHAT):
        want = embedded_ref(text, add_special_tokens=False).input_ids
        assert ref(text, add_special_tokens=False).input_ids == want
        assert ref(text).input_ids == want  # SmolLM2 adds no BOS by default
        assert ref.decode(want) == text
    assert ref.chat_template == embedded_ref.chat_template
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == (
        embedded_ref.bos_token, embedded_ref.eos_token, embedded_ref.pad_token,
    )
