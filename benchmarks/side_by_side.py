"""What the training benchmarks that run llamaherd and a peer each in its own subprocess share
(finetune_speed.py, align_speed.py): the embedded model exported once for transformers, the worker launch,
peak RSS, and llamaherd's Trainer without shuffling (the peers' sequential order)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def export_embedded_hf(work: Path):
    """The embedded SmolLM2-135M-Instruct loaded, and its Hugging Face export under `work` (written once)."""
    from llamaherd.checkpoints.hf import save_hf
    from llamaherd.load import load_model

    hf_dir = work / "smollm2-135m-instruct-hf"
    loaded = load_model()
    if not (hf_dir / "model.safetensors").exists():
        save_hf(loaded.model.state_dict(), loaded.config, hf_dir)
        loaded.tokenizer.save_pretrained(hf_dir)
    return loaded, hf_dir


def run_worker(script: str, argv: list[str]) -> dict:
    """Run `python script ARGV` and return the JSON object its last stdout line holds; exit with its stderr's
    tail when it fails."""
    out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {argv} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set size (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sequential_trainer():
    """llamaherd's Trainer taking the training items in file order every epoch, as the peers are set to."""
    from llamaherd.train.core import Trainer

    class Sequential(Trainer):
        def _epoch_order(self, epoch: int) -> list[int]:
            return list(range(len(self.train_set)))

    return Sequential
