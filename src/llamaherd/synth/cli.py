"""`herd synth self-chat | explain | self-instruct`: the CLI over synth.job (one parser per recipe, shared options)."""

from __future__ import annotations

import argparse
import json

from llamaherd.synth.job import SynthJob, dry_run, run_job
from llamaherd.synth.sampling import Sampling

RECIPE_HELP = {
    "self-chat": "Baize: the teacher chats with itself about each seed topic (dialogues as chat messages)",
    "explain": "Orca / FreeWilly: each instruction answered under one of Orca's 16 system messages",
    "self-instruct": "Self-Instruct / Alpaca: new instructions from seed tasks, ROUGE-L filtered, with instances",
}


def add_synth_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `herd synth` and its three recipes."""
    p = subparsers.add_parser("synth", help="synthetic training data: self-chat, explain, self-instruct",
                              description="Generate training data with a local model or an OpenAI-compatible "
                                          "endpoint; resumable (rerun the same command). See docs/synth.md.")
    recipes = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for recipe, help_ in RECIPE_HELP.items():
        r = recipes.add_parser(recipe, help=help_, description=help_)
        if recipe == "explain":
            r.add_argument("--instructions", "--seeds", dest="seeds", required=True,
                           help="instructions: text (one per line) or JSONL/JSON with 'instruction' (+ 'input')")
            r.add_argument("-n", type=int, default=None, help="rows (default: one per instruction)")
            r.add_argument("--system-map", default=None,
                           help='JSON {source: [message numbers 1-16], "*": [...]}: the system messages each '
                                "record's 'source' may draw (default: all 16, uniformly)")
        else:
            r.add_argument("--seeds", required=True,
                           help="seeds: text (one per line) or JSONL/JSON with 'topic', 'question' or 'instruction'")
            r.add_argument("-n", type=int, required=True, help="rows to produce")
        if recipe == "self-chat":
            r.add_argument("--max-turns", type=int, default=None,
                           help="turn by turn, up to this many exchanges (default: one transcript request)")
            r.add_argument("--api", choices=["chat", "completion"], default="chat",
                           help="send Baize's transcript prompt as a chat message (Baize's ChatGPT usage, default) or "
                                "as a raw completion, which small local models continue more faithfully")
        if recipe == "self-instruct":
            r.add_argument("--variant", choices=["self-instruct", "alpaca"], default="self-instruct",
                           help="self-instruct: 8 example tasks per prompt (6 seed + 2 machine); alpaca: 3 seed "
                                "tasks, up to 20 new ones per reply (default: self-instruct)")
            r.add_argument("--requests-per-round", type=int, default=5,
                           help="instruction prompts per round (default: 5, as both original scripts)")
            r.add_argument("--api", choices=["completion", "chat"], default="completion",
                           help="send prompts as completions (the papers' GPT-3 usage, default) or chat messages")
        _common(r, recipe)
        r.set_defaults(func=run_synth)
    return p


def _common(r: argparse.ArgumentParser, recipe: str) -> None:
    temperature = {"self-chat": 1.0, "explain": 0.7, "self-instruct": 0.7}[recipe]
    max_tokens = {"self-chat": 512, "explain": 512, "self-instruct": 1024}[recipe]
    r.add_argument("--teacher", default=None, help="local model: preset/alias, path or GGUF (default: the embedded "
                                                    "SmolLM2-135M-Instruct)")
    r.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint instead, e.g. "
                                                     "http://127.0.0.1:8000/v1 (herd serve)")
    r.add_argument("--model", default=None, help="the endpoint's model id (default: its only model)")
    r.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's key (default: OPENAI_API_KEY)")
    r.add_argument("--chat-format", default=None, help="local teacher: built-in chat format overriding the model's")
    r.add_argument("--out", default=None, help=f"output folder (default: out/synth-{recipe})")
    r.add_argument("--seed", type=int, default=0, help="run seed; each request's seed derives from it (default: 0)")
    r.add_argument("--max-tokens", type=int, default=max_tokens, help=f"per reply (default: {max_tokens})")
    r.add_argument("--temperature", type=float, default=temperature, help=f"default: {temperature}")
    top_p = 0.5 if recipe == "self-instruct" else None  # Self-Instruct's published setting (with temperature 0.7)
    r.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling (default: {top_p or 'off'})")
    r.add_argument("--max-batch", type=int, default=16, help="local teacher: sequences decoded together (default 16)")
    r.add_argument("--concurrency", type=int, default=8, help="endpoint: requests in flight (default: 8)")
    r.add_argument("--max-retries", type=int, default=5, help="endpoint: retries per request (default: 5)")
    r.add_argument("--timeout", type=float, default=120.0, help="endpoint: seconds per request (default: 120)")
    r.add_argument("--near-dup", type=float, default=0.8,
                   help="drop rows whose MinHash Jaccard with an earlier row is >= this; 0 keeps them (default 0.8)")
    r.add_argument("--keep-refusals", action="store_true", help="keep rows with refusal boilerplate")
    r.add_argument("--price-in", type=float, default=None, help="USD per million prompt tokens (for the cost)")
    r.add_argument("--price-out", type=float, default=None, help="USD per million completion tokens")
    r.add_argument("--dry-run", action="store_true", help="print requests and a token (and cost) estimate, then stop")


def job_from_args(args: argparse.Namespace) -> SynthJob:
    """The SynthJob a parsed `herd synth RECIPE ...` describes."""
    return SynthJob(
        recipe=args.recipe, seeds=args.seeds, out=args.out or f"out/synth-{args.recipe}", n=args.n,
        sampling=Sampling(args.max_tokens, args.temperature, args.top_p, args.seed),
        teacher=args.teacher, base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
        chat_format=args.chat_format, max_batch=args.max_batch, concurrency=args.concurrency,
        max_retries=args.max_retries, timeout=args.timeout, max_turns=getattr(args, "max_turns", None),
        system_map=getattr(args, "system_map", None), variant=getattr(args, "variant", "self-instruct"),
        requests_per_round=getattr(args, "requests_per_round", 5),
        completion_api=None if getattr(args, "api", None) is None else args.api == "completion",
        near_dup=args.near_dup or None, keep_refusals=args.keep_refusals,
        price_in=args.price_in, price_out=args.price_out)


def run_synth(args: argparse.Namespace) -> None:
    job = job_from_args(args)
    if args.dry_run:
        print(json.dumps(dry_run(job), indent=2))
        return
    manifest = run_job(job)
    counts, usage = manifest["counts"], manifest["this_run"]
    print(f"{counts['kept']} rows kept of {counts['finished']}/{counts['items']} items -> {job.out}/data.jsonl")
    if counts["dropped"] or counts["failed"]:
        print(f"dropped: {counts['dropped']}  failed: {counts['failed']}")
    print(f"requests: {usage['requests']} ({usage['cached']} from the cache), tokens in/out: "
          f"{usage['tokens']['prompt']}/{usage['tokens']['completion']}, {usage['wall_s']} s")
    if "cost_usd" in manifest["totals"]:
        print(f"cost so far: ${manifest['totals']['cost_usd']}")
