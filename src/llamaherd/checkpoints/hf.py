"""Hugging Face checkpoints: config.json, safetensors (single or sharded) and `.bin`, for Llama and Falcon."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamaherd.checkpoints.rope_fields import make_scaling, rope_flag, rope_number
from llamaherd.config import Config, RopeScaling
from llamaherd.errors import CheckpointError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
LLAMA_TYPES = {"llama", "mistral"}
FALCON_TYPES = {"falcon", "RefinedWeb", "RefinedWebModel"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None


def read_config(path: str | Path) -> Config:
    """Architecture from a Hugging Face `config.json` (the file or its directory)."""
    path = Path(path)
    cfg_path = path / "config.json" if path.is_dir() else path
    c = _read_json(cfg_path)
    model_type = c.get("model_type")
    rope_base, rope_scaling = _read_rope(c, cfg_path)
    name = Path(c.get("_name_or_path") or cfg_path.parent.name).name or "custom"
    common = dict(
        name=name, vocab_size=c["vocab_size"], n_embd=c["hidden_size"], n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"], bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"),
        pad_token_id=c.get("pad_token_id"), rope_base=rope_base, rope_scaling=rope_scaling,
    )
    if model_type in LLAMA_TYPES:
        return Config(
            family="llama", block_size=c.get("max_position_embeddings", 2048),
            n_query_groups=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim"), intermediate_size=c["intermediate_size"], norm_class="rmsnorm",
            norm_eps=c.get("rms_norm_eps", 1e-6), mlp_class="swiglu", attn_bias=c.get("attention_bias", False),
            attn_out_bias=c.get("attention_bias", False), mlp_bias=c.get("mlp_bias", False),
            tie_embeddings=c.get("tie_word_embeddings", False), **common,
        )
    if model_type in FALCON_TYPES:
        if c.get("alibi"):
            raise CheckpointError(f"{cfg_path}: field 'alibi' = true (ALiBi Falcon variants) is not supported")
        new_arch = c.get("new_decoder_architecture", False)
        if new_arch:
            kv = c.get("num_kv_heads") or c["num_attention_heads"]
        else:
            kv = 1 if c.get("multi_query", True) else c["num_attention_heads"]
        parallel = new_arch or c.get("parallel_attn", True)
        n_ln = c.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        if new_arch and n_ln != 2:
            raise CheckpointError(f"{cfg_path}: field 'num_ln_in_parallel_attn' = {n_ln} is not supported (only 2)")
        return Config(
            family="falcon", block_size=c.get("max_position_embeddings", 2048), n_query_groups=kv,
            intermediate_size=c.get("ffn_hidden_size") or 4 * c["hidden_size"], norm_class="layernorm",
            norm_eps=c.get("layer_norm_epsilon", 1e-5), mlp_class="gelu", attn_bias=c.get("bias", False),
            attn_out_bias=c.get("bias", False), mlp_bias=c.get("bias", False), parallel_residual=parallel,
            shared_attention_norm=parallel and n_ln == 1, tie_embeddings=c.get("tie_word_embeddings", True),
            **common,
        )
    raise CheckpointError(
        f"{cfg_path}: unknown architecture model_type={model_type!r}; supported: "
        f"{', '.join(sorted(LLAMA_TYPES | FALCON_TYPES))}"
    )


# Keys every RoPE type may carry besides its own fields (`RopeScaling.FIELDS`); partial rotation is checked apart.
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


def _read_rope(c: dict, cfg_path: Path) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from config.json as transformers reads them: `rope_scaling` (older writers; it
    wins when both are there) or `rope_parameters` (transformers 5), the type under `rope_type` or `type`,
    the theta there or at the top level, a top-level `original_max_position_embeddings` first for llama3 and
    yarn. A type, field or value llamaherd cannot compute exactly is refused, never dropped: a key the type
    does not read, scaling fields without a type, a number that is not finite and > 0."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    p = c.get(key) or {}
    if not isinstance(p, dict):
        raise CheckpointError(f"{cfg_path}: field {key!r} = {p!r} is not an object")

    def refuse(field: str, value: object, why: str) -> CheckpointError:
        return CheckpointError(f"{cfg_path}: field {field!r} = {value!r} {why}")

    thetas = [rope_number(cfg_path, f, v) for f, v in ((f"{key}.rope_theta", p.get("rope_theta")),
                                                        ("rope_theta", c.get("rope_theta"))) if v is not None]
    base = thetas[0] if thetas else 10000.0
    for field, partial in ((f"{key}.partial_rotary_factor", p.get("partial_rotary_factor")),
                           ("partial_rotary_factor", c.get("partial_rotary_factor"))):
        if partial is not None and (isinstance(partial, bool) or partial != 1):
            raise refuse(field, partial, "is not supported (Llama and Falcon rotate whole heads)")
    type_field = "rope_type" if p.get("rope_type") is not None else "type"
    kind = p.get(type_field)
    fields = [f for f in p if f not in _ROPE_COMMON_KEYS]
    if kind is None and fields:
        raise refuse(f"{key}.{fields[0]}", p[fields[0]], "is given without a RoPE type (add rope_type: linear, "
                     f"dynamic, llama3 or yarn, or remove {', '.join(fields)})")
    if kind in (None, "default"):
        if fields:
            raise refuse(f"{key}.{fields[0]}", p[fields[0]], "is not a field of RoPE type 'default'")
        return base, None
    if not isinstance(kind, str) or kind not in RopeScaling.FIELDS:
        supported = ", ".join(("default", *RopeScaling.FIELDS))
        raise refuse(f"{key}.{type_field}", kind, f"is not supported; supported RoPE types: {supported}")
    unknown = [f for f in fields if f not in RopeScaling.FIELDS[kind]]
    if unknown:
        raise refuse(f"{key}.{unknown[0]}", p[unknown[0]], f"is not a field of RoPE type {kind!r} "
                     f"(allowed: {', '.join(RopeScaling.FIELDS[kind])})")
    if p.get("factor") is None:
        raise CheckpointError(f"{cfg_path}: field '{key}.factor' is missing (RoPE type {kind!r} needs it)")
    values = {}
    for field in (f for f in RopeScaling.FIELDS[kind] if p.get(f) is not None):
        name = f"{key}.{field}"
        values[field] = rope_flag(cfg_path, name, p[field]) if field == "truncate" else rope_number(
            cfg_path, name, p[field], integer=field == "original_max_position_embeddings",
            zero_ok=field.startswith("mscale"))  # transformers reads an mscale of 0 as not given
    orig = "original_max_position_embeddings"
    if kind in ("llama3", "yarn") and c.get(orig) is not None:
        values[orig] = rope_number(cfg_path, orig, c[orig], integer=True)
    elif kind in ("llama3", "yarn") and orig not in values:
        values[orig] = rope_number(cfg_path, "max_position_embeddings", c.get("max_position_embeddings", 2048),
                                   integer=True)
    return base, make_scaling(cfg_path, key, kind, **values)


def _rope_parameters(config: Config) -> dict:
    """`rope_parameters` as transformers 5 writes it: the type, the fields the checkpoint declared, the theta."""
    s = config.rope_scaling
    if s is None:
        return {"rope_type": "default", "rope_theta": config.rope_base}
    declared = {f: getattr(s, f) for f in RopeScaling.FIELDS[s.type] if f == "factor" or getattr(s, f) is not None}
    return {"rope_type": s.type, **declared, "rope_theta": config.rope_base}


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files, from a sharded index when there is one."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: field 'weight_map' missing or not an object")
            return [directory / f for f in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).exists():
            return [directory / single]
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not found:
        raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found")
    return found


def _iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not path.exists():
        raise CheckpointError(f"{path}: weight file listed in the index is missing")
    if path.suffix == ".safetensors":
        yield from read_safetensors(path)
        return
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refusing to unpickle arbitrary objects ({first}); convert it to safetensors "
            "with a tool you trust, or load only checkpoints you trust"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None
    for name, t in state.items():
        yield name, t.clone()  # its own memory: the loader keeps it, and must not keep the file mapped


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a .safetensors file, read into its own memory (in file order).

    Reading instead of memory-mapping keeps the file's pages out of this process: a mapped file counts
    in the resident memory as long as a view of it lives, and the loader copies every tensor anyway.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: truncated or corrupt safetensors file ({why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise corrupt("bad header length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, e in entries:
            dtype = SAFETENSORS_DTYPES.get(e.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            t = torch.empty(e["shape"], dtype=dtype)
            nbytes = t.numel() * t.element_size()
            if end - start != nbytes or 8 + n + end > size:
                raise corrupt(f"tensor {name!r} runs past the end of the file or has the wrong size")
            f.seek(8 + n + start)
            if nbytes and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != nbytes:
                raise corrupt(f"tensor {name!r} is cut short")
            yield name, t


def iter_tensors(path: str | Path, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors under internal names (see llamaherd.checkpoints), one file at a time."""
    for file in weight_files(Path(path)):
        for name, tensor in _iter_file(file):
            if config.family == "falcon":
                yield from _falcon_to_internal(name, tensor, config)
            elif not name.endswith("rotary_emb.inv_freq"):
                yield name, tensor


