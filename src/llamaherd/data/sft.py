"""Supervised fine-tuning data: read instruction/chat/text files, render them with a chat format, tokenize
with the loss on the assistant tokens only, truncate, split off validation and pack.

Record formats (detected per record with `data_format="auto"`):
  alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
  sharegpt  {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...], "system"?}
  messages  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]} (OpenAI)
  text      {"text": ...} records, or a whole `.txt`/`.md` file: continued pre-training, every token trained

A `Sample` is already shifted for next-token prediction: `labels[t]` is the target of `input_ids[t]`
(IGNORE_INDEX where no loss is taken), so the loss is a plain cross-entropy over (B*T, vocab) and packed
samples never predict across a boundary.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from llamaherd.chat import BuiltinChatFormat, ChatFormat, Span, get_chat_format
from llamaherd.errors import InputError
from llamaherd.terminal import printable
from llamaherd.tokenizer import Tokenizer

IGNORE_INDEX = -100
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
TEXT_SUFFIXES = (".txt", ".md")
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "system": "system",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (1-based line of its first character)."""

    file: str
    line: int
    data: Any

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Sample:
    """Token ids and shifted labels of one training row: one sample, or several after `pack`.

    lengths: the length of each packed sample in order (their sum is len(input_ids)).
    sources: "file:line" of each packed sample.
    """

    input_ids: list[int]
    labels: list[int]
    lengths: list[int]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTStats:
    """What loading did: counts, and the samples dropped because truncation left nothing to learn."""

    records: int = 0
    samples: int = 0
    truncated: int = 0  # samples cut at max_seq_len that still keep part of a response
    dropped: list[str] = field(default_factory=list)  # "file:line" of samples whose responses were cut away
    tokens: int = 0
    trained_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.records} records -> {self.samples} samples, {self.tokens} tokens "
            f"({self.trained_tokens} trained); {self.truncated} truncated, "
            f"{len(self.dropped)} dropped with no response left after truncation"
        )


@dataclass
class SFTData:
    samples: list[Sample]
    stats: SFTStats


