"""The `herd eval` subcommand: argument parsing and the summary table, over `runner.evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llamaherd.evaluate.tasks import PROTOCOLS, TASK_NAMES
from llamaherd.terminal import printable, printable_text


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `herd eval` on the `herd` parser's subcommands."""
    p = subparsers.add_parser(
        "eval", help="score a model on the Open LLM Leaderboard suite (resumable)",
        description="Score a model on ARC-Challenge, HellaSwag, MMLU and TruthfulQA as the 2023 Open LLM "
                    "Leaderboard (--suite leaderboard-2023) or today's lm-evaluation-harness (--suite harness) "
                    "scores them. Re-running the same command resumes an interrupted run.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="preset/alias name, local directory, .gguf file, PEFT adapter directory or hub id "
                        "(default: embedded smollm2-135m-instruct)")
    p.add_argument("--base", default=None,
                   help="base model for a PEFT adapter MODEL (default: its adapter_config.json's "
                        "base_model_name_or_path)")
    p.add_argument("--suite", "--protocol", dest="protocol", default="leaderboard-2023", choices=list(PROTOCOLS),
                   help="which protocol to follow (default: leaderboard-2023)")
    p.add_argument("--tasks", default=",".join(TASK_NAMES),
                   help=f"comma-separated tasks (default: {','.join(TASK_NAMES)}); mmlu_<subject> names one subject")
    p.add_argument("--limit", type=int, default=None,
                   help="first N docs of each task (each MMLU subject); results are marked as estimates")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default: 16)")
    p.add_argument("--output", type=Path, default=None,
                   help="results directory (default: eval-results/<model>-<suite>); reused to resume")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local benchmark files laid out like ../shared/benchmarks (default: the Hugging Face hub)")
    p.add_argument("--hellaswag-form", default=None,
                   help="which local HellaSwag file to use when several are present (see docs/evaluation.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 to save memory")
    p.add_argument("--max-length", type=int, default=None,
                   help="context length to truncate prompts to (default: the model's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--log-samples", action="store_true",
                   help="also write each request's context and continuation, their token ids and per-token "
                        "log-likelihoods into the samples files (lm-eval's --log_samples; see docs/herd-eval.md)")
    p.add_argument("--db", default=None,
                   help="leaderboard database to record the results in (default: $LLAMAHERD_DB or the user data dir)")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not record in the leaderboard")
    p.set_defaults(func=run_eval)
    return p


def run_eval(args: argparse.Namespace) -> None:
    """`herd eval`: evaluate, then print the summary table and where the files are."""
    from llamaherd.errors import InputError
    from llamaherd.evaluate.runner import EvalOptions, evaluate
    from llamaherd.load import model_name

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    name = model_name(args.model)
    output = args.output or Path("eval-results") / f"{name}-{args.protocol}"
    results = evaluate(EvalOptions(
        model=args.model, base=args.base, protocol=args.protocol, tasks=args.tasks.split(","), limit=args.limit,
        batch_size=args.batch_size, output=output, data_dir=args.data_dir, dtype=args.dtype,
        device=args.device, quantize=args.quantize, max_length=args.max_length,
        hellaswag_form=args.hellaswag_form, progress=args.progress, log_samples=args.log_samples,
    ))
    print_summary(results)
    print(f"results: {printable(output / 'results.json')}")
    if args.record:
        from llamaherd.leaderboard import record_results

        record_results(args.db, output / "results.json")
        print("recorded in the leaderboard (`herd leaderboard` shows it)")


def print_summary(results: dict[str, Any]) -> None:
    """A table of every task's metrics with their standard errors (the headline metric first, e.g. TruthfulQA's
    mc2 then mc1), the leaderboard columns, and warnings (truncation, half precision, data caveats)."""
    from rich.table import Table

    from llamaherd.terminal import console as wide_console

    estimate = " — ESTIMATE (--limit {})".format(results["limit"]) if results["estimate"] else ""
    title = f"{results['model']['name']} · {results['protocol']}{estimate}"
    table = Table(title=printable_text(title, style="table.title"))
    for col in ("task", "version", "shots", "docs", "metric", "value", "± stderr", "data"):
        table.add_column(col, justify="right" if col in ("shots", "docs", "value", "± stderr") else "left",
                         no_wrap=col != "data", overflow="fold")
    for task, entry in results["tasks"].items():
        headline = entry["metric"]
        others = [m for m in entry["metrics"] if not m.endswith("_stderr") and m != headline]
        for metric in (headline, *others):
            value, stderr = entry["metrics"][metric], entry["metrics"][f"{metric}_stderr"]
            first = metric == headline  # task, version, shots, docs and data on the headline row only
            about = [task, entry["version"], str(entry["n_shot"]), str(entry["n_docs"])] if first else [""] * 4
            table.add_row(*map(printable_text, about), printable_text(metric), f"{100 * value:.2f}",
                          "n/a" if stderr is None else f"{100 * stderr:.2f}",
                          printable_text(entry["data_form"] if first else ""))
    console = wide_console()
    console.print(table)
    scores = results["scores"]
    console.print(printable_text("  ".join(f"{k}: {'—' if v is None else f'{v:.2f}'}" for k, v in scores.items())))
    if results["truncated_requests"]:
        console.print(f"[yellow]{results['truncated_requests']} requests were left-truncated to the model's "
                      f"context of {results['model']['max_length']} tokens[/yellow]")
    if results["model"]["dtype"] in ("bf16", "fp16"):
        console.print(printable_text(
            f"{results['model']['dtype']}: half-precision scores move slightly with --batch-size (padding changes "
            "how the kernels round); only fp32 scores are batch-size invariant (docs/herd-eval.md)", style="yellow"))
    for task, entry in results["tasks"].items():
        for caveat in entry["caveats"]:
            console.print(printable_text(f"{task}: {caveat}", style="yellow"))