_FALCON_NAMES = [
    (r"^transformer\.word_embeddings\.", "model.embed_tokens."),
    (r"^transformer\.ln_f\.", "model.norm."),
    (r"^transformer\.h\.(\d+)\.(input_layernorm|ln_attn)\.", r"model.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.(post_attention_layernorm|ln_mlp)\.", r"model.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.self_attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.up_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.down_proj."),
]


def _falcon_to_internal(name: str, t: torch.Tensor, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
    m = re.match(r"^transformer\.h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)$", name)
    if m:
        prefix = f"model.layers.{m.group(1)}.self_attn"
        q, k, v = split_falcon_qkv(t, config)
        yield from ((f"{prefix}.{p}_proj.{m.group(2)}", w) for p, w in zip("qkv", (q, k, v)))
        return
    for pattern, repl in _FALCON_NAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            yield new, t
            return
    yield name, t  # lm_head.weight, or a name the loader will report as unexpected


def falcon_new_architecture(config: Config) -> bool:
    """Falcon-40B's "new decoder architecture": parallel branches with a norm each, grouped fused QKV."""
    return config.parallel_residual and not config.shared_attention_norm


def split_falcon_qkv(t: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split Falcon's fused query_key_value rows into q, k, v (each head-major)."""
    h, kv, hd = config.n_head, config.n_query_groups, config.head_dim
    rest = t.shape[1:]
    if falcon_new_architecture(config):  # per group: [q * (h/kv), k, v]
        g = t.view(kv, h // kv + 2, hd, *rest)
        return g[:, :-2].reshape(h * hd, *rest), g[:, -2].reshape(kv * hd, *rest), g[:, -1].reshape(kv * hd, *rest)
    if kv == 1:  # multi-query (Falcon-7B): [all q, k, v]
        return t[: h * hd], t[h * hd : (h + 1) * hd], t[(h + 1) * hd :]
    g = t.view(h, 3, hd, *rest)  # multi-head: per head q, k, v
    return g[:, 0].reshape(h * hd, *rest), g[:, 1].reshape(h * hd, *rest), g[:, 2].reshape(h * hd, *rest)


def fuse_falcon_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config) -> torch.Tensor:
    """Inverse of `split_falcon_qkv`."""
    h, kv, hd = config.n_head, config.n_query_groups, config.head_dim
    rest = q.shape[1:]
    if falcon_new_architecture(config):
        qg = q.view(kv, h // kv, hd, *rest)
        return torch.cat((qg, k.view(kv, 1, hd, *rest), v.view(kv, 1, hd, *rest)), dim=1).reshape(-1, *rest)
    if kv == 1:
        return torch.cat((q, k, v))
    return torch.stack([x.view(h, hd, *rest) for x in (q, k, v)], dim=1).reshape(3 * h * hd, *rest)


def hf_config_dict(config: Config) -> dict:
    """config.json contents that `transformers` reads back to the same architecture."""
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, max_position_embeddings=config.block_size,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_embeddings, torch_dtype="float32",
        # transformers 4 reads the top-level theta and `rope_scaling`, transformers 5 `rope_parameters`.
        rope_theta=config.rope_base, rope_parameters=_rope_parameters(config),
    )
    if config.rope_scaling is not None:
        common["rope_scaling"] = {k: v for k, v in common["rope_parameters"].items() if k != "rope_theta"}
    if config.family == "falcon":
        new_arch = falcon_new_architecture(config)
        return dict(
            architectures=["FalconForCausalLM"], model_type="falcon", num_kv_heads=config.n_query_groups,
            multi_query=config.n_query_groups == 1, new_decoder_architecture=new_arch,
            parallel_attn=config.parallel_residual, bias=config.attn_bias, alibi=False,
            layer_norm_epsilon=config.norm_eps, ffn_hidden_size=config.intermediate_size,
            num_ln_in_parallel_attn=2 if new_arch else None, **common,
        )
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=config.n_query_groups,
        head_dim=config.head_dim, intermediate_size=config.intermediate_size, rms_norm_eps=config.norm_eps,
        hidden_act="silu", attention_bias=config.attn_bias, mlp_bias=config.mlp_bias, **common,
    )


def _internal_to_falcon(state: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    new_arch = falcon_new_architecture(config)
    inverse = [
        (r"^model\.embed_tokens\.", "transformer.word_embeddings."),
        (r"^model\.norm\.", "transformer.ln_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.",
         r"transformer.h.\1." + ("ln_attn." if new_arch else "input_layernorm.")),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.",
         r"transformer.h.\1." + ("ln_mlp." if new_arch else "post_attention_layernorm.")),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.self_attention.dense."),
        (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.dense_h_to_4h."),
        (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.dense_4h_to_h."),
    ]
    for name, t in state.items():
        m = re.match(r"^model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", name)
        if m:
            i, kind = m.groups()
            p = f"model.layers.{i}.self_attn"
            fused = fuse_falcon_qkv(t, state[f"{p}.k_proj.{kind}"], state[f"{p}.v_proj.{kind}"], config)
            out[f"transformer.h.{i}.self_attention.query_key_value.{kind}"] = fused
            continue
        if re.match(r"^model\.layers\.\d+\.self_attn\.[kv]_proj\.", name):
            continue
        for pattern, repl in inverse:
            new, n = re.subn(pattern, repl, name)
            if n:
                out[new] = t
                break
        else:
            out[name] = t
    return out


def save_hf(state: dict[str, torch.Tensor], config: Config, out_dir: str | Path,
            max_shard_bytes: int = 5 << 30, config_overrides: dict | None = None) -> Path:
    """Write `config.json` and safetensors (sharded with an index above `max_shard_bytes`).

    config_overrides: config.json fields that replace `hf_config_dict`'s (e.g. a reward model's architectures
    and labels)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.family == "falcon":
        state = _internal_to_falcon(state, config)
    state = {k: v.detach().contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype = next(iter(state.values())).dtype
    cfg = hf_config_dict(config) | {"torch_dtype": str(dtype).removeprefix("torch.")} | (config_overrides or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
