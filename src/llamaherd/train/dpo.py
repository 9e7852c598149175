"""Direct Preference Optimization as an `Objective` of the shared loop: DPO, conservative DPO and IPO.

Losses, per pair, from the summed log-probabilities of the response tokens under the policy (pi) and the
reference (ref), with h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)):
    sigmoid  DPO (Rafailov et al. 2023, eq. 7):         -log sigmoid(beta h)
             with label_smoothing e (cDPO, Mitchell 2023): -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
    ipo      IPO (Azar et al. 2023, eq. 17):             (h' - 1 / (2 beta))^2, h' with each log-ratio divided by
             its response's token count, as TRL computes it (the IPO authors' normalisation)
Logged as TRL's DPOTrainer logs them: rewards/chosen and rewards/rejected (beta (log pi - log ref)), their
difference rewards/margins, rewards/accuracies (chosen reward > rejected reward), logps/chosen, logps/rejected.

The reference is never a second model in memory: with LoRA it is the policy with its adapters disabled; for full
fine-tuning its log-probabilities are computed once, before training, and stored (`precompute_reference`).

Layouts of a micro-batch (`collate_dpo`): "shared" runs each pair as prompt + chosen + rejected, where the rejected
tokens see the prompt but not the chosen ones and their positions restart after the prompt, so the prompt is run
once instead of twice, and the pairs one after another in one row without padding (`model.Spans`: attention per
answer, no dense mask); "separate" is the usual 2B right-padded rows (TRL's), from `collate_pairs`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llamaherd.errors import InputError
from llamaherd.model import GPT, Spans
from llamaherd.train import distributed as D
from llamaherd.train.config import DPO_LOSSES, TrainConfig
from llamaherd.train.core import Batch, LossOutput, Objective
from llamaherd.train.head_loss import head_log_probs
from llamaherd.train.run import Log, Recipe, preference_datasets, run_training

if TYPE_CHECKING:
    from llamaherd.load import Loaded


def dpo_losses(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, loss_type: str,
               label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
               rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses (B,) from log pi - log ref of the chosen and rejected responses (B,) (see the module doc).

    IPO needs the responses' token counts (B,) to average the log-ratios per token.
    """
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        loss = -F.logsigmoid(beta * h)
        if label_smoothing:
            loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * h)
        return loss
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the IPO loss needs the responses' token counts")
        h = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        return (h - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSSES)}")


# ---- batches --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoredPair:
    """A preference pair with its reference log-probabilities (summed over each response's tokens)."""

    pair: Any  # llamaherd.data.preference.PreferencePair
    ref_chosen: float
    ref_rejected: float


def _unscored(item: Any) -> Any:
    return item.pair if isinstance(item, ScoredPair) else item


def collate_dpo(items: Sequence[Any], pad_id: int, shared_prompt: bool = True) -> Batch:
    """A micro-batch of B pairs (or `ScoredPair`s) for `DPOObjective`.

    Model inputs: input_ids (R, T), positions (R, T) and, per layout, spans (2B, 4) (shared: R = 1, no padding)
    or segment_ids (R, T) (separate: R = 2B, right-padded). Selection of the response tokens, N of them:
    pred_index (N,) the flat index in (R*T) of the hidden state that predicts each, targets (N,) the token,
    seq_index (N,) its sequence (chosen of pair b: b; rejected: B + b). response_lengths (2B,); ref_logps (2B,)
    for ScoredPairs.
    """
    pairs = [_unscored(it) for it in items]
    for p in pairs:
        if not p.prompt_ids:
            raise InputError(f"{p.source or 'preference pair'}: empty prompt; the first response token needs a "
                             "prompt token (BOS) before it")
    batch = _collate_shared(pairs, pad_id) if shared_prompt else _collate_separate(pairs, pad_id)
    batch["response_lengths"] = torch.tensor([len(p.chosen_ids) for p in pairs]
                                             + [len(p.rejected_ids) for p in pairs])
    if all(isinstance(it, ScoredPair) for it in items):
        batch["ref_logps"] = torch.tensor([it.ref_chosen for it in items] + [it.ref_rejected for it in items],
                                          dtype=torch.float64)
    return batch