# ---- reading ---------------------------------------------------------------------------------------------
def read_records(path: str | Path) -> Iterator[Record]:
    """Records of a JSON array, JSON Lines or plain text file, each with its line number.

    A name ending in `.gz` is gzip-compressed; the name before it says the layout (`pairs.jsonl.gz`).
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        if gz:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory; pass a data file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); convert the file to UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e}); recompress it or pass it uncompressed") from None
    suffix = Path(path.stem).suffix if gz else path.suffix
    if suffix in TEXT_SUFFIXES:
        yield Record(str(path), 1, {"text": text})
        return
    if suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_array(path, text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield Record(str(path), n, json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


def _json_array(path: Path, text: str) -> Iterator[Record]:
    """Elements of a top-level JSON array, decoded one at a time so each keeps its line number."""
    decoder = json.JSONDecoder()
    i, line, counted = text.index("[") + 1, 1, 0

    def skip_ws(j: int) -> int:
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        return j

    while True:
        i = skip_ws(i)
        if i < len(text) and text[i] == "]":
            return
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield Record(str(path), line, value)
        i = skip_ws(i)
        if i < len(text) and text[i] == ",":
            i += 1
        elif i >= len(text) or text[i] != "]":
            at = text.count("\n", 0, i) + 1
            raise InputError(f"{path}:{at}: invalid JSON (expected ',' or ']' after an array element)")


def _str_field(rec: Record, obj: Mapping[str, Any], key: str, name: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise InputError(f"{rec.where}: field {name!r} is missing")
    if not isinstance(value, str):
        raise InputError(f"{rec.where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def detect_format(rec: Record) -> str:
    """Which of alpaca / sharegpt / messages / text a record is, from its keys."""
    if not isinstance(rec.data, Mapping):
        raise InputError(f"{rec.where}: expected a JSON object per record, got {type(rec.data).__name__}")
    for key, fmt in (("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca"),
                     ("text", "text")):
        if key in rec.data:
            return fmt
    raise InputError(
        f"{rec.where}: unknown record layout (keys {sorted(rec.data)}); expected 'instruction'/'output' "
        "(alpaca), 'conversations' (sharegpt), 'messages' (OpenAI) or 'text'"
    )


def record_to_messages(rec: Record, data_format: str = "auto", accepts_input: bool = False) -> list[dict] | str:
    """A record as chat messages, or as a plain string for `text` records.

    accepts_input: keep Alpaca's `input` as its own field (the alpaca chat format has an `### Input:`
    section); otherwise it is appended to the instruction after a blank line.
    """
    fmt = detect_format(rec) if data_format == "auto" else data_format
    if fmt not in DATA_FORMATS:
        raise InputError(f"unknown data format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    d = rec.data
    if not isinstance(d, Mapping):
        raise InputError(f"{rec.where}: expected a JSON object per record, got {type(d).__name__}")
    if fmt == "text":
        return _str_field(rec, d, "text", "text")
    if fmt == "alpaca":
        return _alpaca_messages(rec, d, accepts_input)
    if fmt == "sharegpt":
        return _sharegpt_messages(rec, d)
    return _openai_messages(rec, d, "messages")


def _alpaca_messages(rec: Record, d: Mapping[str, Any], accepts_input: bool) -> list[dict]:
    instruction = _str_field(rec, d, "instruction", "instruction")
    context = _str_field(rec, d, "input", "input", required=False)
    output = _str_field(rec, d, "output", "output")
    messages: list[dict] = []
    if system := _str_field(rec, d, "system", "system", required=False):
        messages.append({"role": "system", "content": system})
    history = d.get("history") or []
    if not isinstance(history, list):
        raise InputError(f"{rec.where}: field 'history' must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InputError(f"{rec.where}: field 'history[{i}]' must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user: dict[str, str] = {"role": "user", "content": instruction}
    if accepts_input:
        user["input"] = context
    elif context:
        user["content"] = f"{instruction}\n\n{context}"
    return messages + [user, {"role": "assistant", "content": output}]


def _sharegpt_messages(rec: Record, d: Mapping[str, Any]) -> list[dict]:
    turns = d["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{rec.where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    messages: list[dict] = []
    if system := _str_field(rec, d, "system", "system", required=False):
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        name = f"conversations[{i}]"
        if not isinstance(turn, Mapping):
            raise InputError(f"{rec.where}: field {name!r} must be an object with 'from' and 'value'")
        who = _str_field(rec, turn, "from", f"{name}.from")
        if who not in SHAREGPT_ROLES:
            raise InputError(
                f"{rec.where}: field '{name}.from' is {who!r}; use one of {', '.join(sorted(SHAREGPT_ROLES))}"
            )
        messages.append({"role": SHAREGPT_ROLES[who], "content": _str_field(rec, turn, "value", f"{name}.value")})
    return messages


def _openai_messages(rec: Record, d: Mapping[str, Any], key: str) -> list[dict]:
    """The {role, content} messages of field `key` (OpenAI's layout), validated, errors naming `key[i]`."""
    turns = d[key]
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{rec.where}: field {key!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, m in enumerate(turns):
        name = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise InputError(f"{rec.where}: field {name!r} must be an object with 'role' and 'content'")
        role = _str_field(rec, m, "role", f"{name}.role")
        if role not in ("system", "user", "assistant"):
            raise InputError(f"{rec.where}: field '{name}.role' is {role!r}; use system, user or assistant")
        messages.append({"role": role, "content": _str_field(rec, m, "content", f"{name}.content")})
    return messages


# ---- rendering and tokenizing ------------------------------------------------------------------------------
def response_spans(fmt: ChatFormat, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of each assistant response + its end-of-turn.

    Built-in formats know their spans. For a Jinja template, an answer is what rendering the conversation
    up to that answer adds to the prompt that asks for it; trailing whitespace after the end-of-turn string
    (e.g. ChatML's newline) is left out, so the last trained token is the end-of-turn token. The text is the
    template's rendering of all the messages, as transformers' apply_chat_template gives it, so an opening
    assistant message (a greeting) is kept and trained too.
    """
    if isinstance(fmt, BuiltinChatFormat):
        return fmt.render_with_spans(messages)
    full = fmt.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = fmt.render(messages[:i], add_generation_prompt=True) if i else _lead_in(fmt, m)
        upto = fmt.render(messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise InputError(
                "the chat template renders earlier turns differently once later turns are added, so the "
                "assistant responses cannot be located; pass a built-in chat format instead"
            )
        spans.append((len(prompt), _end_of_turn(upto, len(prompt), fmt.stop_strings)))
    if not spans:
        raise InputError("the conversation has no assistant message: without one nothing is trained")
    return full, spans


def _lead_in(fmt: ChatFormat, message: Mapping[str, Any]) -> str:
    """What a template renders before the content of a conversation's opening assistant message.

    There is no earlier turn to render with a generation prompt, so it is the common prefix of that message
    rendered with two contents that differ in their first character.
    """
    a, b = (fmt.render([{**message, "content": c}], add_generation_prompt=False) for c in "ab")
    return os.path.commonprefix([a, b])


def _end_of_turn(text: str, start: int, stop_strings: Sequence[str]) -> int:
    """End of the response that starts at `start`: after its stop string when only whitespace follows."""
    end = len(text)
    for s in stop_strings:
        j = text.rfind(s, start)
        if j >= 0 and not text[j + len(s) :].strip():
            end = min(end, j + len(s))
    return end


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    fmt: ChatFormat,
    train_on_prompt: bool = False,
    last_response_only: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a finished conversation and, per token, whether the loss covers it.

    Trained: the tokens of each assistant response and its end-of-turn text (a token that straddles a span
    boundary counts as response), or of the last response only with `last_response_only` (a preference
    pair, whose earlier answers are prompt). The conversation is cut after the last response; EOS is
    appended (and trained) unless the last token already is a stop token (EOS or an end-of-turn token such
    as <|im_end|>). BOS is added only when the tokenizer expects one and the format did not render it.
    """
    messages = list(messages)
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing prompts have no answer to learn
    if not messages:
        raise InputError("the conversation has no assistant message: without one nothing is trained")
    text, spans = response_spans(fmt, messages)
    text = text[: spans[-1][1]]
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    learnt = spans[-1:] if last_response_only else spans
    trained = [train_on_prompt or any(s < b and e > a for a, b in learnt) for s, e in enc.offsets]
    bos = tokenizer.bos_id
    if tokenizer.add_bos_default and not fmt.includes_bos and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        trained.insert(0, False)
    if not ids or ids[-1] not in tokenizer.stop_ids:
        if tokenizer.eos_id is None:
            raise InputError("the tokenizer has no EOS token; a fine-tuned model could never learn to stop")
        ids.append(tokenizer.eos_id)
        trained.append(True)
    return ids, trained


def encode_document(text: str, tokenizer: Tokenizer) -> list[int]:
    """A plain-text document for continued pre-training: BOS if the model uses one, the text, EOS."""
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos_default)
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids


def _shifted(ids: list[int], trained: list[bool], where: str) -> Sample:
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:])]
    return Sample(ids[:-1], labels, [len(ids) - 1], [where])


