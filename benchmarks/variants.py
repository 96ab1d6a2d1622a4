"""Growth variants of the comparison's grow-* methods (``grow-<base>-<variant>``).

Every variant grows along the same width schedule (``widths[k]`` before experience ``k`` for
the periodic ones) to the same final width, under the same parameter budget and epochs; only
the initialisation of new units, their learning rate, their optimizer state or the timing of
growth differ. :func:`growth_plugins` builds a variant's Avalanche plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: variant name -> one-line description (``--help`` and the README's ablation table)
VARIANTS: dict[str, str] = {
    "zero": "new units: random incoming, zero outgoing weights (init='zero')",
    "vtinit": "new units in (V,V)/(Z,-Z) pairs, Variance Transfer's exact init (init='vt')",
    "vt": "init='vt' + Variance Transfer's per-cohort learning rate (||W_t||/||W_0||)",
    "gradmax": "zero incoming weights, outgoing along the top gradient directions (GradMax)",
    "lr2": "units added by growth train at twice the learning rate (per-cohort rate)",
    "gradmax_lr2": "gradmax + units added by growth at twice the learning rate",
    "statecopy": "copied units get their source's Adam state unscaled",
    "statezero": "new units start from zero Adam state (old units keep theirs)",
    "statereset": "grown parameters restart with empty Adam state",
    "early": "same widths, reached within the first 2 experiences",
    "plateau": "one width step when the loss plateaus, at latest one step behind schedule",
    "rank": "one width step when a layer's effective rank >= 0.5 x width, same deadline",
    "early_vt": "early, with new units in (V,V)/(Z,-Z) pairs (init='vt')",
    "plateau_vt": "plateau, with new units in (V,V)/(Z,-Z) pairs (init='vt')",
    "rank_vt": "rank, with new units in (V,V)/(Z,-Z) pairs (init='vt')",
}


def _schedule(widths: list[int]) -> Any:
    from .schedule import WidthSchedule

    return WidthSchedule(widths)


def growth_plugins(
    variant: str, *, widths: list[int], max_params: int | None, n_experiences: int, epochs: int
) -> list[Any]:
    """The Avalanche plugins of ``variant``: the ``GrowthPlugin`` first, then any other.

    ``widths``: the periodic schedule (``widths[k]`` before experience ``k``, the last the
    final width); ``max_params``: the final-size budget; ``epochs``: training epochs per
    experience (unused by the current variants' rules, which count optimizer steps).
    """
    from ..strategies import GrowthPlugin
    from ..strategies.cohort_lr import CohortLRPlugin
    from ..strategies.policies import Early, PlateauWidths, RankWidths

    if variant not in VARIANTS:
        raise ValueError(f"unknown growth variant {variant!r}; choose from {', '.join(VARIANTS)}")

    def grow(policy: Any = None, **options: Any) -> Any:
        policy = _schedule(widths) if policy is None else policy
        return GrowthPlugin(policy, max_params=max_params, **options)

    def lr2() -> Any:
        return CohortLRPlugin(2.0)

    builders: dict[str, Callable[[], list[Any]]] = {
        "zero": lambda: [grow(init="zero")],
        "vtinit": lambda: [grow(init="vt")],
        "vt": lambda: [grow(init="vt"), CohortLRPlugin(rule="vt")],
        "gradmax": lambda: [grow(init="gradmax")],
        "lr2": lambda: [grow(), lr2()],
        "gradmax_lr2": lambda: [grow(init="gradmax"), lr2()],
        "statecopy": lambda: [grow(optimizer_state="copy")],
        "statezero": lambda: [grow(optimizer_state="zero")],
        "statereset": lambda: [grow(optimizer_state="reset")],
        "early": lambda: [grow(Early(widths, n_experiences, k=2))],
        "plateau": lambda: [grow(PlateauWidths(widths, n_experiences))],
        "rank": lambda: [grow(RankWidths(widths, n_experiences))],
        "early_vt": lambda: [grow(Early(widths, n_experiences, k=2), init="vt")],
        "plateau_vt": lambda: [grow(PlateauWidths(widths, n_experiences), init="vt")],
        "rank_vt": lambda: [grow(RankWidths(widths, n_experiences), init="vt")],
    }
    return builders[variant]()
