"""`herd demo`: the whole story in a few minutes on the embedded model.

A streamed chat reply, a `--limit` evaluation on the four 2023 leaderboard benchmarks, and the
leaderboard showing the result beside the reported 2023 rows (terminal table + exported HTML page).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DATA_DIRS = (Path("../shared/benchmarks"), Path("shared/benchmarks"))


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="chat, a quick evaluation and the leaderboard on the embedded model")
    p.add_argument("model", nargs="?", default=None, help="default: embedded smollm2-135m-instruct")
    p.add_argument("--limit", type=int, default=1, help="docs per task (per MMLU subject: 57 docs); default 1")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local benchmark files (default: ../shared/benchmarks when present, else the hub)")
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="where results and the page go")
    p.add_argument("--prompt", default="In one sentence, what is a llama?")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from rich.text import Text

    from llamaherd.cli import main as herd
    from llamaherd.evaluate.cli import print_summary
    from llamaherd.evaluate.runner import EvalOptions, evaluate
    from llamaherd.leaderboard import story_summary
    from llamaherd.terminal import console as wide_console, printable_text

    console = wide_console()
    data_dir = args.data_dir or next((d for d in DEFAULT_DATA_DIRS if d.exists()), None)
    model_args = [args.model] if args.model else []

    console.rule("1. chat (streamed)")
    console.print(Text.assemble(("user>", "bold"), " ", printable_text(args.prompt)))
    if herd(["chat", *model_args, "--prompt", args.prompt, "--max-new-tokens", "64"]) != 0:
        raise SystemExit(2)

    console.rule(f"2. Open LLM Leaderboard 2023 suite, --limit {args.limit} (an estimate, not a full run)")
    out = args.output
    results = evaluate(EvalOptions(model=args.model, protocol="leaderboard-2023", limit=args.limit,
                                   output=out / "eval", data_dir=data_dir))
    print_summary(results)

    console.rule("3. leaderboard: measured here vs reported in 2023")
    html = story_summary(out / "leaderboard.sqlite", out / "eval" / "results.json", out / "leaderboard.html",
                         console=console)
    console.print(printable_text(f"web page: {Path(html).resolve()}  "
                                 f"(or: herd leaderboard serve --db {out / 'leaderboard.sqlite'})"))
