"""The shared training loop: SFT, reward modelling and DPO differ only in their `Objective` (see train/run.py).

One optimizer step consumes `batch_size` samples (across all processes) split into micro-batches of
`micro_batch_size`; the loss is the sum over the step's items (tokens for SFT) divided by the global item
count, so gradient accumulation and the number of processes never change the result.
"""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from llamaherd.errors import CheckpointError, InputError
from llamaherd.model import GPT
from llamaherd.terminal import printable
from llamaherd.train import distributed as D
from llamaherd.train.checkpoint import STATE, list_checkpoints, load_checkpoint, save_checkpoint
from llamaherd.train.config import RESUME_MUTABLE, TrainConfig
from llamaherd.train.lineage import file_sha256
from llamaherd.train.metrics import MetricsLog, plot_loss

Batch = dict[str, torch.Tensor]


class LossOutput(NamedTuple):
    """A micro-batch's loss summed over its items, plus optional extra sums to log (divided by the count)."""

    loss_sum: torch.Tensor
    metrics: dict[str, torch.Tensor] | None = None


class Objective(nn.Module):
    """The trainable model plus its loss; DDP/FSDP wrap this module so the whole loss runs inside forward.

    `forward`'s metrics are sums over the items, logged per step (and on the validation set, as val_NAME)
    divided by the item count: a per-item mean whatever the accumulation and the number of processes.
    """

    loss_label = "cross-entropy (nats/token)"  # the loss plot's y axis

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def count(self, batch: Batch) -> torch.Tensor:
        """How many items `forward`'s loss_sum adds up (the normaliser)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def n_tokens(self, batch: Batch) -> int:
        """Real (non-padding) input tokens, for throughput."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def blocks(self) -> list[nn.Module]:
        """Units for activation checkpointing and FSDP sharding."""
        return list(self.model.model.layers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def enable_activation_checkpointing(blocks: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of storing them (memory for ~30% compute)."""
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


def lr_multiplier(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup from 0, then cosine/linear decay to `min_ratio` (or constant) — Hugging Face's curves."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(module: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on vectors (norms, biases)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters (check method and lora_targets)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=fused or None)


class Trainer:
    """Runs an `Objective` over a dataset: optimisation, validation, checkpoints, resume, metrics.

    model_fingerprint: the base model's `fingerprint.model_fingerprint` (the main process's is enough), so a
    resumed run checks the base by content rather than by its path.
    """

    def __init__(
        self,
        objective: Objective,
        train_set: Sequence[Any],
        val_set: Sequence[Any],
        collate: Callable[[list[Any]], Batch],
        cfg: TrainConfig,
        info: D.DistInfo | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        self.cfg, self.train_set, self.val_set, self.collate = cfg, train_set, val_set, collate
        # What the location settings hold; a checkpoint records it, and resuming compares it instead of paths.
        self.content: dict[str, Any] = {"model": model_fingerprint, "data": [file_sha256(p) for p in cfg.data],
                                        "val_data": [file_sha256(p) for p in cfg.val_data]}
        self.info = info or D.init_distributed()
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        world = self.info.world_size
        if cfg.batch_size % (cfg.micro_batch_size * world):
            raise InputError(
                f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x processes "
                f"= {cfg.micro_batch_size} x {world}"
            )
        self.accum = cfg.batch_size // (cfg.micro_batch_size * world)
        self.steps_per_epoch = self.epoch_steps()
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        self.objective = objective.to(self.info.device)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(objective.blocks())
        strategy = "fsdp" if cfg.distributed == "fsdp" else "ddp"
        self.module = D.wrap(objective, objective.blocks(), strategy, self.info)
        fused = self.info.device.type in ("cpu", "cuda") and not (self.info.enabled and strategy == "fsdp")
        self.optimizer = build_optimizer(self.module, cfg, fused)
        lam = functools.partial(lr_multiplier, total=self.total_steps, warmup=cfg.warmup_steps,
                                schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)
        self.step = 0
        self.tokens_seen = 0
        self.history: dict[str, float] = {}

    # ---- data -----------------------------------------------------------------------------------
    def epoch_steps(self) -> int:
        """Optimizer steps in one epoch over the training set (PPO's are per rollout: train.ppo.PPOTrainer)."""
        steps = len(self.train_set) // self.cfg.batch_size
        if steps == 0:
            raise InputError(f"the training set has {len(self.train_set)} samples, fewer than "
                             f"batch_size={self.cfg.batch_size}")
        return steps

    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return torch.randperm(len(self.train_set), generator=g).tolist()

    def _micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step`: a pure function of the step (exact resume)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        bs, mb = self.cfg.batch_size, self.cfg.micro_batch_size
        idx = self._epoch_order(epoch)[k * bs : (k + 1) * bs]
        per_rank = bs // self.info.world_size
        mine = idx[self.info.rank * per_rank : (self.info.rank + 1) * per_rank]
        return [self._to_device(self.collate([self.train_set[i] for i in mine[j : j + mb]]))
                for j in range(0, per_rank, mb)]

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.info.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16)

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        micro = self._micro_batches(self.step)
        counts = torch.stack([torch.as_tensor(self.objective.count(b), dtype=torch.float64) for b in micro])
        n_global = D.all_reduce_sum(counts.sum().to(self.info.device), self.info).item()
        scale = self.info.world_size / max(n_global, 1.0)  # DDP/FSDP average gradients over processes
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.info.device)
        extra: dict[str, torch.Tensor] = {}
        tokens = 0
        self.module.train()
        for j, batch in enumerate(micro):
            D.set_grad_sync(self.module, j == len(micro) - 1)
            with self._autocast():
                out = self.module(batch)
            (out.loss_sum * scale).backward()
            loss_sum += out.loss_sum.detach().double()
            for k, v in (out.metrics or {}).items():
                extra[k] = extra.get(k, 0) + v.detach().double()
            tokens += self.objective.n_tokens(batch)
        grad_norm = None
        if self.cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        totals = D.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64,
                                                                       device=self.info.device)]), self.info)
        record = {"step": self.step, "loss": totals[0].item() / max(n_global, 1.0), "lr": lr,
                  "tokens": int(totals[1].item()), "items": int(n_global)}
        for k, v in sorted(extra.items()):
            record[k] = D.all_reduce_sum(v, self.info).item() / max(n_global, 1.0)
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per item, as `val_loss`, and the objective's metrics as `val_NAME`, over (up to
        `eval_max_batches` micro-batches of) the validation set; {} without one."""
        if not self.val_set:
            return {}
        world, rank, mb = self.info.world_size, self.info.rank, self.cfg.micro_batch_size
        mine = list(range(rank, len(self.val_set), world))
        n_batches = math.ceil(math.ceil(len(self.val_set) / world) / mb)  # equal on every rank (FSDP collectives)
        if self.cfg.eval_max_batches is not None:
            n_batches = min(n_batches, self.cfg.eval_max_batches)
        sums: dict[str, torch.Tensor] = {}
        self.module.eval()
        for j in range(n_batches):
            chunk = mine[j * mb : (j + 1) * mb]
            weight = 1.0 if chunk else 0.0  # a rank that ran out still joins the collectives
            batch = self._to_device(self.collate([self.val_set[i] for i in chunk or [0]]))
            with self._autocast():
                out = self.module(batch)
            values = {"count": torch.as_tensor(self.objective.count(batch)), "loss": out.loss_sum} | (out.metrics or {})
            for k, v in values.items():
                sums[k] = sums.get(k, 0) + weight * v.detach().double().to(self.info.device)
        self.module.train()
        names = sorted(sums)  # the same order on every rank
        totals = D.all_reduce_sum(torch.stack([sums[k] for k in names]), self.info)
        count = totals[names.index("count")].clamp(min=1)
        return {f"val_{k}": (v / count).item() for k, v in zip(names, totals, strict=True) if k != "count"}

    # ---- checkpoints ----------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "samples_seen": self.step * self.cfg.batch_size, "tokens_seen": self.tokens_seen,
                "train_samples": len(self.train_set), "world_size": self.info.world_size,
                "history": self.history, "content": self.content}

    def save(self) -> Path:
        import yaml

        extra = {"run_config.yaml": yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)} | self.checkpoint_extras()
        return save_checkpoint(self.ckpt_root, self.step, self.module, self.optimizer, self.scheduler,
                               self._trainer_state(), extra, self.info, self.cfg.keep_checkpoints)

    def checkpoint_extras(self) -> dict[str, str]:
        """Text files, by name, a method adds to each checkpoint (PPO: its rollout and KL coefficient)."""
        return {}

    def restore_extras(self, path: Path) -> None:
        """Read back, on resume, what `checkpoint_extras` wrote into the checkpoint at `path`."""

    def _resume(self) -> None:
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            if self.info.is_main:
                print(f"no checkpoint under {printable(self.ckpt_root)}; starting from step 0", flush=True)
            return
        path = ckpts[-1]
        changed = self._changed(path)
        # Only the main process knows the model's fingerprint: every process stops if any found a change.
        if D.all_reduce_sum(torch.tensor(float(len(changed)), device=self.info.device), self.info).item():
            diff = ", ".join(changed) or "see the main process's error"
            raise CheckpointError(f"{path}: cannot resume exactly, the run config changed ({diff})")
        state = load_checkpoint(path, self.module, self.optimizer, self.scheduler, self.info)
        self.restore_extras(path)
        if state["train_samples"] != len(self.train_set):
            raise CheckpointError(
                f"{path}: the training set had {state['train_samples']} samples, now {len(self.train_set)}; "
                "resume with the same data"
            )
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.history = state.get("history", {})
        if self.info.is_main:
            print(f"resumed from {printable(path)} (step {self.step}, epoch {state['epoch']}, "
                  f"batch {state['batch_in_epoch']} of {self.steps_per_epoch})", flush=True)

    def _changed(self, path: Path) -> list[str]:
        """The settings that differ from the checkpoint's run, as "field: old -> new".

        A location setting (`self.content`'s keys) is compared by what it holds when the checkpoint recorded
        that, and by its value otherwise; a process that does not know a content hash leaves it to the others.
        A field the checkpoint's run_config.yaml lacks (one added to TrainConfig since) counts as its default.
        """
        saved = TrainConfig().to_dict() | _read_saved_config(path)
        try:
            saved_content = json.loads((path / STATE).read_text()).get("content") or {}
        except FileNotFoundError:
            raise CheckpointError(f"{path}: incomplete checkpoint, {STATE} is missing") from None
        changed = []
        for key, value in self.cfg.to_dict().items():
            if key in RESUME_MUTABLE:
                continue
            if saved_content.get(key) is not None:
                if self.content.get(key) not in (None, saved_content[key]):
                    changed.append(f"{key}: {saved.get(key)!r} -> {value!r} (other content)")
            elif saved.get(key) != value:
                changed.append(f"{key}: {saved.get(key)!r} -> {value!r}")
        return changed

    # ---- the loop -------------------------------------------------------------------------------
    def should_log(self, record: dict[str, float]) -> bool:
        """Whether this step's record goes to metrics.jsonl: every `log_every` steps and the last one."""
        return self.step % self.cfg.log_every == 0 or self.step == self.total_steps

    def fit(self) -> dict[str, float]:
        """Train to `total_steps` (resuming if asked); return the final metrics."""
        cfg, main = self.cfg, self.info.is_main
        if not cfg.resume and list_checkpoints(self.ckpt_root):
            raise CheckpointError(f"{self.ckpt_root} holds checkpoints of an earlier run; pass --resume to continue "
                                  "it, or choose another out_dir")
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_root.mkdir(exist_ok=True)
            for stale in self.ckpt_root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            cfg.save(self.out / "run_config.yaml")
        D.barrier(self.info)
        seed_everything(cfg.seed + self.info.rank)
        if cfg.resume:
            self._resume()
        resumed_at = self.step if self.step > 0 else None  # metrics past the checkpoint are dropped
        log = MetricsLog(self.out / "metrics.jsonl", resumed_at, cfg.tensorboard) if main else None
        if self.step == 0 and self.val_set:
            self._log_val(log)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (main and cfg.progress),
                   desc=cfg.task, unit="step", dynamic_ncols=True)
        t_last, tok_last = time.perf_counter(), 0
        while self.step < self.total_steps:
            record = self.train_step()
            self.tokens_seen += record["tokens"]
            tok_last += record["tokens"]
            self.history["train_loss"] = record["loss"]
            if self.should_log(record):
                now = time.perf_counter()
                record["tokens_per_s"] = tok_last / max(now - t_last, 1e-9)
                t_last, tok_last = now, 0
                if log:
                    log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
            last = self.step == self.total_steps
            if self.val_set and (self.step % cfg.eval_every == 0 or last):
                self._log_val(log)
            if self.step % cfg.save_every == 0 or last:
                self.save()
        bar.close()
        if log:
            log.close()
            if cfg.plot:
                plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", self.objective.loss_label)
        return {"steps": self.step, "tokens": self.tokens_seen, **self.history}

    def _log_val(self, log: MetricsLog | None) -> None:
        val = self.evaluate()
        self.history |= val
        self.history.setdefault("initial_val_loss", val["val_loss"])
        if log:
            log.write({"step": self.step, **val})


def _read_saved_config(path: Path) -> dict[str, Any]:
    import yaml

    file = path / "run_config.yaml"
    if not file.exists():
        raise CheckpointError(f"{path}: run_config.yaml is missing; cannot check the run is the same")
    return yaml.safe_load(file.read_text()) or {}
