"""Expansion methods of the comparison (protected growth).

(Placeholder written by the lead so that benchmarks/continual.py imports; the owner replaces it.)
"""

from __future__ import annotations

from typing import Any

#: method name -> one-line description
EXPANSION_METHODS: dict[str, str] = {}


def make_expansion_strategy(
    method: str, *, model_fn: Any, setting: Any, meta: Any, common: dict[str, Any]
) -> tuple[Any, Any]:
    """``(strategy, model)`` for the expansion ``method``."""
    raise ValueError(f"unknown expansion method {method!r}")
