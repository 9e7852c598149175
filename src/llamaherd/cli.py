"""`herd`: the command-line tool, a thin layer over the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from llamaherd.errors import HerdError, InputError
from llamaherd.terminal import printable

MODEL_HELP = ("preset/alias name, local directory, .gguf file, PEFT adapter directory or hub id "
              "(default: embedded smollm2-135m-instruct)")
BASE_HELP = "base model for a PEFT adapter MODEL (default: its adapter_config.json's base_model_name_or_path)"


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 to save memory")


SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "stop_strings": "--stop",
                  "seed": "--seed"}


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="at most this many tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling in (0, 1] (default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def _sampling(args: argparse.Namespace, extra_stops: list[str] = ()):
    """The command line's sampling settings, checked before anything loads or prints; errors name the flag."""
    from llamaherd.generate import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_strings=[*args.stop, *extra_stops], seed=args.seed,
    )
    try:
        params.validate()
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    except InputError as e:
        field, _, rest = str(e).partition(" ")
        raise InputError(f"{SAMPLING_FLAGS.get(field, field)} {rest}") from None
    return params


def _load(args: argparse.Namespace, device: str = "cpu"):
    from llamaherd.load import load_model

    return load_model(args.model, dtype=args.dtype, device=device, quantize=args.quantize, base=args.base)


def _stream(text: Iterator[str]) -> str:
    """Print generated text as it comes; returns all of it."""
    pieces = []
    tty = sys.stdout.isatty()  # a terminal sees control characters as escapes; a pipe gets the exact text
    for piece in text:
        print(printable(piece, keep="\n\t") if tty else piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    return "".join(pieces)


def cmd_chat(args: argparse.Namespace) -> None:
    from llamaherd.chat import get_chat_format
    from llamaherd.generate import Conversation

    _sampling(args)  # bad flags fail before the model loads
    loaded = _load(args)
    tok = loaded.tokenizer
    fmt_name = args.chat_format or loaded.chat_format
    if fmt_name is None:
        raise HerdError(f"{loaded.source.path}: the model has no chat template; pass --chat-format NAME")
    fmt = get_chat_format(fmt_name, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    params = _sampling(args, fmt.stop_strings)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    conversation = Conversation(loaded.model, tok)  # each turn computes only what the last did not

    def reply(user_text: str) -> None:
        messages.append({"role": "user", "content": user_text})
        ids = fmt.encode(messages, tok)
        messages.append({"role": "assistant", "content": _stream(conversation.stream(ids, params))})

    if args.prompt is not None:
        reply(args.prompt)
        return
    print(f"chatting with {printable(loaded.source.name)} — /reset clears the conversation, /exit or Ctrl-D quits",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            del messages[1 if args.system else 0 :]
            continue
        if line:
            reply(line)


def cmd_generate(args: argparse.Namespace) -> None:
    from llamaherd.generate import stream_text

    params = _sampling(args)  # bad flags fail before the model loads or the prompt is echoed
    loaded = _load(args)
    tok = loaded.tokenizer
    ids = tok.encode(args.prompt, add_bos=tok.add_bos_default if args.bos is None else args.bos)
    print(args.prompt, end="", flush=True)
    _stream(stream_text(loaded.model, tok, ids, params))


def cmd_download(args: argparse.Namespace) -> None:
    from llamaherd.hub import download

    print(printable(download(args.repo_id, local_dir=args.local_dir, revision=args.revision)))


def cmd_convert(args: argparse.Namespace) -> None:
    if args.quantize:
        raise HerdError("convert writes float weights; drop --quantize")
    out = _load(args).save_hf(args.dst)
    print(f"wrote Hugging Face checkpoint to {printable(out)}")


def cmd_info(args: argparse.Namespace) -> None:
    from llamaherd import config as presets
    from llamaherd.info import describe
    from llamaherd.load import read_config, resolve

    name = args.model or "smollm2-135m-instruct"
    if presets.is_known(name) and not Path(name).exists() and args.base is None:
        cfg = presets.preset(name)
    else:
        src = resolve(name, args.base)
        cfg = read_config(src)
        if src.base is not None:
            print(printable(f"PEFT adapter {src.path} on base {src.base.name} ({src.base.path})"))
    print(describe(cfg))


def cmd_models(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from llamaherd import config as presets
    from llamaherd.info import human_count

    table = Table(title="llamaherd models (presets and derivatives)")
    for col in ("name", "architecture", "parameters", "hub id", "chat format"):
        table.add_column(col)
    for name in presets.all_names():
        cfg = presets.preset(name)
        base = presets.ALIASES[name].base if name in presets.ALIASES else "preset"
        table.add_row(name, base, human_count(cfg.n_params), cfg.hub_id or "", cfg.chat_format or "")
    console = Console()
    console.width = max(console.width, 140)  # never cut names or hub ids, even in a pipe
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="LLaMA / Llama 2 / Falcon toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat with a model (interactive, or one shot with --prompt)")
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", default=None, help="one message; print the reply and exit")
    p.add_argument("--chat-format", default=None, help="built-in format name (overrides the model's template)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="complete a raw prompt (no chat template)")
    _add_model_options(p)
    _add_sampling_options(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS (default: the tokenizer's own setting)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="download a model from the Hugging Face hub")
    p.add_argument("repo_id")
    p.add_argument("--local-dir", default=None)
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="export any supported checkpoint as Hugging Face safetensors")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("dst", help="output directory")
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="parameters and weight memory per precision")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--base", default=None, help=BASE_HELP)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list presets and derivative names")
    p.set_defaults(func=cmd_models)

    from llamaherd.curate.cli import add_curate_parser
    from llamaherd.demo import add_demo_parser
    from llamaherd.evaluate.cli import add_eval_parser
    from llamaherd.leaderboard.cli import add_leaderboard_parser
    from llamaherd.serve.cli import add_serve_parser
    from llamaherd.synth.cli import add_synth_parser
    from llamaherd.train.cli import (
        add_dpo_parser, add_estimate_parser, add_finetune_parser, add_merge_parser, add_ppo_parser,
        add_rejection_parser, add_reward_parser,
    )

    for add in (add_eval_parser, add_leaderboard_parser, add_finetune_parser, add_reward_parser,
                add_rejection_parser, add_ppo_parser, add_dpo_parser, add_merge_parser, add_estimate_parser,
                add_demo_parser, add_serve_parser, add_synth_parser, add_curate_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HerdError as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
