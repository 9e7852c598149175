"""Reward model (InstructGPT, Ouyang et al. 2022; Llama 2, Touvron et al. 2023, section 3.2.2): the decoder with a
scalar `score` head, trained on preference pairs with the ranking loss -log σ(r_chosen − r_rejected − margin).

A sequence's reward is the head's output at its last real token. That token is found from the attention mask,
not from the pad id (transformers' rule, which reads the token before a trailing EOS when pad == eos), and
positions count real tokens only, so a score never moves with left or right padding or with the batch size.
The result is written in Hugging Face's sequence-classification layout (`LlamaForSequenceClassification` /
`FalconForSequenceClassification`, one label), which `transformers` opens and scores the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamaherd.chat import ChatFormat
from llamaherd.errors import CheckpointError, InputError
from llamaherd.files import atomic_write
from llamaherd.load import Loaded
from llamaherd.model import GPT, Linear, Spans
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Batch, LossOutput, Objective
from llamaherd.train.run import Log, Recipe, merged_state, preference_datasets, prepare_model, run_training

SCORE_INIT_STD = 0.02  # transformers' default initializer_range: how a new *ForSequenceClassification head starts
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "falcon": "FalconForSequenceClassification"}


# ---- the model ------------------------------------------------------------------------------------------------
def add_score_head(model: GPT) -> GPT:
    """Give the decoder its reward head, in place (returns `model`): `score`, Linear(n_embd, 1, bias=False) as in
    LlamaForSequenceClassification, drawn from N(0, 0.02²) as transformers initialises it (left empty on the
    meta device, where the loader fills it). An lm_head module is dropped: a sequence classifier has none."""
    ref = model.model.embed_tokens.weight
    model.score = Linear(model.config.n_embd, 1, bias=False, device=ref.device, dtype=ref.dtype)
    if ref.device.type != "meta":
        nn.init.normal_(model.score.weight, std=SCORE_INIT_STD)
    if "lm_head" in model._modules:  # untied, or an int8 copy of a tied embedding
        del model.lm_head
    return model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token in a (B, T) mask (True / 1 on real tokens; either padding side)."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.flip(-1).int().argmax(-1)


def sequence_rewards(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     padding_free: bool = True) -> torch.Tensor:
    """Rewards (B,) in fp32 of the B sequences of input_ids (B, T), read at each row's last real token.

    attention_mask (B, T): True on real tokens, the padding on either side; positions count real tokens only.
    padding_free: run the real tokens as one row, each sequence attending to itself only (no work on padding),
    rather than the padded batch; the two agree to rounding. Raises InputError for a row without tokens.
    """
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    if not bool((lengths > 0).all()):
        raise InputError("a sequence without tokens has no reward; drop empty rows")
    if padding_free:
        positions = (mask.cumsum(-1) - 1)[mask]  # each row's real tokens in order, row after row
        segments = torch.repeat_interleave(torch.arange(1, len(mask) + 1, device=mask.device), lengths)
        h = model(input_ids[mask][None], positions=positions[None], segment_ids=segments[None], return_hidden=True)
        last = h[0, lengths.cumsum(0) - 1]  # (B, n_embd)
    else:
        h = model(input_ids, attn_mask=mask, return_hidden=True)  # (B, T, n_embd)
        last = h[torch.arange(len(mask), device=mask.device), last_token_index(mask)]
    return model.score(last).squeeze(-1).float()


def shared_prompt_rewards(model: GPT, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards (B,) in fp32 of a `collate_shared_pairs` batch: the pairs in one row, prompt |
    chosen | rejected, the prompt run once; each reward read at its answer's last token."""
    h = model(batch["input_ids"], positions=batch["positions"], attn_mask=Spans.from_table(batch["spans"]),
              return_hidden=True)[0]
    chosen_end = batch["offsets"] + batch["prompt_lengths"] + batch["chosen_lengths"] - 1
    last = torch.cat([h[chosen_end], h[chosen_end + batch["rejected_lengths"]]])  # (2B, n_embd)
    return model.score(last).squeeze(-1).float().chunk(2)


