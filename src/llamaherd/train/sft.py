"""Supervised fine-tuning: the next-token objective and its data, run by the shared `run_training`."""

from __future__ import annotations

import functools
from typing import Any

import torch

from llamaherd.data import IGNORE_INDEX, collate, load_sft_data, pack, split_validation
from llamaherd.errors import InputError
from llamaherd.model import GPT
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Batch, LossOutput, Objective
from llamaherd.train.head_loss import head_cross_entropy
from llamaherd.train.run import Log, Recipe, run_training


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


def load_datasets(cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
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


class SFTRecipe(Recipe):
    """Supervised fine-tuning: instruction / chat / text data, next-token loss on the trained tokens."""

    task = "sft"

    def datasets(self, cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
        return load_datasets(cfg, tokenizer, chat_format, log)

    def objective(self, model: GPT, cfg: TrainConfig) -> SFTObjective:
        return SFTObjective(model)

    def collate(self, cfg: TrainConfig, pad_id: int):
        return functools.partial(collate, pad_id=pad_id, padding_free=cfg.padding_free)

    def lineage_method(self, cfg: TrainConfig) -> str:
        """"rejection-sampling" when every data file is the output of `herd rejection-sample` (Llama 2's rejection
        sampling fine-tuning), else full-sft / lora-sft / qlora-sft."""
        from llamaherd.train.rejection import RECIPE, is_rejection_sampled

        if cfg.data and all(is_rejection_sampled(p) for p in cfg.data):
            return RECIPE
        return super().lineage_method(cfg)


def run_sft(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data`; write the adapter or model, metrics, plot and lineage to `out_dir`."""
    return run_training(cfg, SFTRecipe())
