"""Preference pairs for reward models and DPO: read the common layouts, render prompt and answers with the
model's chat format, tokenize with the prompt tokens shared by both answers, truncate, split and batch.

Record layouts (detected per record; a JSON array or JSON Lines file, `.gz` allowed):
  prompt          {"prompt", "chosen", "rejected", "system"?}: the prompt a string (one user message) or a list of
                  {role, content} messages; each answer a string, one {role: assistant, content} message or a list
                  holding one (TRL's explicit-prompt layout)
  hh-rlhf         {"chosen", "rejected"}: two whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts (HH-RLHF)
  messages        {"chosen", "rejected"}: two whole lists of {role, content} messages (TRL's implicit-prompt layout)
  llama-factory   {"conversations": [{from, value}, ...], "chosen": {from, value}, "rejected": {from, value},
                  "system"?} (LLaMA-Factory's ShareGPT-style pairs, e.g. its data/dpo_en_demo.json)
Each may carry a `margin` (a number >= 0) or a `rating` (a label mapped to a margin through `margin_table`).

Where a transcript splits (hh-rlhf, messages): both sides are parsed into messages (HH-RLHF: consecutive turns of
one speaker merged, see _hh_messages); the prompt is everything before each side's final assistant message and must
be the same on both sides: the common prefix up to the last assistant turn both share. On HH-RLHF that is the split
of TRL's examples/datasets/hh-rlhf-helpful-base.py (the common characters, cut back to their last "\\n\\nAssistant: ")
and of the DPO authors' loader (eric-mitchell/direct-preference-optimization, preference_datasets.py: both sides cut
after the chosen side's last "\\n\\nAssistant:") wherever the two agree. A pair whose sides differ before their
final assistant turn is dropped and counted as "diverged".
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llamaherd.chat import ChatFormat
from llamaherd.data.sft import (
    SHAREGPT_ROLES,
    Record,
    _openai_messages,
    _sharegpt_messages,
    _str_field,
    encode_conversation,
    read_records,
    resolve_chat_format,
    split_validation,
)
from llamaherd.errors import InputError
from llamaherd.terminal import printable
from llamaherd.tokenizer import Tokenizer

TRUNCATIONS = ("keep_end", "none")

# Llama 2 (Touvron et al. 2023), appendix A.3.3, Table 27: the margin m(r) of the ranking loss
# -log(sigmoid(r_chosen - r_rejected - m(r))) per preference rating, in the paper's two variants. "Margin small"
# has the best average accuracy in Table 28 (63.0 vs 62.9 large, 62.5 without), hence the default.
MARGIN_TABLES: dict[str, dict[str, float]] = {
    "llama2-small": {"significantly better": 1.0, "better": 2 / 3, "slightly better": 1 / 3,
                     "negligibly better or unsure": 0.0},
    "llama2-large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
                     "negligibly better or unsure": 0.0},
}
DEFAULT_MARGIN_TABLE = "llama2-small"

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """One comparison, rendered and tokenized.

    prompt_ids: the conversation up to the answer, rendered with the chat format (BOS once, if the model uses
        one); identical for both answers. chosen_ids / rejected_ids: each answer's tokens and its end-of-turn
        or EOS (the model learns to stop), so prompt_ids + chosen_ids is the tokenization of the whole rendered
        conversation. A token that spans the prompt's end belongs to the answer.
    margin: how much better the chosen answer is (0 without a margin or rating). source: "file:line".
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    source: str = ""


@dataclass
class PairMessages:
    """One record as chat messages: the shared prompt and the two final assistant messages."""

    prompt: list[dict]
    chosen: dict
    rejected: dict
    margin: float
    layout: str


@dataclass
class PreferenceStats:
    """What loading did: records read per layout, pairs kept, pairs whose prompt or answers were cut to max_seq_len,
    and pairs dropped per reason, with the "file:line" of the first five of each reason. The reasons:
      identical                    chosen and rejected answers tokenize identically
      identical_after_truncation   the answers are identical once cut to max_seq_len
      no_room                      the prompt leaves no token for an answer (truncation="none")
      diverged                     two transcripts that differ before their final assistant turn
      empty                        an empty answer, with skip_empty (otherwise an error)
    """

    records: int = 0
    pairs: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0
    layouts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str) -> None:
        """Count one pair dropped for `reason`."""
        self.dropped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(where)

    def summary(self) -> str:
        """One line for logs: records per layout -> pairs; drops per reason; truncated."""
        layouts = ", ".join(f"{name} {n}" for name, n in self.layouts.most_common())
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"
        return (f"{self.records} records ({layouts or 'none'}) -> {self.pairs} pairs; dropped: {dropped}; "
                f"{self.truncated} truncated")


