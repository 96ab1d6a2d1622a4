"""Limits on what one growth operation may allocate, checked before anything is allocated.

``widen`` and ``deepen`` compute, from the planned shapes alone (no tensor is built for the
check), how many bytes the operation would allocate: the new value of every tensor that grows
(new numel x element size), the optimizer state that follows it, and the index maps of the unit
mapping (``widen``), or the parameters and buffers of the inserted layers (``deepen``). An
operation needing more than the limit is refused with a :class:`~growth.errors.GrowthError`
before anything is allocated or changed.

The limit is :data:`MAX_GROWTH_BYTES` (8 GiB) unless the call passes ``max_growth_bytes=``;
raise it for one call (``net.widen("fc", 100_000, max_growth_bytes=64 * 2**30)``) or for the
whole process (``net2grow.growth.limits.MAX_GROWTH_BYTES = 64 * 2**30``). ``math.inf`` disables
the check.
The count is a floor of the operation's peak memory, not a bound: temporaries of the copy and
the wider activations of the verification forward pass come on top of it.
"""

from __future__ import annotations

import math
import numbers

from .errors import GrowthError

#: Default largest number of bytes one ``widen``/``deepen`` may allocate (8 GiB). Set it to a
#: larger int (or ``math.inf``) to allow bigger operations in this process, or pass
#: ``max_growth_bytes=`` to a single call.
MAX_GROWTH_BYTES: int = 8 * 2**30

#: Bytes per new unit of a unit mapping: source (int64), original (bool) and share (float64).
MAPPING_BYTES_PER_UNIT = 8 + 1 + 8

_HOW_TO_RAISE = (
    "pass max_growth_bytes=<bytes> to this call, or set net2grow.growth.limits.MAX_GROWTH_BYTES "
    "(math.inf disables the check)"
)


def format_bytes(n: float) -> str:
    """``n`` bytes in a readable unit (``"8 GiB"``, ``"1.5 MiB"``, ``"512 bytes"``)."""
    if math.isinf(n):
        return "unlimited"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def _exact(n: float) -> str:
    """``n`` bytes readable and exact: ``"1.5 GiB (1,610,612,736 bytes)"``, ``"300 bytes"``."""
    if math.isinf(n) or n < 2**10:
        return format_bytes(n)
    return f"{format_bytes(n)} ({int(n):,} bytes)"


def _valid_limit(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return not math.isnan(value) and value >= 0


def resolve_limit(max_growth_bytes: object) -> float:
    """The limit that applies to one call: ``max_growth_bytes``, or the module default."""
    if max_growth_bytes is None:
        value = MAX_GROWTH_BYTES
        if not _valid_limit(value):
            raise GrowthError(
                f"net2grow.growth.limits.MAX_GROWTH_BYTES must be a number of bytes >= 0 (or "
                f"math.inf), "
                f"got {value!r}; set it back to e.g. 8 * 2**30"
            )
        return float(value) if math.isinf(value) else int(value)
    if not _valid_limit(max_growth_bytes):
        raise GrowthError(
            f"max_growth_bytes must be a number of bytes >= 0 (or math.inf for no limit), got "
            f"{max_growth_bytes!r}; e.g. max_growth_bytes=16 * 2**30 allows 16 GiB"
        )
    return max_growth_bytes  # type: ignore[return-value]


def check_growth_bytes(needed: int, limit: float, what: str, *, at_least: bool = False) -> None:
    """Refuse an operation that would allocate ``needed`` bytes when the limit is ``limit``."""
    if needed <= limit:
        return
    amount = f"at least {_exact(needed)}" if at_least else _exact(needed)
    raise GrowthError(
        f"{what} would allocate {amount}, more than the limit of {_exact(limit)}; nothing was "
        f"allocated or changed. Ask for "
        f"a smaller growth, or if this machine has the memory, {_HOW_TO_RAISE}"
    )
