"""Decode and prefill speed on SmolLM2-135M: llamaherd vs transformers in one run, fp32 and bf16.

    .venv/bin/python benchmarks/generate.py [--new-tokens 128] [--prompt-tokens 512] [--repeats 3]

Prints tokens/s for both, the ratio, and the fraction of this machine's limits reached: decode against
the memory read bandwidth (weight bytes read per token x tokens/s), prefill against matmul FLOP/s
(2 x parameters x tokens/s), both measured here by the script itself. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from llamaherd.embedded import embedded_model_path
from llamaherd.generate import generate_ids
from llamaherd.load import load_gpt


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth() -> float:
    """Bytes/s for reading a 1 GiB tensor (a reduction does almost no arithmetic per byte)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    return x.numel() * 4 / best_time(lambda: x.sum(), 5)


def matmul_flops(dtype: torch.dtype) -> float:
    a = torch.randn(2048, 2048).to(dtype)
    b = torch.randn(2048, 2048).to(dtype)
    return 2 * 2048**3 / best_time(lambda: a @ b, 5)


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
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args()
    torch.manual_seed(0)

    bandwidth = read_bandwidth()
    print(f"machine: {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    short = torch.randint(100, 40000, (1, 16))
    long = torch.randint(100, 40000, (1, args.prompt_tokens))
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        compare(name, dtype, args, short, long, bandwidth)


def compare(name: str, dtype: torch.dtype, args: argparse.Namespace, short: torch.Tensor, long: torch.Tensor,
            bandwidth: float) -> None:
    flops = matmul_flops(dtype)
    if dtype != torch.float32:  # without half matrix units the fastest half GEMM here is fp32's (model.linear)
        flops = max(flops, matmul_flops(torch.float32))
    ours = load_gpt(embedded_model_path(), dtype=dtype)
    theirs = load_transformers(dtype)
    n_params = ours.config.n_params
    weight_bytes = n_params * torch.finfo(dtype).bits // 8

    def ours_decode():
        generate_ids(ours, short[0].tolist(), max_new_tokens=args.new_tokens, stop_ids=set())

    def theirs_decode():
        with torch.inference_mode():
            theirs.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                            do_sample=False, pad_token_id=0)

    def ours_prefill():
        with torch.inference_mode():
            ours(long, cache=ours.new_cache(1, args.prompt_tokens + 1), last_only=True)

    def theirs_prefill():
        with torch.inference_mode():
            theirs(long, logits_to_keep=1, use_cache=True)

    d_ours, d_theirs = (args.new_tokens / best_time(f, args.repeats) for f in (ours_decode, theirs_decode))
    p_ours, p_theirs = (args.prompt_tokens / best_time(f, args.repeats) for f in (ours_prefill, theirs_prefill))
    print(f"\n[{name}] SmolLM2-135M, {n_params / 1e6:.1f}M params, {weight_bytes / 1e6:.0f} MB of weights, "
          f"matmul {flops / 1e9:.0f} GFLOP/s")
    print(f"  decode  (batch 1, {args.new_tokens} new tokens): llamaherd {d_ours:7.1f} tok/s   "
          f"transformers {d_theirs:7.1f} tok/s   ratio {d_ours / d_theirs:.2f}x   "
          f"bandwidth used {weight_bytes * d_ours / bandwidth:.0%} (transformers "
          f"{weight_bytes * d_theirs / bandwidth:.0%})")
    print(f"  prefill ({args.prompt_tokens}-token prompt):       llamaherd {p_ours:7.1f} tok/s   "
          f"transformers {p_theirs:7.1f} tok/s   ratio {p_ours / p_theirs:.2f}x   "
          f"matmul peak used {2 * n_params * p_ours / flops:.0%} (transformers "
          f"{2 * n_params * p_theirs / flops:.0%})")


if __name__ == "__main__":
    main()