# ---- records to messages ----------------------------------------------------------------------------------
def detect_layout(rec: Record) -> str:
    """Which layout (prompt, hh-rlhf, messages, llama-factory) a record is, from its keys and its answers' type."""
    d = rec.data
    if not isinstance(d, Mapping):
        raise InputError(f"{rec.where}: expected a JSON object per record, got {type(d).__name__}")
    for key in ("chosen", "rejected"):
        if key not in d:
            raise InputError(
                f"{rec.where}: field {key!r} is missing (keys {sorted(d)}); a preference pair needs 'chosen' and "
                "'rejected', with a 'prompt' or 'conversations' field or as two whole HH-RLHF transcripts"
            )
    if "conversations" in d:
        return "llama-factory"
    if "prompt" in d:
        return "prompt"
    return "hh-rlhf" if isinstance(d["chosen"], str) else "messages"


def pair_messages(rec: Record, margin_table: Mapping[str, float] | str | None = None) -> PairMessages | None:
    """A record as a shared prompt and two final assistant messages, or None for a transcript pair whose sides
    differ before their final assistant turn ("diverged"). Bad fields raise a one-line InputError."""
    layout = detect_layout(rec)
    d = rec.data
    if layout in ("hh-rlhf", "messages"):
        if layout == "hh-rlhf":
            sides = [_hh_messages(rec, d[key], key) for key in ("chosen", "rejected")]
        else:
            sides = [_openai_messages(rec, d, key) for key in ("chosen", "rejected")]
        for key, msgs in zip(("chosen", "rejected"), sides):
            if msgs[-1]["role"] != "assistant":
                raise InputError(f"{rec.where}: field {key!r} ends with a {msgs[-1]['role']} turn; a transcript "
                                 "must end with the assistant's answer")
        (*prompt, chosen), (*other, rejected) = sides
        if prompt != other:
            return None
    elif layout == "prompt":
        prompt = _prompt_messages(rec, d)
        chosen, rejected = (_answer(rec, d[key], key) for key in ("chosen", "rejected"))
    else:
        prompt = _sharegpt_messages(rec, d)
        chosen, rejected = (_answer(rec, d[key], key) for key in ("chosen", "rejected"))
    if not prompt or prompt[-1]["role"] != "user":
        field_name = {"llama-factory": "conversations", "prompt": "prompt"}.get(layout, "chosen")
        raise InputError(f"{rec.where}: field {field_name!r}: the prompt must end with a user message (the answers "
                         "reply to it)")
    return PairMessages(prompt, chosen, rejected, _margin(rec, d, margin_table), layout)


def _hh_messages(rec: Record, text: Any, key: str) -> list[dict]:
    """A "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as messages, contents stripped of surrounding spaces.

    Consecutive turns of one speaker become one message, joined by a blank line: HH-RLHF has such turns where an
    answer wrote "Human: ..." inline and the next "\\n\\nAssistant:" followed (harmless-base test rows 668, 764),
    and the alternating chat formats (llama-2, vicuna, ...) need one message per turn.
    """
    if not isinstance(text, str):
        raise InputError(f"{rec.where}: field {key!r} must be a string (an HH-RLHF transcript), got "
                         f"{type(text).__name__}")
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3 or "Assistant" not in parts[1::2]:
        raise InputError(
            f"{rec.where}: field {key!r} is not an HH-RLHF transcript ('\\n\\nHuman: ...\\n\\nAssistant: ...'); "
            "write the dialogue that way, or give the prompt in a 'prompt' field"
        )
    messages: list[dict] = []
    for who, said in zip(parts[1::2], parts[2::2]):
        if messages and messages[-1]["role"] == _HH_ROLES[who]:
            messages[-1]["content"] = "\n\n".join(filter(None, (messages[-1]["content"], said.strip())))
        else:
            messages.append({"role": _HH_ROLES[who], "content": said.strip()})
    return messages


