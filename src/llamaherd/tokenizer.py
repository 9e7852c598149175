"""One tokenizer for every checkpoint kind: HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF vocabularies.

Every source is turned into a `tokenizers.Tokenizer` (the Rust engine behind Hugging Face's fast
tokenizers), so encoding and `save_pretrained` behave the same whatever the model came from. Decoding
follows each vocabulary's own library where they differ: a SentencePiece vocabulary (tokenizer.model, GGUF
`llama`) decodes broken byte runs as sentencepiece does.
BOS is never implied: `encode(text, add_bos=...)` is an explicit choice, and `add_bos_default` says what
the model was trained with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from llamaherd.errors import CheckpointError, InputError

# Token types shared by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn / end-of-text tokens that stop generation when the vocabulary has them.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
)

# Byte-level BPE pre-tokenizers, by GGUF `tokenizer.ggml.pre` name. As in llama.cpp, the regexes run in
# turn, each one splitting the pieces the previous left (matches and the text between them).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # each digit alone, then GPT-2's rule (StarCoder's tokenizer)
    "llama-bpe": (_LLAMA3_SPLIT,),
    "qwen2": (_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),),
}
_PRE_ALIASES = {
    "gpt2": "gpt-2", "mpt": "gpt-2", "olmo": "gpt-2", "phi-2": "gpt-2",
    "starcoder": "smollm", "refact": "smollm", "codeshell": "smollm",
    "llama3": "llama-bpe", "llama-v3": "llama-bpe", "smaug-bpe": "llama-bpe", "dbrx": "llama-bpe",
    "falcon3": "llama-bpe", "stablelm2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


class Tokenizer:
    """Text <-> token ids, with the model's special tokens, stop tokens and chat template.

    Build it with `from_path`, `from_dir` or `from_gguf`; `save_pretrained` writes files that
    `transformers.AutoTokenizer` loads with identical ids.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        add_bos_default: bool = False,
        sentencepiece: SentencePieceVocab | None = None,
    ) -> None:
        self.backend = backend
        self.sentencepiece = sentencepiece  # set: decode as SentencePiece does, not as `backend`'s decoder
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.chat_template = chat_template
        self.add_bos_default = add_bos_default and bos_id is not None
        turn_ends = {self.token_to_id(t) for t in END_OF_TURN_TOKENS}
        self.stop_ids: set[int] = {i for i in (eos_id, *extra_stop_ids, *turn_ends) if i is not None}

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """A `.gguf` file, a Hugging Face model directory, a `tokenizer.json`/`tokenizer.model` file, or a
        Meta original directory (with `tokenizer.model` in it or in its parent)."""
        path = Path(path).expanduser()
        if path.is_file():
            if path.suffix == ".gguf":
                return cls.from_gguf(path)
            if path.name in ("tokenizer.json", "tokenizer.model"):
                return cls.from_dir(path.parent)
        elif path.is_dir():
            if (path / "tokenizer.json").is_file() or _find_sentencepiece(path) is not None:
                return cls.from_dir(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
        elif not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        raise CheckpointError(
            f"{path}: no tokenizer found (expected a .gguf file, or a directory with tokenizer.json or "
            "tokenizer.model)"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model directory (`tokenizer.json`, else SentencePiece `tokenizer.model`) or a Meta
        original directory; special tokens and the chat template come from the JSON configs beside it."""
        path = Path(path)
        cfg = _read_hf_configs(path)
        spm_ids: dict[str, int] = {}
        sentencepiece = None
        from_json = (path / "tokenizer.json").is_file()
        if from_json:
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the Rust library raises a bare Exception
                raise CheckpointError(f"{path / 'tokenizer.json'}: not a valid tokenizer.json ({e})") from e
        elif (spm := _find_sentencepiece(path)) is not None:
            backend, spm_ids, sentencepiece = _sentencepiece_file_backend(spm)
        else:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

        def special(name: str) -> int | None:
            token = cfg.get(f"{name}_token")
            if token is None:
                return cfg.get(f"{name}_token_id", spm_ids.get(name))
            token_id = backend.token_to_id(token)
            if token_id is None and name in ("bos", "eos"):
                raise CheckpointError(f"{path}: {name}_token {token!r} is not in the vocabulary")
            return token_id

        bos_id = special("bos")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # unset: a tokenizer.json's post-processor says; LLaMA's SentencePiece models add BOS
            add_bos = _post_processor_adds(backend, bos_id) if from_json else True
        return cls(
            backend, bos_id=bos_id, eos_id=special("eos"), pad_id=special("pad"), unk_id=special("unk"),
            extra_stop_ids=cfg.get("eos_token_ids", ()), chat_template=cfg.get("chat_template"),
            add_bos_default=add_bos, sentencepiece=sentencepiece,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The vocabulary embedded in a GGUF file: `gpt2` (byte-level BPE) or `llama` (SentencePiece)."""
        path = Path(path)
        meta = read_gguf_metadata(path, prefix="tokenizer.")
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise CheckpointError(f"{path}: this GGUF file has no embedded tokenizer (tokenizer.ggml.model)")
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        sentencepiece = None
        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre")
            backend = _byte_level_backend(tokens, types, meta.get("tokenizer.ggml.merges", []), pre, path)
            add_bos_default = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            backend = _sentencepiece_backend(tokens, scores, types, add_prefix_space=prefix)
            sentencepiece = SentencePieceVocab(tokens, types, add_dummy_prefix=prefix)
            add_bos_default = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SPM
        else:
            raise CheckpointError(
                f"{path}: tokenizer.ggml.model = {kind!r} is not supported (supported: 'gpt2', 'llama')"
            )
        ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown", "eot", "eom")}
        return cls(
            backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"], unk_id=ids["unknown"],
            extra_stop_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None],
            chat_template=meta.get("tokenizer.chat_template"), add_bos_default=add_bos_default,
            sentencepiece=sentencepiece,
        )

    # ---- encoding and decoding ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. a rendered chat template) become their ids.

        BOS/EOS are added only when asked, and never doubled: text that already starts with the BOS
        string (or ends with the EOS string) gets no second one.
        """
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str):
                try:  # undecodable bytes, e.g. a command-line argument that is not UTF-8 (surrogate escapes)
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise InputError(f"text is not valid UTF-8 (an undecodable byte at character {e.start}); "
                                     "pass UTF-8 text") from None
            raise
        if add_bos:
            if self.bos_id is None:
                raise InputError("add_bos=True, but this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise InputError("add_eos=True, but this tokenizer has no EOS token")
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (ints, or a 1-D tensor/array), as the vocabulary's own library decodes them: sentencepiece's
        DecodeIds for SentencePiece vocabularies, `tokenizers` for every other (byte-level BPE included).

        Bytes that are not valid UTF-8 become U+FFFD: one per byte with SentencePiece, one per maximal invalid
        subpart with byte-level BPE. Special tokens read as written unless `skip_special_tokens`.
        """
        ids = [int(i) for i in ids]
        if self.sentencepiece is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        text = _SentencePieceText(self.sentencepiece, skip_special_tokens)
        return "".join(map(text.push, ids)) + text.flush()

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids that `skip_special_tokens` drops: the control (and SentencePiece unknown) tokens."""
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    # ---- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token as the vocabulary spells it (byte-level vocabularies write a space as "Ġ")."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's spelling of one id (None when out of range)."""
        return self.backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos_default={self.add_bos_default})"
        )

    # ---- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` for transformers.

        The post-processor is set from `add_bos_default`, so `AutoTokenizer(...)(text)` adds BOS exactly
        when the model expects it.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        backend = Backend.from_str(self.backend.to_str())
        if self.add_bos_default:
            bos = self.bos_token
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, self.bos_id)]
            )
        elif _post_processor_adds(backend, self.bos_id):
            backend.post_processor = None
        backend.save(str(out / "tokenizer.json"))
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id, "unk_token": self.unk_id}
        special = {name: self.id_to_token(i) for name, i in names.items() if i is not None}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_bos_token": self.add_bos_default,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
        return out


