"""The error for a resume file that is intact but belongs to another run."""

from __future__ import annotations

from ...growth import GrowthError

__all__ = ["ResumeMismatchError"]


class ResumeMismatchError(GrowthError):
    """The resume file is intact but belongs to another run: other ``config`` (arguments),
    another strategy class, other plugins."""
