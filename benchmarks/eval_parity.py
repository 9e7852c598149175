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

import sys

from eval_speed import parse_args, report_speed, run_side_by_side
from rich.console import Console
from rich.table import Table

LOGPROB_TARGET = 1e-3
METRIC_TARGET_POINTS = 0.1


def main() -> int:
    args = parse_args(__doc__, 100, ".cache/eval-parity")
    run = run_side_by_side(args, progress=True)

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
    report_speed(run, args)  # no warm-up run here: eval_speed.py is the speed benchmark
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