def _collate_shared(pairs: Sequence[Any], pad_id: int) -> Batch:
    """All pairs in one unpadded row, prompt (P) | chosen (C) | rejected (R) each (`collate_shared_pairs`)."""
    from llamaherd.data.preference import collate_shared_pairs

    rows = collate_shared_pairs(list(pairs), pad_id)
    pred, targets, seq, B = [], [], [], len(pairs)
    for b, (p, o) in enumerate(zip(pairs, rows["offsets"].tolist(), strict=True)):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        # chosen token j is predicted at P - 1 + j; rejected token 0 also at P - 1 (the prompt's last), j at P+C+j-1
        pred += [o + P - 1 + j for j in range(C)] + [o + P - 1] + [o + P + C + j - 1 for j in range(1, R)]
        targets += [*p.chosen_ids, *p.rejected_ids]
        seq += [b] * C + [B + b] * R
    return {"input_ids": rows["input_ids"], "positions": rows["positions"], "spans": rows["spans"],
            "pred_index": torch.tensor(pred), "targets": torch.tensor(targets), "seq_index": torch.tensor(seq)}


def _collate_separate(pairs: Sequence[Any], pad_id: int) -> Batch:
    """2B right-padded rows, prompt + chosen then prompt + rejected (`collate_pairs`), as TRL lays them out."""
    from llamaherd.data.preference import collate_pairs

    rows = collate_pairs(list(pairs), pad_id)
    input_ids, attention = rows["input_ids"], rows["attention_mask"].long()
    R, T = input_ids.shape
    # response token at (r, t) is predicted by the hidden state at (r, t - 1)
    r, t = rows["response_mask"].bool().nonzero(as_tuple=True)
    return {"input_ids": input_ids, "positions": torch.arange(T).expand(R, T).contiguous(),
            "segment_ids": attention, "pred_index": r * T + t - 1, "targets": input_ids[r, t], "seq_index": r}


# ---- the objective --------------------------------------------------------------------------------------------
class DPOObjective(Objective):
    """DPO / cDPO / IPO on summed response log-probabilities; the loss_sum adds the per-pair losses.

    reference: "adapters" (the policy with its LoRA adapters disabled, run in the same forward under no_grad) or
    "precomputed" (the batch carries ref_logps, from `precompute_reference`).
    """

    def __init__(self, model: GPT, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: str = "adapters") -> None:
        super().__init__(model)
        if reference not in ("adapters", "precomputed"):
            raise ValueError(f"reference {reference!r}: choose adapters or precomputed")
        self.beta, self.loss_type, self.label_smoothing, self.reference = beta, loss_type, label_smoothing, reference
        self.loss_label = f"{'IPO' if loss_type == 'ipo' else 'DPO'} loss (per pair)"

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["response_lengths"].numel() // 2)

    def n_tokens(self, batch: Batch) -> int:
        if "spans" in batch:  # one unpadded row
            return batch["input_ids"].numel()
        return int((batch["segment_ids"] > 0).sum())

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """Summed log-probabilities of each sequence's response tokens (2B,): chosen first, then rejected."""
        if "spans" in batch:
            h = self.model(batch["input_ids"], positions=batch["positions"],
                           attn_mask=Spans.from_table(batch["spans"]), return_hidden=True)
        else:
            h = self.model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                           return_hidden=True)
        token_logps = head_log_probs(self.model, h.flatten(0, 1)[batch["pred_index"]], batch["targets"])
        n_seq = batch["response_lengths"].numel()
        return token_logps.new_zeros(n_seq).index_add(0, batch["seq_index"], token_logps)

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """`sequence_logps` of the reference: the model with its LoRA adapters disabled (if any), no gradient."""
        from llamaherd.lora import adapters_disabled, lora_layers

        with torch.no_grad(), (adapters_disabled(self.model) if lora_layers(self.model) else nullcontext()):
            return self.sequence_logps(batch)

    def forward(self, batch: Batch) -> LossOutput:
        if self.reference == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError("reference 'precomputed' needs batches of ScoredPairs (precompute_reference)")
            ref = batch["ref_logps"].to(torch.float32)
        else:
            ref = self.reference_logps(batch)
        logps = self.sequence_logps(batch)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        lengths = batch["response_lengths"].to(logps.device)
        loss = dpo_losses(chosen - ref_chosen, rejected - ref_rejected, self.beta, self.loss_type,
                          self.label_smoothing, *lengths.chunk(2))
        with torch.no_grad():
            reward_chosen = self.beta * (chosen - ref_chosen)
            reward_rejected = self.beta * (rejected - ref_rejected)
            metrics = {"rewards/chosen": reward_chosen.sum(), "rewards/rejected": reward_rejected.sum(),
                       "rewards/margins": (reward_chosen - reward_rejected).sum(),
                       "rewards/accuracies": (reward_chosen > reward_rejected).float().sum(),
                       "logps/chosen": chosen.sum(), "logps/rejected": rejected.sum()}
        return LossOutput(loss.sum(), metrics)


