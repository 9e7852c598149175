"""Find a checkpoint from a name or path and load it into `GPT` without allocating the model twice."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamaherd import config as presets
from llamaherd.config import Config
from llamaherd.errors import CheckpointError, InputError
from llamaherd.model import GPT

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives and in which format: "hf", "meta" or "gguf"."""

    path: Path
    format: str
    name: str
    chat_format: str | None = None  # from a preset alias; otherwise the checkpoint's own template


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "config.json").exists():
            return "hf"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a .gguf file, a directory with config.json + safetensors, "
        "or a Meta directory with params.json + consolidated.*.pth)"
    )


def resolve(source: str | Path | None = None) -> Source:
    """A preset/alias name, a local path or a hub id -> a local checkpoint."""
    source = str(source or DEFAULT_MODEL)
    path = Path(source).expanduser()
    if path.exists():
        fmt = detect_format(path)
        if fmt == "gguf" and path.is_dir():
            path = next(iter(sorted(path.glob("*.gguf"))))
        return Source(path, fmt, path.stem if path.is_file() else path.name)
    if source.lower() == DEFAULT_MODEL:
        from llamaherd.embedded import embedded_model_path

        return Source(embedded_model_path(), "gguf", DEFAULT_MODEL, "chatml")
    if presets.is_known(source):
        cfg = presets.preset(source)
        return _download(cfg.hub_id, cfg.name, cfg.chat_format)
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return _download(source, source.split("/")[1], None)
    if source.endswith((".gguf", ".safetensors", ".json", ".pth", ".bin")) or "/" in source:
        raise CheckpointError(f"{source}: no such file or directory")
    presets.preset(source)  # raises UnknownModelName with the closest names
    raise AssertionError("unreachable")


def _download(hub_id: str, name: str, chat_format: str | None) -> Source:
    from llamaherd.hub import download

    path = download(hub_id)
    return Source(path, detect_format(path), name, chat_format)


def read_config(src: Source) -> Config:
    if src.format == "gguf":
        from llamaherd.checkpoints import gguf

        return gguf.read_config(src.path)
    if src.format == "meta":
        from llamaherd.checkpoints import meta

        return meta.read_config(src.path)
    from llamaherd.checkpoints import hf

    return hf.read_config(src.path)


def iter_tensors(src: Source, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    if src.format == "gguf":
        from llamaherd.checkpoints import gguf

        return gguf.iter_tensors(src.path, config)
    if src.format == "meta":
        from llamaherd.checkpoints import meta

        return meta.iter_tensors(src.path, config)
    from llamaherd.checkpoints import hf

    return hf.iter_tensors(src.path, config)


def build_on_meta(config: Config, quantize: str | None = None) -> GPT:
    """The model's structure without memory; tensors are assigned by `load_weights`."""
    with torch.device("meta"):
        model = GPT(config)
    if quantize == "int8":
        from llamaherd.quantize import swap_linears_for_int8

        swap_linears_for_int8(model)
    elif quantize is not None:
        raise InputError(f"unknown quantization {quantize!r}; supported: int8")
    assert model.rope.inv_freq.device.type == "cpu"  # computed, not a checkpoint tensor (see RotaryEmbedding)
    return model


def matmul_layout(t: torch.Tensor) -> torch.Tensor:
    """Store fp32 matrices that widen (out_features > in_features) column-major (same shape, transposed strides).

    Decode is a chain of matrix-vector products, bound by how fast BLAS streams each weight. Measured here
    (benchmarks/generate.py's machine, MKL fp32 gemv): a widening matrix (576 -> 1536, 576 -> 49152) reads
    1.5-2x faster stored (in, out), a square or narrowing one (576 -> 576, 1536 -> 576) faster as stored
    (out, in). The bf16/fp16 kernels prefer row-major throughout, so they are left alone.
    """
    if t.dtype != torch.float32 or t.dim() != 2 or t.shape[0] <= t.shape[1]:
        return t
    return t.t().contiguous().t()


def row_major(params: Iterable[torch.Tensor]) -> None:
    """Give parameters that `matmul_layout` stored column-major row-major storage again, in place (same values):
    for training, where gradients come out row-major, and for FSDP2, which shards row-major storage only."""
    for p in params:
        if not p.is_contiguous():
            p.data = p.data.contiguous()


def load_weights(model: GPT, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, origin: str) -> None:
    """Assign each tensor into place (cast to `dtype`), checking names and shapes; all must be present."""
    from llamaherd.quantize import Int8Linear

    expected = {n: p for n, p in model.named_parameters()}
    expected |= {n.removesuffix("_int8"): b for n, b in model.named_buffers() if n.endswith("weight_int8")}
    tied = model.config.tie_embeddings
    seen: set[str] = set()
    for name, t in tensors:
        if tied and name == "lm_head.weight":
            continue  # some tied checkpoints store the shared matrix twice
        if name not in expected:
            raise CheckpointError(f"{origin}: unexpected tensor {name!r} for this architecture")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{origin}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, Int8Linear) and attr == "weight":
            module.set_weight(t)
        else:
            t = matmul_layout(t.to(dtype).contiguous())  # the readers yield tensors in their own memory
            setattr(module, attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{origin}: missing tensors {', '.join(missing[:3])}{more} (truncated or incomplete checkpoint?)"
        )
    for module in model.modules():
        if isinstance(module, Int8Linear) and module.bias is not None:
            module.bias = nn.Parameter(module.bias.to(dtype))
        if isinstance(module, Int8Linear):
            module.scale = module.scale.to(dtype)


def load_gpt(
    source: Source | str | Path | None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> GPT:
    """Only the model (no tokenizer), in eval mode."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    src = source if isinstance(source, Source) else resolve(source)
    config = read_config(src)
    if src.chat_format:
        config = config.replace(chat_format=src.chat_format)
    model = build_on_meta(config, quantize)
    load_weights(model, iter_tensors(src, config), dtype, str(src.path))
    return model.to(device).eval()


@dataclass
class Loaded:
    model: GPT
    tokenizer: object  # llamaherd.tokenizer.Tokenizer
    source: Source
    chat_format: str | None  # a built-in format name or a Jinja template

    @property
    def config(self) -> Config:
        return self.model.config


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> Loaded:
    """Load model and tokenizer from a preset/alias name, local path or hub id (default: embedded SmolLM2)."""
    from llamaherd.tokenizer import Tokenizer

    src = resolve(source)
    model = load_gpt(src, dtype, device, quantize)
    tokenizer = Tokenizer.from_path(src.path)
    config = model.config
    chat_format = tokenizer.chat_template or config.chat_format
    return Loaded(model, tokenizer, src, chat_format)
