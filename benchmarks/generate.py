"""Decode and prefill speed on SmolLM2-135M: llamaherd vs transformers vs llama.cpp in one run, per precision.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--prompt-tokens 512] [--repeats 5]
                                            [--precisions fp32,bf16,int8] [--threads N] [--json out.json]

The same weights everywhere: the embedded Q4_1 GGUF as llamaherd and transformers dequantize it, and as
llama.cpp re-saved it at F32 / F16 / Q8_0 (benchmarks/setup_llamacpp.sh), compared in pairs fp32/F32,
bf16/F16, int8/Q8_0 (llamaherd's weight-only int8; transformers has no CPU int8 of its own: "—"). The same
prompt token ids, the same thread count (--threads, default torch's), greedy with EOS ignored. Each call is
timed by wall clock around the whole of it (decode: a 16-token prompt and --new-tokens tokens, tokens/s =
new tokens / seconds; prefill: one forward over the prompt keeping the last position's logits, llamaherd's as
its generation engine runs it, within `kernels.generating`; llama.cpp's: one eval of the prompt).

The peers take turns call by call: after one warm-up call each, every repeat times one call of each peer, in
turn (the order reversed every other repeat), so all of them run in the same minutes; this VM's memory
bandwidth drifts by 20-50% between minutes, which made "best of N, one peer after the other" ratios swing from
0.66x to 0.95x between rounds of one run. The table gives each peer's median tokens/s and llamaherd's ratio to
each peer as the median of the per-repeat ratios, with their range. llama.cpp runs in a subprocess with the
llama.cpp venv's python (llamacpp_side.py), kept up for the whole precision, so the project venv needs no
llama.cpp; without that venv the llama.cpp column says how to make it. Also printed: the fraction of this
machine's limits llamaherd reaches, decode against the memory read bandwidth (weight bytes read per token x
tokens/s), prefill against matmul FLOP/s (2 x parameters x tokens/s), both measured here by the script itself.
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from llamacpp_side import FTYPES, VENV_PYTHON, best_time, gguf_path, missing
from rich import box
from rich.console import Console
from rich.table import Table

from llamaherd import kernels
from llamaherd.embedded import embedded_model_path
from llamaherd.generate import generate_ids
from llamaherd.load import load_gpt

# llamaherd precision -> (activation dtype, llamaherd quantization).
PRECISIONS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8")}
PEERS = ("llamaherd", "transformers", "llama.cpp")
PHASES = ("decode", "prefill")
Timer = Callable[[], float]  # one timed call: its seconds


def read_bandwidth() -> float:
    """Bytes/s for reading a 1 GiB tensor (a reduction does almost no arithmetic per byte)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / best_time(lambda: x.sum(), 5)


