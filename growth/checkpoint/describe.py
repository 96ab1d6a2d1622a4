"""Network -> plain description: what :func:`growth.save` writes.

The description holds the layer graph as a list of nodes (op, name, target, encoded
arguments; functions by qualified name), the module tree (each module's path and either a
*layer spec* — registered type and constructor arguments read from the module — or a plain
*container*: the graph, not the user's ``forward``, says what the network computes), every
parameter and buffer (``requires_grad``, persistence, weight tying), the probe batch, the
tolerance, the growth history and, optionally, an optimizer's state and user data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import GrowthError
from ..network import _PROBE_PREFIX, GrowableNetwork
from ..optim import param_names
from ..rules import module_spec_for
from .allowlist import (
    CONTAINERS,
    METHODS,
    check_attribute_name,
    check_path,
    check_placeholder,
    function_name,
    type_key,
)
from .codec import check_plain, encode
from .fileformat import FORMAT_VERSION, KIND
from .rebuild import build_layer, tensor_shapes

__all__ = ["describe", "join", "layer_spec"]


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _constructor_args(module: nn.Module) -> dict[str, Any]:
    spec = module_spec_for(type(module))
    assert spec is not None
    if spec.read is not None:
        args = spec.read(module)
        assert set(args) == set(spec.args), f"{type(module).__name__}: read() != args"
    else:
        args = {name: _read_arg(module, name) for name in spec.args}
    return {
        name: value
        for name, value in args.items()
        if not (name in spec.omit_if_default and _same(value, spec.omit_if_default[name]))
    }


def _read_arg(module: nn.Module, name: str) -> Any:
    if name == "bias":  # constructors take a flag; modules hold a tensor or None
        weight = getattr(module, "weight", None)
        return getattr(module, "bias", None) is not None if weight is not None else True
    return getattr(module, name)


def layer_spec(module: nn.Module, path: str) -> dict[str, Any]:
    """Type, constructor arguments and state of ``module``, checked by rebuilding it on
    ``meta``: a layer whose attributes its constructor cannot reproduce is refused."""
    spec = module_spec_for(type(module))
    assert spec is not None
    where = f"module {path!r}"
    args = {
        k: encode(v, f"argument {k!r} of {where}") for k, v in _constructor_args(module).items()
    }
    state = {k: encode(getattr(module, k), f"attribute {k!r} of {where}") for k in spec.state}
    entry = {"type": type_key(type(module)), "args": args, "state": state}
    rebuilt = build_layer(entry, path)
    problem = None
    for key, value in vars(rebuilt).items():
        if key.startswith("_") or key == "training" or isinstance(value, (Tensor, nn.Module)):
            continue
        if not _same(getattr(module, key, None), value):
            problem = f"its attribute {key!r} = {getattr(module, key, None)!r} (rebuilt: {value!r})"
    rebuilt_shapes = tensor_shapes(rebuilt)
    shapes = tensor_shapes(module)
    if spec.dynamic_buffers:
        shapes = {k: v for k, v in shapes.items() if k in rebuilt_shapes}
    if problem is None and rebuilt_shapes != shapes:
        problem = f"its tensors {shapes} (rebuilt: {rebuilt_shapes})"
    if problem is not None:
        raise GrowthError(
            f"cannot save module {path!r} ({type(module).__name__}): {problem} cannot be "
            f"reproduced from its constructor arguments"
        )
    return entry


def _describe_modules(net: GrowableNetwork) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """One entry per module (pre-order, registration order) and every tensor by full name."""
    called = {str(n.target) for n in net.graph.nodes if n.op == "call_module"}
    entries: list[dict[str, Any]] = []
    tensors: dict[str, Tensor] = {}
    seen_modules: dict[int, str] = {id(net): ""}
    seen_tensors: dict[int, str] = {}

    def tensor_entry(module: nn.Module, path: str, name: str, t: Tensor, parameter: bool):
        full = join(path, name)
        tie = seen_tensors.setdefault(id(t), full)
        if tie == full:
            tensors[full] = t.detach()
        return {
            "name": name,
            "parameter": parameter,
            "requires_grad": bool(parameter and t.requires_grad),
            "persistent": parameter or name not in module._non_persistent_buffers_set,
            "tie": None if tie == full else tie,
        }

    def tensor_entries(module: nn.Module, path: str) -> list[dict[str, Any]]:
        out = [
            tensor_entry(module, path, n, p, True)
            for n, p in module._parameters.items()
            if p is not None
        ]
        out += [
            tensor_entry(module, path, n, b, False)
            for n, b in module._buffers.items()
            if b is not None and not (module is net and n.startswith(_PROBE_PREFIX))
        ]
        return out

    entries.append(
        {"path": "", "kind": "root", "training": net.training, "tensors": tensor_entries(net, "")}
    )

    def visit(module: nn.Module, path: str) -> None:
        for name, child in module._modules.items():
            if child is None:
                continue
            full = join(path, name)
            check_path(full, "module")
            if id(child) in seen_modules:
                entries.append({"path": full, "kind": "alias", "of": seen_modules[id(child)]})
                continue
            seen_modules[id(child)] = full
            entry: dict[str, Any] = {"path": full, "training": child.training}
            if module_spec_for(type(child)) is not None:
                entry.update(kind="layer", **layer_spec(child, full))
            elif full in called:
                raise GrowthError(
                    f"cannot save the network: layer {full!r} has type "
                    f"{type(child).__module__}.{type(child).__name__}, which a checkpoint cannot "
                    f"rebuild without importing it. Checkpoints support the layer types "
                    f"registered with a growth rule and a checkpoint spec "
                    f"(net2grow.growth.rules.register_module_rule(..., spec=ModuleSpec(...)))"
                )
            else:
                kind = type(child).__name__ if type(child) in CONTAINERS.values() else "Module"
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
            target = function_name(node.target)
        elif node.op == "call_method" and node.target not in METHODS:
            raise GrowthError(
                f"cannot save the network: {where} calls method {node.target!r}, which a "
                f"checkpoint does not allow (allowed: {', '.join(sorted(METHODS))}); keep the "
                f"call inside a module with a growth rule"
            )
        elif node.op == "placeholder":
            check_placeholder(node.target)
        elif node.op == "get_attr":
            check_path(str(node.target), "attribute")
            owner_path, _, attr = str(node.target).rpartition(".")
            try:
                owner = net.get_submodule(owner_path)
                value = getattr(owner, attr)
            except AttributeError as exc:
                raise GrowthError(f"cannot save the network: {where}: {exc}") from exc
            if not isinstance(value, Tensor):
                raise GrowthError(
                    f"cannot save the network: {where} reads a {type(value).__name__}; a "
                    f"checkpoint stores tensor attributes only"
                )
            if not (attr in owner._parameters or attr in owner._buffers):
                check_attribute_name(attr, "tensor attribute")
                attributes[str(node.target)] = value.detach()
        entry = {
            "op": node.op,
            "name": node.name,
            "target": str(target),
            "args": encode(list(node.args), where),
            "kwargs": encode(dict(node.kwargs), where),
        }
        scope = _scope(node)
        if scope:
            entry["scope"] = scope
        nodes.append(entry)
    return nodes, attributes


def _scope(node: fx.Node) -> list[str]:
    """The paths of the modules whose ``forward`` made ``node`` (what ``deepen(kind="block")``
    reads to find a block's nodes); empty when unknown or not storable as plain names."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path) for path, _ in stack.values()]
    try:
        for path in paths:
            check_path(path, "module")
    except GrowthError:
        return []
    return paths


def _probe_of(net: GrowableNetwork) -> list[Tensor]:
    return [t.detach() for t in net.probe]


def _optimizer_payload(net: GrowableNetwork, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise GrowthError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    groups = param_names(net, optimizer)
    state = optimizer.state_dict()
    check_plain(state, "optimizer.state_dict()")
    return {"class": type(optimizer).__name__, "state_dict": state, "param_names": groups}


def _extra_payload(extra: dict[str, Any] | None) -> dict[str, Any] | None:
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise GrowthError(f"extra must be a dict of plain data, got {type(extra).__name__}")
    check_plain(extra, "extra")
    return extra


def describe(
    net: GrowableNetwork,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole checkpoint payload of ``net`` (and ``optimizer``, ``extra``)."""
    if not isinstance(net, GrowableNetwork):
        raise GrowthError(f"save() takes a GrowableNetwork, got {type(net).__name__}")
    modules, tensors = _describe_modules(net)
    graph, attributes = _describe_graph(net)
    history = [
        {k: encode(v, "history", lenient=True) for k, v in rec.to_dict().items()}
        for rec in net.history
    ]
    return {
        "kind": KIND,
        "version": FORMAT_VERSION,
        "torch_version": str(torch.__version__),
        "model_class": str(net.model_class),
        "network_class": type_key(type(net)),
        "network_state": {
            k: encode(getattr(net, k), f"attribute {k!r} of the network")
            for k in type(net).checkpoint_state
        },
        "tolerance": float(net.tolerance),
        "graph": graph,
        "modules": modules,
        "tensors": tensors,
        "attributes": attributes,
        "probe": _probe_of(net),
        "history": history,
        "optimizer": None if optimizer is None else _optimizer_payload(net, optimizer),
        "extra": _extra_payload(extra),
    }