class StreamDecoder:
    """Turns ids into text one token at a time, for streaming generation.

    The pieces from `push` and a final `flush` join to exactly `tokenizer.decode(all ids)`, and no piece is ever
    taken back: a byte-level or byte-fallback token can end mid-character, so bytes that may still complete a
    character are held until they do or certainly cannot. Each step costs about the same however long the text.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        if tokenizer.sentencepiece is not None:
            self._text: _SentencePieceText | _ByteLevelText | _WindowText = _SentencePieceText(
                tokenizer.sentencepiece, skip_special_tokens
            )
        elif isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
            self._text = _ByteLevelText(tokenizer.backend, skip)
        else:
            self._text = _WindowText(tokenizer.backend, skip_special_tokens, skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        return self._text.push(int(token_id))

    def flush(self) -> str:
        """The end of the sequence: the text still held back (an incomplete character comes out as U+FFFD)."""
        return self._text.flush()


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token, as SentencePiece and `tokenizers` spell it


class SentencePieceVocab:
    """A SentencePiece vocabulary as sentencepiece's decoder sees it: byte pieces, special (control and unknown)
    pieces, text pieces, and whether the first piece's "▁" is the dummy prefix to drop."""

    def __init__(
        self, pieces: Sequence[str], types: Sequence[int], add_dummy_prefix: bool,
        remove_extra_whitespaces: bool = False,
    ) -> None:
        def unit(piece: str, kind: int) -> str | int:
            byte = _BYTE_PIECE.fullmatch(piece) if kind == BYTE else None
            return int(byte[1], 16) if byte else piece

        self.units = [unit(p, k) for p, k in zip(pieces, types)]  # a byte value, or the piece as written
        self.special = frozenset(i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN))
        # sentencepiece drops the first "▁" when the model adds a dummy prefix or removes extra whitespace, and
        # with the latter, the "▁" of every piece until some text has come out.
        self.drops_first_space = add_dummy_prefix or remove_extra_whitespaces
        self.drops_leading_spaces = remove_extra_whitespaces


