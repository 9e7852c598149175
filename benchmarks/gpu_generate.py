"""Decode and prefill speed on a CUDA GPU: llamaherd with and without CUDA graphs vs transformers, per model size.

    python benchmarks/gpu_generate.py [--models smollm2-135m,llama-2-7b] [--dtype bf16] [--new-tokens 128]
        [--prompt-tokens 512] [--batch 16] [--repeats 3] [--no-parity] [--device cuda] [--save-hf DIR] [--json out.json]

Weights are random (seeded, std 0.02) in each preset's shapes (llamaherd.config presets): speed does not depend on
their values (greedy, no stop id, a fixed number of new tokens), and no checkpoint has to be on the GPU machine.
transformers (LlamaForCausalLM / FalconForCausalLM, attention `sdpa`, DynamicCache, `generate`) gets the
very same tensors. llamaherd decodes through one long-lived Engine (as `herd serve` does), without prefix reuse,
after a warm-up run that also captures its graphs; every figure is the best of --repeats runs, timed by wall clock
between `torch.cuda.synchronize()` calls.

Rows: decode at batch 1 (--new-tokens after a 16-token prompt), decode with --batch rows (same prompt in every row),
prefill of a --prompt-tokens prompt. Decode is set against the GPU's memory bandwidth: weight bytes x decode steps
per second, over the device-to-device copy rate measured here (bytes read + written). Before timing, a parity check
in fp32 on the first model: the greedy tokens and each token's log-probability with CUDA graphs against eager
(≤ 1e-4). --save-hf DIR also writes the first model (weights in --dtype) as a Hugging Face directory, for
`benchmarks/serve_load.py --model DIR`. On a CPU (--device cpu) it runs without graphs: a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from generate import weight_bytes
from llamacpp_side import best_time
from rich import box
from rich.console import Console
from rich.table import Table

from llamaherd.checkpoints.hf import hf_config_dict, save_hf
from llamaherd.config import preset
from llamaherd.engine import Engine, SamplingParams
from llamaherd.load import build_on_meta, load_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synced_best_time(fn, repeats: int, device: str) -> float:
    """llamacpp_side.best_time of fn followed by a device synchronisation (the warm-up call's sync leaves no work
    pending when the first timed call starts)."""
    return best_time(lambda: (fn(), sync(device)), repeats)


def copy_bandwidth(device: str) -> float:
    """Bytes/s read + written by a device-to-device copy of 2 GiB."""
    x = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / synced_best_time(lambda: y.copy_(x), 5, device)


def build(name: str, dtype: torch.dtype, device: str):
    """(transformers model, llamaherd GPT) sharing one set of random weights of preset `name`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = preset(name)
    config = config.replace(block_size=min(config.block_size, 4096))
    hf_dict = hf_config_dict(config)
    hf_config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        theirs = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    ours = build_on_meta(config)
    load_weights(ours, iter(theirs.state_dict().items()), dtype, f"random {name}")
    return theirs, ours.to(device).eval(), config


def parity(name: str, device: str) -> dict:
    """Greedy tokens and their log-probabilities with CUDA graphs against eager, fp32."""
    _, model, _ = build(name, torch.float32, device)
    prompt = list(range(100, 140))
    params = SamplingParams(max_new_tokens=48, stop_ids=frozenset(), logprobs=0)
    out = []
    for graphs in (True, False):
        engine = Engine(model, max_batch=2, max_len=128, cuda_graphs=graphs)
        completion = engine.generate_many([prompt, prompt[:17]], params)[0].completions[0]
        out.append((completion.token_ids, [e.logprob for e in completion.logprobs], engine.graphs))
    (ids_g, lp_g, graphs), (ids_e, lp_e, _) = out
    return {"model": name, "graphs_captured": 0 if graphs is None else len(graphs.graphs),
            "graphs_failed": graphs is not None and graphs.failed,
            "same_tokens": ids_g == ids_e,
            "max_logprob_diff": max(abs(a - b) for a, b in zip(lp_g, lp_e))}


