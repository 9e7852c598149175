"""The run configuration: one flat dataclass that `herd finetune` fills from flags or a YAML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from llamaherd.errors import InputError
from llamaherd.files import atomic_write

METHODS = ("full", "lora", "qlora")
TASKS = ("sft", "reward", "dpo", "ppo")  # what a run trains; each is a command: herd finetune, reward, dpo, ppo
SCHEDULES = ("cosine", "linear", "constant")
DPO_LOSSES = ("sigmoid", "ipo")
REFERENCES = ("auto", "adapters", "precomputed")
# Fields that may change between a run and its resumption without changing the loss sequence. out_dir is where
# the run lives, so a run directory that was moved or renamed resumes. model, data and val_data are locations
# too: the resume check compares what they hold (fingerprint, sha256), not their paths (Trainer._changed).
# reference_dir holds files keyed by what they were computed from (llamaherd.train.dpo).
RESUME_MUTABLE = frozenset({"resume", "eval_every", "save_every", "keep_checkpoints", "log_every", "progress",
                            "tensorboard", "plot", "out_dir", "reference_dir"})


@dataclass
class TrainConfig:
    """Every knob of a training run; saved as `run_config.yaml` beside its checkpoints."""

    # what to train
    task: str = "sft"  # sft | reward | dpo | ppo: set by the command, so a run resumes only as what it was
    model: str | None = None  # preset/alias, local checkpoint or hub id (None: embedded SmolLM2)
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)  # empty: split `val_fraction` off `data`
    val_fraction: float = 0.05
    data_format: str = "auto"  # auto | alpaca | sharegpt | messages | text
    chat_format: str | None = None  # None: the model's own template (alpaca for base models)
    max_seq_len: int = 512
    packing: bool = False
    padding_free: bool = True  # a micro-batch of several samples runs as one unpadded row (same loss)
    train_on_prompt: bool = False  # False: loss on assistant tokens (and EOS) only
    method: str = "lora"
    out_dir: str = "out/finetune"
    # preference data (reward, dpo): a pair's rating -> margin, for files that give ratings instead of margins:
    # {rating: margin}, or a table's name in data.preference.MARGIN_TABLES (empty: its default, llama2-small)
    margin_table: dict[str, float] | str = field(default_factory=dict)
    skip_empty: bool = False  # drop (and count) pairs with an empty answer instead of stopping at the first one
    # reward model: + coefficient * mean((r_chosen + r_rejected)^2), TRL's center_rewards_coefficient
    # (Eisenstein et al. 2023); keeps rewards centred on 0. None: off
    center_rewards_coefficient: float | None = None
    # DPO (herd dpo; llamaherd.train.dpo)
    loss_type: str = "sigmoid"  # sigmoid: DPO (Rafailov et al. 2023, eq. 7) | ipo: IPO (Azar et al. 2023) as TRL's
    beta: float = 0.1  # DPO's beta, IPO's tau: the larger, the closer the policy stays to its reference
    label_smoothing: float = 0.0  # conservative DPO (cDPO): the chance a pair's label is flipped, in [0, 0.5)
    # adapters: the reference is the policy with its LoRA adapters disabled (lora, qlora); precomputed: its
    # log-probs are computed once before training and stored in reference_dir; auto: adapters unless method full
    reference: str = "auto"
    reference_dir: str | None = None  # None: reference_logps/ beside out_dir, shared by the runs there
    shared_prompt: bool = True  # each pair as one row, prompt + chosen + rejected (the prompt runs once)
    # PPO (herd ppo; llamaherd.train.ppo): `data` holds the prompts; each rollout samples one response to each of
    # rollout_batch_size prompts, then ppo_epochs passes over it take optimizer steps of batch_size responses
    reward_model: str | None = None  # a reward model directory (herd reward's out_dir/model); or reward_fn:
    reward_fn: str | None = None  # a programmatic reward, module:function or path/to/file.py:function
    rm_chat_format: str | None = None  # None: the reward model's own chat format
    rollout_batch_size: int = 32
    ppo_epochs: int = 2
    max_new_tokens: int = 128  # per response; prompt + response fit in max_seq_len
    temperature: float = 1.0  # the policy is softmax(logits / temperature), in sampling and in training
    generation_batch_size: int = 16  # sequences the engine decodes at once (rows of its KV cache)
    kl_coef: float = 0.05  # beta, the per-token KL penalty; Llama 2: 0.01 (7B, 13B), 0.005 (34B, 70B)
    target_kl: float | None = None  # adaptive beta toward this KL (nats per response; Ziegler et al. 2019)
    kl_horizon: int = 10000  # the adaptive controller's horizon, in responses
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # PPO's epsilon for the policy ratio
    cliprange_value: float = 0.2  # and for the value's move away from its rollout value
    vf_coef: float = 0.1  # value loss weight
    whiten_scores: bool = False  # whiten the rollout's scores (mean 0, std 1) before the KL penalty
    missing_eos_penalty: float | None = None  # subtracted from the score of a response cut at max_new_tokens
    max_kl: float | None = 20.0  # stop when the exact KL to the reference passes this (nats per response)
    # LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q", "v"])
    # other ranks / alphas for some layers, as PEFT's rank_pattern / alpha_pattern: {regex: value}, the regex
    # matched against the layer's Hugging Face name (llamaherd.lora.pattern_key); flags take REGEX=VALUE
    lora_rank_pattern: dict[str, int] = field(default_factory=dict)
    lora_alpha_pattern: dict[str, float] = field(default_factory=dict)
    # optimisation
    max_steps: int | None = None  # None: run `epochs` over the data
    epochs: int = 1
    batch_size: int = 8  # samples per optimizer step, across all processes
    micro_batch_size: int = 1  # samples per forward pass on one process
    lr: float = 2e-4
    min_lr_ratio: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0
    bf16: bool = False  # bf16 autocast for matmuls; weights and optimizer state stay fp32
    activation_checkpointing: bool = False
    seed: int = 1337
    distributed: str = "auto"  # auto | ddp | fsdp (only used under torchrun with WORLD_SIZE > 1)
    # feedback and checkpoints
    eval_every: int = 50
    eval_max_batches: int | None = None
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False
    plot: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.val_data, str):
            self.val_data = [self.val_data]
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.lora_rank_pattern = _patterns(self.lora_rank_pattern, "lora_rank_pattern", int)
        self.lora_alpha_pattern = _patterns(self.lora_alpha_pattern, "lora_alpha_pattern", float)
        self.margin_table = _margin_table(self.margin_table)
        checks = [
            (self.task in TASKS, "task", f"choose one of {', '.join(TASKS)}"),
            (self.method in METHODS, "method", f"choose one of {', '.join(METHODS)}"),
            (self.schedule in SCHEDULES, "schedule", f"choose one of {', '.join(SCHEDULES)}"),
            (self.distributed in ("auto", "ddp", "fsdp"), "distributed", "choose auto, ddp or fsdp"),
            (self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size", "must be >= 1"),
            (self.batch_size % self.micro_batch_size == 0, "batch_size",
             f"must be a multiple of micro_batch_size={self.micro_batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.max_seq_len >= 2, "max_seq_len", "must be >= 2"),
            (self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
             "center_rewards_coefficient", "must be >= 0"),
            (self.loss_type in DPO_LOSSES, "loss_type", f"choose one of {', '.join(DPO_LOSSES)}"),
            (self.beta > 0, "beta", "must be > 0"),
            (0.0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)"),
            (self.label_smoothing == 0 or self.loss_type == "sigmoid", "label_smoothing",
             f"smooths the sigmoid loss only; set it to 0 for loss_type {self.loss_type!r}"),
            (self.reference in REFERENCES, "reference", f"choose one of {', '.join(REFERENCES)}"),
            (self.reference != "adapters" or self.method != "full", "reference",
             "method 'full' has no adapters to disable; use precomputed (or auto)"),
            (self.task != "ppo" or self.rollout_batch_size % self.batch_size == 0, "rollout_batch_size",
             f"must be a multiple of batch_size={self.batch_size} (a PPO epoch splits the rollout into minibatches)"),
            (self.ppo_epochs >= 1 and self.max_new_tokens >= 1 and self.generation_batch_size >= 1, "ppo_epochs",
             "ppo_epochs, max_new_tokens and generation_batch_size must be >= 1"),
            (self.temperature > 0, "temperature", "must be > 0 (PPO samples from the policy)"),
            (self.target_kl is None or self.target_kl > 0, "target_kl", "must be > 0"),
            (self.kl_horizon >= 1, "kl_horizon", "must be >= 1 (responses)"),
            (self.kl_coef >= 0, "kl_coef", "must be >= 0"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange", "cliprange and cliprange_value must be > 0"),
            (self.vf_coef >= 0, "vf_coef", "must be >= 0"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma and lam must be in [0, 1]"),
            (self.missing_eos_penalty is None or self.missing_eos_penalty >= 0, "missing_eos_penalty",
             "must be >= 0 (it is subtracted from the score)"),
            (self.task != "ppo" or self.method == "full" or self.lora_dropout == 0, "lora_dropout",
             "must be 0 for PPO: the update's ratio compares the policy with itself at sampling time, and dropout "
             "would make them differ"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise InputError(f"config field {name!r} = {getattr(self, name)!r}: {fix}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "config") -> TrainConfig:
        """Build from a mapping, naming any unknown key and the closest known one."""
        return settings_from_dict(cls, d, origin)

    def save(self, path: Path) -> None:
        """Write as YAML (atomically)."""
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def settings_from_dict(cls: type, d: dict[str, Any], origin: str = "config") -> Any:
    """A settings dataclass (TrainConfig, train.rejection.RejectionConfig) from a mapping; InputError naming an
    unknown key and the closest known one."""
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(f"{origin}: unknown field {key!r}{hint}")
    return cls(**d)


def _patterns(value: Any, name: str, kind: type) -> dict[str, Any]:
    """A LoRA pattern field as {regex: value}, from a mapping or from REGEX=VALUE strings (the command line)."""
    from llamaherd.lora import checked_patterns

    if isinstance(value, list | tuple):
        try:
            value = {key: kind(v) for key, v in _key_values(value, name, "REGEX=VALUE").items()}
        except ValueError as e:
            want = "an integer" if kind is int else "a number"
            raise InputError(f"config field {name!r}: {e}; give {want} after '='") from None
    return checked_patterns(value, name, "config", InputError)


def _key_values(items: list | tuple, name: str, form: str) -> dict[str, str]:
    """KEY=VALUE strings (a mapping given on the command line) as {key: value string}; split at the last '='."""
    pairs = [str(item).rpartition("=") for item in items]
    bad = next((item for item, (key, eq, _) in zip(items, pairs) if not (key and eq)), None)
    if bad is not None:
        raise InputError(f"config field {name!r}: {bad!r} is not {form}")
    return {key: v for key, _, v in pairs}


def _margin_table(value: Any) -> dict[str, float] | str:
    """The margin table as {rating: margin} or a table's name, from a mapping, a name, or RATING=MARGIN strings /
    one name (the command line). A name is checked when the data is read."""
    if isinstance(value, list | tuple):
        one = len(value) == 1 and "=" not in str(value[0])
        value = str(value[0]) if one else _key_values(value, "margin_table", "RATING=MARGIN")
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise InputError(f"config field 'margin_table' = {value!r}: give a mapping of rating: margin")
    table = {}
    for key, margin in value.items():
        try:
            table[str(key)] = float(margin)
        except (TypeError, ValueError):
            raise InputError(f"config field 'margin_table': rating {key!r} has margin {margin!r}; "
                             "give a number") from None
    return table


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict (dashes in keys become underscores), with a clear error if malformed."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}