class _SentencePieceText:
    """sentencepiece's Decode (sentencepiece_processor.cc), one id at a time. A run of byte pieces becomes its
    well-formed UTF-8 characters and one U+FFFD per other byte (util.cc, DecodeUTF8); any other piece ends the run.
    Special tokens (which sentencepiece never shows) read as written unless skipped, as in `transformers`."""

    def __init__(self, vocab: SentencePieceVocab, skip_special_tokens: bool) -> None:
        self._vocab, self._skip = vocab, skip_special_tokens
        self._bytes = _Utf8Text(per_byte=True)
        self._at_start = True  # no text out yet, and no dummy prefix dropped (sentencepiece's is_bos_ws)

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._vocab.units):
            return ""  # not a token: dropped, as `tokenizers` does
        unit = self._vocab.units[token_id]
        if isinstance(unit, int):
            return self._text(self._bytes.push(bytes((unit,))))
        text = self._text(self._bytes.flush())
        if token_id in self._vocab.special:
            return text + self._text("" if self._skip else unit)
        if self._at_start and self._vocab.drops_first_space and unit.startswith("▁"):
            unit = unit[1:]
            self._at_start = self._vocab.drops_leading_spaces
        return text + self._text(unit.replace("▁", " "))

    def flush(self) -> str:
        return self._text(self._bytes.flush())

    def _text(self, text: str) -> str:
        self._at_start = self._at_start and not text
        return text


class _ByteLevelText:
    """`tokenizers`' ByteLevel decoding, one id at a time: each token's characters map back to bytes (a token
    spelled outside GPT-2's byte alphabet counts as its UTF-8), and the byte stream reads as UTF-8 with one U+FFFD
    per maximal invalid subpart (Rust's `String::from_utf8_lossy`)."""

    def __init__(self, backend: Backend, skip: frozenset[int]) -> None:
        self._backend, self._skip = backend, skip
        self._bytes = _Utf8Text(per_byte=False)

    def push(self, token_id: int) -> str:
        token = None if token_id in self._skip else self._backend.id_to_token(token_id)
        if not token:
            return ""
        try:
            data = bytes(_UNICODE_TO_BYTE[c] for c in token)
        except KeyError:
            data = token.encode()
        return self._bytes.push(data)

    def flush(self) -> str:
        return self._bytes.flush()


