"""Run feedback: append-only metrics JSONL (optionally mirrored to TensorBoard) and the loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llamaherd.files import atomic_write


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line with a `step`; resuming drops lines past the checkpoint."""

    def __init__(self, path: Path, resume_step: int | None, tensorboard: bool = False) -> None:
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            kept = [line for line in read_metrics(path) if line["step"] <= resume_step]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a kill mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def plot_loss(metrics_path: Path, out: Path, ylabel: str = "cross-entropy (nats/token)") -> Path:
    """Training loss per step (and validation loss where measured) as a PNG; `ylabel` names the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps, values = zip(*train, strict=True)
        ax.plot(steps, values, label="train loss", linewidth=0.8, alpha=0.4)
        window = max(1, len(values) // 20)
        if window > 1:  # a trailing mean shows the trend under per-step noise
            smooth = [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                      for i in range(len(values))]
            ax.plot(steps, smooth, label=f"train loss, mean of {window} steps", linewidth=1.5)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
