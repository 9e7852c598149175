"""A lean reader of the GGUF container: metadata, tensor directory, and tensor bytes dequantized with torch.

`gguf.GGUFReader` builds numpy views of every field and takes seconds on a 49k-token vocabulary; this
reads the header with `struct` in a fraction of that. The legacy block formats that llama.cpp ships most
(Q4_0, Q4_1, Q8_0) are dequantized with torch; other quantized types go through the `gguf` package.
Layout reference: the GGUF specification in ggml's docs/gguf.md (v2 and v3; all integers little-endian
unless the file is big-endian, which the version field reveals).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llamaherd.errors import CheckpointError

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9
DEFAULT_ALIGNMENT = 32


def _shortest_float32(x: float) -> float:
    """1e-05 rather than 9.999999747378752e-06: the decimal the file's writer meant."""
    return float(str(np.float32(x)))


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (torch) order: ggml's `ne` reversed
    type: int  # ggml type id (gguf.GGMLQuantizationType)
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, object]
    tensors: list[TensorInfo]


class _Cursor:
    def __init__(self, buf: mmap.mmap, order: str) -> None:
        self.buf, self.order, self.pos = buf, order, 0

    def unpack(self, fmt: str) -> tuple:
        fmt = self.order + fmt
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("string runs past the end of the file")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("IQ")
            if item in _SCALARS and item != _FLOAT32:
                return list(self.unpack(f"{count}{_SCALARS[item]}"))
            return [self.value(item) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        (v,) = self.unpack(_SCALARS[kind])
        return _shortest_float32(v) if kind == _FLOAT32 else v


def read_gguf(path: str | Path, prefix: str | None = "", with_tensors: bool = True) -> GGUFFile:
    """Metadata (keys starting with `prefix`) and, when asked, the tensor directory, checked against the file size."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ValueError(f"bad magic {bytes(buf[:4])!r}")
            order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
            cur = _Cursor(buf, order)
            cur.pos = 4
            version, n_tensors, n_kv = cur.unpack("IQQ")
            if version < 2:
                raise CheckpointError(f"{path}: GGUF version {version} is too old (2 or newer needed)")
            metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = cur.string()
                (kind,) = cur.unpack("I")
                value = cur.value(kind)
                if prefix is not None and key.startswith(prefix):
                    metadata[key] = value
            tensors: list[TensorInfo] = []
            if with_tensors:
                raw = []
                for _ in range(n_tensors):
                    name = cur.string()
                    (n_dims,) = cur.unpack("I")
                    ne = cur.unpack(f"{n_dims}Q")
                    kind, offset = cur.unpack("IQ")
                    raw.append((name, ne, kind, offset))
                alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT) or DEFAULT_ALIGNMENT)
                data_start = -(-cur.pos // alignment) * alignment
                for name, ne, kind, offset in raw:
                    try:
                        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                    except (ValueError, KeyError):
                        raise CheckpointError(f"{path}: tensor {name!r} has unknown type id {kind}") from None
                    n = int(np.prod(ne, dtype=np.int64)) if ne else 1
                    n_bytes = n // block * type_size
                    if data_start + offset + n_bytes > len(buf):
                        raise ValueError(f"tensor {name!r} runs past the end of the file")
                    tensors.append(TensorInfo(name, tuple(reversed(ne)), kind, data_start + offset, n_bytes))
    except (struct.error, IndexError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{path}: truncated or not a GGUF file ({e})") from None
    return GGUFFile(path, metadata, tensors)


def _blocks(raw: torch.Tensor, type_size: int) -> torch.Tensor:
    return raw.view(-1, type_size)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 scale at byte `start` of every block, as fp32 (n_blocks, 1)."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n_blocks, 16) packed bytes -> (n_blocks, 32) values 0..15: low nibbles are weights 0-15, high 16-31.

    Written into one buffer with `out=` (a cat of two narrow halves is many times slower)."""
    qs = qs.contiguous()
    out = torch.empty(qs.shape[0], 2, qs.shape[1], dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(qs.shape[0], -1)


def dequantize(raw: torch.Tensor, kind: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of one tensor (uint8) -> torch tensor of `shape`: F32/F16/BF16 keep their dtype, the rest fp32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qt = GGMLQuantizationType(kind)
    plain = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
             GGMLQuantizationType.BF16: torch.bfloat16}
    if qt in plain:
        return raw.view(plain[qt]).reshape(shape)
    if qt == GGMLQuantizationType.Q8_0:  # d (f16), 32 x int8
        b = _blocks(raw, 34)
        values = b[:, 2:].view(torch.int8).float().mul_(_f16(b, 0))
    elif qt == GGMLQuantizationType.Q4_0:  # d (f16), 32 x 4-bit; value = d * (q - 8)
        b = _blocks(raw, 18)
        values = _nibbles(b[:, 2:]).float().sub_(8).mul_(_f16(b, 0))
    elif qt == GGMLQuantizationType.Q4_1:  # d, m (f16), 32 x 4-bit; value = d * q + m
        b = _blocks(raw, 20)
        values = _nibbles(b[:, 4:]).float().mul_(_f16(b, 0)).add_(_f16(b, 2))
    elif qt.name in ("F64", "I8", "I16", "I32", "I64"):  # not weights
        raise NotImplementedError
    else:
        _, type_size = GGML_QUANT_SIZES[qt]
        values = torch.from_numpy(quants.dequantize(raw.numpy().reshape(-1, type_size), qt).astype(np.float32))
    return values.reshape(shape)


def read_tensor(gf: GGUFFile, info: TensorInfo, buf: mmap.mmap) -> torch.Tensor:
    """One tensor, dequantized into its own memory (nothing keeps the mapping alive).

    `buf` is a copy-on-write mapping of the file (torch.frombuffer wants a writable buffer; nothing writes)."""
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.n_bytes, offset=info.offset)
    try:
        t = dequantize(raw, info.type, info.shape)
    except NotImplementedError:
        from gguf import GGMLQuantizationType

        raise CheckpointError(
            f"{gf.path}: tensor {info.name!r} has type {GGMLQuantizationType(info.type).name}, which cannot be "
            "dequantized (supported: F32, F16, BF16 and the quantized types of the gguf package, e.g. Q4_0, "
            "Q4_1, Q8_0, Q4_K, Q6_K)"
        ) from None
    return t.clone() if t.data_ptr() == raw.data_ptr() else t