class RewardObjective(Objective):
    """The ranking loss over B pairs, summed per pair: -log σ(r_c − r_r − margin), plus
    center_rewards_coefficient · (r_c + r_r)² when set (TRL's RewardTrainer). A batch is either layout of the
    data module: `collate_shared_pairs` (one unpadded row, each prompt run once) or `collate_pairs` (the chosen
    rows, then the rejected rows; run padding-free unless padding_free is False). Both give the same rewards.

    Metrics per pair, named as TRL's RewardTrainer logs them: accuracy (r_c > r_r), margin (r_c − r_r, the
    reward gap, not the pair's label margin) and mean_reward ((r_c + r_r) / 2).
    """

    loss_label = "ranking loss -log σ(r_chosen - r_rejected - m) (nats/pair)"

    def __init__(self, model: GPT, center_rewards_coefficient: float | None = None, padding_free: bool = True) -> None:
        super().__init__(model)
        self.center, self.padding_free = center_rewards_coefficient, padding_free

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["margin"].shape[0])

    def n_tokens(self, batch: Batch) -> int:
        if "spans" in batch:
            return batch["input_ids"].numel()
        return super().n_tokens(batch)

    def forward(self, batch: Batch) -> LossOutput:
        if "spans" in batch:
            chosen, rejected = shared_prompt_rewards(self.model, batch)
        else:
            rewards = sequence_rewards(self.model, batch["input_ids"], batch["attention_mask"], self.padding_free)
            chosen, rejected = rewards.chunk(2)
        gap = chosen - rejected
        loss = -F.logsigmoid(gap - batch["margin"].float())
        if self.center:
            loss = loss + self.center * (chosen + rejected) ** 2
        metrics = {"accuracy": (gap > 0).float().sum(), "margin": gap.detach().sum(),
                   "mean_reward": (chosen + rejected).detach().sum() / 2}
        return LossOutput(loss.sum(), metrics)


# ---- Hugging Face layout --------------------------------------------------------------------------------------
def export_pad_id(tokenizer: Any) -> int | None:
    """The pad id to write with a reward model: transformers scores a batch at each row's last token that is not
    the pad, so the pad must never end a real sequence. The tokenizer's own pad unless it is a stop token (pad ==
    eos, as SmolLM2's), else its unknown token, else another special token that neither starts nor stops a
    sequence; None when there is none (then transformers reads the token before a final EOS: a warning says so)."""
    stops = tokenizer.stop_ids
    if tokenizer.pad_id is not None and tokenizer.pad_id not in stops:
        return tokenizer.pad_id
    candidates = [tokenizer.unk_id] + sorted(tokenizer.special_ids)
    return next((i for i in candidates if i is not None and i not in stops and i != tokenizer.bos_id), None)


