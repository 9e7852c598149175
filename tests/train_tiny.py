"""Shared set-up for the training tests: a tiny random HF Llama + tokenizer and a small Alpaca file."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from eval_tiny import save_tiny_eval_model

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over lazy dog water boils ice melts capital france paris spider "
         "legs").split()


def make_tiny_run_inputs(root: Path, n_records: int = 48) -> tuple[Path, Path]:
    """(model dir, alpaca data file) under `root`."""
    model = save_tiny_eval_model(root / "tiny")
    rng = random.Random(0)
    rows = []
    for _ in range(n_records):
        answer = " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
        rows.append({"instruction": f"Repeat: {answer}", "input": "", "output": answer})
    data = root / "data.json"
    data.write_text(json.dumps(rows))
    return model, data


def tiny_args(model: Path, data: Path, out: Path, **overrides: object) -> list[str]:
    """`herd finetune` arguments for a few-second run on the tiny model."""
    opts: dict[str, object] = {
        "data": data, "out-dir": out, "method": "full", "max-steps": 8, "batch-size": 4, "micro-batch-size": 2,
        "eval-every": 4, "save-every": 4, "lr": 1e-3, "chat-format": "alpaca", "lora-dropout": 0.0,
        "warmup-steps": 2, "progress": False, "plot": False,
    } | {k.replace("_", "-"): v for k, v in overrides.items()}
    args = ["finetune", str(model)]
    for key, value in opts.items():
        args += [f"--{key}"] if value is True else [f"--no-{key}"] if value is False else [f"--{key}", str(value)]
    return args


def herd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamaherd.cli", *args]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llamaherd.cli", *args]


def subprocess_env() -> dict[str, str]:
    """One thread per process: tiny matmuls on a shared 2-core machine are far faster that way."""
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


def losses(out: Path, key: str = "loss") -> list[float]:
    """The per-step training (or validation) losses of a run, in step order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


def run_in_process(args: list[str]) -> None:
    """`herd ARGS` in this process on one thread (no interpreter start-up: the cheap reference run).

    Errors propagate as exceptions (the CLI would print them and exit 2).
    """
    import torch

    from llamaherd.cli import build_parser

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parsed = build_parser().parse_args(args)
        parsed.func(parsed)
    finally:
        torch.set_num_threads(threads)


class Crash(Exception):
    """Stands in for a run that dies part-way."""


def crash_at(monkeypatch, step: int) -> None:
    """Make the shared Trainer raise `Crash` when it is about to run optimizer step `step` + 1."""
    from llamaherd.train.core import Trainer

    train_step = Trainer.train_step

    def crashing(self):
        if self.step == step:
            raise Crash
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)
