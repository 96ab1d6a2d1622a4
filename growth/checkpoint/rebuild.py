"""Plain description -> network: the loading side, where every entry of a file is untrusted.

Each value is checked against :mod:`net2grow.growth.checkpoint.allowlist` before it is used: types
and arguments of layers, names of modules, tensors and attributes, functions, methods and the
arguments of ``getattr``/``getitem``. Modules are walked through their ``_modules`` tables, never
through ``getattr``. The first run of the graph on the probe checks every method, ``getattr``
and ``getitem`` against the kind of value it acts on, and runs each call on the ``meta`` device
(shapes only, nothing allocated) before running it for real, refusing any result over
:data:`MAX_PROBE_ELEMENTS` elements.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..errors import GrowthError
from ..record import GrowthRecord
from ..rules import module_spec_for
from .allowlist import (
    check_attribute_name,
    check_call,
    check_local_name,
    check_member_name,
    check_method,
    check_path,
    check_placeholder,
    container_type,
    layer_type,
    resolve_function,
)
from .codec import decode

__all__ = [
    "MAX_MODULES",
    "MAX_NODES",
    "MAX_PROBE_ELEMENTS",
    "build_graph",
    "build_history",
    "build_layer",
    "build_tree",
    "dry_run",
    "tensor_shapes",
]

#: Most graph nodes a checkpoint may hold.
MAX_NODES = 200_000
#: Most modules a checkpoint may hold.
MAX_MODULES = 200_000
#: Most elements any intermediate tensor may have when the graph first runs on the stored
#: probe batch (checked on the ``meta`` device, before anything is allocated). Raise it for
#: networks whose probe activations are larger.
MAX_PROBE_ELEMENTS = 1 << 28

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


def _malformed(why: str) -> GrowthError:
    return GrowthError(f"malformed checkpoint: {why}")


def _field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise _malformed(f"{where} has no {key!r}")
    value = entry[key]
    if not isinstance(value, kind):
        raise _malformed(f"{where}: {key!r} is a {type(value).__name__}")
    return value


def tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = [*module._parameters.items(), *module._buffers.items()]
    return {n: tuple(t.shape) for n, t in tensors if t is not None}


def build_layer(entry: dict[str, Any], path: str) -> nn.Module:
    """A registered layer type built on ``meta`` from its stored arguments and state."""
    cls = layer_type(entry.get("type"), path)
    spec = module_spec_for(cls)
    assert spec is not None
    args = _field(entry, "args", dict, f"module {path!r}")
    state = entry.get("state") or {}
    if not isinstance(state, dict) or any(k not in spec.args for k in args):
        raise _malformed(f"bad constructor arguments for {path!r}")
    if any(k not in spec.state for k in state):
        raise _malformed(f"bad state for {path!r}: {sorted(state)} (allowed: {spec.state})")
    kwargs = {k: decode(v) for k, v in args.items()}
    try:
        with torch.device("meta"):
            module = cls(**kwargs)
    except Exception as exc:
        raise GrowthError(
            f"cannot rebuild module {path!r}: {cls.__name__}(**{kwargs}) failed: {exc}"
        ) from exc
    for key, value in state.items():
        setattr(module, key, decode(value))
    return module


class _Tree:
    """The module tree being rebuilt, with every module by path."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.modules: dict[str, nn.Module] = {"": self.root}
        self.defined: set[str] = {""}
        self.objects: dict[str, Tensor] = {}

    def module(self, path: Any, what: str) -> nn.Module:
        if not isinstance(path, str) or path not in self.modules:
            raise _malformed(f"{what} refers to unknown module {str(path)[:100]!r}")
        return self.modules[path]

    def add(self, path: str, module: nn.Module) -> None:
        """Attach ``module`` at ``path`` (replacing a child its parent's constructor made)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.module(parent_path, f"module {path!r}")
        if path in self.defined or (name not in parent._modules and hasattr(parent, name)):
            raise _malformed(f"module {path!r} is defined twice or hides an attribute")
        for sub in [p for p in self.modules if p.startswith(f"{path}.")]:
            del self.modules[sub]
        parent.add_module(name, module)
        self.defined.add(path)
        for sub, child in module.named_modules(prefix=path):
            self.modules[sub] = child

    def install(self, module: nn.Module, path: str, item: Any, stored: dict[str, Any]) -> None:
        where = f"tensor of module {path!r}"
        name = check_member_name(_field(item, "name", str, where), "tensor")
        full = f"{path}.{name}" if path else name
        if (
            name not in module._parameters
            and name not in module._buffers
            and (name in module._modules or hasattr(type(module), name) or name in vars(module))
        ):
            raise _malformed(f"tensor {full!r} hides an attribute of its module")
        tie = item.get("tie")
        parameter = bool(item.get("parameter"))
        if tie is not None:
            if tie not in self.objects:
                raise _malformed(f"tensor {full!r} is tied to unknown tensor {str(tie)[:100]!r}")
            value = self.objects[tie]
            if isinstance(value, nn.Parameter) != parameter:
                raise _malformed(f"tensor {full!r} is tied to a tensor of another kind")
        else:
            value = stored.get(full)
            if not isinstance(value, Tensor):
                raise _malformed(f"no value stored for {full!r}")
            if parameter:
                value = nn.Parameter(value, requires_grad=bool(item.get("requires_grad")))
        expected = module._parameters.get(name, module._buffers.get(name))
        if expected is not None and tuple(expected.shape) != tuple(value.shape):
            raise _malformed(
                f"tensor {full!r} has shape {tuple(value.shape)}; its layer's arguments make "
                f"{tuple(expected.shape)}"
            )
        self.objects[full] = value
        if parameter:
            module._buffers.pop(name, None)
            module._parameters[name] = value
        else:
            module._parameters.pop(name, None)
            module._buffers[name] = value
            if item.get("persistent", True):
                module._non_persistent_buffers_set.discard(name)
            else:
                module._non_persistent_buffers_set.add(name)


def build_tree(data: dict[str, Any]) -> nn.Module:
    """The module tree of a checkpoint, every tensor installed and checked."""
    entries = _field(data, "modules", list, "the checkpoint")
    stored = _field(data, "tensors", dict, "the checkpoint")
    if not entries or len(entries) > MAX_MODULES:
        raise _malformed(f"{len(entries)} modules (1..{MAX_MODULES} allowed)")
    tree = _Tree()
    for i, entry in enumerate(entries):
        kind = _field(entry, "kind", str, f"module entry {i}")
        if (kind == "root") != (i == 0):
            raise _malformed("the first module entry, and only it, must be the root")
        path = check_path(
            _field(entry, "path", str, f"module entry {i}"), "module", allow_root=i == 0
        )
        if kind == "root":
            module = tree.root
        elif kind == "alias":
            tree.add(path, tree.module(entry.get("of"), f"alias {path!r}"))
            continue
        elif kind == "layer":
            module = build_layer(entry, path)
            tree.add(path, module)
        elif kind == "container":
            module = container_type(entry.get("type"), path)()
            tree.add(path, module)
        else:
            raise _malformed(f"module {path!r} of kind {kind[:50]!r}")
        module.training = bool(entry.get("training", False))
        items = _field(entry, "tensors", list, f"module {path!r}")
        created = set(tensor_shapes(module))
        wanted = {item.get("name") for item in items if isinstance(item, dict)}
        spec = module_spec_for(type(module)) if kind == "layer" else None
        if spec is not None and not (
            created == wanted or (spec.dynamic_buffers and created <= wanted)
        ):
            raise _malformed(
                f"module {path!r} ({type(module).__name__}) has tensors {sorted(created)}, "
                f"the file {sorted(str(w) for w in wanted)}"
            )
        for item in items:
            tree.install(module, path, item, stored)
    _set_attributes(tree, _field(data, "attributes", dict, "the checkpoint"))
    for name, t in [*tree.root.named_parameters(), *tree.root.named_buffers()]:
        if t.is_meta:
            raise _malformed(f"no value stored for {name!r}")
    return tree.root


def _set_attributes(tree: _Tree, attributes: dict[Any, Any]) -> None:
    """Plain tensor attributes that ``get_attr`` nodes read."""
    for target, value in attributes.items():
        check_path(target, "attribute")
        owner_path, _, attr = target.rpartition(".")
        owner = tree.module(owner_path, f"attribute {target!r}")
        check_attribute_name(attr, "tensor attribute")
        if not isinstance(value, Tensor) or hasattr(owner, attr):
            raise _malformed(f"attribute {target!r} is not a new tensor attribute")
        setattr(owner, attr, value)


def _target(op: str, target: Any, root: nn.Module) -> Any:
    if op == "call_function":
        return resolve_function(target)
    if op == "call_method":
        return check_method(target)
    if op == "placeholder":
        return check_placeholder(target)
    if op == "output":
        if target != "output":
            raise _malformed(f"output node with target {str(target)[:50]!r}")
        return target
    check_path(target, "module" if op == "call_module" else "attribute")
    owner_path, _, attr = target.rpartition(".") if op == "get_attr" else (target, "", "")
    module: Any = root
    for part in owner_path.split(".") if owner_path else ():
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
    if not isinstance(module, nn.Module):
        raise _malformed(f"no module {owner_path!r} for {op} {target!r}")
    if op == "call_module" and module_spec_for(type(module)) is None:
        raise GrowthError(
            f"the checkpoint calls module {target!r} of type {type(module).__name__}, which is "
            f"not allowed: only registered layer types are called"
        )
    if op == "get_attr" and not isinstance(
        module._parameters.get(attr, module._buffers.get(attr, vars(module).get(attr))), Tensor
    ):
        raise _malformed(f"no tensor attribute {target!r}")
    return target


def build_graph(data: dict[str, Any], root: nn.Module) -> fx.Graph:
    """The stored graph, each node checked before it is created."""
    specs = _field(data, "graph", list, "the checkpoint")
    if not specs or len(specs) > MAX_NODES:
        raise _malformed(f"{len(specs)} graph nodes (1..{MAX_NODES} allowed)")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for i, spec in enumerate(specs):
        op = _field(spec, "op", str, f"graph node {i}")
        if op not in _OPS:
            raise _malformed(f"unknown node op {op[:50]!r}")
        name = check_local_name(_field(spec, "name", str, f"graph node {i}"), "graph node")
        if name in nodes:
            raise _malformed(f"two graph nodes named {name!r}")
        target = _target(op, spec.get("target"), root)
        args = decode(spec.get("args"), nodes)
        kwargs = decode(spec.get("kwargs"), nodes)
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise _malformed(f"bad arguments of node {name!r}")
        for key in kwargs:
            check_local_name(key, "keyword argument")
        check_call(op, target, tuple(args), kwargs)
        nodes[name] = graph.create_node(op, target, tuple(args), kwargs, name=name)
        scope = spec.get("scope")
        if scope is not None:  # module paths of the node's call stack (blocks for deepen)
            if not isinstance(scope, list) or len(scope) > 256:
                raise _malformed(f"bad scope of node {name!r}")
            paths = [check_path(p, "module") for p in scope]
            nodes[name].meta["nn_module_stack"] = {p: (p, "") for p in paths}
    if specs[-1].get("op") != "output":
        raise _malformed("the graph does not end with its output")
    try:
        graph.lint()
    except Exception as exc:
        raise _malformed(f"inconsistent graph: {exc}") from exc
    return graph


def build_history(data: dict[str, Any]) -> list[GrowthRecord]:
    names = {f.name for f in fields(GrowthRecord)}
    records = []
    for item in _field(data, "history", list, "the checkpoint"):
        if not isinstance(item, dict):
            raise _malformed("a growth record is not a dict")
        decoded = {k: decode(v) for k, v in item.items() if k in names}
        try:
            records.append(GrowthRecord(**decoded))
        except TypeError as exc:
            raise _malformed(f"growth record {decoded}: {exc}") from exc
    return records


@contextlib.contextmanager
def _on_meta(root: nn.Module) -> Iterator[None]:
    """Every tensor of ``root`` temporarily replaced by an empty ``meta`` twin."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    twins: dict[int, Tensor] = {}

    def twin(t: Tensor) -> Tensor:
        if id(t) not in twins:
            meta = torch.empty_like(t, device="meta")
            twins[id(t)] = (
                nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
            )
        return twins[id(t)]

    for module in root.modules():
        for table in (module._parameters, module._buffers, vars(module)):
            for key, value in list(table.items()):
                if isinstance(value, Tensor):
                    saved.append((table, key, value))
                    table[key] = twin(value)
    try:
        yield
    finally:
        for table, key, value in reversed(saved):
            table[key] = value


