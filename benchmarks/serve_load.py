"""Serving under load: `herd serve` vs llama.cpp's `llama-server` on the same weights, 1, 4 and 16 clients.

    .venv/bin/python benchmarks/serve_load.py [--servers herd,llama.cpp] [--clients 1,4,16] [--requests 32]
        [--max-seconds 300] [--precision fp32|bf16|int8] [--mix 16:64,64:128,256:64,512:128]
        [--api completions|chat] [--threads N] [--seed 0] [--model DIR] [--device cuda] [--json out.json]

Each server is started here on a free port of 127.0.0.1 (nothing leaves the machine), one at a time and never
two together, once per client count, and stopped after its run. llama-server gets the embedded model re-saved
by llama.cpp at the matching precision (F32 / F16 / Q8_0, benchmarks/setup_llamacpp.sh), --parallel = clients,
continuous batching on, -c = clients x --slot-context, -t/-tb = --threads. herd serve gets the embedded Q4_1
GGUF itself with --dtype / --quantize (setup_llamacpp.sh checks that llama.cpp's F32 file holds these very
weights), OMP_NUM_THREADS = --threads, --max-batch = clients and --max-len = --slot-context.

The requests: streamed OpenAI completions (or chat completions), greedy, `ignore_eos` so that every answer
runs to its max_tokens (a server that refuses the field with 400 gets requests without it: see "short");
(prompt tokens, max_tokens) drawn with --seed from --mix, prompts of single-token words counted with the
model's tokenizer; the same list for every server and client count (max(--requests, 4 x clients) of them).
Each client sends its next request when its last one has ended, until the list is done or --max-seconds
have passed. Reported per server and client count: TTFT p50/p99 (request sent to the first streamed text),
inter-token latency p50/p99 (gaps between streamed chunks that carry text), output tokens/s (completion
tokens of all answers / first request sent to last answer ended), errors (a status other than 200, a broken
stream) and short answers (fewer tokens than max_tokens: EOS was not ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from llamacpp_side import FTYPES, SERVER, gguf_path, missing
from rich import box
from rich.console import Console
from rich.table import Table

from llamaherd.embedded import embedded_model_path
from llamaherd.load import load_tokenizer
from llamaherd.tokenizer import Tokenizer

HOST = "127.0.0.1"
HERD = Path(sys.executable).with_name("herd")
HERD_PRECISION = {"fp32": ["--dtype", "fp32"], "bf16": ["--dtype", "bf16"], "int8": ["--quantize", "int8"]}
WORDS = ("the a of and to in is was it for on with as at by from this that an be are or have one all their there "
         "time people water day land sun river field grass tree light night world year food home house hand").split()


@dataclass
class Request:
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds from time.perf_counter()."""

    sent: float
    max_tokens: int
    chunks: list[float] = field(default_factory=list)  # arrival of each streamed chunk carrying text
    ended: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def make_requests(n: int, mix: list[tuple[int, int]], seed: int, tokenizer: Tokenizer) -> list[Request]:
    """n requests with (prompt tokens, max_tokens) drawn from `mix`; prompts are words of one token each."""
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
    rng = random.Random(seed)
    requests = []
    for prompt_tokens, max_tokens in (rng.choice(mix) for _ in range(n)):
        prompt = "".join(" " + rng.choice(words) for _ in range(prompt_tokens))
        if len(tokenizer.encode(prompt)) != prompt_tokens:
            raise RuntimeError(f"{prompt_tokens} one-token words did not encode to {prompt_tokens} tokens")
        requests.append(Request(prompt, prompt_tokens, max_tokens))
    return requests


