"""Fine-tuning speed and memory: llamaherd vs peft + trl's SFTTrainer (LoRA) and the transformers Trainer (full).

    .venv/bin/python benchmarks/finetune_speed.py [--methods lora full] [--steps 30] [--batch 4] [--seq-len 256]

Both sides train the embedded SmolLM2-135M-Instruct (exported once to Hugging Face safetensors so
transformers loads the same weights) on the same token sequences, in the same order (no shuffling), with the
same loss (response tokens and EOS only), batch, optimizer (fused AdamW, constant lr, clip 1.0), steps and
precision (fp32: trl's default bf16 autocast and activation checkpointing are turned off).
Each side runs in its own subprocess, so peak RSS (ru_maxrss: imports, model, data and training) is its own.
Prints tokens/s, peak RSS, first and final loss (mean of the last 5 steps) and the ratios; writes the JSON
beside the table. Targets: >= 1.3x tokens/s and <= 0.8x peak RSS at matching loss. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from side_by_side import export_embedded_hf, peak_rss_mb, run_worker, sequential_trainer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/benchmarks/instructions/alpaca_en_demo.json"
LORA_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
PEERS = {"lora": "peft + trl SFTTrainer", "full": "transformers Trainer"}


# ---- set-up (parent process) ---------------------------------------------------------------------------
def prepare(work: Path, data: Path, n: int, seq_len: int) -> tuple[Path, Path]:
    """Export the embedded model to HF format once; tokenize the first `n` records once for both sides."""
    from llamaherd.data import IGNORE_INDEX, load_sft_data

    loaded, hf_dir = export_embedded_hf(work)
    samples = load_sft_data(data, loaded.tokenizer, "alpaca", max_seq_len=seq_len).samples[:n]
    if len(samples) < n:
        raise SystemExit(f"{data}: only {len(samples)} samples, need steps x batch = {n}")
    rows = []
    for s in samples:
        if s.labels[-1] == IGNORE_INDEX:
            raise SystemExit(f"{s.sources[0]}: the last token is not trained; pick other data")
        rows.append({"input_ids": s.input_ids, "labels": s.labels})
    tokens = work / "samples.json"
    tokens.write_text(json.dumps(rows))
    return hf_dir, tokens


# ---- workers (one subprocess each) ----------------------------------------------------------------------
def worker_llamaherd(args: argparse.Namespace, rows: list[dict]) -> dict:
    import functools

    import torch

    from llamaherd.data import Sample, collate
    from llamaherd.load import load_model
    from llamaherd.train.config import TrainConfig
    from llamaherd.train.core import seed_everything
    from llamaherd.train.distributed import DistInfo
    from llamaherd.train.run import prepare_model
    from llamaherd.train.sft import SFTObjective

    cfg = TrainConfig(method=args.method, max_steps=args.steps, batch_size=args.batch, micro_batch_size=args.batch,
                      lr=args.lr, schedule="constant", warmup_steps=0, grad_clip=1.0, lora_r=args.lora_r,
                      lora_alpha=2 * args.lora_r, lora_dropout=0.0, lora_targets=LORA_TARGETS, val_fraction=0.0,
                      save_every=10**9, progress=False, plot=False, out_dir=str(args.work / f"llamaherd-{args.method}"))
    shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a scratch run, never resumed
    seed_everything(0)
    loaded = load_model(args.hf_dir)
    model = prepare_model(loaded.model, cfg)
    samples = [Sample(r["input_ids"], r["labels"], [len(r["input_ids"])], ["-"]) for r in rows]
    batches = functools.partial(collate, pad_id=0, padding_free=cfg.padding_free)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer = sequential_trainer()(SFTObjective(model), samples, [], batches, cfg, info)
    t = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - t
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r], "seconds": elapsed, "peak_rss_mb": peak_rss_mb()}


def worker_peer(args: argparse.Namespace, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    common = {
        "output_dir": str(args.work / f"peer-{args.method}"), "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "max_steps": args.steps, "learning_rate": args.lr,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0,
        "optim": "adamw_torch_fused", "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "dataloader_num_workers": 0, "seed": 0, "disable_tqdm": True, "bf16": False,
    }
    # HF shifts labels itself: give it the full sequence (input + last target) and unshifted labels.
    full_ids = [r["input_ids"] + [r["labels"][-1]] for r in rows]
    if args.method == "lora":
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        class SequentialSFT(SFTTrainer):
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

        masks = [[0] + [int(t != -100) for t in r["labels"]] for r in rows]
        dataset = Dataset.from_dict({"input_ids": full_ids, "completion_mask": masks})
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=[f"{t}_proj" for t in LORA_TARGETS], task_type="CAUSAL_LM")
        # SFTConfig defaults to bf16 autocast and activation checkpointing; both off, as on our side.
        cfg = SFTConfig(**common, completion_only_loss=True, max_length=args.seq_len + 1, packing=False,
                        pad_token="<|endoftext|>", dataset_num_proc=None, gradient_checkpointing=False)
        trainer = SequentialSFT(model=model, args=cfg, train_dataset=dataset, peft_config=peft_config)
    else:
        class SequentialTrainer(Trainer):
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

        def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
            T = max(len(b["input_ids"]) for b in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            labels = torch.full((len(batch), T), -100, dtype=torch.long)
            attn = torch.zeros(len(batch), T, dtype=torch.long)
            for i, b in enumerate(batch):
                n = len(b["input_ids"])
                ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
            return {"input_ids": ids, "labels": labels, "attention_mask": attn}

        data = [{"input_ids": ids, "labels": [-100] + r["labels"]} for ids, r in zip(full_ids, rows, strict=True)]
        trainer = SequentialTrainer(model=model, args=TrainingArguments(**common), train_dataset=data,
                                    data_collator=pad)
    t = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "seconds": elapsed, "peak_rss_mb": peak_rss_mb()}


# ---- report ---------------------------------------------------------------------------------------------
def summarize(result: dict, tokens: int) -> dict:
    losses = result["losses"]
    return {"tokens_per_s": tokens / result["seconds"], "peak_rss_mb": result["peak_rss_mb"],
            "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses),
            "seconds": result["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=Path("out/bench_finetune"))
    p.add_argument("--worker", choices=["llamaherd", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--method", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        rows = json.loads(args.samples.read_text())
        fn = worker_llamaherd if args.worker == "llamaherd" else worker_peer
        print(json.dumps(fn(args, rows)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    hf_dir, samples = prepare(args.work, args.data, args.steps * args.batch, args.seq_len)
    tokens = sum(len(r["input_ids"]) for r in json.loads(samples.read_text()))
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lr",
              str(args.lr), "--lora-r", str(args.lora_r), "--work", str(args.work), "--hf-dir", str(hf_dir),
              "--samples", str(samples)]
    report = {"settings": {k: str(v) for k, v in vars(args).items() if v is not None}, "tokens": tokens,
              "results": {}}
    print(f"{args.steps} steps x batch {args.batch}, max {args.seq_len} tokens/sample, {tokens} input tokens; "
          f"torch threads: default")
    header = f"{'method':6} {'side':24} {'tokens/s':>9} {'peak RSS MB':>12} {'first loss':>11} {'final loss':>11}"
    lines = [header, "-" * len(header)]
    for method in args.methods:
        ours = summarize(run_worker(__file__, ["--worker", "llamaherd", "--method", method, *common]), tokens)
        peer = summarize(run_worker(__file__, ["--worker", "peer", "--method", method, *common]), tokens)
        report["results"][method] = {"llamaherd": ours, "peer": peer, "peer_name": PEERS[method],
                                     "speed_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
                                     "memory_ratio": ours["peak_rss_mb"] / peer["peak_rss_mb"]}
        for name, r in (("llamaherd", ours), (PEERS[method], peer)):
            lines.append(f"{method:6} {name:24} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
                         f"{r['first_loss']:11.4f} {r['final_loss']:11.4f}")
        res = report["results"][method]
        ratio = "ratio (llamaherd/peer)"
        lines.append(f"{method:6} {ratio:24} {res['speed_ratio']:8.2f}x {res['memory_ratio']:11.2f}x")
    print("\n".join(lines))
    out = args.work / "finetune_speed.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
