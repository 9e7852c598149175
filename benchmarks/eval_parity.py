"""Scoring parity with lm-evaluation-harness on the embedded SmolLM2-135M-Instruct (harness protocol).

The embedded model is exported as a Hugging Face checkpoint (what `herd convert` writes); `herd eval`'s
runner and `lm-eval --model hf` (float32) both load that export and score the same docs. Prints, per
task: per-item prediction agreement, the largest per-request log-likelihood difference (target 1e-3)
and the aggregate metric differences (target 0.1 points). Exit status 1 when a target is missed.

    python benchmarks/eval_parity.py --limit 100 --batch-size 16     # MMLU: ceil(100 / 57) per subject

HellaSwag runs on a stand-in split (see llamaherd.evaluate.reference.local_data_dir): the official
files are not available here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llamaherd.evaluate.data import MMLU_SUBJECTS
from llamaherd.evaluate.reference import side_by_side

LOGPROB_TARGET = 1e-3
METRIC_TARGET_POINTS = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100, help="docs per task (MMLU: split over the 57 subjects)")
    parser.add_argument("--tasks", default="arc_challenge,hellaswag,mmlu,truthfulqa_mc2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--benchmarks", type=Path, default=Path(__file__).resolve().parents[2] / "shared/benchmarks")
    parser.add_argument("--work", type=Path, default=Path(".cache/eval-parity"),
                        help="where the export, the data stand-in and both runs' records go")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    per_subject = math.ceil(args.limit / len(MMLU_SUBJECTS))
    names = args.tasks.split(",")
    others = ",".join(n for n in names if n != "mmlu")
    task_limits = [(others, args.limit)] * bool(others) + [("mmlu", per_subject)] * ("mmlu" in names)
    run = side_by_side(args.work, args.benchmarks,
                       task_limits,
                       args.batch_size, args.device, progress=True)

    table = Table(title=f"llamaherd vs lm-eval --model hf · harness protocol · batch size {args.batch_size} · "
                        f"{args.device}")
    for col in ("task", "docs", "same prediction", "same per-doc metrics", "max |Δ loglik|", "Δ metrics (points)"):
        table.add_column(col)
    ok = True
    for group, c in run.comparisons.items():
        diffs = ", ".join(f"{m} {d:.3f}" for m, d in c.metric_diff_points.items())
        table.add_row(group, str(c.n_docs), f"{c.same_prediction}/{c.n_docs}", f"{c.same_metrics}/{c.n_docs}",
                      f"{c.max_logprob_diff:.2e}", diffs)
        ok &= (c.same_prediction == c.n_docs and c.max_logprob_diff <= LOGPROB_TARGET
               and all(d <= METRIC_TARGET_POINTS for d in c.metric_diff_points.values()))
    Console().print(table)
    print(f"targets: identical predictions, |Δ loglik| <= {LOGPROB_TARGET}, |Δ metric| <= {METRIC_TARGET_POINTS} "
          f"points -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
