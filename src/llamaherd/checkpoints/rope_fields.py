"""Checks on the RoPE numbers a checkpoint declares, shared by the HF, GGUF and Meta readers, so a bad value is
refused in one line naming the file, the field, the value and what is allowed, instead of giving NaN logits."""

from __future__ import annotations

import math
from pathlib import Path

from llamaherd.config import RopeScaling
from llamaherd.errors import CheckpointError


def rope_number(source: str | Path, field: str, value: object, *, integer: bool = False,
                zero_ok: bool = False) -> float | int:
    """`value` as a finite number, > 0 (>= 0 with `zero_ok`), whole with `integer`; JSON/GGUF booleans and
    strings are not numbers. The frequencies divide by or take logarithms of these (`llamaherd.rope`)."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or (integer and value != int(value)) or value < 0 or (value == 0 and not zero_ok):
        allowed = f"a finite {'whole number' if integer else 'number'} {'>= 0' if zero_ok else '> 0'}"
        raise CheckpointError(f"{source}: field {field!r} = {value!r} is not allowed (RoPE needs {allowed})")
    return int(value) if integer else float(value)


def rope_flag(source: str | Path, field: str, value: object) -> bool:
    """`value` as a boolean: only true or false, since "false" or 0 would read as a different switch."""
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: field {field!r} = {value!r} is not allowed (must be true or false)")
    return value


def make_scaling(source: str | Path, field: str, kind: str, **values: object) -> RopeScaling:
    """`RopeScaling(kind, **values)`, its consistency rules (`RopeScaling.__post_init__`) failing as one line."""
    try:
        return RopeScaling(kind, **values)
    except ValueError as e:
        raise CheckpointError(f"{source}: field {field!r} = {values!r} cannot be computed: {e}") from None
