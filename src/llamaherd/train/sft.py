"""Supervised fine-tuning recipe: set up (model, method, data), train with the shared loop, save, record lineage."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llamaherd.data import IGNORE_INDEX, collate, load_sft_data, pack, split_validation
from llamaherd.errors import InputError
from llamaherd.model import GPT
from llamaherd.terminal import printable
from llamaherd.train import distributed as D
from llamaherd.train.checkpoint import gather_trainable
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Batch, LossOutput, Objective, Trainer, seed_everything
from llamaherd.train.head_loss import head_cross_entropy
from llamaherd.train.lineage import build_lineage, write_lineage


class SFTObjective(Objective):
    """Next-token cross-entropy summed over the trained tokens (labels are already shifted by the data).

    Only the positions that carry a label are projected to the vocabulary, so prompt and padding tokens
    cost no lm_head compute, and no (tokens, vocab) logits are kept for backward (`head_cross_entropy`).
    """

    def count(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def forward(self, batch: Batch) -> LossOutput:
        # Per-sample positions and segment ids: packed samples do not attend to each other.
        h = self.model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                       return_hidden=True)
        labels = batch["labels"]
        sel = labels != IGNORE_INDEX
        return LossOutput(head_cross_entropy(self.model, h[sel], labels[sel]))

    def n_tokens(self, batch: Batch) -> int:
        return int((batch["segment_ids"] > 0).sum())


def prepare_model(model: GPT, cfg: TrainConfig) -> GPT:
    """Full: every float weight trains. LoRA / QLoRA: the base is frozen and adapters are injected."""
    if cfg.method == "full":
        if any(not p.is_floating_point() for p in model.parameters()):
            raise InputError("method 'full' needs float weights; load the model without quantization")
        model.requires_grad_(True)
        return model
    from llamaherd.lora import LoRAConfig, inject_lora, lora_layers

    if lora_layers(model):  # a PEFT adapter MODEL on an int8 base is loaded unmerged (load.load_gpt)
        raise InputError("the model already carries LoRA layers (a PEFT adapter on an int8 base); merge it first "
                         "(herd merge BASE ADAPTER OUT) and fine-tune the merged model")
    return inject_lora(model, LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                         targets=tuple(cfg.lora_targets), rank_pattern=cfg.lora_rank_pattern,
                                         alpha_pattern=cfg.lora_alpha_pattern))


def load_datasets(cfg: TrainConfig, tokenizer, chat_format: str, log) -> tuple[list, list]:
    """Train and validation samples (packed when asked); the split is seeded and made before packing."""
    common = {"tokenizer": tokenizer, "chat_format": chat_format, "max_seq_len": cfg.max_seq_len,
              "data_format": cfg.data_format, "train_on_prompt": cfg.train_on_prompt}
    if not cfg.data:
        raise InputError("no training data: pass --data FILE (or `data:` in the config)")
    data = load_sft_data(cfg.data, **common)
    log(f"train data: {data.stats.summary()}")
    if cfg.val_data:
        val_data = load_sft_data(cfg.val_data, **common)
        log(f"validation data: {val_data.stats.summary()}")
        train, val = data.samples, val_data.samples
    else:
        train, val = split_validation(data.samples, cfg.val_fraction, seed=cfg.seed)
    if cfg.packing:
        train, val = pack(train, cfg.max_seq_len), pack(val, cfg.max_seq_len)
    log(f"{len(train)} training rows, {len(val)} validation rows")
    return train, val


def full_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state on CPU on rank 0, keyed as in `GPT`; collective under FSDP2."""
    if trainable_only:
        state = gather_trainable(module)
    else:
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def run_sft(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data`; write the adapter or model, metrics, plot and lineage to `out_dir`."""
    from llamaherd.fingerprint import model_fingerprint
    from llamaherd.load import load_model

    info = D.init_distributed()

    def log(msg: str) -> None:
        if info.is_main:
            print(printable(msg), flush=True)

    seed_everything(cfg.seed)
    nf4 = cfg.method == "qlora" and info.device.type == "cuda"  # QLoRA's 4-bit NF4 base; int8 on CPU
    loaded = load_model(cfg.model, quantize="int8" if cfg.method == "qlora" and not nf4 else None)
    if nf4:
        from llamaherd.lora import quantize_nf4

        quantize_nf4(loaded.model, compute_dtype=torch.bfloat16)
    parent_fp = model_fingerprint(loaded.source.path) if info.is_main else None
    chat_format = cfg.chat_format or loaded.chat_format or "alpaca"
    tok = loaded.tokenizer
    train, val = load_datasets(cfg, tok, chat_format, log)
    model = prepare_model(loaded.model, cfg)
    peft_layout = model.config.family == "llama"
    if cfg.method != "full" and not peft_layout and info.enabled and cfg.distributed == "fsdp":
        raise InputError(f"LoRA on a {model.config.family} model is exported merged, which needs unsharded "
                         "weights: use --distributed ddp (or a single process)")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    log(f"{cfg.method}: {n_train:,} trainable of {n_all:,} parameters")
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    batches = functools.partial(collate, pad_id=pad_id, padding_free=cfg.padding_free)
    trainer = Trainer(SFTObjective(model), train, val, batches, cfg, info, model_fingerprint=parent_fp)
    metrics = trainer.fit()
    out = Path(cfg.out_dir)
    state = full_state(trainer.module, trainable_only=cfg.method != "full")
    if not info.is_main:
        return metrics
    if cfg.method != "full":
        for name, t in state.items():  # the gathered tensors (FSDP2 leaves the model's own ones sharded)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, torch.nn.Parameter(t, requires_grad=False))
    if cfg.method != "full" and peft_layout:
        from llamaherd.lora import save_adapter

        child = save_adapter(model, out / "adapter", base_model_name_or_path=str(loaded.source.path.resolve()))
    else:
        from llamaherd.checkpoints.hf import save_hf
        from llamaherd.lora import merge_lora

        if cfg.method != "full":  # PEFT has no adapter layout for this family: export the merged model
            state = merge_lora(model).state_dict()
        child = save_hf(state, model.config, out / "model")
        tok.save_pretrained(child)
    hyper = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "data", "val_data", "out_dir", "resume",
                                                                 "progress", "plot", "tensorboard")}
    hyper |= {"world_size": info.world_size, "chat_format": chat_format, "trainable_params": n_train}
    lineage = build_lineage(out.resolve().name, child, loaded.source.name, loaded.source.path, cfg.method,
                            [*zip(cfg.data, trainer.content["data"]), *zip(cfg.val_data, trainer.content["val_data"])],
                            hyper, metrics, parent_fp)
    write_lineage(out, lineage)
    log(f"saved {child}; final metrics {metrics}")
    return metrics
