"""One tokenizer for every checkpoint kind: HF `tokenizer.json`, SentencePiece `tokenizer.model`, GGUF vocabularies.

Every source is turned into a `tokenizers.Tokenizer` (the Rust engine behind Hugging Face's fast
tokenizers), so encoding, decoding and `save_pretrained` behave the same whatever the model came from.
BOS is never implied: `encode(text, add_bos=...)` is an explicit choice, and `add_bos_default` says what
the model was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
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
    ) -> None:
        self.backend = backend
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
        from_json = (path / "tokenizer.json").is_file()
        if from_json:
            try:
                backend = Backend.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the Rust library raises a bare Exception
                raise CheckpointError(f"{path / 'tokenizer.json'}: not a valid tokenizer.json ({e})") from e
        elif (spm := _find_sentencepiece(path)) is not None:
            backend, spm_ids = _sentencepiece_file_backend(spm)
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
            add_bos_default=add_bos,
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
        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre")
            backend = _byte_level_backend(tokens, types, meta.get("tokenizer.ggml.merges", []), pre, path)
            add_bos_default = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
            backend = _sentencepiece_backend(tokens, scores, types, add_prefix_space=prefix)
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
        )

    # ---- encoding and decoding ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. a rendered chat template) become their ids.

        BOS/EOS are added only when asked, and never doubled: text that already starts with the BOS
        string (or ends with the EOS string) gets no second one.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
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
        """Text of `ids` (ints, or a 1-D tensor/array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special_tokens)

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

    `push` returns only completed text: never half of a multi-byte character (a byte-level or
    byte-fallback token can end mid-character). The pieces from `push` and `flush` join to exactly
    `tokenizer.decode(all ids)`. Each step decodes a short window of recent ids, not the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # window start: text before it is final
        self._done = 0  # ids[_start:_done] were already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        window = self._ids[self._start :]
        seen = self._tokenizer.decode(window[: self._done - self._start], self._skip)
        text = self._tokenizer.decode(window, self._skip)
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self._start, self._done = self._done, len(self._ids)
        return text[len(seen) :]


# ---- building backends --------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


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


def _sentencepiece_file_backend(path: Path) -> tuple[Backend, dict[str, int]]:
    """A SentencePiece `tokenizer.model` (BPE) as a backend, plus its bos/eos/pad/unk ids."""
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
    pieces = proto.pieces
    backend = _sentencepiece_backend(
        [p.piece for p in pieces], [p.score for p in pieces], [p.type for p in pieces],
        add_prefix_space=norm.add_dummy_prefix, extra_normalizers=extra,
    )
    ids = {"bos": trainer.bos_id, "eos": trainer.eos_id, "pad": trainer.pad_id, "unk": trainer.unk_id}
    return backend, {k: i for k, i in ids.items() if 0 <= i < len(pieces)}


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