def resolve_chat_format(chat_format: ChatFormat | str, tokenizer: Tokenizer) -> ChatFormat:
    """A ChatFormat from a built-in name or Jinja template, with the tokenizer's BOS/EOS strings."""
    if isinstance(chat_format, ChatFormat):
        return chat_format
    return get_chat_format(chat_format, tokenizer.bos_token or "", tokenizer.eos_token or "")


def load_sft_data(
    paths: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer,
    chat_format: ChatFormat | str,
    max_seq_len: int,
    data_format: str = "auto",
    train_on_prompt: bool = False,
    progress: bool = False,
) -> SFTData:
    """Read, render and tokenize every record; samples hold at most `max_seq_len` input tokens.

    A conversation longer than that is truncated on the right. One whose responses are cut away entirely
    is dropped, counted in `stats.dropped` and reported with a warning (it would add no loss). A text
    document longer than that is split into consecutive windows, all trained.
    """
    if data_format not in DATA_FORMATS:
        raise InputError(f"unknown data format {data_format!r}; choose one of {', '.join(DATA_FORMATS)}")
    fmt = resolve_chat_format(chat_format, tokenizer)
    accepts_input = getattr(fmt, "name", None) == "alpaca"
    stats = SFTStats()
    samples: list[Sample] = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        for rec in tqdm(read_records(path), desc=f"tokenizing {printable(Path(path).name)}", unit=" records",
                        disable=not progress):
            stats.records += 1
            content = record_to_messages(rec, data_format, accepts_input)
            if isinstance(content, str):
                samples += _document_windows(encode_document(content, tokenizer), max_seq_len, rec.where)
                continue
            try:
                ids, trained = encode_conversation(content, tokenizer, fmt, train_on_prompt)
            except InputError as e:
                raise InputError(f"{rec.where}: {e}") from None
            if len(ids) > max_seq_len + 1:
                ids, trained = ids[: max_seq_len + 1], trained[: max_seq_len + 1]
                if not any(trained[1:]):
                    stats.dropped.append(rec.where)
                    continue
                stats.truncated += 1
            samples.append(_shifted(ids, trained, rec.where))
    stats.samples = len(samples)
    stats.tokens = sum(len(s) for s in samples)
    stats.trained_tokens = sum(label != IGNORE_INDEX for s in samples for label in s.labels)
    if stats.dropped:
        shown = ", ".join(stats.dropped[:5]) + (" ..." if len(stats.dropped) > 5 else "")
        warnings.warn(
            f"{len(stats.dropped)} samples dropped: their responses start after max_seq_len={max_seq_len} "
            f"tokens ({printable(shown)}); raise max_seq_len to keep them",
            stacklevel=2,
        )
    return SFTData(samples, stats)