# ---- the precomputed reference --------------------------------------------------------------------------------
REFERENCE_SUFFIX = ".safetensors"


def pair_digest(pair: Any) -> bytes:
    """16 bytes naming a pair's tokens (prompt, chosen, rejected): the row key of a reference file."""
    text = json.dumps([list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)])
    return hashlib.sha256(text.encode()).digest()[:16]


def reference_key(model_fingerprint: str, data_sha256: Sequence[str], template: str, numerics: str) -> dict[str, Any]:
    """What a reference file's log-probs depend on beyond the tokens: the base weights and tokenizer (fingerprint),
    the data files and chat template they were rendered from, and how the model computes (dtype, quantization)."""
    return {"model": model_fingerprint, "data": sorted(data_sha256),
            "template": hashlib.sha256(template.encode()).hexdigest(), "numerics": numerics}


def reference_path(directory: str | Path, key: dict[str, Any]) -> Path:
    """`directory/ref-logps-<sha256 of the key, 16 hex>.safetensors`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / f"ref-logps-{digest}{REFERENCE_SUFFIX}"


def _read_reference(path: Path, key: dict[str, Any]) -> dict[bytes, tuple[float, float]]:
    """The rows of a reference file, {pair digest: (chosen, rejected)}; {} if absent or written for another key."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("key", "null")) != key:
                return {}
            digests, logps = f.get_tensor("digests"), f.get_tensor("logps")
    except (SafetensorError, OSError, ValueError):
        return {}  # a damaged file is recomputed and replaced
    return {bytes(d.tolist()): (float(c), float(r)) for d, (c, r) in zip(digests, logps)}


