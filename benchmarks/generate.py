"""Decode and prefill speed on SmolLM2-135M: llamaherd vs transformers vs llama.cpp in one run, per precision.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--prompt-tokens 512] [--repeats 3] [--rounds 1]
                                            [--precisions fp32,bf16,int8] [--threads N] [--json out.json]

The same weights everywhere: the embedded Q4_1 GGUF as llamaherd and transformers dequantize it, and as
llama.cpp re-saved it at F32 / F16 / Q8_0 (benchmarks/setup_llamacpp.sh), compared in pairs fp32/F32,
bf16/F16, int8/Q8_0 (llamaherd's weight-only int8; transformers has no CPU int8 of its own: "—"). The same
prompt token ids, the same thread count (--threads, default torch's), greedy with EOS ignored. All three are
timed by wall clock around the whole call, best of --repeats after a warm-up (prefill: one forward over the
prompt keeping the last position's logits, llamaherd's as its generation engine runs it, within
`kernels.generating`; llama.cpp's: one eval of the prompt); llama.cpp runs in a subprocess
with the llama.cpp venv's python (llamacpp_side.py), so the project venv needs no llama.cpp. Without that
venv the llama.cpp column says how to make it. Prints one table with the ratios, and the fraction of this
machine's limits llamaherd reaches: decode against the memory read bandwidth (weight bytes read per token x
tokens/s), prefill against matmul FLOP/s (2 x parameters x tokens/s), both measured here by the script
itself. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def read_bandwidth() -> float:
    """Bytes/s for reading a 1 GiB tensor (a reduction does almost no arithmetic per byte)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / best_time(lambda: x.sum(), 5)


def matmul_flops(dtype: torch.dtype) -> float:
    a = torch.randn(2048, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    return 2 * 2048**3 / best_time(lambda: a @ b, 5)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every stored tensor once (a tied embedding counts once)."""
    return sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values())


def load_transformers(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run the whole comparison this many times; the table "
                    "shows each peer's fastest round, then each round's ratios")
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="any of " + ",".join(PRECISIONS))
    ap.add_argument("--threads", type=int, help="threads for all three (default: torch's, one per core)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
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
    rounds = []
    for _ in range(args.rounds):  # each round: every peer at every precision, close in time to each other
        rows = []
        for name in precisions:
            dtype = PRECISIONS[name][0]
            # without half matrix units the fastest half GEMM here is fp32's (model.linear); int8 computes in fp32
            rows += compare(name, args, threads, short, long, bandwidth, max(peak[dtype], peak[torch.float32]))
        rounds.append(rows)
    rows = best_of_rounds(rounds)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "read_bandwidth": bandwidth, "new_tokens": args.new_tokens,
                                         "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                                         "rounds": args.rounds, "rows": rows}, indent=1))


def best_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (phase, precision): each peer's fastest round, and every round's tokens/s under "rounds"."""
    rows = []
    for i, first in enumerate(rounds[0]):
        same = [r[i] for r in rounds]
        row = dict(first, rounds=[{p: r[p] for p in PEERS} for r in same])
        for peer in PEERS:
            if isinstance(first[peer], float):
                row[peer] = max(r[peer] for r in same)
        row["limit_used"] = max(r["limit_used"] for r in same)
        rows.append(row)
    return rows


def compare(name: str, args: argparse.Namespace, threads: int, short: torch.Tensor, long: torch.Tensor,
            bandwidth: float, flops: float) -> list[dict]:
    """Decode and prefill rows (tokens/s per peer, None where a peer has no such precision) for one precision."""
    dtype, quantize = PRECISIONS[name]
    ftype = FTYPES[name]
    (d_ours, p_ours), n_params, n_bytes = time_llamaherd(dtype, quantize, args, short, long)
    d_theirs, p_theirs = (None, None) if quantize else time_transformers(dtype, args, short, long)
    d_cpp, p_cpp = time_llamacpp(ftype, args, threads, short, long)
    return [{"phase": "decode", "precision": name, "ftype": ftype, "llamaherd": d_ours, "transformers": d_theirs,
             "llama.cpp": d_cpp, "limit_used": n_bytes * d_ours / bandwidth, "weight_bytes": n_bytes},
            {"phase": "prefill", "precision": name, "ftype": ftype, "llamaherd": p_ours, "transformers": p_theirs,
             "llama.cpp": p_cpp, "limit_used": 2 * n_params * p_ours / flops}]


def time_llamaherd(dtype: torch.dtype, quantize: str | None, args: argparse.Namespace, short: torch.Tensor,
                   long: torch.Tensor) -> tuple[tuple[float, float], int, int]:
    """((decode, prefill) tokens/s, parameters, weight bytes) of llamaherd."""
    ours = load_gpt(embedded_model_path(), dtype=dtype, quantize=quantize)

    def decode():
        generate_ids(ours, short[0].tolist(), max_new_tokens=args.new_tokens, stop_ids=set())

    def prefill():  # one forward over the prompt, as the engine's prefill runs it (kernels.prefilling)
        with torch.inference_mode(), kernels.generating(), kernels.prefilling():
            ours(long, cache=ours.new_cache(1, args.prompt_tokens + 1), last_only=True)

    speeds = (args.new_tokens / best_time(decode, args.repeats), args.prompt_tokens / best_time(prefill, args.repeats))
    return speeds, ours.config.n_params, weight_bytes(ours)


def time_transformers(dtype: torch.dtype, args: argparse.Namespace, short: torch.Tensor,
                      long: torch.Tensor) -> tuple[float, float]:
    """(decode, prefill) tokens/s of transformers."""
    theirs = load_transformers(dtype)

    def decode():
        with torch.inference_mode():
            theirs.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)

    def prefill():
        with torch.inference_mode():
            theirs(long, logits_to_keep=1, use_cache=True)

    return args.new_tokens / best_time(decode, args.repeats), args.prompt_tokens / best_time(prefill, args.repeats)


