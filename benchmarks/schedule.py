"""The growth schedule of the comparison's grow-* methods: a geometric series of hidden widths
from ``--small`` to exactly ``--large``, one step before each experience but the first."""

from __future__ import annotations

from typing import Any

from ..growth import GrowableNetwork


def width_schedule(small: int, large: int, growths: int) -> list[int]:
    """Hidden widths of the grow-* variants: ``widths[k]`` before experience ``k``.

    A geometric schedule from ``small`` to ``large`` in ``growths`` steps, rounded, never
    shrinking, whose last width is exactly ``large`` (16 -> 64 in 4 steps: 16, 23, 32, 45, 64).
    No growth (``growths == 0``, a one-experience stream): ``[small]``.
    """
    if small < 1 or large < small:
        raise ValueError(f"need 1 <= small <= large, got small={small}, large={large}")
    if growths < 1:
        return [small]
    widths = [small]
    for k in range(1, growths + 1):
        w = large if k == growths else round(small * (large / small) ** (k / growths))
        widths.append(max(widths[-1], min(int(w), large)))
    return widths


class WidthSchedule:
    """Growth policy of the grow-* variants: before experience ``k`` (k >= 1), widen every
    hidden layer narrower than ``widths[k]`` to exactly ``widths[k]`` (the last width for
    later experiences). Stateless: decisions read the strategy's clock and the network."""

    def __init__(self, widths: list[int]) -> None:
        self.widths = [int(w) for w in widths]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[Any]:
        from ..strategies.policies import Widen

        k = int(strategy.clock.train_exp_counter)
        if k == 0:
            return []
        target = self.widths[min(k, len(self.widths) - 1)]
        return [Widen(n, width=target) for n in net.layers if net.width(n) < target]

    def after_iteration(self, strategy: Any, net: GrowableNetwork) -> list[Any]:
        return []
