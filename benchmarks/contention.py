"""Two llamaherd processes on one machine: a LoRA fine-tune and an evaluation, each alone and side by side.

    .venv/bin/python benchmarks/contention.py [--seconds 40] [--work out/bench_contention]

The fine-tune is `herd finetune`'s Trainer (LoRA r=8 on q/k/v/o/gate/up/down of the embedded SmolLM2-135M-Instruct,
batch 8 of short Alpaca records in the model's chat template, at most 256 tokens); the evaluation is `herd eval`'s
log-likelihood engine on ARC-Challenge 25-shot requests (batch 16). Each runs in its own process with torch's
default threads. Both load and warm up first, wait at a barrier, then count tokens (fine-tune) or requests
(evaluation) over the same `--seconds` window.

Scenarios: each alone and both together, with llamaherd's core sharing on (the default, `llamaherd.threads`) and
off (LLAMAHERD_SHARE_CORES=0: every process runs one thread per core, as before). Prints throughput, the share of
the solo throughput each side keeps, and the threads it ran; writes contention.json beside the table.
Target (issue 11, point 8): together, each side >= 60% of its solo throughput; alone, sharing on loses nothing.
Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/benchmarks"
UNITS = {"finetune": "tokens/s", "eval": "requests/s"}


# ---- workers (one process each) ----------------------------------------------------------------------------
def finetune_step_fn(args: argparse.Namespace):
    """A LoRA Trainer as `herd finetune` builds it; returns a function that runs one step and gives its tokens."""
    import functools

    import torch

    from llamaherd.data import collate, load_sft_data
    from llamaherd.load import load_model
    from llamaherd.train.config import TrainConfig
    from llamaherd.train.core import Trainer
    from llamaherd.train.distributed import DistInfo
    from llamaherd.train.run import prepare_model
    from llamaherd.train.sft import SFTObjective

    cfg = TrainConfig(method="lora", batch_size=8, micro_batch_size=8, max_seq_len=256, max_steps=10**6,
                      lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      lora_targets=["q", "k", "v", "o", "gate", "up", "down"], val_fraction=0.0,
                      save_every=10**9, progress=False, plot=False, out_dir=str(args.work / f"run-{os.getpid()}"))
    loaded = load_model()
    samples = load_sft_data(SHARED / "instructions/alpaca_en_demo.json", loaded.tokenizer,
                            loaded.chat_format or "chatml", max_seq_len=cfg.max_seq_len).samples
    model = prepare_model(loaded.model, cfg)
    batches = functools.partial(collate, pad_id=0, padding_free=cfg.padding_free)
    trainer = Trainer(SFTObjective(model), samples, [], batches, cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    return lambda: trainer.train_step()["tokens"]


def eval_step_fn(args: argparse.Namespace):
    """`herd eval`'s engine on ARC-Challenge 25-shot; returns a function that scores one batch of requests."""
    from llamaherd.evaluate.engine import LoglikelihoodEngine
    from llamaherd.evaluate.tasks import build_requests, get_protocol, resolve_tasks
    from llamaherd.load import load_model

    protocol = get_protocol("leaderboard-2023")
    task = resolve_tasks(["arc_challenge"], SHARED, None)[0]
    docs = build_requests(task, protocol, 200)
    loaded = load_model()
    engine = LoglikelihoodEngine(loaded.model, loaded.tokenizer, protocol.add_bos and loaded.tokenizer
                                 .add_bos_default, batch_size=16)
    encoded = engine.encode([(r.context, r.continuation) for d in docs for r in d.requests])
    chunks = [encoded[i:i + 16] for i in range(0, len(encoded), 16)]
    state = {"next": 0}

    def step() -> int:
        chunk = chunks[state["next"] % len(chunks)]
        state["next"] += 1
        return sum(1 for _ in engine.iter_results(chunk))

    return step


def worker(args: argparse.Namespace) -> dict:
    import torch

    step = finetune_step_fn(args) if args.worker == "finetune" else eval_step_fn(args)
    for _ in range(2):  # warm-up: allocator, first-call costs
        step()
    (args.barrier / f"ready-{os.getpid()}").touch()
    while len(list(args.barrier.glob("ready-*"))) < args.parties:
        time.sleep(0.01)
    done, threads, t0 = 0, [], time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < args.seconds:
        done += step()
        threads.append(torch.get_num_threads())
    return {"rate": done / elapsed, "units": done, "seconds": elapsed, "steps": len(threads),
            "threads": sorted(set(threads)), "cpu_s": time.process_time()}


# ---- scenarios (parent) ------------------------------------------------------------------------------------
def run_scenario(args: argparse.Namespace, sides: list[str], share: bool, name: str) -> dict[str, dict]:
    barrier = args.work / f"barrier-{name}"
    barrier.mkdir(parents=True, exist_ok=True)
    for f in barrier.glob("*"):
        f.unlink()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["LLAMAHERD_SHARE_CORES"] = "1" if share else "0"
    procs = {side: subprocess.Popen([sys.executable, __file__, "--worker", side, "--seconds", str(args.seconds),
                                     "--work", str(args.work), "--barrier", str(barrier), "--parties",
                                     str(len(sides))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for side in sides}
    results = {}
    for side, p in procs.items():
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{name}: {side} worker failed:\n{err[-4000:]}")
        results[side] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=40.0, help="measured window per scenario")
    p.add_argument("--work", type=Path, default=Path("out/bench_contention"))
    p.add_argument("--worker", choices=list(UNITS), help=argparse.SUPPRESS)
    p.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--parties", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx", "amx"))})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags: {' '.join(flags)}")
    print(f"window {args.seconds:.0f} s per scenario; load average before: {os.getloadavg()[0]:.2f}")
    scenarios = {}
    for share in (False, True):
        tag = "sharing on" if share else "sharing off (before)"
        for side in UNITS:
            scenarios[f"{side} alone, {tag}"] = run_scenario(args, [side], share, f"{side}-{share}")
        scenarios[f"together, {tag}"] = run_scenario(args, list(UNITS), share, f"both-{share}")

    solo = {side: scenarios[f"{side} alone, sharing off (before)"][side]["rate"] for side in UNITS}
    header = f"{'scenario':32} {'side':9} {'rate':>9} {'unit':11} {'of solo':>8} {'threads':>8}"
    lines = [header, "-" * len(header)]
    for name, results in scenarios.items():
        for side, r in results.items():
            lines.append(f"{name:32} {side:9} {r['rate']:9.2f} {UNITS[side]:11} {r['rate'] / solo[side]:7.0%} "
                         f"{','.join(map(str, r['threads'])):>8}")
    print("\n".join(lines))
    print("'of solo': against the same side alone with sharing off (today's behaviour before this change).")
    out = args.work / "contention.json"
    out.write_text(json.dumps({"seconds": args.seconds, "flags": flags, "scenarios": scenarios, "solo": solo},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