def _prompt_messages(rec: Record, d: Mapping[str, Any]) -> list[dict]:
    """The `prompt` field (a string or messages) with the optional `system` field in front."""
    system = _str_field(rec, d, "system", "system", required=False)
    if isinstance(d["prompt"], str):
        if not d["prompt"].strip():
            raise InputError(f"{rec.where}: field 'prompt' is empty; write the user's request there")
        prompt = [{"role": "user", "content": d["prompt"]}]
    elif isinstance(d["prompt"], list):
        prompt = _openai_messages(rec, d, "prompt")
    else:
        raise InputError(f"{rec.where}: field 'prompt' must be a string or a list of {{role, content}} messages, "
                         f"got {type(d['prompt']).__name__}")
    if system and prompt[0]["role"] == "system":
        raise InputError(f"{rec.where}: field 'system' is given and 'prompt' opens with a system message too; "
                         "keep one of them")
    return [{"role": "system", "content": system}, *prompt] if system else prompt


def _answer(rec: Record, value: Any, key: str) -> dict:
    """One assistant message from a string, a {role, content} or {from, value} object, or a list of one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if len(value) != 1:
            raise InputError(f"{rec.where}: field {key!r} must hold one assistant message, got {len(value)}; "
                             "put earlier turns in the prompt")
        value, key = value[0], f"{key}[0]"
    if not isinstance(value, Mapping):
        raise InputError(f"{rec.where}: field {key!r} must be a string or an assistant message, got "
                         f"{type(value).__name__}")
    if "from" in value:
        who = _str_field(rec, value, "from", f"{key}.from")
        role, content = SHAREGPT_ROLES.get(who), _str_field(rec, value, "value", f"{key}.value")
    else:
        who = role = _str_field(rec, value, "role", f"{key}.role")
        content = _str_field(rec, value, "content", f"{key}.content")
    if role != "assistant":
        raise InputError(f"{rec.where}: field {key!r} is a message from {who!r}; an answer comes from the assistant")
    return {"role": "assistant", "content": content}


def _rating_key(label: str) -> str:
    """Ratings compare case- and space-insensitively, "/" reading as "or": "Negligibly Better / Unsure"."""
    return " ".join(label.lower().replace("/", " or ").split())


def resolve_margin_table(table: Mapping[str, float] | str | None) -> dict[str, float]:
    """The rating -> margin table: a name in MARGIN_TABLES (None: the default), or a mapping checked here."""
    if table is None or isinstance(table, str):
        name = table or DEFAULT_MARGIN_TABLE
        if name not in MARGIN_TABLES:
            raise InputError(f"unknown margin table {name!r}; use one of {', '.join(MARGIN_TABLES)} or a mapping "
                             "from rating to margin")
        return MARGIN_TABLES[name]
    out = {}
    for label, value in table.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InputError(f"margin table: the margin of {label!r} is {value!r}; use a finite number >= 0")
        out[_rating_key(str(label))] = float(value)
    return out


def _margin(rec: Record, d: Mapping[str, Any], table: Mapping[str, float] | str | None) -> float:
    """The record's `margin`, or its `rating` through the margin table, or 0."""
    if "margin" in d and "rating" in d:
        raise InputError(f"{rec.where}: fields 'margin' and 'rating' are both given; keep one")
    if "margin" in d:
        m = d["margin"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            raise InputError(f"{rec.where}: field 'margin' must be a finite number, got {m!r}")
        if m < 0:
            raise InputError(f"{rec.where}: field 'margin' is {m}; a margin is >= 0 (swap 'chosen' and 'rejected' "
                             "if the rejected answer is the better one)")
        return float(m)
    if "rating" in d:
        table = resolve_margin_table(table)
        rating = _str_field(rec, d, "rating", "rating")
        if _rating_key(rating) not in table:
            raise InputError(f"{rec.where}: field 'rating' is {rating!r}; use one of {', '.join(map(repr, table))} "
                             "or add it to the margin table")
        return table[_rating_key(rating)]
    return 0.0


# ---- tokenizing ---------------------------------------------------------------------------------------------
def _encode(messages: list[dict], tokenizer: Tokenizer, fmt: ChatFormat) -> tuple[list[int], int]:
    """The ids of a whole conversation and the index of its final answer's first token."""
    ids, trained = encode_conversation(messages, tokenizer, fmt, last_response_only=True)
    return ids, trained.index(True)


def encode_pair(pm: PairMessages, tokenizer: Tokenizer, fmt: ChatFormat, source: str = "") -> PreferencePair:
    """Both conversations tokenized whole; the prompt is their shared leading tokens (untruncated).

    A chat template that renders the prompt differently once an answer follows is refused (InputError, from
    sft.response_spans). Where a token merges the prompt's last characters with an answer's first, the prompt
    stops before it on both sides, so prompt_ids + answer_ids still is each conversation's own tokenization.
    """
    ids_c, start_c = _encode([*pm.prompt, pm.chosen], tokenizer, fmt)
    ids_r, start_r = _encode([*pm.prompt, pm.rejected], tokenizer, fmt)
    n = 0
    while n < min(start_c, start_r) and ids_c[n] == ids_r[n]:
        n += 1
    return PreferencePair(ids_c[:n], ids_c[n:], ids_r[n:], pm.margin, source)


def truncate_pair(
    pair: PreferencePair, max_seq_len: int, truncation: str = "keep_end", min_prompt_len: int | None = None,
    bos_id: int | None = None,
) -> tuple[PreferencePair | None, bool]:
    """(the pair fitted to max_seq_len tokens per sequence or None when the prompt leaves no room, whether it was cut).

    When prompt + the longer answer exceed max_seq_len: with "keep_end" the prompt loses tokens on the left (a
    leading BOS stays), only as many as the longer answer needs, and keeps at least min_prompt_len tokens
    (default max_seq_len // 4, the 128 of 512 of the DPO authors' loader, whose "keep_end" this is); with "none"
    the prompt stays whole. Answers are then cut on the right to the room left (losing their EOS).
    """
    P, A = len(pair.prompt_ids), max(len(pair.chosen_ids), len(pair.rejected_ids))
    if P + A <= max_seq_len:
        return pair, False
    prompt = pair.prompt_ids
    if truncation == "keep_end":
        floor = max_seq_len // 4 if min_prompt_len is None else min_prompt_len
        keep = max(max_seq_len - A, min(P, floor), 1)
        if keep < P:
            head = prompt[:1] if bos_id is not None and prompt[0] == bos_id and keep > 1 else []
            prompt = head + prompt[P - keep + len(head) :]
    room = max_seq_len - len(prompt)
    if room < 1:
        return None, True
    return PreferencePair(prompt, pair.chosen_ids[:room], pair.rejected_ids[:room], pair.margin, pair.source), True


def load_preference_data(
    path: str | Path | Sequence[str | Path],
    tokenizer: Tokenizer,
    chat_format: ChatFormat | str,
    max_seq_len: int,
    margin_table: Mapping[str, float] | str | None = None,
    truncation: str = "keep_end",
    min_prompt_len: int | None = None,
    skip_empty: bool = False,
    progress: bool = False,
) -> tuple[list[PreferencePair], PreferenceStats]:
    """Read, render and tokenize every pair; each sequence (prompt + answer) holds at most max_seq_len tokens.

    Dropped and counted (a warning names the first rows): identical answers, answers identical after truncation,
    a prompt that leaves no room for an answer, transcripts that diverge before their final assistant turn.
    An empty (or all-whitespace) answer is an error naming the row, or dropped and counted with skip_empty.
    Truncation: see truncate_pair. margin_table: see MARGIN_TABLES and resolve_margin_table.
    """
    if truncation not in TRUNCATIONS:
        raise InputError(f"unknown truncation {truncation!r}; use one of {', '.join(TRUNCATIONS)}")
    if max_seq_len < 2:
        raise InputError(f"max_seq_len={max_seq_len} leaves no room for a prompt and an answer; use 2 or more")
    if min_prompt_len is not None and not 1 <= min_prompt_len < max_seq_len:
        raise InputError(f"min_prompt_len={min_prompt_len} must be between 1 and max_seq_len - 1 = {max_seq_len - 1}")
    table = resolve_margin_table(margin_table)
    fmt = resolve_chat_format(chat_format, tokenizer)
    stats, pairs = PreferenceStats(), []
    for p in [path] if isinstance(path, str | Path) else path:
        for rec in tqdm(read_records(p), desc=f"tokenizing {printable(Path(p).name)}", unit=" pairs",
                        disable=not progress):
            stats.records += 1
            stats.layouts[detect_layout(rec)] += 1
            pm = pair_messages(rec, table)
            if pm is None:
                stats.drop("diverged", rec.where)
                continue
            empty = [key for key in ("chosen", "rejected") if not getattr(pm, key)["content"].strip()]
            if empty and skip_empty:
                stats.drop("empty", rec.where)
                continue
            if empty:
                raise InputError(f"{rec.where}: field {empty[0]!r}: the answer is empty; write it, remove the row, "
                                 "or pass skip_empty (--skip-empty) to drop such pairs")
            try:
                pair = encode_pair(pm, tokenizer, fmt, rec.where)
            except InputError as e:
                raise InputError(f"{rec.where}: {e}") from None
            if pair.chosen_ids == pair.rejected_ids:
                stats.drop("identical", rec.where)
                continue
            fitted, cut = truncate_pair(pair, max_seq_len, truncation, min_prompt_len, tokenizer.bos_id)
            if fitted is None:
                stats.drop("no_room", rec.where)
            elif fitted.chosen_ids == fitted.rejected_ids:
                stats.drop("identical_after_truncation", rec.where)
            else:
                stats.truncated += cut
                pairs.append(fitted)
    stats.pairs = len(pairs)
    if stats.records == 0:
        raise InputError(f"{printable(path)}: no records; a preference file holds one pair per line or a JSON array")
    if stats.dropped:
        shown = "; ".join(f"{r}: {', '.join(w)}" for r, w in stats.examples.items())
        warnings.warn(f"{stats.summary()} at max_seq_len={max_seq_len} (first rows dropped: {printable(shown)})",
                      stacklevel=2)
    if not pairs:
        raise InputError(f"{printable(path)}: no preference pairs left: {stats.summary()}")
    return pairs, stats


# ---- splitting and batching ---------------------------------------------------------------------------------
def split_pairs(
    pairs: Sequence[PreferencePair], val_fraction: float, seed: int, val_size: int | None = None
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): a seeded random choice of val_size (or val_fraction, at least one) pairs, both in input
    order, by the rule of sft.split_validation."""
    return split_validation(pairs, val_fraction, seed, val_size)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of B pairs as 2B right-padded rows: chosen_0..chosen_{B-1}, then rejected_0..rejected_{B-1}.

    input_ids (2B, T) long: prompt + answer, padded with pad_id. attention_mask (2B, T) bool: real tokens.
    response_mask (2B, T) bool: True on the answer's own tokens (labels convention, as TRL's completion_mask):
        token t is scored by the log-prob that position t-1 gives it, i.e. log_softmax(logits[:, :-1]) gathered
        at input_ids[:, 1:] and weighted by response_mask[:, 1:]. Position 0 is never an answer token.
    last_index (2B,) long: the index of each row's last real token, where a reward model reads its score.
    margin (B,) float32.
    """
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    response_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = True
        response_mask[i, start : len(row)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "last_index": torch.tensor([len(r) - 1 for r in rows], dtype=torch.long),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
    }


def collate_shared_pairs(pairs: Sequence[PreferencePair], pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of B pairs as one row without padding, each pair as prompt (P) | chosen (C) | rejected (R), so each
    prompt runs once and nothing is spent on padding: the rejected tokens see their prompt and each other, not the
    chosen ones, and their positions restart at P.

    input_ids (1, T) long; positions (1, T) long; spans (2B, 4) long, per pair its chosen then its rejected answer
    as [start, end, context start, context end] (no context: -1), the attention segments of `model.Spans.from_table`
    (the chosen segment starts at the prompt); offsets (B,) long, where each pair starts; prompt_lengths,
    chosen_lengths, rejected_lengths (B,) long: pair b's chosen answer ends at offsets + P + C - 1, its rejected
    one at offsets + P + C + R - 1; margin (B,). pad_id is unused (there is no padding), as in `collate_pairs`'s
    signature.
    """
    ids: list[int] = []
    positions: list[int] = []
    spans, offsets = [], []
    for p in pairs:
        o, P, C, R = len(ids), len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids += [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids]
        positions += [*range(P + C), *range(P, P + R)]
        spans += [[o, o + P + C, -1, -1], [o + P + C, o + P + C + R, o, o + P]]
        offsets.append(o)
    return {
        "input_ids": torch.tensor([ids]),
        "positions": torch.tensor([positions]),
        "spans": torch.tensor(spans),
        "offsets": torch.tensor(offsets),
        "prompt_lengths": torch.tensor([len(p.prompt_ids) for p in pairs]),
        "chosen_lengths": torch.tensor([len(p.chosen_ids) for p in pairs]),
        "rejected_lengths": torch.tensor([len(p.rejected_ids) for p in pairs]),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
    }
