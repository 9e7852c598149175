"""`herd finetune`, `herd reward`, `herd dpo`, `herd ppo`, `herd rejection-sample`, `herd merge` and `herd estimate`:
thin layers over llamaherd.train, .lora and .estimate.

`add_run_options` and `run_config` give every training command (finetune, reward, dpo, ppo) the same flags and YAML;
`herd reward score` scores responses with a reward model.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import fields
from pathlib import Path

from llamaherd.terminal import printable
from llamaherd.train.config import DPO_LOSSES, METHODS, REFERENCES, SCHEDULES, TrainConfig, load_yaml

HELP = {
    "data": "training file: Alpaca JSON/JSONL, ShareGPT, OpenAI messages JSONL or .txt (repeatable)",
    "val_data": "validation file (repeatable); default: split val_fraction off the training data",
    "method": "full, lora or qlora (LoRA on an int8 weight-only quantized base)",
    "batch_size": "samples per optimizer step across all processes",
    "micro_batch_size": "samples per forward pass on one process (batch_size / (micro x processes) = accumulation)",
    "lora_targets": "LoRA target modules by name: q k v o gate up down lm_head",
    "lora_rank_pattern": "other ranks for some layers, as PEFT's rank_pattern: REGEX=RANK ... ('q_proj|v_proj=16')",
    "lora_alpha_pattern": "other alphas for some layers, as PEFT's alpha_pattern: REGEX=ALPHA ...",
    "bf16": "bf16 autocast (weights and optimizer state stay fp32)",
    "distributed": "under torchrun: ddp (replicated) or fsdp (FSDP2 fully_shard); auto = ddp",
    "resume": "continue exactly from the newest checkpoint in out_dir",
    "max_steps": "optimizer steps (default: epochs over the data)",
    "padding_free": "run a micro-batch as one unpadded row with a block-diagonal mask (default; same loss)",
}
CHOICES = {"method": METHODS, "schedule": SCHEDULES, "distributed": ("auto", "ddp", "fsdp"),
           "data_format": ("auto", "alpaca", "sharegpt", "messages", "text"), "loss_type": DPO_LOSSES,
           "reference": REFERENCES}
DPO_HELP = {
    "data": "preference pairs: {prompt, chosen, rejected}, HH-RLHF transcripts, {chosen, rejected} message lists "
            "or LLaMA-Factory's {conversations, chosen, rejected}; JSON or JSONL (repeatable)",
    "val_data": "held-out pairs (repeatable); default: split val_fraction off the training pairs",
    "batch_size": "pairs per optimizer step across all processes",
    "micro_batch_size": "pairs per forward pass on one process",
    "loss_type": "sigmoid (DPO) or ipo",
    "beta": "DPO's beta (IPO's tau): larger keeps the policy closer to the reference (default 0.1)",
    "label_smoothing": "conservative DPO: the probability a pair's label is flipped, in [0, 0.5) (sigmoid only)",
    "reference": "adapters (LoRA disabled), precomputed (computed once, stored) or auto (adapters unless full)",
    "reference_dir": "where precomputed reference log-probs are kept (default: reference_logps/ beside out_dir)",
    "shared_prompt": "run each pair as one row, prompt + chosen + rejected (default; same result, fewer tokens)",
}


def _flag_type(hint: object) -> tuple[type, bool]:
    """(element type, is list) of a field type: `int | None` -> (int, False), `list[str]` -> (str, True);
    a mapping is a list of KEY=VALUE strings that TrainConfig turns into a dict."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    if typing.get_origin(hint) is dict:
        return str, True
    return hint, False


def add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="instruction/chat fine-tuning: full, LoRA or QLoRA (resumable, torchrun-ready)",
                       argument_default=argparse.SUPPRESS)
    add_run_options(p, HELP)
    p.set_defaults(func=cmd_finetune)