class _Utf8Text:
    """Bytes to text as they arrive. Bytes that may still complete a character are held; the others become their
    characters, or U+FFFD: one per byte that starts no whole character (`per_byte`, sentencepiece) or one per maximal
    invalid subpart (Unicode's recommended practice, followed by Rust's from_utf8_lossy and Python's "replace")."""

    def __init__(self, per_byte: bool) -> None:
        self._per_byte = per_byte
        self._held = bytearray()

    def push(self, data: bytes) -> str:
        self._held += data
        return self._decode(final=False)

    def flush(self) -> str:
        return self._decode(final=True)

    def _decode(self, final: bool) -> str:
        run = self._held
        try:
            text = run.decode()
            run.clear()
            return text
        except UnicodeDecodeError:  # an invalid or incomplete character somewhere: one character at a time
            pass
        out = []
        while run:
            size = _utf8_length(run[0])
            valid = _well_formed_prefix(run[:size])
            if valid == size:
                out.append(run[:size].decode())
                del run[:size]
            elif valid == len(run) and not final:
                break  # the first bytes of a character: wait for the rest
            else:
                out.append("\ufffd")
                del run[: 1 if self._per_byte else max(valid, 1)]
        return "".join(out)


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 character that `lead` starts (1 for a byte that starts none)."""
    return 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 1


# Where the second byte of a well-formed sequence differs from 80..BF: no overlong forms, no surrogates, nothing
# past U+10FFFF (the Unicode Standard, Table 3-7).
_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _well_formed_prefix(head: bytearray) -> int:
    """How many leading bytes of `head` (at most one character long) begin a well-formed UTF-8 character."""
    lead = head[0]
    if lead < 0x80:
        return 1
    if not 0xC2 <= lead <= 0xF4:
        return 0
    valid = 1
    for byte in head[1:]:
        low, high = _SECOND_BYTE.get(lead, (0x80, 0xBF)) if valid == 1 else (0x80, 0xBF)
        if not low <= byte <= high:
            break
        valid += 1
    return valid


class _WindowText:
    """Any other `tokenizers` decoder (e.g. a Llama 2 tokenizer.json's Replace, ByteFallback, Fuse, Strip): decode a
    short window of recent ids and emit what it adds. ByteFallback turns a whole byte run into one U+FFFD per byte
    token when any of it is invalid, and skipped special tokens do not end a run, so text is emitted only after a
    token that ends one."""

    def __init__(self, backend: Backend, skip_special_tokens: bool, skip: frozenset[int]) -> None:
        self._backend, self._skip_special, self._skip = backend, skip_special_tokens, skip
        self._ids: list[int] = []  # the window: the ids emitted last time, and those since
        self._done = 0  # self._ids[: self._done] are emitted ...
        self._text = ""  # ... as this text (decoded from the window start)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        if token_id in self._skip or _BYTE_PIECE.fullmatch(self._backend.id_to_token(token_id) or ""):
            return ""
        return self.flush()  # a token that ends any byte run: all text so far is final

    def flush(self) -> str:
        decode, skip = self._backend.decode, self._skip_special
        text = decode(self._ids, skip_special_tokens=skip)
        new = text[len(self._text) :]
        # The next window starts at the ids emitted now: never inside a byte run, and decoders such as Strip and
        # Metaspace treat only the first token apart, so what later ids add to its text is what they add to all.
        self._ids = self._ids[self._done :]
        self._text, self._done = decode(self._ids, skip_special_tokens=skip), len(self._ids)
        return new


# ---- building backends --------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_backend(
    tokens: list[str], types: list[int], merges: list[str], pre: str | None, path: Path
) -> Backend:
    """Byte-level BPE from a GGUF `gpt2` vocabulary, with the pre-tokenizer `tokenizer.ggml.pre` names."""
    name = _PRE_ALIASES.get(pre, pre)
    if name not in _PRE_SPLITS:
        what = f"tokenizer.ggml.pre = {pre!r} is not supported" if pre else "tokenizer.ggml.pre is missing"
        known = ", ".join(sorted({*_PRE_SPLITS, *_PRE_ALIASES}))
        raise CheckpointError(f"{path}: {what} (known: {known}); load the model's Hugging Face directory instead")
    byte_map = _bytes_to_unicode()
    alphabet = set(byte_map.values())
    # A token written in raw UTF-8 rather than the byte alphabet is respelled so BPE can produce it.
    spelled = [t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SPLITS[name]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is mislabelled normal text: not added as special.
    control = [t for t, s, k in zip(tokens, spelled, types) if k == CONTROL and t == s]
    _add_whole_tokens(backend, control, [t for t, k in zip(tokens, types) if k == USER_DEFINED])
    return backend


def _sentencepiece_backend(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    add_prefix_space: bool,
    extra_normalizers: Sequence[normalizers.Normalizer] = (),
) -> Backend:
    """SentencePiece BPE (LLaMA, Llama 2) as a `tokenizers` BPE with byte fallback.

    SentencePiece merges the adjacent pair whose union has the best score; a BPE merge list ranked by
    that score does the same. A dummy "▁" goes before the text and, as in llama.cpp, before the text
    that follows a control or user-defined token.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    backend = Backend(
        models.BPE(vocab, _merges_from_scores(tokens, scores, types), unk_token=unk, fuse_unk=True,
                   byte_fallback=BYTE in types)
    )
    prefix = [normalizers.Prepend("▁")] if add_prefix_space else []
    steps = [*extra_normalizers, *prefix, normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if add_prefix_space else [])
    )
    control = [t for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    _add_whole_tokens(backend, control, [t for t, k in zip(tokens, types) if k == USER_DEFINED])
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a normal piece into two normal
    pieces, best-scoring result first."""
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == NORMAL}
    ranked = [
        (-scores[i], i, cut, piece[:cut], piece[cut:])
        for piece, i in normal.items()
        for cut in range(1, len(piece))
        if piece[:cut] in normal and piece[cut:] in normal
    ]
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _add_whole_tokens(backend: Backend, control: list[str], user_defined: list[str]) -> None:
    """Control and user-defined tokens are cut out of the raw text before anything else, as llama.cpp and
    Hugging Face's Llama tokenizers do (so text right after one gets its own SentencePiece "▁", like Meta's
    chat code that encodes each segment separately). Control tokens are special: skippable on decode."""
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])


def _sentencepiece_file_backend(path: Path) -> tuple[Backend, dict[str, int], SentencePieceVocab]:
    """A SentencePiece `tokenizer.model` (BPE) as a backend, plus its bos/eos/pad/unk ids and what decoding needs."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # sentencepiece's generated module needs protobuf
        raise CheckpointError(f"{path}: reading a SentencePiece model needs protobuf: pip install protobuf") from e
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from e
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != trainer.BPE:
        kind = trainer.ModelType.Name(trainer.model_type)
        raise CheckpointError(f"{path}: SentencePiece model type {kind} is not supported (LLaMA uses BPE)")
    extra: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        extra.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        extra += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    pieces, types = [p.piece for p in proto.pieces], [p.type for p in proto.pieces]
    backend = _sentencepiece_backend(
        pieces, [p.score for p in proto.pieces], types, add_prefix_space=norm.add_dummy_prefix,
        extra_normalizers=extra,
    )
    vocab = SentencePieceVocab(pieces, types, norm.add_dummy_prefix, norm.remove_extra_whitespaces)
    ids = {"bos": trainer.bos_id, "eos": trainer.eos_id, "pad": trainer.pad_id, "unk": trainer.unk_id}
    return backend, {k: i for k, i in ids.items() if 0 <= i < len(pieces)}, vocab