def matmul_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a 1024 x 1024 product (ATen's bf16 GEMM without bf16 hardware ran at <1 GFLOP/s here: small)."""
    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    return 2 * 1024**3 / best_time(lambda: a @ b, 3)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every stored tensor once (a tied embedding counts once, as the
    head), less the embedding table when a head of its own reads the logits (int8's copy, an untied head): a
    step looks up one row of it."""
    tensors = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}
    if model._modules.get("lm_head") is not None:
        tensors.pop(model.model.embed_tokens.weight.data_ptr(), None)
    return sum(tensors.values())


def seconds(fn: Callable[[], object]) -> Timer:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per peer and phase, taking turns")
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="any of " + ",".join(PRECISIONS))
    ap.add_argument("--threads", type=int, help="threads for all three (default: torch's, one per core)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.repeats < 1 or args.new_tokens < 1 or args.prompt_tokens < 1:
        ap.error("--repeats, --new-tokens and --prompt-tokens must be at least 1")
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        ap.error(f"--precisions: unknown {','.join(sorted(unknown))}; choose from {','.join(PRECISIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)

    bandwidth = read_bandwidth()
    peak = {dtype: matmul_flops(dtype) for dtype in {torch.float32} | {PRECISIONS[p][0] for p in precisions}}
    print(f"machine: {threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, matmul "
          + ", ".join(f"{str(d).removeprefix('torch.')} {f / 1e9:.0f} GFLOP/s" for d, f in peak.items()))
    short = torch.randint(100, 40000, (1, 16))
    long = torch.randint(100, 40000, (1, args.prompt_tokens))
    rows = []
    for name in precisions:
        dtype = PRECISIONS[name][0]
        # without half matrix units the fastest half GEMM here is fp32's (model.linear); int8 computes in fp32
        rows += compare(name, args, threads, short, long, bandwidth, max(peak[dtype], peak[torch.float32]))
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "read_bandwidth": bandwidth, "new_tokens": args.new_tokens,
                                         "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                                         "rows": rows}, indent=1))


def compare(name: str, args: argparse.Namespace, threads: int, short: torch.Tensor, long: torch.Tensor,
            bandwidth: float, flops: float) -> list[dict]:
    """Decode and prefill rows for one precision: each peer's tokens/s per repeat (None where a peer has no such
    precision, the set-up hint where llama.cpp is missing), their medians and llamaherd's paired ratios."""
    dtype, quantize = PRECISIONS[name]
    ftype = FTYPES[name]
    ours, n_params, n_bytes = llamaherd_timers(dtype, quantize, args, short, long)
    peers: dict[str, dict[str, Timer] | str | None] = {
        "llamaherd": ours,
        "transformers": None if quantize else transformers_timers(dtype, args, short, long),
    }
    model = gguf_path(ftype, embedded_model_path())
    cpp = None if (hint := missing(VENV_PYTHON, model)) else LlamaCpp(model, threads, args, short, long)
    peers["llama.cpp"] = hint or cpp.timers()
    try:
        timed = {phase: take_turns({p: t[phase] for p, t in peers.items() if isinstance(t, dict)}, args.repeats)
                 for phase in PHASES}
    finally:
        if cpp:
            cpp.close()
    rows = []
    for phase in PHASES:
        tokens = args.new_tokens if phase == "decode" else args.prompt_tokens
        rates = {p: [tokens / s for s in runs] for p, runs in timed[phase].items()}
        row = {"phase": phase, "precision": name, "ftype": ftype, "rates": rates}
        for peer, t in peers.items():
            row[peer] = statistics.median(rates[peer]) if peer in rates else t
            if peer != "llamaherd" and peer in rates:
                row[f"vs {peer}"] = sorted(a / b for a, b in zip(rates["llamaherd"], rates[peer]))
        row["limit_used"] = (n_bytes * row["llamaherd"] / bandwidth if phase == "decode"
                             else 2 * n_params * row["llamaherd"] / flops)
        rows.append(row)
    return rows


def take_turns(timers: dict[str, Timer], repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each timer, one call of each in turn (reversed every other repeat, so no
    peer always follows the same one), after one warm-up call each."""
    for timer in timers.values():
        timer()
    runs = {name: [] for name in timers}
    order = list(timers)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            runs[name].append(timers[name]())
    return runs


def llamaherd_timers(dtype: torch.dtype, quantize: str | None, args: argparse.Namespace, short: torch.Tensor,
                     long: torch.Tensor) -> tuple[dict[str, Timer], int, int]:
    """llamaherd's decode and prefill timers, its parameters and weight bytes."""
    ours = load_gpt(embedded_model_path(), dtype=dtype, quantize=quantize)

    def decode():
        generate_ids(ours, short[0].tolist(), max_new_tokens=args.new_tokens, stop_ids=set())

    def prefill():  # one forward over the prompt, as the engine's prefill runs it (kernels.prefilling)
        with torch.inference_mode(), kernels.generating(), kernels.prefilling():
            ours(long, cache=ours.new_cache(1, args.prompt_tokens + 1), last_only=True)

    return {"decode": seconds(decode), "prefill": seconds(prefill)}, ours.config.n_params, weight_bytes(ours)


def transformers_timers(dtype: torch.dtype, args: argparse.Namespace, short: torch.Tensor,
                        long: torch.Tensor) -> dict[str, Timer]:
    """transformers' decode and prefill timers."""
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = theirs.to(dtype).eval()

    def decode():
        with torch.inference_mode():
            theirs.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)

    def prefill():
        with torch.inference_mode():
            theirs(long, logits_to_keep=1, use_cache=True)

    return {"decode": seconds(decode), "prefill": seconds(prefill)}


class LlamaCpp:
    """llama.cpp's timing worker (llamacpp_side.worker) on the `ftype` file, in the llama.cpp venv, kept up while
    the peers take turns; each timer sends it one command and reads back its seconds."""

    def __init__(self, model: Path, threads: int, args: argparse.Namespace, short: torch.Tensor,
                 long: torch.Tensor) -> None:
        self.model, self.log = model, tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(VENV_PYTHON), str(Path(__file__).with_name("llamacpp_side.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        spec = {"model": str(model), "threads": threads, "new_tokens": args.new_tokens,
                "short": short[0].tolist(), "long": long[0].tolist()}
        self._send(json.dumps(spec), expect="ready")

    def _send(self, line: str, expect: str | None = None) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer or (expect and answer != expect):
            self.proc.kill()
            self.log.seek(0)
            sys.exit(f"llama.cpp on {self.model} failed:\n{self.log.read()[-2000:]}")
        return answer

    def timers(self) -> dict[str, Timer]:
        return {phase: (lambda phase=phase: float(self._send(phase))) for phase in PHASES}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """One Markdown table: median tokens/s per peer, llamaherd's paired ratios to both (median and range over the
    repeats), and the share of the machine's limit."""

    def rate(x: float | str | None) -> str:
        return "—" if x is None else x if isinstance(x, str) else f"{x:,.1f} tok/s"

    def ratio(r: dict, peer: str) -> str:
        ratios = r.get(f"vs {peer}")
        if not ratios:
            return "—"
        return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"

    print(f"\nbatch 1; decode: {args.new_tokens} new tokens after a 16-token prompt; prefill: a {args.prompt_tokens}-"
          f"token prompt; medians of {args.repeats} calls each, the peers taking turns; ratios: median (range) of "
          "the per-call ratios; limit: decode vs read bandwidth, prefill vs matmul peak\n")
    table = Table(box=box.MARKDOWN)
    for col in ("", *PEERS, "vs transformers", "vs llama.cpp", "llamaherd of limit"):
        table.add_column(col)
    for r in rows:
        table.add_row(f"{r['phase']} {r['precision']} / {r['ftype']}", *(rate(r[p]) for p in PEERS),
                      ratio(r, "transformers"), ratio(r, "llama.cpp"), f"{r['limit_used']:.0%}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
