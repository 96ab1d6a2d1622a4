"""The record kept for every growth operation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class GrowthRecord:
    """One widen or deepen operation, as reported in ``GrowableNetwork.history``.

    Attributes
    ----------
    op : {"widen", "deepen"}
    layer : str
        The layer named in the call.
    old_width, new_width : int
        Output width of ``layer`` before and after (equal for ``deepen``).
    params_before, params_after : int
        Parameter count of the whole network.
    max_abs_error : float or None
        Largest output change on the probe batch; None when not verified.
    seconds : float
        Wall time of the operation, verification included.
    details : dict
        Operation specifics: coupled layers, inserted modules, init mode.
    """

    op: str
    layer: str
    old_width: int
    new_width: int
    params_before: int
    params_after: int
    max_abs_error: float | None
    seconds: float
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for JSON and checkpoints)."""
        return asdict(self)