def add_run_options(p: argparse.ArgumentParser, helps: dict[str, str],
                    aliases: dict[str, list[str]] | None = None) -> None:
    """MODEL, --config and a flag per TrainConfig field (but `task`, which the command sets): the options of every
    training command (herd finetune, reward, dpo, ppo). `p` must have argument_default=SUPPRESS, so that only the
    flags given override the YAML file. aliases: more option strings for a field (herd ppo's --prompts for data)."""
    p.add_argument("model", nargs="?", help="base model: preset/alias, checkpoint path or hub id "
                                            "(default: embedded smollm2-135m-instruct)")
    p.add_argument("--config", help="YAML file of run settings; flags given here override it")
    add_settings_options(p, TrainConfig, helps, ("model", "task"), aliases)


def add_settings_options(p: argparse.ArgumentParser, cls: type, helps: dict[str, str], skip: tuple[str, ...] = (),
                         aliases: dict[str, list[str]] | None = None) -> None:
    """A flag per field of the settings dataclass `cls` (but those in `skip`), typed from its annotation: bools as
    --x / --no-x, lists as repeatable values, mappings as KEY=VALUE strings."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, many = _flag_type(hints[f.name])
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, [])]
        if kind is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        elif many:
            p.add_argument(*flags, type=kind, nargs="+", action="extend", help=helps.get(f.name))
        else:
            p.add_argument(*flags, type=kind, choices=CHOICES.get(f.name), help=helps.get(f.name))


def run_config(args: argparse.Namespace, task: str = "sft", defaults: dict | None = None) -> TrainConfig:
    """YAML settings (if any), overridden by the flags actually given, for the command that trains `task`
    (a YAML `task:` naming another one is refused by run_training). defaults: the command's own defaults for
    fields neither gives (herd ppo: lora_dropout 0)."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    origin = args.config if getattr(args, "config", None) else "command line"
    return TrainConfig.from_dict({"task": task} | (defaults or {}) | values | given, origin=origin)


def cmd_finetune(args: argparse.Namespace) -> None:
    from llamaherd.train.sft import run_sft

    run_sft(run_config(args))


def add_dpo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dpo", help="preference optimisation (DPO, cDPO, IPO): full, LoRA or QLoRA (resumable, "
                                   "torchrun-ready)", argument_default=argparse.SUPPRESS)
    add_run_options(p, HELP | DPO_HELP)
    p.set_defaults(func=cmd_dpo)


def cmd_dpo(args: argparse.Namespace) -> None:
    from llamaherd.train.dpo import run_dpo

    run_dpo(run_config(args, task="dpo"))


REWARD_HELP = {
    "data": "preference pairs: {prompt, chosen, rejected}, HH-RLHF transcripts, {chosen, rejected} message lists "
            "or LLaMA-Factory's {conversations, chosen, rejected}; JSON or JSONL, .gz allowed (repeatable)",
    "val_data": "held-out pairs (repeatable); default: split val_fraction off the training pairs",
    "batch_size": "pairs per optimizer step across all processes",
    "micro_batch_size": "pairs per forward pass on one process",
    "margin_table": "margins of pairs that carry a 'rating': RATING=MARGIN ..., or a table name (llama2-small, "
                    "the default, or llama2-large)",
    "center_rewards_coefficient": "add C x (r_chosen + r_rejected)^2 per pair to the loss (TRL's reward centring)",
    "skip_empty": "drop and count pairs with an empty answer (HH-RLHF has some) instead of stopping with an error",
    "shared_prompt": "each pair as one row, prompt + chosen + rejected, the prompt run once (default; same "
                     "rewards, fewer tokens)",
    "padding_free": "without --shared-prompt: run a micro-batch's sequences as one unpadded row (default)",
}


