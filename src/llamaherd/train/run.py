"""The one training run every method shares: load, prepare (full / LoRA / QLoRA), train, export, record lineage.

A method (SFT, reward model, DPO) is a `Recipe`: its data, batches, objective and export. `run_training` does
the rest the same way for all of them — model loading, the QLoRA base, the shared `Trainer` (checkpoints, exact
resume, DDP/FSDP2, metrics.jsonl and plots), gathering the trained weights and `lineage.json` — so a fix or a
feature there reaches every method at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llamaherd.errors import InputError
from llamaherd.model import GPT
from llamaherd.terminal import printable
from llamaherd.train import distributed as D
from llamaherd.train.checkpoint import gather_trainable
from llamaherd.train.config import TrainConfig
from llamaherd.train.core import Batch, Objective, Trainer, seed_everything
from llamaherd.train.lineage import build_lineage, write_lineage

if TYPE_CHECKING:
    from llamaherd.load import Loaded

Log = Callable[[str], None]


class Recipe:
    """What one training method brings to `run_training`; the defaults are what SFT and DPO share.

    `run_training` calls, in order: `load` -> `datasets` -> `prepare` -> `objective` -> `collate` -> `trainer`
    (and its fit) -> `export` -> `lineage_method`. `task` is the method's `TrainConfig.task` value.
    """

    task = "sft"

    def load(self, cfg: TrainConfig, quantize: str | None) -> Loaded:
        """The model and tokenizer to start from (`quantize`: "int8" for QLoRA on CPU, else None)."""
        from llamaherd.load import load_model

        return load_model(cfg.model, quantize=quantize)

    def datasets(self, cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[Sequence, Sequence]:
        """(train, validation) items, which `collate` turns into batches."""
        raise NotImplementedError

    def prepare(self, model: GPT, cfg: TrainConfig) -> GPT:
        """The model with what `cfg.method` trains made trainable (`prepare_model`)."""
        return prepare_model(model, cfg)

    def objective(self, model: GPT, cfg: TrainConfig) -> Objective:
        raise NotImplementedError

    def collate(self, cfg: TrainConfig, pad_id: int) -> Callable[[list], Batch]:
        raise NotImplementedError

    def trainer(self, objective: Objective, train: Sequence, val: Sequence, collate: Callable[[list], Batch],
                cfg: TrainConfig, info: D.DistInfo, model_fingerprint: str | None) -> Trainer:
        """The loop that trains `objective`: the shared Trainer (PPO's makes its batches from rollouts)."""
        return Trainer(objective, train, val, collate, cfg, info, model_fingerprint=model_fingerprint)

    def writes_adapter(self, model: GPT, cfg: TrainConfig) -> bool:
        """Whether `export` writes a PEFT adapter (LoRA on Llama) rather than a merged model (then `run_training`
        gathers the whole model for it, base weights included, when FSDP2 shards them)."""
        return cfg.method != "full" and model.config.family == "llama"

    def export(self, model: GPT, state: dict[str, torch.Tensor], cfg: TrainConfig, loaded: Loaded, out: Path) -> Path:
        """Write the trained model under `out`; return its directory (lineage's child).

        state: the full trained state (method full) or the trainable tensors (LoRA; every tensor for a merged
        export under FSDP2), already put back in `model`.
        Default: the PEFT adapter (`out/adapter`), or a Hugging Face model with its tokenizer (`out/model`).
        """
        if self.writes_adapter(model, cfg):
            from llamaherd.lora import save_adapter

            return save_adapter(model, out / "adapter", base_model_name_or_path=str(loaded.source.path.resolve()))
        from llamaherd.checkpoints.hf import save_hf

        child = save_hf(merged_state(model, state, cfg), model.config, out / "model")
        loaded.tokenizer.save_pretrained(child)
        return child

    def lineage_method(self, cfg: TrainConfig) -> str:
        """lineage.json's "method" (lineage.METHODS maps full/lora/qlora to full-sft/lora-sft/qlora-sft)."""
        return cfg.method if self.task == "sft" else self.task


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


def preference_datasets(cfg: TrainConfig, tokenizer: Any, chat_format: str, log: Log) -> tuple[list, list]:
    """Training and held-out preference pairs (reward model, DPO): `val_data`, or a seeded `val_fraction` of `data`."""
    import functools

    from llamaherd.data.preference import load_preference_data, split_pairs

    if not cfg.data:
        raise InputError("no training data: pass --data PAIRS (or `data:` in the config)")
    read = functools.partial(load_preference_data, tokenizer=tokenizer, chat_format=chat_format,
                             max_seq_len=cfg.max_seq_len, margin_table=cfg.margin_table or None,
                             skip_empty=cfg.skip_empty)
    pairs, stats = read(cfg.data)
    log(f"train data: {stats.summary()}")
    if cfg.val_data:
        val, val_stats = read(cfg.val_data)
        log(f"validation data: {val_stats.summary()}")
        train = pairs
    else:
        train, val = split_pairs(pairs, cfg.val_fraction, seed=cfg.seed)
    log(f"{len(train)} training pairs, {len(val)} held-out pairs")
    return train, val


def full_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state on CPU on rank 0, keyed as in `GPT`; collective under FSDP2."""
    if trainable_only:
        state = gather_trainable(module)
    else:
        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def merged_state(model: GPT, state: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights to export as a plain model: `state` as trained (full), or the LoRA adapters folded in and an
    int8 base (QLoRA) dequantized to fp32, the weights the adapters were trained on."""
    if cfg.method == "full":
        return state
    from llamaherd.lora import merge_lora
    from llamaherd.quantize import Int8Linear

    merged = merge_lora(model).state_dict()
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            del merged[f"{name}.weight_int8"], merged[f"{name}.scale"]
            if not (name == "lm_head" and model.config.tie_embeddings):  # a tied model exports its embedding only
                merged[f"{name}.weight"] = module.dequantized(torch.float32)
    return merged


def run_training(cfg: TrainConfig, recipe: Recipe) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data` as `recipe` says; write the model, metrics, plot and lineage to `out_dir`.

    Returns the final metrics (every process; only the main one writes). Raises InputError when `cfg.task` is
    not the recipe's (a config written for another command).
    """
    from llamaherd.fingerprint import model_fingerprint

    if cfg.task != recipe.task:
        raise InputError(f"config field 'task' = {cfg.task!r}, but this command trains {recipe.task!r}; "
                         "remove the field or use the command for that task")
    info = D.init_distributed()

    def log(msg: str) -> None:
        if info.is_main:
            print(printable(msg), flush=True)

    seed_everything(cfg.seed)
    nf4 = cfg.method == "qlora" and info.device.type == "cuda"  # QLoRA's 4-bit NF4 base; int8 on CPU
    loaded = recipe.load(cfg, "int8" if cfg.method == "qlora" and not nf4 else None)
    if nf4:
        from llamaherd.lora import quantize_nf4

        quantize_nf4(loaded.model, compute_dtype=torch.bfloat16)
    parent_fp = model_fingerprint(loaded.source.path) if info.is_main else None
    chat_format = cfg.chat_format or loaded.chat_format or "alpaca"
    tok = loaded.tokenizer
    train, val = recipe.datasets(cfg, tok, chat_format, log)
    model = recipe.prepare(loaded.model, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    log(f"{cfg.method}: {n_train:,} trainable of {n_all:,} parameters")
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    trainer = recipe.trainer(recipe.objective(model, cfg), train, val, recipe.collate(cfg, pad_id), cfg, info,
                             parent_fp)
    metrics = trainer.fit()
    out = Path(cfg.out_dir)
    # LoRA: the trained tensors, gathered; all of them when adapters are merged into base weights FSDP2 shards.
    merged_shards = not recipe.writes_adapter(model, cfg) and info.enabled and cfg.distributed == "fsdp"
    state = full_state(trainer.module, trainable_only=cfg.method != "full" and not merged_shards)
    if not info.is_main:
        return metrics
    if cfg.method != "full":
        for name, t in state.items():  # the gathered tensors back in place of the shards FSDP2 left
            parent, _, attr = name.rpartition(".")
            module = model.get_submodule(parent)
            is_buffer = attr in dict(module.named_buffers(recurse=False))  # an int8 base's weights and scales
            setattr(module, attr, t if is_buffer else torch.nn.Parameter(t, requires_grad=False))
    child = recipe.export(model, state, cfg, loaded, out)
    hyper = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "data", "val_data", "out_dir", "resume",
                                                                 "progress", "plot", "tensorboard")}
    hyper |= {"world_size": info.world_size, "chat_format": chat_format, "trainable_params": n_train}
    lineage = build_lineage(out.resolve().name, child, loaded.source.name, loaded.source.path,
                            recipe.lineage_method(cfg),
                            [*zip(cfg.data, trainer.content["data"]), *zip(cfg.val_data, trainer.content["val_data"])],
                            hyper, metrics, parent_fp)
    write_lineage(out, lineage)
    log(f"saved {child}; final metrics {metrics}")
    return metrics
