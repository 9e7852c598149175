"""LoRA (Hu et al. 2021): a frozen weight W plus a trainable low-rank update, y = W x + (alpha / r) B A x.

A (r, in) starts random and B (out, r) starts at zero, so an injected model computes exactly what the base
did. The base may be an `nn.Linear`, an `Int8Linear` (frozen int8 weights: the QLoRA-style path that runs on
CPU) or, with bitsandbytes on a GPU, a 4-bit NF4 `Linear4bit` (`quantize_nf4`).

Names follow Hugging Face PEFT: a wrapped layer keeps its place in the model as `LoRALinear` with
`base_layer`, `lora_A` and `lora_B` children, so `save_adapter` writes PEFT's own keys
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and `peft.PeftModel.from_pretrained`
opens the result on the `transformers` model.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llamaherd.errors import CheckpointError, InputError
from llamaherd.files import atomic_write
from llamaherd.model import Linear
from llamaherd.quantize import Int8Linear

# Short target names -> the module names in `GPT` (Hugging Face Llama names).
TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj", "lm_head": "lm_head",
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, scale (alpha / r, or alpha / sqrt(r) with rslora), dropout on the LoRA input, target layers.

    `rank_pattern` / `alpha_pattern` give some layers another rank / alpha, keyed as PEFT keys them: a regex
    matched against the layer's Hugging Face name (see `pattern_key`); on Falcon, q, k and v each take what
    their fused `query_key_value` name gets.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InputError(f"LoRA rank r={self.r} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        object.__setattr__(self, "targets", tuple(self.targets))
        for t in self.targets:
            if t not in TARGETS and t not in TARGETS.values():
                raise InputError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
        for name in ("rank_pattern", "alpha_pattern"):
            object.__setattr__(self, name, checked_patterns(getattr(self, name), name, "LoRA config", InputError))

    @property
    def module_names(self) -> set[str]:
        return {TARGETS.get(t, t) for t in self.targets}

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r = r or self.r
        alpha = self.alpha if alpha is None else alpha
        return alpha / (math.sqrt(r) if self.rslora else r)

    def layer_rank_scaling(self, peft_name: str) -> tuple[int, float]:
        """Rank and scale of the layer PEFT calls `peft_name`, after rank_pattern and alpha_pattern."""
        r = pattern_value(self.rank_pattern, peft_name, self.r)
        return r, self.scaling(r, pattern_value(self.alpha_pattern, peft_name, self.alpha))


def pattern_key(patterns: Mapping[str, float], module_name: str) -> str | None:
    """The first key of a PEFT `rank_pattern` / `alpha_pattern` that matches a module name, or None.

    PEFT's rule (peft.utils.other.get_pattern_key): the whole key is one regular expression, alternation
    included, that must match the end of the name from a module boundary on. So `q_proj|v_proj` matches
    `model.layers.0.self_attn.v_proj`, `layers\\.1\\..*v_proj` only layer 1's v_proj, `proj` nothing.
    """
    for key in patterns:
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return key
    return None


def pattern_value(patterns: Mapping[str, float], module_name: str, default: float) -> float:
    """The value of the first pattern key matching `module_name` (`pattern_key`), else `default`."""
    key = pattern_key(patterns, module_name)
    return default if key is None else patterns[key]


def checked_patterns(patterns: object, field_name: str, origin: str, error: type[Exception]) -> dict[str, float]:
    """A rank/alpha pattern mapping whose keys are valid regexes and whose values are ranks >= 1 / numbers."""
    if patterns is None:
        return {}
    if not isinstance(patterns, Mapping):
        raise error(f"{origin}: field {field_name!r} must map regex keys to values, got {patterns!r}")
    rank = field_name.startswith("rank")
    for key, value in patterns.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as e:
            raise error(f"{origin}: field {field_name!r} key {key!r} is not a valid regex ({e}); fix the key") from None
        if isinstance(value, bool) or not isinstance(value, int if rank else (int, float)) or (rank and value < 1):
            raise error(f"{origin}: field {field_name!r} key {key!r} has value {value!r}; "
                        f"use {'an integer >= 1' if rank else 'a number'}")
    return dict(patterns)


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * lora_B(lora_A(dropout(x)))`, with the base frozen."""

    def __init__(self, base_layer: nn.Module, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device, dtype = _float_param(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, scaling
        self.disabled = False  # `adapters_disabled`: the base layer alone

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (so `GPT.output_weight` and device look-ups keep working)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shape (out, in), in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        # scaling applied to the rank-r activations, and B's product added in its GEMM (addmm): no elementwise pass
        # over the (tokens, out_features) output, forward or backward (PEFT scales and adds that output). Same
        # value up to rounding.
        h = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)) * self.scaling  # (..., r)
        if h.dtype != y.dtype:
            return y + self.lora_B(h).to(y.dtype)
        return torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r),
                           self.lora_B.weight.t()).view(y.shape)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def _float_param(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype the LoRA matrices should use beside this base layer."""
    if isinstance(module, Int8Linear):
        return module.scale.device, module.scale.dtype
    w = module.weight
    dtype = w.dtype if w.is_floating_point() else getattr(module, "compute_dtype", None) or torch.float32
    return w.device, dtype


def _check_targets(model: nn.Module, names: set[str]) -> None:
    config = getattr(model, "config", None)
    if "lm_head" in names and getattr(config, "tie_embeddings", False):
        raise InputError(
            "this model ties lm_head to the input embeddings, so it has no separate lm_head to adapt; "
            "drop 'lm_head' from the LoRA targets"
        )
    present = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    missing = sorted(names - present)
    if missing:
        raise InputError(
            f"LoRA targets {', '.join(missing)} do not exist in this model (e.g. a GELU MLP has no gate_proj); "
            "remove them from the targets"
        )


def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every target layer in a `LoRALinear` and freeze everything else (in place; returns `model`).

    Each layer's rank and scale follow the config's patterns, matched on its PEFT name (`layer_rank_scaling`);
    a pattern key that matches no adapted layer is ignored, as PEFT ignores it, with a warning.
    """
    names = config.module_names
    _check_targets(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_names = []
    for parent_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in names and not isinstance(child, LoRALinear):
                peft_names.append(_peft_name(model, f"{parent_name}.{child_name}".lstrip(".")))
                r, scaling = config.layer_rank_scaling(peft_names[-1])
                setattr(module, child_name, LoRALinear(child, r, scaling, config.dropout))
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        unused = set(patterns) - {pattern_key(patterns, n) for n in peft_names}
        if unused:
            warnings.warn(f"LoRA {field_name} keys {sorted(unused)} match none of the adapted layers (PEFT names "
                          f"such as {peft_names[0]!r}); they change nothing", stacklevel=2)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in the model by its module name (e.g. `model.layers.0.self_attn.q_proj`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer of `model` computes its base layer alone: the frozen base model, e.g.
    the reference policy of DPO or PPO, without a second copy of the weights (PEFT's `disable_adapter`)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, under the model's own names (what a LoRA training checkpoint needs)."""
    return {n: p for n, p in model.state_dict().items() if ".lora_A." in n or ".lora_B." in n}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place; returns `model`).

    An int8 or NF4 base is dequantized first, so the merged layer is an `nn.Linear` in the dtype of the
    LoRA matrices: exact, and ready for `save_hf`.
    """
    for name, lora in lora_layers(model).items():
        base = lora.base_layer
        delta = lora.delta_weight()
        if type(base) in (nn.Linear, Linear):
            with torch.no_grad():
                base.weight += delta.to(base.weight.dtype)
            merged = base
        else:
            dtype = lora.lora_A.weight.dtype
            merged = Linear(lora.in_features, lora.out_features, bias=base.bias is not None,
                               device=delta.device, dtype=dtype)
            with torch.no_grad():
                merged.weight.copy_(_dequantize(base) + delta)
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, merged)
    return model


def _dequantize(base: nn.Module) -> torch.Tensor:
    """The fp32 weight of a quantized base layer."""
    if isinstance(base, Int8Linear):
        return base.dequantized(torch.float32)
    import bitsandbytes as bnb  # only an NF4 base gets here

    return bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                 skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (except `skip`) by a bitsandbytes 4-bit NF4 layer on the GPU (QLoRA's base).

    Needs bitsandbytes and CUDA; on CPU load the model with `quantize="int8"` instead.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise InputError(
            "4-bit NF4 needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; "
            "on CPU use the int8 base (load_model(..., quantize='int8'))"
        ) from None
    if not torch.cuda.is_available():
        raise InputError("4-bit NF4 needs a CUDA GPU; on CPU use the int8 base (load_model(..., quantize='int8'))")
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Linear, Linear) and child_name not in skip:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(module, child_name, q.cuda())
    return model


# ---- PEFT layout ---------------------------------------------------------------------------------------------
# Falcon's Hugging Face names; q, k and v live in one fused `query_key_value` layer there.
_FALCON_NAMES = {"self_attn.o_proj": "self_attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
                 "mlp.down_proj": "mlp.dense_4h_to_h"}
_FALCON_QKV = "self_attention.query_key_value"


def _is_falcon(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "family", "llama") == "falcon"


def _peft_name(model: nn.Module, name: str) -> str:
    """The Hugging Face (PEFT) name of a llamaherd layer: the same, except Falcon's (q, k and v share the
    fused `query_key_value`)."""
    if not _is_falcon(model) or name == "lm_head":
        return name
    block, _, rest = name.removeprefix("model.layers.").partition(".")
    if rest in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.h.{block}.{_FALCON_QKV}"
    return f"transformer.h.{block}.{_FALCON_NAMES[rest]}"


def _peft_modules(
    model: nn.Module, layers: dict[str, LoRALinear]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Hugging Face module name -> (A, B, scale) for every adapted layer.

    Falcon's q, k, v adapters of a block become one exact adapter on the fused layer: A stacks their A
    matrices (rank = the sum of theirs) and B is block-diagonal, its rows in Falcon's fused order.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    qkv: dict[str, dict[str, LoRALinear]] = {}
    for name, m in layers.items():
        hf = _peft_name(model, name)
        if hf.endswith(_FALCON_QKV):
            qkv.setdefault(hf, {})[name[-6]] = m  # "q", "k" or "v"
            continue
        out[hf] = (m.lora_A.weight.detach(), m.lora_B.weight.detach(), m.scaling)
    if qkv:
        from llamaherd.checkpoints.hf import fuse_falcon_qkv

        config = model.config
        widths = {"q": config.n_head * config.head_dim, "k": config.n_query_groups * config.head_dim}
        widths["v"] = widths["k"]
        for hf, parts in qkv.items():
            if len({m.scaling for m in parts.values()}) > 1:
                raise InputError(f"{hf}: q, k and v adapters with different scales cannot share Falcon's fused layer")
            some = next(iter(parts.values())).lora_A.weight
            rank = sum(m.r for m in parts.values())
            a = torch.cat([parts[x].lora_A.weight.detach() for x in "qkv" if x in parts])
            blocks, col = {}, 0
            for x in "qkv":
                blocks[x] = some.new_zeros(widths[x], rank)
                if x in parts:
                    blocks[x][:, col : col + parts[x].r] = parts[x].lora_B.weight.detach()
                    col += parts[x].r
            out[hf] = (a, fuse_falcon_qkv(blocks["q"], blocks["k"], blocks["v"], config),
                       next(iter(parts.values())).scaling)
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout (each file atomically)."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("the model has no LoRA layers to save; call inject_lora or load_adapter first")
    modules = _peft_modules(model, layers)
    ranks = {hf: a.shape[0] for hf, (a, _, _) in modules.items()}
    alphas = {hf: round(scaling * a.shape[0], 6) for hf, (a, _, scaling) in modules.items()}
    base_r, base_alpha = (Counter(v.values()).most_common(1)[0][0] for v in (ranks, alphas))
    dropouts = {m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0 for m in layers.values()}
    tensors = {}
    for hf, (a, b, _) in modules.items():
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": base_r,
        "lora_alpha": base_alpha,
        "lora_dropout": max(dropouts),
        "target_modules": sorted({hf.rpartition(".")[2] for hf in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": _pattern_entries(ranks, base_r),
        "alpha_pattern": _pattern_entries(alphas, base_alpha),
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / ADAPTER_WEIGHTS)
    atomic_write(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def _pattern_entries(values: dict[str, float], default: float) -> dict[str, float]:
    """rank/alpha_pattern entries that give every module its value under PEFT's matching: keyed by the layer
    name (q_proj) where all layers of that name agree, else by each differing module's escaped full name."""
    by_name: dict[str, set[float]] = {}
    for hf, value in values.items():
        by_name.setdefault(hf.rpartition(".")[2], set()).add(value)
    out = {}
    for hf, value in values.items():
        name = hf.rpartition(".")[2]
        if value != default:
            out[name if len(by_name[name]) == 1 else re.escape(hf)] = value
    return out


def read_adapter_config(path: str | Path) -> dict:
    """The JSON object in a PEFT adapter directory's adapter_config.json."""
    cfg_path = Path(path) / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (is {path} a PEFT adapter directory?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object of PEFT settings")
    return cfg


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    cfg = read_adapter_config(path)
    if not weights_path.exists():
        raise CheckpointError(f"{weights_path}: not found (adapters saved as .bin are not read; re-save with "
                              "safe_serialization=True)")
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as e:
        raise CheckpointError(f"{weights_path}: unreadable safetensors ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    unsupported = [(k, v) for k, v in (("use_dora", True), ("fan_in_fan_out", True)) if cfg.get(k) == v]
    if cfg.get("bias", "none") != "none":
        unsupported.append(("bias", cfg["bias"]))
    if cfg.get("modules_to_save"):
        unsupported.append(("modules_to_save", cfg["modules_to_save"]))
    if unsupported:
        k, v = unsupported[0]
        raise CheckpointError(f"{cfg_path}: field {k!r} = {v!r} is not supported by llamaherd's LoRA")
    return cfg, tensors


def _internal_modules(model: nn.Module, hf: str, b: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The llamaherd layers (and their B) behind one Hugging Face module; Falcon's fused qkv splits in three."""
    if not _is_falcon(model) or hf == "lm_head":
        return [(hf, b)]
    m = re.match(r"^transformer\.h\.(\d+)\.(.+)$", hf)
    if m is None:
        return [(hf, b)]
    block, rest = m.groups()
    if rest == _FALCON_QKV:
        from llamaherd.checkpoints.hf import split_falcon_qkv

        q, k, v = split_falcon_qkv(b, model.config)
        return [(f"model.layers.{block}.self_attn.{x}_proj", t) for x, t in zip("qkv", (q, k, v))]
    inverse = {v: k for k, v in _FALCON_NAMES.items()}
    return [(f"model.layers.{block}.{inverse.get(rest, rest)}", b)]


def load_adapter(model: nn.Module, adapter_dir: str | Path, dropout: float | None = None) -> nn.Module:
    """Inject and fill the LoRA layers of a PEFT adapter directory (in place; returns `model`).

    The rank of each layer comes from its tensors; alpha from `lora_alpha`/`alpha_pattern`; the scale is
    alpha / r (alpha / sqrt(r) with `use_rslora`). Full base-layer copies PEFT may store are skipped. A Falcon
    adapter on the fused query_key_value layer becomes q, k and v adapters sharing its A.
    """
    path = Path(adapter_dir)
    weights = path / ADAPTER_WEIGHTS
    cfg, tensors = _read_adapter(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.match(rf"^{re.escape(PEFT_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$", key)
        if m is None:
            if key.endswith(".base_layer.weight"):
                continue
            raise CheckpointError(f"{weights}: unexpected tensor {key!r} (not a LoRA A/B weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    names = {n for n, _ in model.named_modules()}
    dropout = cfg.get("lora_dropout", 0.0) if dropout is None else dropout
    cfg_path = path / ADAPTER_CONFIG
    rank_pattern, alpha_pattern = (checked_patterns(cfg.get(f), f, str(cfg_path), CheckpointError)
                                   for f in ("rank_pattern", "alpha_pattern"))
    for hf, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{weights}: {hf} has {sorted(ab)} but needs lora_A and lora_B")
        a, r = ab["lora_A"], ab["lora_A"].shape[0]
        if r != (want := pattern_value(rank_pattern, hf, cfg.get("r", 8))):
            raise CheckpointError(f"{cfg_path}: fields 'r' / 'rank_pattern' give {hf} rank {want} (PEFT's matching) "
                                  f"but its lora_A in {weights.name} has rank {r}; make the config say {r}")
        alpha = pattern_value(alpha_pattern, hf, cfg.get("lora_alpha", 8))
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        for name, b in _internal_modules(model, hf, ab["lora_B"]):
            if name not in names:
                raise CheckpointError(f"{weights}: layer {hf!r} does not exist in this model")
            _fill(model, name, a, b, scaling, dropout, weights)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in lora_layers(model).values():
        module.lora_A.weight.requires_grad_(True)
        module.lora_B.weight.requires_grad_(True)
        module.train(model.training)  # new layers follow the model's mode (no dropout at inference)
    return model


def _fill(model: nn.Module, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float,
          origin: Path) -> None:
    """Wrap layer `name` in a LoRALinear (unless it already is one) holding A, B and the scale."""
    module = model.get_submodule(name)
    r = a.shape[0]
    if not isinstance(module, LoRALinear):
        if not hasattr(module, "in_features"):
            raise CheckpointError(f"{origin}: layer {name!r} is not a linear layer")
        module = LoRALinear(module, r, scaling, dropout)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    if tuple(a.shape) != (r, module.in_features) or tuple(b.shape) != (module.out_features, r):
        raise CheckpointError(
            f"{origin}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, which do "
            f"not fit a ({module.out_features}, {module.in_features}) layer (adapter for another model?)"
        )
    if module.r != r:
        device, dtype = module.lora_A.weight.device, module.lora_A.weight.dtype
        module.lora_A = nn.Linear(module.in_features, r, bias=False, device=device, dtype=dtype)
        module.lora_B = nn.Linear(r, module.out_features, bias=False, device=device, dtype=dtype)
        module.r = r
    with torch.no_grad():
        module.lora_A.weight.copy_(a)
        module.lora_B.weight.copy_(b)
    module.scaling = scaling


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; int8 base weights count as parameters of the total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(b.numel() for n, b in model.named_buffers() if n.endswith("weight_int8"))
    return trainable, total
