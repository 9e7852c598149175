"""`herd curate`: web text to training text the RefinedWeb way (see docs/curation.md)."""

from __future__ import annotations

import argparse
import os
import time

from llamaherd.terminal import printable


def add_curate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `herd curate` on the `herd` parser's subcommands."""
    p = subparsers.add_parser(
        "curate", help="filter and deduplicate web text (WARC, JSONL, HTML) the RefinedWeb way",
        description="Read INPUT (WARC/WARC.gz, JSONL(.gz) with `text`, or directories of .html/.html.gz files), run "
                    "the recipe's stages (URL filter, extraction, language ID, Gopher repetition and quality, "
                    "line-wise corrections, exact, fuzzy and substring deduplication) and write JSONL shards and a "
                    "report to OUT. Rerunning the same command after an interruption resumes it. "
                    "See docs/curation.md.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="WARC/WARC.gz, JSONL(.gz) files or HTML directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory: data/*.jsonl, report.md/html/png")
    p.add_argument("--recipe", default="refinedweb",
                   help="refinedweb (default: the paper's stages and parameters), fineweb (FineWeb-style MinHash "
                        "14 bands x 8 rows) or FILE.yaml")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: a process pool on this machine (default); ray: Ray tasks (pip install "
                        "'llamaherd[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: start a local Ray instance of --workers CPUs)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (local) or CPUs of the local Ray instance (default: this machine's cores)")
    p.add_argument("--language", nargs="+", default=None, metavar="LANG",
                   help="keep documents in these languages (fastText codes, e.g. en de; default: the recipe's, en)")
    p.add_argument("--per-shard", action="store_true",
                   help="deduplicate each shard on its own (as RefinedWeb did per CommonCrawl part) instead of "
                        "across all shards")
    p.add_argument("--keep-metadata", action="store_true",
                   help="write each stage's scores and reasons beside text, url and id")
    p.set_defaults(func=run_curate_command)
    return p


def run_curate_command(args: argparse.Namespace) -> None:
    """`herd curate`: resolve the recipe, print its MinHash S-curve, run the pipeline, print the report's path."""
    from llamaherd.curate.executors import check_engine, make_executor
    from llamaherd.curate.minhash import s_curve_table
    from llamaherd.curate.pipeline import run_curate
    from llamaherd.curate.recipe import load_recipe

    check_engine(args.engine, args.workers, args.ray_address)  # before the recipe's stages load
    recipe = load_recipe(args.recipe)
    if args.language:
        recipe = recipe.with_languages(args.language)
    params = recipe.minhash()
    if params is not None:
        scope = "within each shard" if args.per_shard else "across all shards"
        print(f"Fuzzy deduplication {scope}: {s_curve_table(params)}")
    executor = make_executor(args.engine, args.workers, args.ray_address)
    start = time.perf_counter()
    try:
        report = run_curate(args.inputs, args.out, recipe, executor, per_shard=args.per_shard,
                            keep_metadata=args.keep_metadata)
    finally:
        executor.close()
    print(f"Done in {time.perf_counter() - start:.1f} s. Report: {printable(report)} "
          f"(also .html, .json, .png); data: {printable(report.parent / 'data')}")
