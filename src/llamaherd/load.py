"""Find a checkpoint from a name or path and load it into `GPT` without allocating the model twice."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llamaherd import config as presets
from llamaherd.config import Config
from llamaherd.errors import CheckpointError, HerdError, InputError
from llamaherd.model import GPT

DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives and in which format: "hf", "meta", "gguf", or "peft" (a PEFT LoRA adapter
    directory, with the `base` it applies to)."""

    path: Path
    format: str
    name: str
    chat_format: str | None = None  # from a preset alias, or the format an adapter was trained with
    base: Source | None = None  # set for "peft" only


def detect_format(path: Path) -> str:
    from llamaherd.lora import ADAPTER_CONFIG

    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / ADAPTER_CONFIG).exists():
            return "peft"
        if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
            return "meta"
        if (path / "config.json").exists():
            return "hf"
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a .gguf file, a directory with config.json + safetensors, "
        "a Meta directory with params.json + consolidated.*.pth, or a PEFT adapter directory)"
    )


def resolve(source: str | Path | None = None, base: str | Path | None = None) -> Source:
    """A preset/alias name, a local path or a hub id -> a local checkpoint; a PEFT adapter comes with its base
    (`base`, else the adapter's own `base_model_name_or_path`)."""
    return _resolve(source, base, ())


def _resolve(source: str | Path | None, base: str | Path | None, adapters: tuple[Path, ...]) -> Source:
    src = _locate(source)
    if src.format == "peft":
        return _on_base(src, base, adapters)
    if base is not None:
        raise InputError(f"--base {base}: {src.path} is a full checkpoint, not a PEFT adapter directory; "
                         "drop --base")
    return src


def _on_base(adapter: Source, base: str | Path | None, adapters: tuple[Path, ...]) -> Source:
    """The adapter's Source with its base resolved like any MODEL (an adapter's base may be an adapter too).

    A relative `base_model_name_or_path` is tried as given, then relative to the adapter directory. The name
    and the chat format it was trained with come from the lineage.json of the run that wrote it, if any.
    """
    from llamaherd.lora import ADAPTER_CONFIG, read_adapter_config

    here = adapter.path.resolve()
    cfg_path = adapter.path / ADAPTER_CONFIG
    if here in adapters:
        raise CheckpointError(f"{cfg_path}: base_model_name_or_path leads back to this adapter; pass --base MODEL")
    if base is None:
        fix = "pass the base model with --base MODEL (library: load_model(..., base=MODEL))"
        declared = read_adapter_config(adapter.path).get("base_model_name_or_path")
        if not isinstance(declared, str) or not declared:
            raise CheckpointError(f"{cfg_path}: field 'base_model_name_or_path' is {declared!r}; {fix}")
        tried = [Path(declared).expanduser()]
        if not tried[0].is_absolute():
            tried.append(adapter.path / tried[0])
        found = next((p for p in tried if p.exists()), None)
        where = f"tried {' and '.join(map(str, tried))}"
        if found is None and (tried[0].is_absolute() or declared.startswith((".", "~"))):
            raise CheckpointError(f"{cfg_path}: base model {declared!r} not found ({where}); {fix}")
        try:
            base_src = _resolve(found or declared, None, (*adapters, here))
        except HerdError as e:
            context = f"{where}, then as a name or hub id: " if found is None else ""
            raise CheckpointError(f"{cfg_path}: base model {declared!r} ({context}{e}); {fix}") from None
    else:
        base_src = _resolve(base, None, (*adapters, here))
    name, chat_format = trained_as(adapter.path)
    return replace(adapter, name=name or adapter.name, chat_format=chat_format, base=base_src)


def trained_as(path: Path) -> tuple[str | None, str | None]:
    """(run name, chat format) of the fine-tuning run whose lineage.json describes this directory, if any."""
    from llamaherd.train.lineage import find_lineage, read_lineage

    lineage_path = find_lineage(path)
    if lineage_path is None:
        return None, None
    lineage = read_lineage(lineage_path)
    child, hyper = lineage.get("child"), lineage.get("hyperparameters")
    name = child.get("name") if isinstance(child, dict) else None
    chat_format = hyper.get("chat_format") if isinstance(hyper, dict) else None
    return (name if isinstance(name, str) else None), (chat_format if isinstance(chat_format, str) else None)


def model_name(source: str | Path | None) -> str:
    """A MODEL's name for naming outputs, without loading it: a PEFT adapter's run name (from its lineage.json),
    else the last part of the name or path."""
    from llamaherd.lora import ADAPTER_CONFIG

    path = Path(str(source or DEFAULT_MODEL)).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return trained_as(path)[0] or path.name
    return path.name


