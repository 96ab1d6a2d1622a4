"""State of any object (plugin, growth policy, metric): its ``state_dict()`` when it has
``state_dict()``/``load_state_dict()``, else its attributes, as plain data."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ...growth import GrowthError
from .codec import decode_state, encode_state
from .errors import ResumeMismatchError
from .steps import RestoreStep

__all__ = [
    "has_state_dict",
    "object_state",
    "prepare_object_state",
    "qualified_name",
    "set_attributes",
]


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class: how a resume file names plugins and metrics."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def has_state_dict(obj: Any) -> bool:
    """True when ``obj`` has callable ``state_dict`` and ``load_state_dict`` methods."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def set_attributes(obj: Any, values: dict[str, Any]) -> None:
    """Set ``obj``'s attributes to ``values``; a dict replacing a ``defaultdict`` becomes one
    with the same default factory."""
    for k, v in values.items():
        current = getattr(obj, k, None)
        if isinstance(current, defaultdict) and isinstance(v, dict):
            v = defaultdict(current.default_factory, v)
        setattr(obj, k, v)


def object_state(obj: Any, where: str) -> dict[str, Any]:
    """``obj.state_dict()`` when it has ``state_dict``/``load_state_dict``, else its attributes
    (all of which must be plain data), encoded."""
    if has_state_dict(obj):
        return {"kind": "state_dict", "state": encode_state(obj.state_dict(), where)}
    try:
        return {"kind": "attributes", "state": encode_state(dict(vars(obj)), where)}
    except GrowthError as exc:
        raise GrowthError(
            f"{exc}. Give {type(obj).__qualname__} state_dict() and load_state_dict() methods "
            f"that return and take plain data"
        ) from exc


def prepare_object_state(obj: Any, saved: Any, where: str) -> RestoreStep:
    """Decode ``saved`` (from :func:`object_state`) for ``obj``; nothing changes until the
    returned step is applied."""
    if not isinstance(saved, dict) or saved.get("kind") not in ("state_dict", "attributes"):
        raise GrowthError(f"malformed resume file: bad state of {where}")
    state = decode_state(saved["state"])
    if saved["kind"] == "state_dict":
        if not has_state_dict(obj):
            raise ResumeMismatchError(
                f"{where} was saved with state_dict(), but {type(obj).__qualname__} has no "
                f"load_state_dict()"
            )
        previous = obj.state_dict()
        return RestoreStep(
            lambda: obj.load_state_dict(state), lambda: obj.load_state_dict(previous)
        )
    if not isinstance(state, dict):
        raise GrowthError(f"malformed resume file: bad attributes of {where}")
    return RestoreStep(lambda: set_attributes(obj, state))
