"""Growth variants of the comparison's grow-* methods (``grow-<base>-<variant>``).

(Placeholder written by the lead so that benchmarks/continual.py imports; the owner replaces it.)
"""

from __future__ import annotations

from typing import Any

#: variant name -> one-line description
VARIANTS: dict[str, str] = {}


def growth_plugins(
    variant: str, *, widths: list[int], max_params: int | None, n_experiences: int, epochs: int
) -> list[Any]:
    """The Avalanche plugins of ``variant``."""
    raise ValueError(f"unknown growth variant {variant!r}; choose from {', '.join(VARIANTS)}")