def _write_reference(path: Path, key: dict[str, Any], rows: dict[bytes, tuple[float, float]]) -> None:
    """Write all rows atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    digests = torch.tensor([list(d) for d in rows], dtype=torch.uint8).reshape(len(rows), 16)
    logps = torch.tensor(list(rows.values()), dtype=torch.float64).reshape(len(rows), 2)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"digests": digests, "logps": logps}, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)


@torch.no_grad()
def _score(objective: DPOObjective, pairs: Sequence[Any], collate: Callable[[list[Any]], Batch], info: D.DistInfo,
           micro_batch_size: int, bf16: bool, progress: bool) -> torch.Tensor:
    """Reference log-probs (n, 2) of `pairs`, each process scoring every world_size-th pair; summed over processes."""
    from tqdm.auto import tqdm

    mine = list(range(info.rank, len(pairs), info.world_size))
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=info.device)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    objective.eval()
    for j in tqdm(range(0, len(mine), micro_batch_size), disable=not (info.is_main and progress),
                  desc="reference log-probs", unit="batch", dynamic_ncols=True):
        chunk = mine[j:j + micro_batch_size]
        batch = {k: v.to(info.device) for k, v in collate([pairs[i] for i in chunk]).items()}
        with autocast:
            logps = objective.reference_logps(batch).double()
        out[chunk] = torch.stack(logps.chunk(2), dim=1)
    objective.train()
    return D.all_reduce_sum(out, info)


def precompute_reference(
    objective: DPOObjective,
    datasets: Sequence[Sequence[Any]],
    collate: Callable[[list[Any]], Batch],
    info: D.DistInfo,
    path: Path | None,
    key: dict[str, Any] | None,
    micro_batch_size: int = 1,
    bf16: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[list[ScoredPair]]:
    """Each dataset's pairs with their reference log-probs, from the file at `path` or computed in one pass.

    Run before the model trains (the reference is the model as loaded) and before it is wrapped for DDP/FSDP:
    every process scores a share of the missing pairs and the shares are summed. Only the main process knows
    `path` and `key` (the model fingerprint): it reads the file, announces what it holds, and writes the file
    again, atomically, with the new rows, so a resumed run and later runs with the same key compute nothing.
    """
    flat = [p for ds in datasets for p in ds]
    digests = [pair_digest(p) for p in flat]
    known = _read_reference(path, key) if info.is_main and path is not None else {}
    values = torch.zeros(len(flat), 2, dtype=torch.float64, device=info.device)
    have = torch.zeros(len(flat), dtype=torch.float64, device=info.device)
    for i, d in enumerate(digests):
        if d in known:
            values[i] = torch.tensor(known[d], dtype=torch.float64)
            have[i] = 1.0
    values, have = D.all_reduce_sum(values, info), D.all_reduce_sum(have, info)
    missing = [i for i in range(len(flat)) if not have[i]]
    if info.is_main and path is not None:
        log(f"reference log-probs: {len(flat) - len(missing)} of {len(flat)} pairs from {path}"
            if len(missing) < len(flat) else f"reference log-probs: computing {len(flat)} pairs once ({path})")
    if missing:
        objective.to(info.device)
        values[missing] = _score(objective, [flat[i] for i in missing], collate, info, micro_batch_size, bf16,
                                 progress)
        if info.is_main and path is not None:
            known.update((digests[i], (values[i, 0].item(), values[i, 1].item())) for i in range(len(flat)))
            _write_reference(path, key, known)
    D.barrier(info)
    rows = values.cpu().tolist()
    out, start = [], 0
    for ds in datasets:
        out.append([ScoredPair(p, *rows[start + i]) for i, p in enumerate(ds)])
        start += len(ds)
    return out


# ---- herd dpo -------------------------------------------------------------------------------------------------
def reference_mode(cfg: TrainConfig) -> str:
    """`cfg.reference` with auto resolved: adapters for LoRA / QLoRA, precomputed for full fine-tuning."""
    if cfg.reference != "auto":
        return cfg.reference
    return "precomputed" if cfg.method == "full" else "adapters"


class DPORecipe(Recipe):
    """DPO / cDPO / IPO on preference pairs; the reference comes from the loaded model itself (see module doc)."""

    task = "dpo"

    def load(self, cfg: TrainConfig, quantize: str | None) -> Loaded:
        self.loaded = super().load(cfg, quantize)  # the reference, for a precomputed pass in `datasets`
        return self.loaded

    def datasets(self, cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
        train, val = preference_datasets(cfg, tokenizer, chat_format, log)
        if reference_mode(cfg) != "precomputed":
            return train, val
        from llamaherd.fingerprint import model_fingerprint
        from llamaherd.train.lineage import file_sha256

        info = D.init_distributed()
        path = key = None
        if info.is_main:  # the main process alone reads and writes the file (precompute_reference)
            weights = next(self.loaded.model.parameters())
            quantized = cfg.method == "qlora" and ("nf4" if info.device.type == "cuda" else "int8")
            numerics = f"{weights.dtype}; quantized: {quantized or 'no'}; bf16 autocast: {cfg.bf16}"
            key = reference_key(model_fingerprint(self.loaded.source.path),
                                [file_sha256(p) for p in [*cfg.data, *cfg.val_data]], chat_format, numerics)
            path = reference_path(cfg.reference_dir or Path(cfg.out_dir).resolve().parent / "reference_logps", key)
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        objective = self.objective(self.loaded.model, cfg)
        train, val = precompute_reference(objective, [train, val], self.collate(cfg, pad_id), info, path, key,
                                          cfg.micro_batch_size, cfg.bf16, cfg.progress, log)
        return train, val

    def objective(self, model: GPT, cfg: TrainConfig) -> DPOObjective:
        return DPOObjective(model, cfg.beta, cfg.loss_type, cfg.label_smoothing, reference_mode(cfg))

    def collate(self, cfg: TrainConfig, pad_id: int) -> Callable[[list], Batch]:
        return functools.partial(collate_dpo, pad_id=pad_id, shared_prompt=cfg.shared_prompt)


def run_dpo(cfg: TrainConfig) -> dict[str, Any]:
    """DPO-train `cfg.model` on the preference pairs `cfg.data`; write the adapter or model, metrics (with the
    held-out rewards/accuracies as val_rewards/accuracies), plot and lineage (method "dpo") to `out_dir`."""
    return run_training(cfg, DPORecipe())
