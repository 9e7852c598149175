"""Evaluation speed, side by side: llamaherd vs `lm-eval --model hf`, same model, same docs, same batch size.

Both load the embedded SmolLM2-135M-Instruct exported as a Hugging Face checkpoint (float32) and score
the harness-protocol requests of the first N docs of each leaderboard task. Prints requests/s, wall time
(model loading excluded on both sides), the speed ratio (target >= 3x) and whether every prediction is
identical. One warm-up run on each side first.

    python benchmarks/eval_speed.py --limit 50 --batch-size 16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from llamaherd.evaluate.data import MMLU_SUBJECTS
from llamaherd.evaluate.reference import SideBySide, side_by_side

TARGET_RATIO = 3.0


def parse_args(doc: str, default_limit: int, work: str) -> argparse.Namespace:
    """The options both side-by-side benchmarks (this one and eval_parity.py) take."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=default_limit,
                        help="docs per task (MMLU: split over the 57 subjects)")
    parser.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu,truthfulqa_mc2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/benchmarks")
    parser.add_argument("--work", type=Path, default=Path(work),
                        help="where the export, the data stand-in and both runs' records go")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return args


def run_side_by_side(args: argparse.Namespace, **kw) -> SideBySide:
    per_subject = math.ceil(args.limit / len(MMLU_SUBJECTS))
    names = args.tasks.split(",")
    others = ",".join(n for n in names if n != "mmlu")
    task_limits = [(others, args.limit)] * bool(others) + [("mmlu", per_subject)] * ("mmlu" in names)
    return side_by_side(args.work, args.benchmarks, task_limits, args.batch_size, args.device, **kw)


def report_speed(run: SideBySide, args: argparse.Namespace) -> bool:
    """Print requests/s of both sides and the ratio; True when the target is met with identical predictions."""
    n_docs = sum(c.n_docs for c in run.comparisons.values())
    identical = all(c.same_prediction == c.n_docs for c in run.comparisons.values())
    ratio = run.peer_seconds / run.seconds
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    per_subject = math.ceil(args.limit / len(MMLU_SUBJECTS))
    print(f"{n_docs} docs ({args.limit} per task, {per_subject} per MMLU subject), batch size {args.batch_size}, "
          f"{device}, float32")
    print(f"{'':12} {'requests':>9} {'wall s':>9} {'req/s':>9}")
    for name, n, s in (("llamaherd", run.n_requests, run.seconds), ("lm-eval hf", run.peer_requests,
                                                                     run.peer_seconds)):
        print(f"{name:12} {n:9d} {s:9.2f} {n / s:9.1f}")
    print(f"speed-up: {ratio:.2f}x (target >= {TARGET_RATIO}x); predictions identical: {identical}")
    return identical and ratio >= TARGET_RATIO


def main() -> int:
    args = parse_args(__doc__, 50, ".cache/eval-speed")
    return 0 if report_speed(run_side_by_side(args, warmup=True), args) else 1


if __name__ == "__main__":
    sys.exit(main())
