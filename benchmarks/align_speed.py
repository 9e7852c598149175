"""Preference-training speed and memory: llamaherd vs TRL (+ peft) for DPO (LoRA and full) and a reward model (LoRA).

    .venv/bin/python benchmarks/align_speed.py [--rows dpo-lora dpo-full rm-lora] [--steps 4] [--batch 4]
                                               [--seq-len 256] [--repeats 2]

Both sides train the embedded SmolLM2-135M-Instruct (exported once to Hugging Face safetensors so transformers
loads the same weights) on the same preference pairs of ../shared/benchmarks/preferences/dpo_en_demo.json,
tokenized once with the model's chat template, in the same order (no shuffling), with the same loss (DPO's sigmoid
loss at beta 0.1; the ranking loss -log sigmoid(r_chosen - r_rejected) for the RM), batch, optimizer (fused AdamW,
constant lr, clip 1.0), LoRA (r 8, alpha 16, no dropout, every linear layer) and precision (fp32: TRL's default
bf16 autocast and activation checkpointing are turned off). Each side runs in its own subprocess, so its peak RSS
(ru_maxrss: imports, model, data, training) is its own.

tokens/s counts, for both sides, the tokens of the usual layout: prompt + chosen and prompt + rejected per pair.
TRL's DPO runs those twice per step (policy, and reference: a second model copy for full fine-tuning, adapters
disabled for LoRA); llamaherd runs each pair as one row (the prompt once) and, for full fine-tuning, computes the
reference log-probs in one pass before training (timed here: the run's clock starts before it).
Each side runs --repeats times, alternating (llamaherd, TRL, llamaherd, TRL, ...), and its fastest run counts:
on a shared 2-core VM the same run varies by 10-20%, and alternating spreads slow spells over both sides.
Prints tokens/s (and every run's), peak RSS and the first and last losses and the ratios; writes the JSON beside
the table.
Targets: DPO >= 1.5x tokens/s at <= 0.7x peak RSS; RM >= 1.3x at <= 0.8x. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from side_by_side import export_embedded_hf, peak_rss_mb, run_worker, sequential_trainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/benchmarks/preferences/dpo_en_demo.json"
LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
ROWS = {"dpo-lora": ("dpo", "lora"), "dpo-full": ("dpo", "full"), "rm-lora": ("reward", "lora")}
PEERS = {"dpo": "trl DPOTrainer", "reward": "trl RewardTrainer"}
BETA = 0.1


# ---- set-up (parent process) ---------------------------------------------------------------------------------
def prepare(work: Path, data: Path, n: int, seq_len: int) -> tuple[Path, Path]:
    """Export the embedded model to HF format once; tokenize the first `n` pairs once for every worker."""
    from llamaherd.data.preference import load_preference_data

    loaded, hf_dir = export_embedded_hf(work)
    pairs, _ = load_preference_data(data, loaded.tokenizer, loaded.chat_format, max_seq_len=seq_len)
    if len(pairs) < n:
        raise SystemExit(f"{data}: only {len(pairs)} pairs, need steps x batch = {n}")
    rows = [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids}
            for p in pairs[:n]]
    tokens = work / "pairs.json"
    tokens.write_text(json.dumps(rows))
    return hf_dir, tokens


# ---- workers (one subprocess each) ----------------------------------------------------------------------------
def worker_llamaherd(args: argparse.Namespace, rows: list[dict]) -> dict:
    import torch

    from llamaherd.data.preference import PreferencePair
    from llamaherd.train.config import TrainConfig
    from llamaherd.train.core import seed_everything
    from llamaherd.train.distributed import DistInfo
    from llamaherd.train.dpo import DPORecipe, precompute_reference
    from llamaherd.train.reward import RewardRecipe

    task, method = ROWS[args.row]
    cfg = TrainConfig(task=task, model=str(args.hf_dir), method=method, max_steps=args.steps, batch_size=args.batch,
                      micro_batch_size=args.batch, lr=args.lr, schedule="constant", warmup_steps=0, grad_clip=1.0,
                      lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, lora_targets=LORA_TARGETS,
                      val_fraction=0.0, beta=BETA, save_every=10**9, progress=False, plot=False,
                      out_dir=str(args.work / f"llamaherd-{args.row}"))
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a scratch run, never resumed
    seed_everything(0)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    recipe = DPORecipe() if task == "dpo" else RewardRecipe()  # herd dpo's / herd reward's model, loss and batches
    loaded = recipe.load(cfg, None)
    pairs = [PreferencePair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    t = time.perf_counter()
    objective = recipe.objective(recipe.prepare(loaded.model, cfg), cfg)
    batches = recipe.collate(cfg, 0)
    if task == "dpo" and objective.reference == "precomputed":  # the first pass over the pairs, timed
        (pairs,) = precompute_reference(objective, [pairs], batches, info, None, None, args.batch, progress=False,
                                        log=lambda m: None)
    sequential_trainer()(objective, pairs, [], batches, cfg, info).fit()
    elapsed = time.perf_counter() - t
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r], "seconds": elapsed, "peak_rss_mb": peak_rss_mb()}


def worker_peer(args: argparse.Namespace, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    task, method = ROWS[args.row]
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    tokenizer.pad_token = tokenizer.eos_token
    common = {
        "output_dir": str(args.work / f"peer-{args.row}"), "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": args.lr,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "optim": "adamw_torch_fused", "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True, "bf16": False, "gradient_checkpointing": False,
        "max_length": None, "train_sampling_strategy": "sequential",
    }
    targets = [f"{t}_proj" for t in LORA_TARGETS]
    if task == "dpo":
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        class Tokenized(DPOTrainer):
            def _prepare_dataset(self, dataset, *a, **k):  # the pairs are token ids already
                return dataset

        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
        peft = (LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets,
                           task_type="CAUSAL_LM") if method == "lora" else None)
        trainer = Tokenized(model=model, args=DPOConfig(**common, beta=BETA, loss_type=["sigmoid"]),
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=peft)
    else:
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(args.hf_dir, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        data = Dataset.from_list([{"chosen_ids": r["prompt_ids"] + r["chosen_ids"],
                                   "rejected_ids": r["prompt_ids"] + r["rejected_ids"]} for r in rows])
        peft = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets,
                          task_type="SEQ_CLS")
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), train_dataset=data,
                                processing_class=tokenizer, peft_config=peft)
    t = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "seconds": elapsed, "peak_rss_mb": peak_rss_mb()}


# ---- report ---------------------------------------------------------------------------------------------------
def summarize(result: dict, tokens: int) -> dict:
    losses = result["losses"]
    return {"tokens_per_s": tokens / result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses), "seconds": result["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per side, alternating llamaherd, TRL, llamaherd, ...; the fastest run of each counts "
                        "(2-core VMs vary by 10-20%% between runs of the same code)")
    p.add_argument("--work", type=Path, default=Path("out/bench_align"))
    p.add_argument("--worker", choices=["llamaherd", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pairs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        rows = json.loads(args.pairs.read_text())
        fn = worker_llamaherd if args.worker == "llamaherd" else worker_peer
        print(json.dumps(fn(args, rows)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    hf_dir, pairs = prepare(args.work, args.data, args.steps * args.batch, args.seq_len)
    rows = json.loads(pairs.read_text())
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr), "--lora-r",
              str(args.lora_r), "--work", str(args.work), "--hf-dir", str(hf_dir), "--pairs", str(pairs)]
    report = {"settings": {k: str(v) for k, v in vars(args).items() if v is not None}, "tokens": tokens,
              "results": {}}
    print(f"{args.steps} steps x {args.batch} pairs, at most {args.seq_len} tokens per sequence, {tokens} tokens "
          "(prompt + chosen, prompt + rejected); torch threads: default")
    header = f"{'row':9} {'side':22} {'tokens/s':>9} {'peak RSS MB':>12} {'first loss':>11} {'last loss':>10}"
    print(header, "-" * len(header), sep="\n", flush=True)
    for row in args.rows:
        task = ROWS[row][0]
        runs = {"llamaherd": [], "peer": []}
        for _ in range(args.repeats):
            for side in runs:
                runs[side].append(summarize(run_worker(__file__, ["--worker", side, "--row", row, *common]), tokens))
        ours, peer = (max(runs[side], key=lambda r: r["tokens_per_s"]) for side in ("llamaherd", "peer"))
        report["results"][row] = {"llamaherd": ours, "peer": peer, "peer_name": PEERS[task],
                                  "all_tokens_per_s": {k: [r["tokens_per_s"] for r in v] for k, v in runs.items()},
                                  "speed_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
                                  "memory_ratio": ours["peak_rss_mb"] / peer["peak_rss_mb"]}
        for name, r, side in (("llamaherd", ours, "llamaherd"), (PEERS[task], peer, "peer")):
            every = "/".join(f"{x['tokens_per_s']:.0f}" for x in runs[side])
            print(f"{row:9} {name:22} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
                  f"{r['first_loss']:11.4f} {r['last_loss']:10.4f}   runs: {every} tok/s")
        res = report["results"][row]
        print(f"{row:9} {'ratio (llamaherd/TRL)':22} {res['speed_ratio']:8.2f}x {res['memory_ratio']:11.2f}x",
              flush=True)
    out = args.work / "align_speed.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