class _RewardParser(argparse.ArgumentParser):
    """`herd reward`'s parser: `herd reward score ...` goes to the scoring parser, anything else trains."""

    scoring: argparse.ArgumentParser | None = None

    def parse_known_args(self, args=None, namespace=None):
        if args and args[0] == "score" and self.scoring is not None:
            return self.scoring.parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def add_reward_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reward", help="reward model: train on preference pairs (full, LoRA, QLoRA); "
                                      "`herd reward score RM --data FILE` scores responses",
                       description="Train a reward model on preference pairs. `herd reward score RM --data FILE "
                                   "[--out FILE]` scores responses with one (see `herd reward score --help`).",
                       argument_default=argparse.SUPPRESS)
    p.__class__ = _RewardParser  # sub-parsers are built by argparse; this one dispatches `score` (above)
    add_run_options(p, HELP | REWARD_HELP)
    p.set_defaults(func=cmd_reward)
    s = argparse.ArgumentParser(prog="herd reward score", description="Add reward-model scores to each record: "
                                "{prompt, response} -> score, {prompt, responses} -> scores, a preference pair -> "
                                "chosen_score and rejected_score (and the pairwise accuracy).")
    s.add_argument("rm", help="reward model directory (herd reward's out_dir/model, or a transformers "
                              "sequence-classification checkpoint with num_labels 1)")
    s.add_argument("--data", required=True, help="JSON or JSONL records (.gz allowed)")
    s.add_argument("--out", default=None, help="JSONL output (default: standard output)")
    s.add_argument("--chat-format", default=None, help="default: the one the RM was trained with")
    s.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    s.add_argument("--max-seq-len", type=int, default=None, help="cut longer conversations as training cut them "
                                                                 "(default: the model's context length)")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    s.set_defaults(func=cmd_reward_score)
    p.scoring = s


def cmd_reward(args: argparse.Namespace) -> None:
    from llamaherd.train.reward import run_reward

    run_reward(run_config(args, task="reward"))


def cmd_reward_score(args: argparse.Namespace) -> None:
    from llamaherd.train.reward import score_file

    score_file(args.rm, args.data, args.out, args.chat_format, args.batch_size, args.max_seq_len, args.dtype)


PPO_HELP = {
    "data": "prompts: {prompt}, SFT records (their last answer left out) or preference pairs (their prompt); "
            "JSON or JSONL, .gz allowed (repeatable)",
    "reward_model": "reward model directory (herd reward's out_dir/model, or a transformers sequence classifier)",
    "reward_fn": "programmatic reward instead: module:function or path/to/file.py:function, called as "
                 "fn(prompts=, completions=, completion_ids=) -> one number per completion",
    "rm_chat_format": "chat format the reward model reads (default: its own)",
    "batch_size": "responses per optimizer step (a minibatch of the rollout)",
    "micro_batch_size": "responses per forward pass",
    "rollout_batch_size": "prompts sampled per rollout (a multiple of batch_size)",
    "ppo_epochs": "passes over each rollout",
    "max_new_tokens": "tokens per response at most",
    "temperature": "the policy is softmax(logits / temperature), sampled and trained (default 1)",
    "generation_batch_size": "sequences the engine decodes at once",
    "kl_coef": "beta of the per-token KL penalty (the initial one with --target-kl)",
    "target_kl": "adaptive beta toward this KL in nats per response (Ziegler et al.'s controller)",
    "kl_horizon": "the adaptive controller's horizon, in responses",
    "missing_eos_penalty": "subtracted from the score of a response cut at max_new_tokens",
    "max_kl": "stop when the KL to the reference passes this many nats per response",
}
REJECTION_HELP = {
    "prompts": "prompts: {prompt}, SFT records (their last answer left out) or preference pairs (their prompt); "
               "JSON or JSONL, .gz allowed (repeatable)",
    "out": "output folder: data.jsonl, journal.jsonl, run.json, manifest.json (default: out/rejection)",
    "reward_model": "reward model directory (herd reward's out_dir/model, or a transformers sequence classifier)",
    "reward_fn": "programmatic reward instead: module:function or path/to/file.py:function",
    "k": "samples per prompt; the best is kept (default 8)",
    "temperature": "sampling temperature (default 1)",
    "top_p": "nucleus sampling in (0, 1] (default: off)",
    "seed": "run seed; sample i of prompt p uses seed * 1000003 + p * k + i",
    "chat_format": "chat format of the policy (default: its own)",
    "rm_chat_format": "chat format the reward model reads (default: its own)",
    "dtype": "policy weights: fp32, bf16 or fp16",
    "max_batch": "sequences the engine decodes at once",
    "rm_batch_size": "rows per reward-model forward pass",
}


