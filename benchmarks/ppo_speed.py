"""PPO speed: rollout (generation) tokens/s, update tokens/s and the share of time spent generating, for herd ppo.

    .venv/bin/python benchmarks/ppo_speed.py [--methods lora full] [--rollouts 4] [--rollout-batch 16]
                                             [--max-new-tokens 64] [--generation-batch 16]

There is no maintained CPU peer to run beside it (TRL removed PPO from its stable API; torchtune's PPO recipe runs on
one CUDA device), so this prints llamaherd's own figures. Each method trains the embedded SmolLM2-135M-Instruct by
PPO on the prompts of ../shared/benchmarks/preferences/dpo_en_demo.json (its chat template) against a cheap
programmatic reward (the response's length in words, at most 20), so the time is PPO's, not a reward model's.
From the run's metrics.jsonl: rollout tokens/s = sampled response tokens / generation time; update tokens/s =
tokens of the optimizer steps (prompt + response, every PPO epoch) / their time; the generating share =
generation time / (rollout time, which also scores and runs the policy and reference passes, + update time).
The first rollout is left out (kernel builds, allocator warm-up). Prints a table; writes the JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/benchmarks/preferences/dpo_en_demo.json"
REWARD = "def words(prompts, completions, completion_ids):\n    return [min(len(c.split()), 20) for c in completions]\n"


def run(method: str, args: argparse.Namespace, work: Path) -> dict:
    """One PPO run of args.rollouts + 1 rollouts; the figures of all but the first."""
    from llamaherd.train.config import TrainConfig
    from llamaherd.train.metrics import read_metrics
    from llamaherd.train.ppo import run_ppo

    out = work / f"ppo-{method}"
    shutil.rmtree(out, ignore_errors=True)
    updates = 2 * args.rollout_batch // 8
    cfg = TrainConfig(task="ppo", data=[str(args.data)], out_dir=str(out), reward_fn=str(work / "reward.py:words"),
                      method=method, lora_dropout=0.0, lora_targets=["q", "k", "v", "o", "gate", "up", "down"],
                      rollout_batch_size=args.rollout_batch, batch_size=8, micro_batch_size=4, ppo_epochs=2,
                      max_new_tokens=args.max_new_tokens, generation_batch_size=args.generation_batch,
                      max_seq_len=512, lr=1e-5 if method == "full" else 1e-4, schedule="constant",
                      max_steps=(args.rollouts + 1) * updates, save_every=10**6, progress=False, plot=False)
    started = time.perf_counter()
    run_ppo(cfg)
    wall = time.perf_counter() - started
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][updates:]
    rollouts = [r for r in records if "generate_s" in r]
    generated = sum(r["response_length"] * args.rollout_batch for r in rollouts)
    generate_s = sum(r["generate_s"] for r in rollouts)
    rollout_s = sum(r["rollout_s"] for r in rollouts)
    update_s = sum(r["update_s"] for r in records)
    return {"method": method, "rollouts": len(rollouts), "response_tokens": generated,
            "rollout_tokens_per_s": generated / generate_s,
            "update_tokens_per_s": sum(r["tokens"] for r in records) / update_s,
            "generating_share": generate_s / (rollout_s + update_s),
            "scoring_share": (rollout_s - generate_s) / (rollout_s + update_s),
            "mean_response_length": generated / len(rollouts) / args.rollout_batch, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full", "qlora"])
    p.add_argument("--rollouts", type=int, default=4, help="timed rollouts (after one warm-up rollout)")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--generation-batch", type=int, default=16)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, default=Path("benchmarks/ppo_speed.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ppo_speed_"))
    (work / "reward.py").write_text(REWARD)
    try:
        rows = [run(method, args, work) for method in args.methods]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nherd ppo on SmolLM2-135M-Instruct: {args.rollouts} rollouts of {args.rollout_batch} prompts, "
          f"<= {args.max_new_tokens} new tokens, 2 PPO epochs in minibatches of 8")
    print(f"{'method':8} {'rollout tok/s':>14} {'update tok/s':>13} {'generating':>11} {'scoring':>8} "
          f"{'resp len':>9}")
    for r in rows:
        print(f"{r['method']:8} {r['rollout_tokens_per_s']:14.1f} {r['update_tokens_per_s']:13.1f} "
              f"{100 * r['generating_share']:10.1f}% {100 * r['scoring_share']:7.1f}% "
              f"{r['mean_response_length']:9.1f}")
    args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                    indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