def request_body(req: Request, api: str, ignore_eos: bool) -> dict:
    """The JSON body of a streamed, greedy request (usage in the last chunk)."""
    body = {"max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}} | ({"ignore_eos": True} if ignore_eos else {})
    if api == "chat":
        return body | {"messages": [{"role": "user", "content": req.prompt}]}
    return body | {"prompt": req.prompt}


async def send(http: httpx.AsyncClient, req: Request, api: str, ignore_eos: bool) -> Outcome:
    """One streamed request; an HTTP or stream failure is recorded in the outcome, never raised."""
    out = Outcome(sent=time.perf_counter(), max_tokens=req.max_tokens)
    path = "/v1/chat/completions" if api == "chat" else "/v1/completions"
    try:
        async with http.stream("POST", path, json=request_body(req, api, ignore_eos)) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices") or ():
                    if choice.get("text") if api == "completions" else (choice.get("delta") or {}).get("content"):
                        out.chunks.append(time.perf_counter())
                if usage := chunk.get("usage"):
                    out.completion_tokens, out.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        out.ended = time.perf_counter()
    out.completion_tokens = out.completion_tokens or len(out.chunks)
    return out


async def run_load(port: int, requests: list[Request], clients: int, api: str,
                   max_seconds: float) -> tuple[list[Outcome], bool]:
    """`clients` concurrent clients working through `requests` until done or `max_seconds` have passed.

    Returns the outcomes and whether `ignore_eos` was sent: a server that refuses the field (400 naming it, as
    herd serve does for fields OpenAI does not define) is sent requests without it.
    """
    todo = list(reversed(requests))
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=httpx.Timeout(max_seconds),
                                 limits=limits, trust_env=False) as http:
        warm_up = Request(requests[0].prompt, requests[0].prompt_tokens, 4)  # not counted
        ignore_eos = "ignore_eos" not in ((await send(http, warm_up, api, True)).error or "")
        if not ignore_eos:
            await send(http, warm_up, api, False)
        deadline = time.perf_counter() + max_seconds

        async def client() -> None:
            while todo and time.perf_counter() < deadline:
                outcomes.append(await send(http, todo.pop(), api, ignore_eos))

        await asyncio.gather(*(client() for _ in range(clients)))
    return outcomes, ignore_eos


def summarize(outcomes: list[Outcome]) -> dict:
    """TTFT and inter-token latency percentiles (ms), output tokens/s, errors and short answers of one run."""
    ok = [o for o in outcomes if o.error is None]
    ttft = [1e3 * (o.chunks[0] - o.sent) for o in ok if o.chunks]
    itl = [1e3 * gap for o in ok for gap in np.diff(o.chunks)]
    span = max(o.ended for o in outcomes) - min(o.sent for o in outcomes)

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q)) if xs else None

    return {"requests": len(outcomes), "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "output_tokens_per_s": sum(o.completion_tokens for o in ok) / span,
            "prompt_tokens_mean": float(np.mean([o.prompt_tokens for o in ok])) if ok else None,
            "errors": len(outcomes) - len(ok), "short": sum(o.completion_tokens < o.max_tokens for o in ok),
            "first_error": next((o.error for o in outcomes if o.error), None)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], port: int, log: Path, env: dict[str, str], timeout: float) -> Iterator[None]:
    """Start a server, wait until GET /health answers 200, stop it (SIGTERM, then SIGKILL) on leaving."""
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not healthy after {timeout:.0f} s; log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{HOST}:{port}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def herd_command(args: argparse.Namespace, clients: int, port: int) -> list[str] | str:
    """The `herd serve` command line, or why it cannot run (no serve sub-command yet)."""
    helped = subprocess.run([str(HERD), "serve", "--help"], capture_output=True, text=True)
    if helped.returncode != 0:
        return "herd serve not available"
    cmd = [str(HERD), "serve", str(args.model or embedded_model_path()), "--host", HOST, "--port", str(port),
           *HERD_PRECISION[args.precision], *(["--device", args.device] if args.device else [])]
    cmd += ["--max-batch", str(clients)] if "--max-batch" in helped.stdout else []
    return cmd + (["--max-len", str(args.slot_context)] if "--max-len" in helped.stdout else [])


def llamacpp_command(args: argparse.Namespace, clients: int, port: int) -> list[str] | str:
    """The `llama-server` command line, or the set-up hint when it or the model file is missing."""
    model = gguf_path(FTYPES[args.precision], embedded_model_path())
    if hint := missing(SERVER, model):
        return hint
    return [str(SERVER), "-m", str(model), "--host", HOST, "--port", str(port), "-t", str(args.threads),
            "-tb", str(args.threads), "--parallel", str(clients), "--cont-batching",
            "-c", str(clients * args.slot_context), "--no-webui"]


COMMANDS = {"herd": herd_command, "llama.cpp": llamacpp_command}