def add_ppo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ppo", help="RLHF with PPO against a reward model or a reward function: full, LoRA or QLoRA "
                                   "(resumable)", argument_default=argparse.SUPPRESS,
                       description="PPO (Ziegler et al. 2019, InstructGPT, Llama 2): `herd ppo POLICY --rm RM "
                                   "--prompts FILE`, or --reward module:function. See docs/alignment.md.")
    add_run_options(p, HELP | PPO_HELP, aliases={"data": ["--prompts"], "reward_model": ["--rm"],
                                                 "reward_fn": ["--reward"]})
    p.set_defaults(func=cmd_ppo)


def cmd_ppo(args: argparse.Namespace) -> None:
    from llamaherd.train.ppo import run_ppo

    run_ppo(run_config(args, task="ppo", defaults={"lora_dropout": 0.0, "out_dir": "out/ppo"}))


def add_rejection_parser(sub: argparse._SubParsersAction) -> None:
    from llamaherd.train.rejection import RejectionConfig

    p = sub.add_parser("rejection-sample", help="best of k samples per prompt by a reward model, as SFT data "
                                                "(resumable)", argument_default=argparse.SUPPRESS,
                       description="Rejection sampling (Llama 2): `herd rejection-sample POLICY --rm RM --prompts "
                                   "FILE -k 8`; the best sample per prompt, with its score, in OUT/data.jsonl, "
                                   "which herd finetune reads. Rerun the same command to resume.")
    p.add_argument("model", nargs="?", help="the policy: preset/alias, checkpoint path, adapter or hub id "
                                            "(default: embedded smollm2-135m-instruct)")
    p.add_argument("--config", help="YAML file of these settings; flags given here override it")
    add_settings_options(p, RejectionConfig, REJECTION_HELP, ("model",),
                         aliases={"reward_model": ["--rm"], "reward_fn": ["--reward"], "k": ["-k"]})
    p.set_defaults(func=cmd_rejection)


def cmd_rejection(args: argparse.Namespace) -> None:
    from llamaherd.train.config import settings_from_dict
    from llamaherd.train.rejection import RejectionConfig, run_rejection_sampling, summary_line

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    cfg = settings_from_dict(RejectionConfig, values | given, getattr(args, "config", None) or "command line")
    print(summary_line(run_rejection_sampling(cfg), cfg.out))


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and export Hugging Face safetensors")
    p.add_argument("base", help="base model the adapter was trained on")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> None:
    """`herd merge BASE ADAPTER OUT` is `herd convert ADAPTER OUT --base BASE`: the adapter merged on load."""
    from llamaherd.load import load_model

    loaded = load_model(args.adapter, dtype=args.dtype, base=args.base)
    out = loaded.save_hf(args.out)
    print(printable(f"merged {args.adapter} into {loaded.source.base.name}; wrote {Path(out)}"))


def add_estimate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="training memory: parameters, weights, gradients, optimizer, activations")
    p.add_argument("model", nargs="?", default=None, help="preset/alias name or checkpoint path "
                                                          "(default: embedded smollm2-135m-instruct)")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora", "inference"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="micro-batch size")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-targets", nargs="+", default=["q", "v"])
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype")
    p.add_argument("--quantize", default=None, choices=["int8", "nf4"], help="frozen base for qlora/inference")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as `herd finetune --bf16`)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> None:
    from llamaherd.estimate import estimate, format_estimate

    est = estimate(args.model, method=args.method, seq_len=args.seq_len, batch=args.batch, lora_r=args.lora_r,
                   lora_targets=args.lora_targets, lora_dropout=args.lora_dropout, dtype=args.dtype,
                   quantize=args.quantize, activation_checkpointing=args.activation_checkpointing,
                   bf16_autocast=args.bf16)
    print(format_estimate(est))
