"""Atomic training checkpoints: trainable weights, optimizer, scheduler, RNG states and data position.

A checkpoint is written into `step-NNNNNNNN.tmp/` and renamed to `step-NNNNNNNN/` only when complete, so
a directory without the suffix is always whole; a run killed mid-write leaves a `.tmp` that is removed.
Full state dicts are gathered on rank 0 (DDP and FSDP2 alike) and read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llamaherd.errors import CheckpointError
from llamaherd.train.distributed import DistInfo, barrier, unwrap

PREFIX = "step-"
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.json"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.suffix != ".tmp")


def trainable_names(module: nn.Module) -> set[str]:
    """State-dict keys of the trainable parameters (without a DDP wrapper's prefix)."""
    return {n for n, p in unwrap(module).named_parameters() if p.requires_grad}


def gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters on rank 0, {} elsewhere; collective under FSDP2.

    Frozen parameters and buffers (an int8 base) are left out: they come back from the base checkpoint.
    """
    names = trainable_names(module)
    return {k: v for k, v in get_model_state_dict(module, options=FULL).items() if k in names}


def rng_state() -> dict[str, Any]:
    """Every random generator a run may draw from (torch CPU/CUDA, Python, NumPy)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([np_state[0], np_state[1].tolist(), *map(float, np_state[2:])]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    extra_files: dict[str, str],
    info: DistInfo,
    keep: int,
) -> Path:
    """Write a checkpoint of `step` (every rank must call this); keep the newest `keep` checkpoints."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    weights = gather_trainable(module)
    optim = get_optimizer_state_dict(module, optimizer, options=FULL)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    torch.save(rng_state(), tmp / f"rng_state_{info.rank}.pt")
    barrier(info)
    if info.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        (tmp / STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # the same step again: keep a whole checkpoint on disk at every moment
            old = final.with_name(final.name + ".old.tmp")
            final.replace(old)
            tmp.replace(final)
            shutil.rmtree(old)
        else:
            tmp.replace(final)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: DistInfo,
) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; return the trainer state (step, data position...)."""
    try:
        state = json.loads((path / STATE).read_text())
        weights = load_file(str(path / WEIGHTS))
        optim = torch.load(path / "optimizer.pt", weights_only=True)
        sched = torch.load(path / "scheduler.pt", weights_only=True)
        rng_file = path / f"rng_state_{info.rank}.pt"
        rng = torch.load(rng_file, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: incomplete checkpoint, {Path(e.filename).name} is missing") from None
    if state.get("world_size") != info.world_size:
        raise CheckpointError(
            f"{path}: written by {state.get('world_size')} processes, resumed with {info.world_size}; "
            "resume with the same number of processes (the data order and RNG streams depend on it)"
        )
    if set(weights) != trainable_names(module):
        raise CheckpointError(f"{path}: its trainable tensors do not match this model's (another method or "
                              "LoRA targets?)")
    opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    set_model_state_dict(module, weights, options=opts)
    set_optimizer_state_dict(module, optimizer, optim, options=opts)
    scheduler.load_state_dict(sched)
    set_rng_state(rng)
    return state