def save_reward_model(state: dict[str, torch.Tensor], config: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a reward model as transformers' sequence-classification checkpoint: the decoder and `score.weight`
    (no lm_head), config.json with architectures [Llama|Falcon]ForSequenceClassification, one label and a
    pad_token_id (`export_pad_id`), and the tokenizer with that pad token. Returns the directory."""
    from llamaherd.checkpoints.hf import save_hf

    pad = export_pad_id(tokenizer)
    if pad is None:
        warnings.warn("the tokenizer has no token to pad with that never ends a sequence: transformers will read "
                      "rewards at the token before a final EOS (llamaherd reads them at the EOS)", stacklevel=2)
        pad = tokenizer.eos_id
    overrides = {"architectures": [ARCHITECTURES[config.family]], "id2label": {"0": "LABEL_0"},
                 "label2id": {"LABEL_0": 0}, "pad_token_id": pad}
    state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    out = save_hf(state, config, out_dir, config_overrides=overrides)
    with_pad = copy.copy(tokenizer)
    with_pad.pad_id = pad
    with_pad.save_pretrained(out)
    return out


def reward_head_labels(path: Path) -> int | None:
    """The number of outputs of a Hugging Face sequence-classification checkpoint's head (its id2label entries,
    else num_labels, else transformers' default 2), or None when config.json names no *ForSequenceClassification."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    if not isinstance(archs, list) or not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    labels = cfg.get("id2label")
    return len(labels) if isinstance(labels, dict) else cfg.get("num_labels", 2)


def load_reward_model(source: str | Path, dtype: torch.dtype | str = torch.float32, device: str = "cpu",
                      quantize: str | None = None) -> Loaded:
    """A reward model in Hugging Face sequence-classification layout (as `herd reward` writes it, or from
    transformers), with its tokenizer and the chat format it was trained with (its run's lineage.json, else the
    tokenizer's template); in eval mode.

    Raises CheckpointError when the checkpoint is not a sequence classifier or its head has more than one output
    (num_labels != 1).
    """
    from llamaherd.load import (
        DTYPES,
        build_on_meta,
        iter_tensors,
        load_weights,
        read_config,
        resolve,
        tokenizer_path,
        trained_as,
    )
    from llamaherd.tokenizer import Tokenizer

    src = resolve(source)
    labels = reward_head_labels(src.path) if src.format == "hf" else None
    if labels is None:
        raise CheckpointError(f"{src.path}: not a reward model (config.json names no *ForSequenceClassification "
                              "architecture); train one with `herd reward MODEL --data PAIRS`")
    if labels != 1:
        raise CheckpointError(f"{src.path / 'config.json'}: the score head has {labels} outputs (num_labels "
                              f"{labels}); a reward model has one: use a checkpoint saved with num_labels=1")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    config = read_config(src)
    model = add_score_head(build_on_meta(config, quantize))
    load_weights(model, iter_tensors(src, config), dtype, str(src.path))
    tokenizer = Tokenizer.from_path(tokenizer_path(src))
    name, trained_format = trained_as(src.path)
    return Loaded(model.to(device).eval(), tokenizer, src if name is None else dataclasses.replace(src, name=name),
                  trained_format or tokenizer.chat_template or config.chat_format)


# ---- scoring --------------------------------------------------------------------------------------------------
def encode_scored(prompt: str | Sequence[dict], response: str, tokenizer: Any, fmt: ChatFormat,
                  max_seq_len: int | None = None) -> list[int]:
    """The ids a reward model scores for one response: the conversation rendered and tokenized as a training pair
    is (prompt_ids + answer_ids, see data.preference.encode_pair), cut to max_seq_len as pairs are cut.

    prompt: one user message, or {role, content} messages ending with the user's.
    """
    from llamaherd.data.preference import PreferencePair, truncate_pair
    from llamaherd.data.sft import encode_conversation

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    ids, trained = encode_conversation([*messages, {"role": "assistant", "content": response}], tokenizer, fmt,
                                       last_response_only=True)
    start = trained.index(True)
    if max_seq_len is None or len(ids) <= max_seq_len:
        return ids
    answer = ids[start:]
    fitted, _ = truncate_pair(PreferencePair(ids[:start], answer, answer), max_seq_len, bos_id=tokenizer.bos_id)
    if fitted is None:
        raise InputError(f"the prompt leaves no room for a response at max_seq_len={max_seq_len}")
    return fitted.prompt_ids + fitted.chosen_ids


@torch.no_grad()
def score_texts(rm: GPT, tokenizer: Any, prompts: Sequence[str | Sequence[dict]], responses: Sequence[str],
                chat_format: ChatFormat | str, batch_size: int = 8, max_seq_len: int | None = None) -> list[float]:
    """The reward of each (prompt, response), in input order: rendered with `chat_format` and tokenized as the
    training pairs were (`encode_scored`), scored in batches of similar length (the scores do not depend on it).

    rm: a GPT with a score head (`load_reward_model(...).model`). prompts: user messages or message lists.
    max_seq_len: cut longer conversations as training cut them (default: the model's block_size).
    """
    from llamaherd.data.sft import resolve_chat_format

    if len(prompts) != len(responses):
        raise InputError(f"{len(prompts)} prompts but {len(responses)} responses; give one prompt per response")
    fmt = resolve_chat_format(chat_format, tokenizer)
    limit = max_seq_len or rm.config.block_size
    rows = [encode_scored(p, r, tokenizer, fmt, limit) for p, r in zip(prompts, responses, strict=True)]
    device = rm.model.embed_tokens.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    scores = [0.0] * len(rows)
    was_training = rm.training
    rm.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        T = len(rows[chunk[0]])
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)
        for j, i in enumerate(chunk):
            ids[j, : len(rows[i])], mask[j, : len(rows[i])] = torch.tensor(rows[i]), True
        for i, r in zip(chunk, sequence_rewards(rm, ids.to(device), mask.to(device)).tolist(), strict=True):
            scores[i] = r
    rm.train(was_training)
    return scores


