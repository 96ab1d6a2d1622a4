"""Plain data for resume files: :func:`encode_state` turns Python, numpy and torch values into
what ``torch.load(weights_only=True)`` reads back, :func:`decode_state` is its inverse, and
encoded values can be compared (:func:`encoded_equal`) and told apart (:func:`config_diff`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ...growth import GrowthError
from ..policies import Deepen, Widen

__all__ = ["config_diff", "decode_state", "encode_state", "encoded_equal"]

_ACTIONS = {cls.__name__: cls for cls in (Widen, Deepen)}


def encode_state(value: Any, where: str = "state") -> Any:
    """``value`` as data a resume file stores.

    None, bool, int, float, str, tensors, lists and str-keyed dicts stay as they are; tuples,
    sets, other dict keys, ``torch.Size``, numpy values and growth actions become one-key tagged
    dicts. Anything else raises a ``GrowthError`` naming ``where``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, np.generic):
        return encode_state(value.item(), where)
    if isinstance(value, np.ndarray):
        return {"__np__": torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, torch.Size):
        return {"__size__": [int(v) for v in value]}
    if isinstance(value, tuple(_ACTIONS.values())):
        return {"__action__": {"op": type(value).__name__, **asdict(value)}}
    if isinstance(value, list):
        return [encode_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        tag = "__set__" if isinstance(value, set) else "__frozenset__"
        return {tag: [encode_state(v, f"{where} item") for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "__dict__": [
                [encode_state(k, f"{where} key"), encode_state(v, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise GrowthError(
        f"cannot save {where}: it is a {type(value).__module__}.{type(value).__qualname__}; a "
        f"resume file stores plain data only (numbers, strings, tensors, lists, tuples, sets, "
        f"dicts)"
    )


def _decode_action(data: dict[str, Any]) -> Widen | Deepen:
    fields = dict(data)
    op = fields.pop("op")
    cls = _ACTIONS.get(op)
    if cls is None:
        raise GrowthError(f"malformed resume file: unknown growth action {op!r}")
    return cls(**fields)


#: How each tag of :func:`encode_state` decodes its data.
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "__tuple__": lambda data: tuple(decode_state(v) for v in data),
    "__set__": lambda data: {decode_state(v) for v in data},
    "__frozenset__": lambda data: frozenset(decode_state(v) for v in data),
    "__dict__": lambda data: {decode_state(k): decode_state(v) for k, v in data},
    "__action__": _decode_action,
    "__size__": torch.Size,
    "__np__": lambda data: data.numpy().copy(),
}


def _is_tagged(value: dict[Any, Any]) -> bool:
    """True for a one-key dict that :func:`encode_state` made of a non-plain value."""
    return len(value) == 1 and next(iter(value)) in _DECODERS


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode_state(v) for v in value)
    if not isinstance(value, dict):
        return value
    if _is_tagged(value):
        ((tag, data),) = value.items()
        return _DECODERS[tag](data)
    return {k: decode_state(v) for k, v in value.items()}


def encoded_equal(a: Any, b: Any) -> bool:
    """Equality of encoded values (tensors compared exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(encoded_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(encoded_equal, a, b))
    return type(a) is type(b) and a == b


def config_diff(saved: Any, now: Any, prefix: str = "") -> str:
    """The differing entries of two encoded configs, one line each (nested keys dotted)."""
    if (
        isinstance(saved, dict)
        and isinstance(now, dict)
        and not (_is_tagged(saved) or _is_tagged(now))
    ):
        lines = []
        for k in sorted(set(saved) | set(now), key=str):
            key = f"{prefix}{k}"
            if k not in now:
                lines.append(f"  {key}: saved {decode_state(saved[k])!r}, now absent")
            elif k not in saved:
                lines.append(f"  {key}: not saved, now {decode_state(now[k])!r}")
            elif not encoded_equal(saved[k], now[k]):
                lines.append(config_diff(saved[k], now[k], f"{key}."))
        return "\n".join(lines)
    where = prefix[:-1] or "config"
    return f"  {where}: saved {decode_state(saved)!r}, now {decode_state(now)!r}"