def measure(name: str, args: argparse.Namespace, bandwidth: float) -> list[dict]:
    dtype, device = DTYPES[args.dtype], args.device
    theirs, ours, config = build(name, dtype, device)
    short = list(range(100, 116))
    long = torch.randint(100, 30000, (1, args.prompt_tokens), device=device)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_ids=frozenset())
    max_len = len(short) + args.new_tokens + 1
    rows = []
    for batch in (1, args.batch):
        prompts = [short] * batch
        timed = {}
        for label, graphs in (("llamaherd + CUDA graphs", True), ("llamaherd eager", False)):
            if graphs and not device.startswith("cuda"):
                timed[label] = None
                continue
            engine = Engine(ours, max_batch=batch, max_len=max_len, prefix_reuse=False, cuda_graphs=graphs)
            seconds = synced_best_time(lambda e=engine, p=prompts: e.generate_many(p, params), args.repeats, device)
            timed[label] = batch * args.new_tokens / seconds

        def hf_decode(batch=batch):
            with torch.inference_mode():
                theirs.generate(torch.tensor([short] * batch, device=device), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

        timed["transformers"] = batch * args.new_tokens / synced_best_time(hf_decode, args.repeats, device)
        best = max(v for k, v in timed.items() if v and k.startswith("llamaherd"))
        rows.append({"model": name, "phase": f"decode, batch {batch}", **timed,
                     "of_bandwidth": weight_bytes(ours) * best / batch / bandwidth})

    def our_prefill():
        with torch.inference_mode():
            ours(long, cache=ours.new_cache(1, args.prompt_tokens + 1), last_only=True)

    def hf_prefill():
        with torch.inference_mode():
            theirs(long, logits_to_keep=1, use_cache=True)

    ours_rate = args.prompt_tokens / synced_best_time(our_prefill, args.repeats, device)
    rows.append({"model": name, "phase": f"prefill, {args.prompt_tokens} tokens", "llamaherd eager": ours_rate,
                 "llamaherd + CUDA graphs": None,
                 "transformers": args.prompt_tokens / synced_best_time(hf_prefill, args.repeats, device),
                 "of_bandwidth": None})
    if args.save_hf and name == args.models.split(",")[0]:
        save_hf({k: v.cpu() for k, v in theirs.state_dict().items() if k != "lm_head.weight"
                 or not config.tie_embeddings}, config, args.save_hf)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,llama-2-7b", help="llamaherd.config preset names")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="rows of the batched decode row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True,
                    help="check graphs against eager first (default: on)")
    ap.add_argument("--save-hf", type=Path, help="write the first model here as a Hugging Face directory")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    bandwidth = copy_bandwidth(device)
    print(f"{name}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + write); torch {torch.__version__}")
    checks = parity(args.models.split(",")[0], device) if args.parity else None
    print(f"parity (fp32, CUDA graphs vs eager): {checks}")
    rows = []
    for model in args.models.split(","):
        rows += measure(model, args, bandwidth)  # the models are freed on return
        print(json.dumps(rows[-3:]), flush=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    cols = ("llamaherd + CUDA graphs", "llamaherd eager", "transformers")
    table = Table(box=box.MARKDOWN, title=f"{name}, {args.dtype}, tokens/s")
    for col in ("model", "phase", *cols, "best llamaherd / transformers", "of copy bandwidth"):
        table.add_column(col)
    for r in rows:
        ours = max(r[c] for c in cols[:2] if r[c])
        table.add_row(r["model"], r["phase"], *("—" if r[c] is None else f"{r[c]:,.0f}" for c in cols),
                      f"{ours / r['transformers']:.2f}x",
                      "—" if r["of_bandwidth"] is None else f"{r['of_bandwidth']:.0%}")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_bandwidth": bandwidth, "parity": checks,
                                         "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