# ---- the training recipe --------------------------------------------------------------------------------------
class RewardRecipe(Recipe):
    """`herd reward`: a causal LM (given a new score head) or a reward model, trained on preference pairs; exported
    merged, in sequence-classification layout, whatever the method. The score head always trains, LoRA or not
    (as PEFT's modules_to_save keeps it trainable for SEQ_CLS)."""

    task = "reward"

    def load(self, cfg: TrainConfig, quantize: str | None) -> Loaded:
        from llamaherd.load import load_model, resolve

        src = resolve(cfg.model)
        if src.format == "hf" and reward_head_labels(src.path) is not None:
            return load_reward_model(src.path, quantize=quantize)
        loaded = load_model(cfg.model, quantize=quantize)
        add_score_head(loaded.model)
        return loaded

    def datasets(self, cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
        return preference_datasets(cfg, tokenizer, chat_format, log)

    def prepare(self, model: GPT, cfg: TrainConfig) -> GPT:
        prepare_model(model, cfg)
        model.score.requires_grad_(True)
        return model

    def objective(self, model: GPT, cfg: TrainConfig) -> RewardObjective:
        return RewardObjective(model, cfg.center_rewards_coefficient, cfg.padding_free)

    def collate(self, cfg: TrainConfig, pad_id: int):
        from llamaherd.data.preference import collate_pairs, collate_shared_pairs

        return functools.partial(collate_shared_pairs if cfg.shared_prompt else collate_pairs, pad_id=pad_id)

    def writes_adapter(self, model: GPT, cfg: TrainConfig) -> bool:
        return False

    def export(self, model: GPT, state: dict[str, torch.Tensor], cfg: TrainConfig, loaded: Loaded, out: Path) -> Path:
        return save_reward_model(merged_state(model, state, cfg), model.config, loaded.tokenizer, out / "model")


def run_reward(cfg: TrainConfig) -> dict[str, Any]:
    """Train a reward model on `cfg.data`; write it (out_dir/model), metrics, plot and lineage to `out_dir`."""
    return run_training(cfg, RewardRecipe())


# ---- herd reward score ----------------------------------------------------------------------------------------
def _score_targets(rec: Any) -> list[tuple[str, list[dict], str]]:
    """(output field, prompt messages, response) for each response a record asks to score: a pair's chosen and
    rejected answers ("chosen_score", "rejected_score"), a "response" ("score") or each of "responses"
    ("scores"); [] for a transcript pair that differs before its final assistant turn (left unscored)."""
    from llamaherd.data.preference import _prompt_messages, pair_messages

    d = rec.data
    if not isinstance(d, dict):
        raise InputError(f"{rec.where}: expected a JSON object per record, got {type(d).__name__}")
    if "chosen" in d or "rejected" in d:
        pm = pair_messages(rec)
        if pm is None:
            return []
        return [("chosen_score", pm.prompt, pm.chosen["content"]),
                ("rejected_score", pm.prompt, pm.rejected["content"])]
    if "prompt" not in d or ("response" in d) == ("responses" in d):
        raise InputError(f"{rec.where}: expected 'prompt' with 'response' or 'responses' (or a preference pair with "
                         f"'chosen' and 'rejected'), got keys {sorted(d)}")
    prompt = _prompt_messages(rec, d)
    if prompt[-1]["role"] != "user":
        raise InputError(f"{rec.where}: field 'prompt' must end with a user message (the response replies to it)")
    key = "response" if "response" in d else "responses"
    answers = [d[key]] if key == "response" else d[key]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        want = "a string" if key == "response" else "a list of strings"
        raise InputError(f"{rec.where}: field {key!r} must be {want}")
    field_name = "score" if key == "response" else "scores"
    return [(field_name, prompt, a) for a in answers]


def score_file(rm: str | Path, data: str | Path, out: str | Path | None = None, chat_format: str | None = None,
               batch_size: int = 8, max_seq_len: int | None = None, dtype: str = "fp32") -> dict[str, Any]:
    """`herd reward score`: each record of `data` (JSON or JSONL) with its reward(s) added, as JSONL to `out`
    (written atomically) or to stdout; returns a summary (responses scored, mean score; for pairs, the accuracy
    r_chosen > r_rejected with its standard error sqrt(p(1-p)/n)).

    Records: {prompt, response} -> + "score"; {prompt, responses: [...]} -> + "scores"; a preference pair in any
    layout `herd reward` trains on -> + "chosen_score", "rejected_score" (null for pairs it cannot split).
    """
    import math
    import sys

    from llamaherd.data.sft import read_records
    from llamaherd.terminal import printable

    loaded = load_reward_model(rm, dtype=dtype)
    records = list(read_records(data))
    targets = [(i, *t) for i, rec in enumerate(records) for t in _score_targets(rec)]
    scores = score_texts(loaded.model, loaded.tokenizer, [t[2] for t in targets], [t[3] for t in targets],
                         chat_format or loaded.chat_format or "alpaca", batch_size, max_seq_len)
    rows = [dict(rec.data) for rec in records]
    for row in rows:
        if "chosen" in row or "rejected" in row:
            row |= {"chosen_score": None, "rejected_score": None}
    for (i, field_name, _, _), score in zip(targets, scores, strict=True):
        if field_name == "scores":
            rows[i].setdefault("scores", []).append(score)
        else:
            rows[i][field_name] = score
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write(out, text)
    summary: dict[str, Any] = {"records": len(rows), "responses": len(scores),
                               "mean_score": sum(scores) / len(scores) if scores else None}
    pairs = [(r["chosen_score"], r["rejected_score"]) for r in rows if r.get("chosen_score") is not None]
    if pairs:
        p = sum(c > r for c, r in pairs) / len(pairs)
        summary |= {"pairs": len(pairs), "accuracy": p, "accuracy_stderr": math.sqrt(p * (1 - p) / len(pairs))}
    line = f"scored {len(scores)} responses of {len(rows)} records"
    if scores:
        line += f", mean reward {summary['mean_score']:.4f}"
    if pairs:
        line += (f"; pairs: accuracy {summary['accuracy']:.4f} ± {summary['accuracy_stderr']:.4f} "
                 f"(r_chosen > r_rejected, n={len(pairs)})")
    print(printable(line + (f"; wrote {out}" if out is not None else "")),
          file=sys.stderr if out is None else sys.stdout)
    return summary
