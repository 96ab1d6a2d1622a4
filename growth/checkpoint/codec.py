"""Plain-data encoding of graph and constructor arguments.

Values become nested lists and one-key tagged dicts of ``str``/``int``/``float``/``bool``/``None``
that ``torch.load(weights_only=True)`` reads back. Decoding is the inverse and the only way a
file's values enter a graph: it produces nothing but plain values, slices, dtypes, devices,
memory formats and references to nodes already built, within fixed size bounds.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import GrowthError

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "MAX_STRING", "check_plain", "decode", "encode"]

#: Deepest nesting of lists, tuples and dicts a stored value may have.
MAX_DEPTH = 32
#: Most items in one stored list, tuple or dict.
MAX_ITEMS = 100_000
#: Longest stored string (characters).
MAX_STRING = 4096

_DTYPES = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
_MEMORY_FORMATS = {
    str(v).removeprefix("torch."): v
    for v in vars(torch).values()
    if isinstance(v, torch.memory_format)
}
_DEVICE = re.compile(r"(cpu|cuda|mps|meta|xpu)(:[0-9]{1,4})?")


def encode(value: Any, where: str, *, lenient: bool = False) -> Any:
    """``value`` as plain data; ``lenient`` stores the ``repr`` of anything else."""

    def enc(v: Any) -> Any:
        return encode(v, where, lenient=lenient)

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, list):
        return [enc(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [enc(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[enc(k), enc(v)] for k, v in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"set": [enc(v) for v in sorted(value, key=repr)]}
    if isinstance(value, slice):
        return {"slice": [enc(value.start), enc(value.stop), enc(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if lenient:
        return repr(value)
    raise GrowthError(
        f"cannot save the network: {where} holds a {type(value).__name__} ({value!r}), which a "
        f"checkpoint cannot store (plain numbers, strings, tuples, lists, dicts, dtypes only)"
    )


def _malformed(value: Any) -> GrowthError:
    shown = repr(value)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return GrowthError(f"malformed checkpoint: cannot decode value {shown}")


def decode(value: Any, nodes: dict[str, fx.Node] | None = None, depth: int = 0) -> Any:
    """Inverse of :func:`encode`; node references are looked up in ``nodes``."""
    if depth > MAX_DEPTH:
        raise GrowthError(f"malformed checkpoint: values nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise GrowthError(f"malformed checkpoint: a string longer than {MAX_STRING}")
        return value
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise GrowthError(f"malformed checkpoint: a list longer than {MAX_ITEMS}")
        return [decode(v, nodes, depth + 1) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise _malformed(value)
    ((tag, data),) = value.items()
    if tag == "node" and nodes is not None and isinstance(data, str):
        if data not in nodes:
            raise GrowthError(f"malformed checkpoint: reference to unknown node {data[:100]!r}")
        return nodes[data]
    if tag == "tuple" and isinstance(data, list):
        return tuple(decode(data, nodes, depth))
    if tag == "dict" and isinstance(data, list):
        pairs = decode(data, nodes, depth)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise _malformed(value)
        try:
            return {k: v for k, v in pairs}
        except TypeError as exc:  # an unhashable key
            raise _malformed(value) from exc
    if tag == "set" and isinstance(data, list):
        items = decode(data, nodes, depth)
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
            raise _malformed(value)
        return set(items)
    if tag == "slice" and isinstance(data, list) and len(data) == 3:
        return slice(*decode(data, nodes, depth))
    if tag == "ellipsis" and data is None:
        return Ellipsis
    if tag == "dtype" and data in _DTYPES:
        return _DTYPES[data]
    if tag == "device" and isinstance(data, str) and _DEVICE.fullmatch(data):
        return torch.device(data)
    if tag == "memory_format" and data in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[data]
    raise _malformed(value)


def check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` might not read back."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise GrowthError(f"cannot save: {where} has a {type(k).__name__} key {k!r}")
            check_plain(v, f"{where}[{k!r}]")
        return
    raise GrowthError(
        f"cannot save: {where} is a {type(value).__name__}, which torch.load(weights_only=True) "
        f"may not read back"
    )
