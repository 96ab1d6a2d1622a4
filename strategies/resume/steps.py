"""Restoring in two phases: everything is read and checked into :class:`RestoreStep` objects
first, and only then applied, so a bad file leaves the strategy as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["RestoreStep", "apply_fallible", "apply_infallible"]


@dataclass(frozen=True)
class RestoreStep:
    """A prepared, checked change to one object.

    Attributes
    ----------
    apply : callable
        Makes the change.
    undo : callable or None
        Puts the old state back; given only for steps that may fail when applied (user
        ``load_state_dict`` methods), which makes the step :attr:`fallible`.
    """

    apply: Callable[[], None]
    undo: Callable[[], None] | None = None

    @property
    def fallible(self) -> bool:
        """Whether applying may fail (the step then has an ``undo``)."""
        return self.undo is not None


def apply_fallible(steps: Iterable[RestoreStep]) -> None:
    """Apply the fallible ``steps`` in order; when one fails, undo the ones applied (last
    first) and re-raise."""
    done: list[RestoreStep] = []
    try:
        for step in steps:
            if step.fallible:
                step.apply()
                done.append(step)
    except BaseException:
        for step in reversed(done):
            step.undo()
        raise


def apply_infallible(steps: Iterable[RestoreStep]) -> None:
    """Apply the steps of ``steps`` that cannot fail, in order."""
    for step in steps:
        if not step.fallible:
            step.apply()
