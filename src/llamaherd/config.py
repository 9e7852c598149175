"""Model configuration: one dataclass for every family, plus named presets.

LLaMA, Llama 2, Falcon and later Llama-architecture models (SmolLM2, TinyLlama) differ only in the
fields below; `model.GPT` reads them and never branches on a family name.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal

from llamaherd.errors import InputError

DEFAULT_MAX_LEN = 2048  # KV positions per engine row (serving, batch generation) unless the model's context is shorter


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint stretches RoPE beyond its pre-training context, in the terms of transformers'
    `rope_parameters`; `llamaherd.rope` computes the frequencies by transformers' rules. A field the type
    does not use, or that the checkpoint leaves out (the rule's default applies), stays None."""

    # The fields each type reads, and those it cannot do without (transformers' `_validate_*_rope_parameters`).
    FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "linear": ("factor",),
        "dynamic": ("factor",),
        "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
        "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                 "mscale", "mscale_all_dim", "truncate"),
    }
    REQUIRED: ClassVar[dict[str, tuple[str, ...]]] = FIELDS | {"yarn": ("original_max_position_embeddings",)}

    type: Literal["linear", "dynamic", "llama3", "yarn"]
    factor: float | None = None  # None only for yarn: block_size / original_max_position_embeddings
    original_max_position_embeddings: int | None = None  # llama3, yarn: the context before scaling
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float | None = None  # yarn (default 32)
    beta_slow: float | None = None  # yarn (default 1)
    attention_factor: float | None = None  # yarn: scale on cos and sin (default from factor and mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool | None = None  # yarn: round the ramp's ends outwards (default True)

    def __post_init__(self) -> None:
        if self.type not in self.FIELDS:
            raise ValueError(f"RoPE scaling type {self.type!r} is not supported; supported: {', '.join(self.FIELDS)}")
        missing = [f for f in self.REQUIRED[self.type] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"RoPE scaling {self.type!r} needs {', '.join(missing)}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            # the blend divides by their difference (transformers' `_validate_llama3_rope_parameters`)
            raise ValueError(f"RoPE scaling 'llama3' needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    family: str = "llama"  # informative only: "llama", "falcon"
    block_size: int = 2048  # context length the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    # n_query_groups == n_head: multi-head; 1: multi-query (Falcon-7B); in between: grouped-query (Llama 2 70B).
    n_query_groups: int | None = None
    head_dim: int | None = None  # defaults to n_embd // n_head
    intermediate_size: int = 11008
    norm_class: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_class: Literal["swiglu", "gelu"] = "swiglu"
    attn_bias: bool = False  # bias on q, k, v projections
    attn_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    # Falcon: attention and MLP read the same input and are added to the residual together.
    parallel_residual: bool = False
    # Falcon-7B: one norm feeds both branches; Falcon-40B ("new decoder architecture") has one each.
    shared_attention_norm: bool = False
    rope_base: float = 10000.0
    rope_dim: int | None = None  # rotary dimensions per head; defaults to head_dim
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    chat_format: str | None = None  # name in llamaherd.chat, or None for a base model
    hub_id: str | None = None

    def __post_init__(self) -> None:
        if self.n_query_groups is None:
            object.__setattr__(self, "n_query_groups", self.n_head)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.rope_dim is None:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"config {self.name!r}: n_head={self.n_head} must be a multiple of "
                f"n_query_groups={self.n_query_groups}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Parameter count from the shapes alone (no allocation)."""
        d, h, kv, hd, f = self.n_embd, self.n_head, self.n_query_groups, self.head_dim, self.intermediate_size
        norm = d * (2 if self.norm_class == "layernorm" else 1)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h + 2 * kv) * hd * self.attn_bias + d * self.attn_out_bias
        n_mats = 3 if self.mlp_class == "swiglu" else 2
        mlp = n_mats * d * f + (f * (n_mats - 1) + d) * self.mlp_bias
        norms = norm if (self.parallel_residual and self.shared_attention_norm) else 2 * norm
        layer = attn + mlp + norms
        emb = self.vocab_size * d
        return emb * (1 if self.tie_embeddings else 2) + self.n_layer * layer + norm


@dataclass(frozen=True)
class Alias:
    """A fine-tuned derivative: same architecture as `base`, its own weights, hub id and chat format."""

    name: str
    base: str
    hub_id: str
    chat_format: str | None


def _llama1(name: str, d: int, n_layer: int, n_head: int, f: int, hub: str) -> Config:
    return Config(
        name=name, family="llama", block_size=2048, vocab_size=32000, n_layer=n_layer, n_head=n_head,
        n_embd=d, intermediate_size=f, norm_eps=1e-6, hub_id=hub,
    )


def _llama2(name: str, d: int, n_layer: int, n_head: int, kv: int, f: int, hub: str) -> Config:
    return Config(
        name=name, family="llama", block_size=4096, vocab_size=32000, n_layer=n_layer, n_head=n_head,
        n_query_groups=kv, n_embd=d, intermediate_size=f, norm_eps=1e-5, hub_id=hub,
    )


_FALCON = dict(
    family="falcon", block_size=2048, vocab_size=65024, norm_class="layernorm", norm_eps=1e-5,
    mlp_class="gelu", parallel_residual=True, bos_token_id=11, eos_token_id=11,
)

# Hyper-parameters from the LLaMA paper (Touvron et al. 2023, table 2), the Llama 2 paper and its
# released params.json files, the Falcon model cards/config.json, and SmolLM2's config.json.
PRESETS: dict[str, Config] = {
    c.name: c
    for c in [
        _llama1("llama-7b", 4096, 32, 32, 11008, "huggyllama/llama-7b"),
        _llama1("llama-13b", 5120, 40, 40, 13824, "huggyllama/llama-13b"),
        _llama1("llama-30b", 6656, 60, 52, 17920, "huggyllama/llama-30b"),
        _llama1("llama-65b", 8192, 80, 64, 22016, "huggyllama/llama-65b"),
        _llama2("llama-2-7b", 4096, 32, 32, 32, 11008, "meta-llama/Llama-2-7b-hf"),
        _llama2("llama-2-13b", 5120, 40, 40, 40, 13824, "meta-llama/Llama-2-13b-hf"),
        _llama2("llama-2-70b", 8192, 80, 64, 8, 28672, "meta-llama/Llama-2-70b-hf"),
        Config(
            name="falcon-7b", n_layer=32, n_head=71, n_query_groups=1, n_embd=4544,
            intermediate_size=4 * 4544, shared_attention_norm=True, tie_embeddings=True,
            hub_id="tiiuae/falcon-7b", **_FALCON,
        ),
        Config(
            name="falcon-40b", n_layer=60, n_head=128, n_query_groups=8, n_embd=8192,
            intermediate_size=4 * 8192, shared_attention_norm=False, tie_embeddings=False,
            hub_id="tiiuae/falcon-40b", **_FALCON,
        ),
        Config(
            name="smollm2-135m", family="llama", block_size=8192, vocab_size=49152, n_layer=30,
            n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536, norm_eps=1e-5,
            rope_base=100000.0, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
            hub_id="HuggingFaceTB/SmolLM2-135M",
        ),
    ]
}

ALIASES: dict[str, Alias] = {
    a.name: a
    for a in [
        Alias("llama-2-7b-chat", "llama-2-7b", "meta-llama/Llama-2-7b-chat-hf", "llama-2"),
        Alias("llama-2-13b-chat", "llama-2-13b", "meta-llama/Llama-2-13b-chat-hf", "llama-2"),
        Alias("llama-2-70b-chat", "llama-2-70b", "meta-llama/Llama-2-70b-chat-hf", "llama-2"),
        Alias("vicuna-7b", "llama-7b", "lmsys/vicuna-7b-v1.3", "vicuna"),
        Alias("alpaca-7b", "llama-7b", "chavinlo/alpaca-native", "alpaca"),
        Alias("koala-7b", "llama-7b", "TheBloke/koala-7B-HF", "koala"),
        Alias("falcon-7b-instruct", "falcon-7b", "tiiuae/falcon-7b-instruct", "falcon"),
        Alias("falcon-40b-instruct", "falcon-40b", "tiiuae/falcon-40b-instruct", "falcon"),
        Alias("stablebeluga2", "llama-2-70b", "stabilityai/StableBeluga2", "stablebeluga"),
        Alias("freewilly2", "llama-2-70b", "stabilityai/StableBeluga2", "stablebeluga"),
        Alias("smollm2-135m-instruct", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml"),
    ]
}


def all_names() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def is_known(name: str) -> bool:
    return name.lower() in PRESETS or name.lower() in ALIASES


def closest_names(name: str, n: int = 3) -> list[str]:
    return difflib.get_close_matches(name.lower(), all_names(), n=n, cutoff=0.4)


class UnknownModelName(InputError):
    """A preset/alias name that does not exist."""


def preset(name: str) -> Config:
    """The architecture for a preset or alias name; derivatives carry their hub id and chat format."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in ALIASES:
        a = ALIASES[key]
        return PRESETS[a.base].replace(name=a.name, hub_id=a.hub_id, chat_format=a.chat_format)
    hint = closest_names(key)
    suggestion = f" Did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
    raise UnknownModelName(f"unknown model name {name!r}.{suggestion} (`herd models` lists them all)")