def print_tables(results: list[dict]) -> None:
    """Per-run figures, then herd serve against llama-server and against its own single-client rate."""
    console = Console(width=200)

    def ms(x: float | None) -> str:
        return "—" if x is None else f"{x:,.1f}"

    runs = Table(box=box.MARKDOWN)
    for col in ("clients", "server", "requests", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                "output tok/s", "errors", "short"):
        runs.add_column(col)
    for r in results:
        if "skipped" in r:
            runs.add_row(str(r["clients"]), r["server"], r["skipped"])
        else:
            runs.add_row(str(r["clients"]), r["server"], str(r["requests"]), ms(r["ttft_p50"]), ms(r["ttft_p99"]),
                         ms(r["itl_p50"]), ms(r["itl_p99"]), f"{r['output_tokens_per_s']:,.1f}", str(r["errors"]),
                         str(r["short"]))
    console.print(runs)
    for r in results:
        if r.get("first_error"):
            console.print(f"{r['server']}, clients={r['clients']}, first error: {r['first_error']}", markup=False)
        if r.get("ignore_eos") is False:
            console.print(f"{r['server']}, clients={r['clients']}: refused ignore_eos: answers stop at EOS (short)")

    done = {(r["server"], r["clients"]): r for r in results if "skipped" not in r}
    ratios = Table(box=box.MARKDOWN)
    for col in ("clients", "herd / llama-server output tok/s", "herd / llama-server TTFT p50",
                "herd output tok/s / herd at 1 client"):
        ratios.add_column(col)
    for n in sorted({r["clients"] for r in results}):
        ours, theirs, solo = done.get(("herd", n)), done.get(("llama.cpp", n)), done.get(("herd", 1))
        both = ours and theirs
        ratios.add_row(
            str(n), f"{ours['output_tokens_per_s'] / theirs['output_tokens_per_s']:.2f}x" if both else "—",
            f"{ours['ttft_p50'] / theirs['ttft_p50']:.2f}x" if both and ours["ttft_p50"] and theirs["ttft_p50"]
            else "—",
            f"{ours['output_tokens_per_s'] / solo['output_tokens_per_s']:.2f}x" if ours and solo else "—")
    console.print(ratios)


def parse_mix(text: str) -> list[tuple[int, int]]:
    try:
        mix = [(int(p), int(o)) for p, o in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise SystemExit(f"--mix {text!r}: expected PROMPT:OUTPUT token counts separated by commas") from None
    if any(p < 1 or o < 1 for p, o in mix):
        raise SystemExit(f"--mix {text!r}: token counts must be at least 1")
    return mix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="herd,llama.cpp", help="any of " + ",".join(COMMANDS))
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, one run each")
    ap.add_argument("--requests", type=int, default=32, help="requests per run (at least 4 per client)")
    ap.add_argument("--max-seconds", type=float, default=300, help="no new request after this many seconds")
    ap.add_argument("--precision", choices=list(FTYPES), default="fp32")
    ap.add_argument("--mix", default="16:64,64:128,256:64,512:128", help="PROMPT:OUTPUT token counts, drawn evenly")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of each server")
    ap.add_argument("--slot-context", type=int, help="llama-server context per slot (default: longest request + 64)")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to become healthy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="herd serve's model (default: the embedded GGUF; llama-server always "
                                                "gets the embedded model's re-saved files)")
    ap.add_argument("--device", help="herd serve --device (default: herd serve's, cuda when available)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    servers, client_counts = args.servers.split(","), [int(c) for c in args.clients.split(",")]
    if unknown := set(servers) - set(COMMANDS):
        ap.error(f"--servers: unknown {','.join(sorted(unknown))}; choose from {','.join(COMMANDS)}")
    mix = parse_mix(args.mix)
    args.slot_context = args.slot_context or max(p + o for p, o in mix) + 64
    tokenizer, _ = load_tokenizer(args.model)
    requests = make_requests(max(args.requests, 4 * max(client_counts)), mix, args.seed, tokenizer)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    print(f"{len(requests)} requests at most per run, mix {args.mix}, {args.precision}, {args.threads} threads, "
          f"{args.api}", file=sys.stderr)

    results = []
    with tempfile.TemporaryDirectory(prefix="serve_load-") as logs:
        for server in servers:
            for clients in client_counts:
                port = free_port()
                cmd = COMMANDS[server](args, clients, port)
                if isinstance(cmd, str):
                    results.append({"server": server, "clients": clients, "skipped": cmd})
                    continue
                print(f"{server}, clients={clients}: {' '.join(cmd)}", file=sys.stderr)
                with running(cmd, port, Path(logs) / f"{server}-{clients}.log", env, args.start_timeout):
                    n = max(args.requests, 4 * clients)
                    outcomes, ignore_eos = asyncio.run(run_load(port, requests[:n], clients, args.api,
                                                                args.max_seconds))
                results.append({"server": server, "clients": clients, "ignore_eos": ignore_eos,
                                **summarize(outcomes)})
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                         "requests": [(r.prompt_tokens, r.max_tokens) for r in requests],
                                         "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