def _document_windows(ids: list[int], max_seq_len: int, where: str) -> list[Sample]:
    """Consecutive windows of max_seq_len + 1 tokens overlapping by one, so every token is a target once."""
    windows = (ids[i : i + max_seq_len + 1] for i in range(0, max(len(ids) - 1, 0), max_seq_len))
    return [_shifted(w, [True] * len(w), where) for w in windows]


# ---- splitting, packing, batching ---------------------------------------------------------------------------
def split_validation(
    samples: Sequence[T], val_fraction: float = 0.05, seed: int = 0, val_size: int | None = None
) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded random choice of `val_size` (or `val_fraction`, at least one) samples.

    Both keep the input order; split before packing so no validation sample shares a row with training.
    """
    n = len(samples)
    if val_size is None:
        val_size = max(1, round(n * val_fraction)) if val_fraction > 0 and n > 1 else 0
    if not 0 <= val_size < max(n, 1):
        raise InputError(f"validation size {val_size} leaves no training samples out of {n}")
    chosen = set(random.Random(seed).sample(range(n), val_size))
    train = [s for i, s in enumerate(samples) if i not in chosen]
    return train, [s for i, s in enumerate(samples) if i in chosen]


def pack(samples: Sequence[Sample], max_seq_len: int) -> list[Sample]:
    """Concatenate consecutive samples into rows of at most `max_seq_len` tokens (in order, first fit).

    The rows keep each sample's length, so `collate` gives positions that restart at every sample and a
    block-diagonal causal mask: packed samples never attend to one another.
    """
    rows: list[Sample] = []
    for s in samples:
        if len(s) > max_seq_len:
            raise InputError(f"{s.sources[0]}: sample of {len(s)} tokens is longer than max_seq_len={max_seq_len}")
        if rows and len(rows[-1]) + len(s) <= max_seq_len:
            rows[-1] = concatenate([rows[-1], s])
        else:
            rows.append(s)
    return rows


def concatenate(samples: Sequence[Sample]) -> Sample:
    """One row holding `samples` one after another (each keeps its own length, hence its own positions)."""
    return Sample([t for s in samples for t in s.input_ids], [t for s in samples for t in s.labels],
                  [n for s in samples for n in s.lengths], [w for s in samples for w in s.sources])


def collate(batch: Sequence[Sample], pad_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded tensors (B, T): input_ids, labels (IGNORE_INDEX on padding), positions, segment_ids.

    positions restart at 0 for every packed sample; segment_ids number the samples of a row from 1
    (0 = padding). Pass both to `GPT.forward` so packed samples do not attend to each other.
    padding_free: put the whole batch in one row (B = 1) instead, so no compute is spent on padding; the
    segments keep the samples apart, so a sum of per-token losses is the same as padded.
    """
    if padding_free and len(batch) > 1:
        batch = [concatenate(batch)]
    T = max(len(s) for s in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(T).repeat(len(batch), 1)
    segment_ids = torch.zeros(len(batch), T, dtype=torch.long)
    for b, s in enumerate(batch):
        input_ids[b, : len(s)] = torch.tensor(s.input_ids)
        labels[b, : len(s)] = torch.tensor(s.labels)
        start = 0
        for k, n in enumerate(s.lengths, 1):
            positions[b, start : start + n] = torch.arange(n)
            segment_ids[b, start : start + n] = k
            start += n
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "segment_ids": segment_ids}