def time_llamacpp(ftype: str, args: argparse.Namespace, threads: int, short: torch.Tensor,
             long: torch.Tensor) -> tuple[float, float] | tuple[str, str]:
    """llama.cpp's (decode, prefill) tokens/s on the `ftype` file, or the set-up hint twice when it is missing."""
    model = gguf_path(ftype, embedded_model_path())
    if hint := missing(VENV_PYTHON, model):
        return hint, hint
    spec = {"model": str(model), "threads": threads, "repeats": args.repeats, "new_tokens": args.new_tokens,
            "short": short[0].tolist(), "long": long[0].tolist()}
    run = subprocess.run([str(VENV_PYTHON), str(Path(__file__).with_name("llamacpp_side.py"))],
                         input=json.dumps(spec), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"llama.cpp on {model} failed:\n{run.stderr[-2000:]}")
    out = json.loads(run.stdout)
    return out["decode"], out["prefill"]


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """One Markdown table: tokens/s per peer, llamaherd's ratios to both, and the share of the machine's limit."""

    def rate(x: float | str | None) -> str:
        return "—" if x is None else x if isinstance(x, str) else f"{x:,.1f} tok/s"

    def ratio(a: float, b: float | str | None) -> str:
        return f"{a / b:.2f}x" if isinstance(b, float) else "—"

    print(f"\nbatch 1; decode: {args.new_tokens} new tokens after a 16-token prompt; prefill: a {args.prompt_tokens}-"
          f"token prompt; limit: decode vs read bandwidth, prefill vs matmul peak\n")
    table = Table(box=box.MARKDOWN)
    for col in ("", *PEERS, "vs transformers", "vs llama.cpp", "llamaherd of limit"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: r["phase"]):
        table.add_row(f"{r['phase']} {r['precision']} / {r['ftype']}", *(rate(r[p]) for p in PEERS),
                      ratio(r["llamaherd"], r["transformers"]), ratio(r["llamaherd"], r["llama.cpp"]),
                      f"{r['limit_used']:.0%}")
    Console(width=200).print(table)
    if args.rounds > 1:  # the VM drifts between minutes: each round's own ratio says more than the best of all
        for peer in ("llama.cpp", "transformers"):
            print(f"\nllamaherd / {peer} in each round (the same minute):")
            for r in sorted(rows, key=lambda r: r["phase"]):
                if isinstance(r[peer], float):
                    ratios = [ratio(x["llamaherd"], x[peer]) for x in r["rounds"]]
                    print(f"  {r['phase']} {r['precision']}: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