def _locate(source: str | Path | None) -> Source:
    """A preset/alias name, a local path or a hub id -> a local checkpoint (an adapter still without its base)."""
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
    if src.format == "peft":  # LoRA leaves the architecture as it is
        return read_config(src.base)
    if src.format == "gguf":
        from llamaherd.checkpoints import gguf

        return gguf.read_config(src.path)
    if src.format == "meta":
        from llamaherd.checkpoints import meta

        return meta.read_config(src.path)
    from llamaherd.checkpoints import hf

    return hf.read_config(src.path)


def iter_tensors(src: Source, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    if src.format == "peft":
        raise CheckpointError(f"{src.path}: a PEFT adapter holds no base weights; load it with load_gpt/load_model")
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
        from llamaherd.quantize import Int8Linear, swap_linears_for_int8

        swap_linears_for_int8(model)
        if config.tie_embeddings:  # an int8 copy of the tied embedding for the head; load_weights fills it
            model.lm_head = Int8Linear(config.n_embd, config.vocab_size, False, torch.device("meta"))
    elif quantize is not None:
        raise InputError(f"unknown quantization {quantize!r}; supported: int8")
    assert model.rope.inv_freq.device.type == "cpu"  # computed, not a checkpoint tensor (see RotaryEmbedding)
    return model


def load_weights(model: GPT, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, origin: str) -> None:
    """Assign each tensor into place (cast to `dtype`), checking names and shapes; all must be present."""
    from llamaherd.quantize import Int8Linear

    expected = {n: p for n, p in model.named_parameters()}
    expected |= {n.removesuffix("_int8"): b for n, b in model.named_buffers() if n.endswith("weight_int8")}
    tied = model.config.tie_embeddings
    if tied:
        expected.pop("lm_head.weight", None)  # an int8 head of a tied model is quantized from the embedding below
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
            t = t.to(dtype).contiguous()  # the readers yield tensors in their own memory; kernels read rows
            setattr(module, attr, nn.Parameter(t, requires_grad=t.is_floating_point()))
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{origin}: missing tensors {', '.join(missing[:3])}{more} (truncated or incomplete checkpoint?)"
        )
    if tied and isinstance(model._modules.get("lm_head"), Int8Linear):
        model.lm_head.set_weight(model.model.embed_tokens.weight.detach())
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
    base: str | Path | None = None,
) -> GPT:
    """Only the model (no tokenizer), in eval mode; `base` overrides a PEFT adapter's base model.

    A PEFT adapter is merged into its base on load (W + scaling * B A, as `peft`'s merge_and_unload): decode then
    runs the plain layers, with no extra LoRA matmuls per adapted layer. On an int8 base it stays unmerged
    (LoRA layers around the int8 weights), since merging would bring back float weights.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16")
        dtype = DTYPES[dtype]
    src = source if isinstance(source, Source) else resolve(source, base)
    if src.format == "peft":
        from llamaherd.lora import load_adapter, merge_lora

        model = load_adapter(load_gpt(src.base, dtype, device, quantize), src.path)
        return (model if quantize else merge_lora(model)).eval()
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

    def save_hf(self, out_dir: str | Path) -> Path:
        """Write the model (an adapter merged in) and its tokenizer as a Hugging Face checkpoint."""
        from llamaherd.checkpoints.hf import save_hf

        out = save_hf(self.model.state_dict(), self.config, out_dir)
        self.tokenizer.save_pretrained(out)
        return out


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    base: str | Path | None = None,
) -> Loaded:
    """Load model and tokenizer from a preset/alias name, local path, hub id or PEFT adapter directory (default:
    embedded SmolLM2); `base` overrides an adapter's `base_model_name_or_path`. See `load_gpt` for adapters."""
    from llamaherd.tokenizer import Tokenizer

    src = resolve(source, base)
    model = load_gpt(src, dtype, device, quantize)
    tokenizer = Tokenizer.from_path(tokenizer_path(src))
    return Loaded(model, tokenizer, src, _chat_format(src, tokenizer, model.config.chat_format))


def load_tokenizer(source: str | Path | None = None, base: str | Path | None = None) -> tuple[object, str | None]:
    """A model's tokenizer and chat format (as load_model gives them) without reading its weights: dry runs and
    data preparation."""
    from llamaherd.tokenizer import Tokenizer

    src = resolve(source, base)
    tokenizer = Tokenizer.from_path(tokenizer_path(src))
    weights = src.base if src.format == "peft" else src  # an adapter keeps its base's architecture and preset
    return tokenizer, _chat_format(src, tokenizer, weights.chat_format or read_config(weights).chat_format)


def _chat_format(src: Source, tokenizer, config_format: str | None) -> str | None:
    """What an adapter was trained with, else the tokenizer's template, else the config's (preset) format."""
    trained = src.chat_format if src.format == "peft" else None  # what the adapter learned wins over the base's
    return trained or tokenizer.chat_template or config_format


def tokenizer_path(src: Source) -> Path:
    """An adapter's own tokenizer files (PEFT trainers often save them beside the adapter), else its base's."""
    while src.base is not None and not any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        src = src.base
    return src.path
