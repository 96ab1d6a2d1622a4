"""Checkpoints: save a ``GrowableNetwork`` and rebuild it where its model class is unknown.

A checkpoint stores no pickled Python objects, only plain data and tensors that
``torch.load(weights_only=True)`` accepts:

- the layer graph as a list of nodes (op, name, target, encoded args/kwargs); functions are stored
  by qualified name and, on load, resolved only through an allowlist: functions that have a growth
  rule (:func:`growth.rules.known_function`) plus ``getattr``/``operator.getitem``;
- the module tree: every module as its path plus either a *layer spec* (a ``torch.nn`` type from
  :data:`LAYER_TYPES` and the constructor arguments read from the module) or a *container* (the
  user's own classes become plain ``nn.Module`` containers: the graph, not their ``forward``,
  says what the network computes);
- every parameter and buffer (with ``requires_grad``, persistence and weight tying), the probe
  batch, the tolerance, the growth history, the model class name and, optionally, an optimizer's
  ``state_dict`` with the names of the parameters it holds.

File layout: a 56-byte header (magic, format version, payload length, SHA-256 of the payload)
followed by the ``torch.save`` payload. Writes go to a temporary file in the target's directory,
which is flushed, ``fsync``-ed and renamed over the target, so an interrupted save leaves the
previous file intact.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import math
import operator
import os
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .errors import GrowthError
from .network import _PROBE_PREFIX, GrowableNetwork
from .record import GrowthRecord
from .rules import known_function

__all__ = [
    "FORMAT_VERSION",
    "LAYER_TYPES",
    "Checkpoint",
    "load",
    "load_checkpoint",
    "save",
]

FORMAT_VERSION = 1
_MAGIC = b"\x89NET2GROW\r\n\x1a\n"
_HEADER = struct.Struct(f"<{len(_MAGIC)}sIQ32s")  # magic, version, payload length, sha256
_KIND = "net2grow-checkpoint"

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# allowlists
# --------------------------------------------------------------------------------------------

#: Constructor arguments of each ``torch.nn`` layer type a checkpoint can rebuild. They are read
#: from the module's attributes of the same name; ``bias`` is ``module.bias is not None``.
LAYER_TYPES: dict[type[nn.Module], tuple[str, ...]] = {}

#: Constructor arguments stored only when they differ from this default (keywords that older
#: torch versions lack).
_OMIT_IF_DEFAULT: dict[type[nn.Module], dict[str, Any]] = {}


def _allow(types: Iterable[type[nn.Module]], args: tuple[str, ...]) -> None:
    for t in types:
        LAYER_TYPES[t] = args


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
_NORM_ARGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_allow([nn.Linear], ("in_features", "out_features", "bias"))
_allow([nn.Conv1d, nn.Conv2d, nn.Conv3d], (*_CONV_ARGS, "groups", "bias", "padding_mode"))
_EMBEDDING_ARGS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
_allow([nn.Embedding], (*_EMBEDDING_ARGS, "scale_grad_by_freq", "sparse"))
_NORMS = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm]
_NORMS += [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d]
_allow(_NORMS, (*_NORM_ARGS, "bias"))
_allow([nn.PReLU], ("num_parameters",))
_allow([nn.LayerNorm], ("normalized_shape", "eps", "elementwise_affine", "bias"))
_allow([nn.GroupNorm], ("num_groups", "num_channels", "eps", "affine", "bias"))
_OMIT_IF_DEFAULT.update({t: {"bias": True} for t in [*_NORMS, nn.GroupNorm]})
_allow([nn.ReLU, nn.ReLU6, nn.SiLU, nn.SELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish], ("inplace",))
_allow([nn.LeakyReLU], ("negative_slope", "inplace"))
_allow([nn.GELU], ("approximate",))
_allow([nn.ELU, nn.CELU], ("alpha", "inplace"))
_allow([nn.Hardtanh], ("min_val", "max_val", "inplace"))
_allow([nn.Softplus], ("beta", "threshold"))
_allow([nn.Threshold], ("threshold", "value", "inplace"))
_allow([nn.Tanh, nn.Sigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity], ())
_allow([nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout], ("p", "inplace"))
_allow(
    [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d],
    ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
)
_allow([nn.AvgPool1d], ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))
_allow(
    [nn.AvgPool2d, nn.AvgPool3d],
    ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
)
_allow([nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d], ("output_size",))
_allow(
    [nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d],
    ("output_size", "return_indices"),
)
_allow([nn.LPPool1d, nn.LPPool2d], ("norm_type", "kernel_size", "stride", "ceil_mode"))
_allow([nn.Upsample], ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"))
_allow([nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d], ("size", "scale_factor"))
_PADS = [nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d]
_PADS += [nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d]
_PADS += [nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d]
_allow(_PADS, ("padding",))
_allow([nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d], ("padding", "value"))
_allow([nn.Flatten], ("start_dim", "end_dim"))
_allow([nn.Softmax, nn.LogSoftmax], ("dim",))

_LAYERS_BY_NAME = {t.__name__: t for t in LAYER_TYPES}
_CONTAINERS: dict[str, type[nn.Module]] = {
    t.__name__: t for t in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
}

#: Modules searched (in this order) for a ``call_function`` target's qualified name.
_FUNCTION_MODULES: dict[str, ModuleType] = {
    "operator": operator,
    "builtins": builtins,
    "torch.nn.functional": F,
    "torch": torch,
}
#: Functions without a growth rule that graphs use to take tensors apart.
_EXTRA_FUNCTIONS: tuple[Callable[..., Any], ...] = (getattr, operator.getitem)


def _function_allowed(fn: Any) -> bool:
    try:
        return known_function(fn) or any(fn is f for f in _EXTRA_FUNCTIONS)
    except TypeError:  # unhashable target
        return False


def _method_allowed(name: Any) -> bool:
    return (
        isinstance(name, str)
        and not name.startswith("_")
        and callable(getattr(torch.Tensor, name, None))
    )


def _function_name(fn: Any) -> str:
    """``"module.attr"`` of ``fn`` in one of the allowlisted modules, or a ``GrowthError``."""
    label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    where = getattr(fn, "__module__", None)
    full = f"{where}.{label}" if where else label
    if not _function_allowed(fn):
        raise GrowthError(
            f"cannot save the network: its graph calls {full}, a function with no growth rule. "
            f"A checkpoint rebuilds only functions that growth.rules knows; register a rule for "
            f"it (growth.rules.register_function_rule) or keep it inside a module"
        )
    attr = getattr(fn, "__name__", None)
    for mod_name, mod in _FUNCTION_MODULES.items():
        if isinstance(attr, str) and not attr.startswith("_") and vars(mod).get(attr) is fn:
            return f"{mod_name}.{attr}"
    for mod_name, mod in _FUNCTION_MODULES.items():
        for key, value in vars(mod).items():
            if value is fn and not key.startswith("_"):
                return f"{mod_name}.{key}"
    raise GrowthError(
        f"cannot save the network: its graph calls {full}, which is not reachable from "
        f"{', '.join(_FUNCTION_MODULES)}; a checkpoint can only name functions found there"
    )


def _resolve_function(name: Any) -> Callable[..., Any]:
    if isinstance(name, str):
        mod_name, _, attr = name.rpartition(".")
        mod = _FUNCTION_MODULES.get(mod_name)
        # vars(), not getattr(): no lazily imported submodules, no module __getattr__
        fn = vars(mod).get(attr) if mod is not None and not attr.startswith("_") else None
        if fn is not None and _function_allowed(fn):
            return fn
    raise GrowthError(
        f"the checkpoint calls function {name!r}, which is not allowed: a net2grow checkpoint may "
        f"only call functions that have a growth rule (plus getattr and operator.getitem)"
    )


# --------------------------------------------------------------------------------------------
# plain-data encoding of graph arguments and constructor arguments
# --------------------------------------------------------------------------------------------


def _encode(value: Any, where: str, *, lenient: bool = False) -> Any:
    """``value`` as nested lists/dicts of str/int/float/bool/None (tagged dicts for the rest)."""

    def enc(v: Any) -> Any:
        return _encode(v, where, lenient=lenient)

    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, list):
        return [enc(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [enc(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[enc(k), enc(v)] for k, v in value.items()]}
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


def _decode(value: Any, nodes: dict[str, fx.Node] | None = None) -> Any:
    """Inverse of :func:`_encode`; graph node references are looked up in ``nodes``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        ((tag, data),) = value.items()
        if tag == "node" and nodes is not None and isinstance(data, str):
            if data not in nodes:
                raise GrowthError(f"malformed checkpoint: reference to unknown node {data!r}")
            return nodes[data]
        if tag == "tuple" and isinstance(data, list):
            return tuple(_decode(v, nodes) for v in data)
        if tag == "dict" and isinstance(data, list):
            return {_decode(k, nodes): _decode(v, nodes) for k, v in data}
        if tag == "slice" and isinstance(data, list) and len(data) == 3:
            return slice(*(_decode(v, nodes) for v in data))
        if tag == "ellipsis":
            return Ellipsis
        if tag == "dtype" and isinstance(getattr(torch, str(data), None), torch.dtype):
            return getattr(torch, data)
        if tag == "device" and isinstance(data, str):
            return torch.device(data)
        if tag == "memory_format" and isinstance(
            getattr(torch, str(data), None), torch.memory_format
        ):
            return getattr(torch, data)
    raise GrowthError(f"malformed checkpoint: cannot decode value {value!r}")


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` might not read back."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise GrowthError(f"cannot save: {where} has a {type(k).__name__} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise GrowthError(
        f"cannot save: {where} is a {type(value).__name__}, which torch.load(weights_only=True) "
        f"may not read back"
    )


# --------------------------------------------------------------------------------------------
# layer specs
# --------------------------------------------------------------------------------------------


def _layer_args(module: nn.Module) -> dict[str, Any]:
    args = {}
    for name in LAYER_TYPES[type(module)]:
        if name == "bias":
            weight = getattr(module, "weight", None)
            value = getattr(module, "bias", None) is not None if weight is not None else True
        else:
            value = getattr(module, name)
        args[name] = value
    return args


def _build_layer(type_name: Any, args: Any, path: str) -> nn.Module:
    cls = _LAYERS_BY_NAME.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise GrowthError(
            f"the checkpoint's module {path!r} has type {type_name!r}, which a net2grow "
            f"checkpoint cannot rebuild (allowed: torch.nn layer types with a growth rule)"
        )
    if not isinstance(args, dict) or any(k not in LAYER_TYPES[cls] for k in args):
        raise GrowthError(f"malformed checkpoint: bad constructor arguments for {path!r}")
    kwargs = {k: _decode(v) for k, v in args.items()}
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:
        raise GrowthError(
            f"cannot rebuild module {path!r}: {cls.__name__}(**{kwargs}) failed: {exc}"
        ) from exc


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = [*module._parameters.items(), *module._buffers.items()]
    return {n: tuple(t.shape) for n, t in tensors if t is not None}


def _layer_spec(module: nn.Module, path: str) -> dict[str, Any]:
    """Type and constructor arguments of ``module``, checked by rebuilding it (on ``meta``)."""
    omit = _OMIT_IF_DEFAULT.get(type(module), {})
    encoded = {
        k: _encode(v, f"argument {k!r} of module {path!r}")
        for k, v in _layer_args(module).items()
        if not (k in omit and _same(v, omit[k]))
    }
    rebuilt = _build_layer(type(module).__name__, encoded, path)
    problem = None
    for key, value in vars(rebuilt).items():
        if key.startswith("_") or key == "training" or isinstance(value, Tensor):
            continue
        if not _same(getattr(module, key, None), value):
            problem = f"its attribute {key!r} = {getattr(module, key, None)!r} (rebuilt: {value!r})"
    if problem is None and _tensor_shapes(rebuilt) != _tensor_shapes(module):
        problem = f"its tensors {_tensor_shapes(module)} (rebuilt: {_tensor_shapes(rebuilt)})"
    if problem is not None:
        raise GrowthError(
            f"cannot save module {path!r} ({type(module).__name__}): {problem} cannot be "
            f"reproduced from its constructor arguments"
        )
    return {"type": type(module).__name__, "args": encoded}


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe_modules(
    net: GrowableNetwork,
) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """One entry per module (pre-order, registration order) and every tensor by full name."""
    called = {str(n.target) for n in net.graph.nodes if n.op == "call_module"}
    entries: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    seen_modules: dict[int, str] = {id(net): ""}
    seen_tensors: dict[int, str] = {}

    def tensor_entries(module: nn.Module, path: str) -> list[dict[str, Any]]:
        out = []
        for name, p in module._parameters.items():
            if p is None:
                continue
            full = _join(path, name)
            tie = seen_tensors.setdefault(id(p), full)
            if tie == full:
                tensors[full] = p.detach()
            out.append(
                {
                    "name": name,
                    "parameter": True,
                    "requires_grad": bool(p.requires_grad),
                    "persistent": True,
                    "tie": None if tie == full else tie,
                }
            )
        for name, b in module._buffers.items():
            if b is None or (module is net and name.startswith(_PROBE_PREFIX)):
                continue
            full = _join(path, name)
            tie = seen_tensors.setdefault(id(b), full)
            if tie == full:
                tensors[full] = b.detach()
            out.append(
                {
                    "name": name,
                    "parameter": False,
                    "requires_grad": False,
                    "persistent": name not in module._non_persistent_buffers_set,
                    "tie": None if tie == full else tie,
                }
            )
        return out

    entries.append(
        {"path": "", "kind": "root", "training": net.training, "tensors": tensor_entries(net, "")}
    )

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            full = _join(path, name)
            if id(child) in seen_modules:
                entries.append({"path": full, "kind": "alias", "of": seen_modules[id(child)]})
                continue
            seen_modules[id(child)] = full
            entry: dict[str, Any] = {"path": full, "training": child.training}
            if type(child) in LAYER_TYPES:
                entry.update(kind="layer", **_layer_spec(child, full))
            elif full in called:
                raise GrowthError(
                    f"cannot save the network: layer {full!r} has type "
                    f"{type(child).__module__}.{type(child).__name__}, which a checkpoint cannot "
                    f"rebuild without importing it. Checkpoints support the torch.nn layer types "
                    f"that have growth rules (growth.checkpoint.LAYER_TYPES)"
                )
            else:
                kind = type(child).__name__ if type(child) in _CONTAINERS.values() else "Module"
                entry.update(kind="container", type=kind)
            entry["tensors"] = tensor_entries(child, full)
            entries.append(entry)
            visit(child, full)

    visit(net, "")
    return entries, tensors


def _describe_graph(net: GrowableNetwork) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """The graph's nodes as plain data, and plain tensor attributes read by ``get_attr``."""
    nodes = []
    attributes: dict[str, Tensor] = {}
    for node in net.graph.nodes:
        where = f"node {node.name!r} ({node.op} {node.target})"
        target: Any = node.target
        if node.op == "call_function":
            target = _function_name(node.target)
        elif node.op == "call_method":
            if not _method_allowed(node.target):
                raise GrowthError(
                    f"cannot save the network: {where} calls method {node.target!r}, which is "
                    f"not a public torch.Tensor method"
                )
        elif node.op == "get_attr":
            owner_path, _, attr = str(node.target).rpartition(".")
            try:
                owner = net.get_submodule(owner_path)
                value = getattr(owner, attr)
            except AttributeError as exc:
                raise GrowthError(f"cannot save the network: {where}: {exc}") from exc
            if isinstance(value, Tensor) and not (
                attr in owner._parameters or attr in owner._buffers
            ):
                attributes[str(node.target)] = value.detach()
            elif not isinstance(value, (Tensor, nn.Module)):
                raise GrowthError(
                    f"cannot save the network: {where} reads a {type(value).__name__}; a "
                    f"checkpoint stores tensor and module attributes only"
                )
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "target": str(target),
                "args": _encode(list(node.args), where),
                "kwargs": _encode(dict(node.kwargs), where),
            }
        )
    return nodes, attributes


def _probe_of(net: GrowableNetwork) -> list[Tensor]:
    probe = []
    while hasattr(net, f"{_PROBE_PREFIX}{len(probe)}"):
        probe.append(getattr(net, f"{_PROBE_PREFIX}{len(probe)}").detach())
    return probe or list(net.probe)


def _optimizer_payload(net: GrowableNetwork, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GrowthError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    names = {id(p): n for n, p in net.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise GrowthError(
                f"cannot save the optimizer: its param group {i} holds parameters of shapes "
                f"{missing} that are not part of the network"
            )
        groups.append([names[id(p)] for p in group["params"]])
    state = optimizer.state_dict()
    _check_plain(state, "optimizer.state_dict()")
    return {"class": type(optimizer).__name__, "state_dict": state, "param_names": groups}


def _payload(net: GrowableNetwork, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if not isinstance(net, GrowableNetwork):
        raise GrowthError(f"save() takes a GrowableNetwork, got {type(net).__name__}")
    modules, tensors = _describe_modules(net)
    graph, attributes = _describe_graph(net)
    history = [
        {k: _encode(v, "history", lenient=True) for k, v in rec.to_dict().items()}
        for rec in net.history
    ]
    return {
        "kind": _KIND,
        "version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "model_class": str(net.model_class),
        "tolerance": float(net.tolerance),
        "graph": graph,
        "modules": modules,
        "tensors": tensors,
        "attributes": attributes,
        "probe": _probe_of(net),
        "history": history,
        "optimizer": None if optimizer is None else _optimizer_payload(net, optimizer),
    }


class _HashingWriter:
    """File-like ``write``/``flush`` that hashes and counts what it forwards."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self.f.write(view)
        return len(view)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_payload(payload: dict[str, Any], path: PathLike) -> None:
    """Write header + ``torch.save(payload)`` atomically (temporary file, fsync, rename)."""
    target = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(target)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * _HEADER.size)
            writer = _HashingWriter(f)
            torch.save(payload, writer)
            f.seek(0)
            f.write(_HEADER.pack(_MAGIC, FORMAT_VERSION, writer.size, writer.sha.digest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save(
    net: GrowableNetwork, path: PathLike, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Save ``net`` (and optionally ``optimizer``'s state) to ``path``, atomically.

    Parameters
    ----------
    net : GrowableNetwork
        The network. Every module the graph calls must be a ``torch.nn`` layer type with a
        growth rule (:data:`LAYER_TYPES`) and every function one with a rule; otherwise a
        ``GrowthError`` names the offender and no file is written.
    path : str or os.PathLike
        Destination. An existing file is replaced only once the new one is complete.
    optimizer : torch.optim.Optimizer, optional
        Its ``state_dict()`` and the names of the parameters of each param group are stored;
        :meth:`Checkpoint.make_optimizer` rebuilds it in the same parameter order.

    Raises
    ------
    GrowthError
        A module type, function or value that the checkpoint cannot store.
    """
    _write_payload(_payload(net, optimizer), path)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _read_payload(path: PathLike, map_location: Any = None) -> dict[str, Any]:
    """Verify the header and checksum of ``path`` and ``torch.load`` its payload."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        header = f.read(_HEADER.size)
        payload = f.read()
    if header[: len(_MAGIC)] != _MAGIC:
        if header and len(header) < len(_MAGIC) and _MAGIC.startswith(header):
            raise GrowthError(f"{name}: net2grow checkpoint file is corrupt: truncated header")
        raise GrowthError(f"{name} is not a net2grow checkpoint (no net2grow header)")
    if len(header) < _HEADER.size:
        raise GrowthError(f"{name}: net2grow checkpoint file is corrupt: truncated header")
    _, version, size, digest = _HEADER.unpack(header)
    if version > FORMAT_VERSION or version < 1:
        raise GrowthError(
            f"{name}: net2grow checkpoint format {version} is not supported (this net2grow reads "
            f"formats 1..{FORMAT_VERSION}); upgrade net2grow"
        )
    if len(payload) < size:
        raise GrowthError(
            f"{name}: net2grow checkpoint file is corrupt: truncated ({len(payload)} of {size} "
            f"payload bytes)"
        )
    if len(payload) > size:
        raise GrowthError(
            f"{name}: net2grow checkpoint file is corrupt: {len(payload) - size} unexpected "
            f"bytes after the payload"
        )
    if hashlib.sha256(payload).digest() != digest:
        raise GrowthError(
            f"{name}: net2grow checkpoint file is corrupt: SHA-256 checksum mismatch (the file "
            f"was modified or damaged after it was written)"
        )
    try:
        data = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise GrowthError(f"{name}: cannot read the checkpoint payload: {exc}") from exc
    if not isinstance(data, dict) or data.get("kind") != _KIND:
        raise GrowthError(f"{name} is not a net2grow checkpoint (unexpected payload)")
    return data


def _build_tree(data: dict[str, Any]) -> nn.Module:
    tensors: dict[str, Tensor] = data["tensors"]
    root = nn.Module()
    objects: dict[str, Tensor] = {}
    for entry in data["modules"]:
        path = entry["path"]
        kind = entry["kind"]
        parent_path, _, name = path.rpartition(".")
        if kind == "root":
            module = root
        elif kind == "alias":
            module = root.get_submodule(entry["of"])
        elif kind == "layer":
            module = _build_layer(entry["type"], entry["args"], path)
        elif kind == "container" and entry.get("type") in _CONTAINERS:
            module = _CONTAINERS[entry["type"]]()
        else:
            raise GrowthError(f"malformed checkpoint: module {path!r} of kind {kind!r}")
        if kind != "root":
            root.get_submodule(parent_path).add_module(name, module)
        if kind == "alias":
            continue
        module.training = bool(entry["training"])
        created = {n for n, p in module._parameters.items() if p is not None}
        created |= {n for n, b in module._buffers.items() if b is not None}
        wanted = {t["name"] for t in entry["tensors"]}
        if kind == "layer" and created != wanted:
            raise GrowthError(
                f"malformed checkpoint: module {path!r} ({entry['type']}) has tensors "
                f"{sorted(created)}, the file {sorted(wanted)}"
            )
        for t in entry["tensors"]:
            full = _join(path, t["name"])
            if t["tie"] is not None:
                value = objects[t["tie"]]
            elif t["parameter"]:
                value = nn.Parameter(tensors[full], requires_grad=bool(t["requires_grad"]))
            else:
                value = tensors[full]
            objects[full] = value
            if t["parameter"]:
                module._parameters[t["name"]] = value
            else:
                module._buffers[t["name"]] = value
                if t["persistent"]:
                    module._non_persistent_buffers_set.discard(t["name"])
                else:
                    module._non_persistent_buffers_set.add(t["name"])
    for target, value in data["attributes"].items():
        owner_path, _, attr = target.rpartition(".")
        setattr(root.get_submodule(owner_path), attr, value)
    for name, t in [*root.named_parameters(), *root.named_buffers()]:
        if t.is_meta:
            raise GrowthError(f"malformed checkpoint: no value stored for {name!r}")
    return root


def _build_graph(data: dict[str, Any], root: nn.Module) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for spec in data["graph"]:
        op, target, name = spec["op"], spec["target"], spec["name"]
        if op == "call_function":
            target = _resolve_function(target)
        elif op == "call_method":
            if not _method_allowed(target):
                raise GrowthError(
                    f"the checkpoint calls method {target!r}, which is not allowed (public "
                    f"torch.Tensor methods only)"
                )
        elif op == "call_module":
            try:
                module = root.get_submodule(target)
            except AttributeError as exc:
                raise GrowthError(f"malformed checkpoint: no module {target!r}") from exc
            if type(module) not in LAYER_TYPES:
                raise GrowthError(
                    f"the checkpoint calls module {target!r} of type {type(module).__name__}, "
                    f"which is not allowed"
                )
        elif op == "get_attr":
            owner_path, _, attr = str(target).rpartition(".")
            try:
                getattr(root.get_submodule(owner_path), attr)
            except AttributeError as exc:
                raise GrowthError(f"malformed checkpoint: no attribute {target!r}") from exc
        elif op not in ("placeholder", "output"):
            raise GrowthError(f"malformed checkpoint: unknown node op {op!r}")
        args = _decode(spec["args"], nodes)
        kwargs = _decode(spec["kwargs"], nodes)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise GrowthError(f"malformed checkpoint: bad arguments of node {name!r}")
        nodes[name] = graph.create_node(op, target, tuple(args), kwargs, name=name)
    return graph


def _build_history(data: dict[str, Any]) -> list[GrowthRecord]:
    names = {f.name for f in fields(GrowthRecord)}
    records = []
    for item in data["history"]:
        decoded = {k: _decode(v) for k, v in item.items() if k in names}
        records.append(GrowthRecord(**decoded))
    return records


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes
    ----------
    network : GrowableNetwork
        The rebuilt network, in the training/eval mode it was saved in.
    optimizer_state : dict or None
        ``optimizer.state_dict()`` as saved (None when no optimizer was saved).
    optimizer_class : str or None
        Class name of the saved optimizer (``"Adam"``).
    optimizer_param_names : list of list of str, or None
        Names of the parameters of each param group, in the optimizer's order.
    """

    network: GrowableNetwork
    optimizer_state: dict[str, Any] | None = None
    optimizer_class: str | None = None
    optimizer_param_names: list[list[str]] | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """Param groups over ``network``'s parameters, ordered and configured as saved."""
        if self.optimizer_state is None or self.optimizer_param_names is None:
            raise GrowthError("this checkpoint holds no optimizer state")
        groups = []
        for names, saved in zip(self.optimizer_param_names, self.optimizer_state["param_groups"]):
            group = {k: v for k, v in saved.items() if k != "params"}
            group["params"] = [self.network.get_parameter(n) for n in names]
            groups.append(group)
        return groups

    def make_optimizer(
        self, optimizer_class: type[torch.optim.Optimizer] | None = None, **defaults: Any
    ) -> torch.optim.Optimizer:
        """A new optimizer over ``network`` with the saved state (moments, step counts, lr).

        ``optimizer_class`` defaults to the saved class looked up in ``torch.optim``; pass it for
        other optimizers. ``defaults`` go to its constructor.
        """
        if self.optimizer_state is None:
            raise GrowthError("this checkpoint holds no optimizer state")
        if optimizer_class is None:
            optimizer_class = getattr(torch.optim, str(self.optimizer_class), None)
            if not (
                isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)
            ):
                raise GrowthError(
                    f"the saved optimizer {self.optimizer_class!r} is not in torch.optim: pass "
                    f"its class to make_optimizer"
                )
        elif optimizer_class.__name__ != self.optimizer_class:
            raise GrowthError(
                f"the checkpoint holds {self.optimizer_class} state, not "
                f"{optimizer_class.__name__} state"
            )
        optimizer = optimizer_class(self.param_groups(), **defaults)
        optimizer.load_state_dict(self.optimizer_state)
        return optimizer


def load_checkpoint(path: PathLike, map_location: Any = None) -> Checkpoint:
    """Read a file written by :func:`save`: the network and, if saved, the optimizer state.

    Parameters
    ----------
    path : str or os.PathLike
    map_location
        As for ``torch.load`` (for example ``"cpu"`` or ``torch.device("cuda:0")``).

    Returns
    -------
    Checkpoint
        ``.network`` is the rebuilt :class:`GrowableNetwork`; ``.make_optimizer()`` resumes
        the saved optimizer.

    Raises
    ------
    GrowthError
        The file is not a net2grow checkpoint, is truncated or corrupt (checksum), or names a
        layer type or function outside the allowlists.
    """
    data = _read_payload(path, map_location)
    try:
        root = _build_tree(data)
        graph = _build_graph(data, root)
        history = _build_history(data)
        probe = list(data["probe"])
        net = GrowableNetwork.from_graph(
            root, graph, probe, tolerance=float(data["tolerance"]), history=history
        )
    except GrowthError:
        raise
    except Exception as exc:
        raise GrowthError(
            f"{os.fspath(path)}: malformed net2grow checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    net.model_class = str(data["model_class"])
    net.training = bool(data["modules"][0]["training"])
    opt = data.get("optimizer")
    if opt is None:
        return Checkpoint(net)
    return Checkpoint(net, opt["state_dict"], opt["class"], [list(g) for g in opt["param_names"]])


def load(path: PathLike, map_location: Any = None) -> GrowableNetwork:
    """Rebuild the :class:`GrowableNetwork` saved at ``path`` (see :func:`load_checkpoint`).

    Works in a process that never imported the model's class. For the optimizer state as
    well, use ``load_checkpoint(path).make_optimizer()``.
    """
    return load_checkpoint(path, map_location).network