def _meta(value: Any) -> Any:
    return torch.empty_like(value, device="meta") if isinstance(value, Tensor) else value


class _Checked(fx.Interpreter):
    """Runs the graph on the probe, checking the kind of value every method, ``getattr`` and
    ``getitem`` acts on, and, before each call, the size of what it will return: the call runs
    first on ``meta`` twins of its inputs (nothing allocated); only a registered layer or
    allow-listed op that has no ``meta`` kernel (its output's shape depends on values, e.g.
    ``torch.unique``) runs unchecked."""

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_method" and not isinstance(args[0], Tensor):
            raise GrowthError(
                f"the checkpoint calls method {n.target!r} on a {type(args[0]).__name__}; "
                f"methods may only be called on tensors"
            )
        if n.op == "call_function" and n.target is getattr and not isinstance(args[0], Tensor):
            raise GrowthError(f"the checkpoint reads {args[1]!r} of a {type(args[0]).__name__}")
        if n.op == "call_function" and n.target is operator.getitem and not isinstance(
            args[0], (Tensor, torch.Size, tuple, list)
        ):
            raise GrowthError(f"the checkpoint indexes a {type(args[0]).__name__}")
        if n.op in ("call_function", "call_method", "call_module"):
            self._check_size(n, args, kwargs)
        return super().run_node(n)

    def _check_size(self, n: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        meta_args, meta_kwargs = fx.node.map_aggregate((args, kwargs), _meta)
        try:
            if n.op == "call_module":
                module = self.fetch_attr(str(n.target))
                with _on_meta(module):
                    out = module(*meta_args, **meta_kwargs)
            else:
                out = getattr(self, n.op)(n.target, meta_args, meta_kwargs)
        except Exception:  # no meta kernel, or the real call fails the same way below
            return
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and t.numel() > MAX_PROBE_ELEMENTS:
                raise GrowthError(
                    f"the checkpoint's graph makes a tensor of {t.numel():,} elements at node "
                    f"{n.name!r} from its probe batch (limit net2grow.growth.checkpoint.rebuild."
                    f"MAX_PROBE_ELEMENTS = {MAX_PROBE_ELEMENTS:,}; raise it if you trust the file)"
                )


def dry_run(root: nn.Module, graph: fx.Graph, probe: list[Tensor]) -> None:
    """Run ``graph`` over ``root`` on the probe in eval mode, every call checked first."""
    modes = {m: m.training for m in root.modules()}
    try:
        with torch.no_grad():
            root.eval()
            _Checked(root, graph=graph).run(*probe)
    except GrowthError:
        raise
    except Exception as exc:
        raise GrowthError(
            f"the checkpoint's graph does not run on its own probe batch: "
            f"{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
