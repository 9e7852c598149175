"""The sampling settings a recipe sends with every request, and the per-request seeds derived from the run's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llamaherd.errors import InputError


@dataclass(frozen=True)
class Sampling:
    """max_tokens per reply; temperature 0 is greedy; seed: the run's seed, from which each request's is derived
    (`request_seed`), so a seeded local teacher gives the same rows whatever the batch or a resume."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InputError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")

    def request_seed(self, item: int, step: int = 0) -> int:
        """A distinct seed per (item, step): the run's seed, the item's index and the step within the item."""
        return self.seed * 1_000_003 + item * 101 + step

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