def _post_processor_adds(backend: Backend, bos_id: int | None) -> bool:
    """Whether a tokenizer.json's post-processor puts BOS first (Llama 3 and Llama 2 HF files do)."""
    post = json.loads(backend.to_str()).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            return first is not None and backend.token_to_id(first) == bos_id
    return False


# ---- files ------------------------------------------------------------------------------------------
def _find_sentencepiece(path: Path) -> Path | None:
    """`tokenizer.model` in `path`, or one level up for Meta's original layout (params.json, consolidated.*.pth)."""
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    meta = (path / "params.json").is_file() or any(path.glob("consolidated.*.pth"))
    return path.parent / "tokenizer.model" if meta and (path.parent / "tokenizer.model").is_file() else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _token_string(value: object) -> str | None:
    """A special token as configs write it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_hf_configs(path: Path) -> dict:
    """Special tokens, add_bos_token and chat template from tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja/.json, generation_config.json and config.json (first found wins)."""
    tok_cfg = _read_json(path / "tokenizer_config.json")
    tok_map = _read_json(path / "special_tokens_map.json")
    gen_cfg = _read_json(path / "generation_config.json")
    model_cfg = _read_json(path / "config.json")
    out: dict = {}
    for name in ("bos", "eos", "pad", "unk"):
        token = _token_string(tok_cfg.get(f"{name}_token")) or _token_string(tok_map.get(f"{name}_token"))
        if token is not None:
            out[f"{name}_token"] = token
        token_id = gen_cfg.get(f"{name}_token_id", model_cfg.get(f"{name}_token_id"))
        if isinstance(token_id, list):  # several EOS ids: the first is EOS, all stop generation
            out[f"{name}_token_ids"] = token_id
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            out[f"{name}_token_id"] = token_id
    if "add_bos_token" in tok_cfg:
        out["add_bos_token"] = bool(tok_cfg["add_bos_token"])
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template", template)
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        out["chat_template"] = template
    return out


def read_gguf_metadata(path: str | Path, prefix: str = "") -> dict[str, object]:
    """The key/value metadata of a GGUF file (keys starting with `prefix`), without its tensor directory."""
    from llamaherd.checkpoints.gguf_file import read_gguf

    return read_gguf(path, prefix=prefix, with_tensors=False).metadata
