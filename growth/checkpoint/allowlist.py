"""What a checkpoint may name: the allow-lists behind its trust model.

A checkpoint file is untrusted input. Loading it builds modules, installs tensors and compiles
the stored graph into Python code, so every name the file holds is checked here before it is
used, against lists fixed by this module and the rule registry:

- layer types: exactly the types registered with a :class:`~growth.rules.ModuleSpec`;
- functions: by qualified name in ``operator``, ``torch.nn.functional`` and ``torch``, and only
  those with a growth rule; from ``builtins`` only ``getattr``;
- tensor methods: :data:`METHODS`, pure computations on tensors (nothing that takes a callable,
  imports by name, touches storage or hooks, or leaves the tensor world);
- ``getattr`` in the graph: only on a graph value, only the attributes in
  :data:`TENSOR_ATTRIBUTES`; ``operator.getitem``: only on a graph value;
- module, tensor and attribute names: plain identifiers (``[A-Za-z0-9_]``, no dunder), so the
  generated code can only reach what the file itself created.
"""

from __future__ import annotations

import builtins
import keyword
import operator
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import GrowthError
from ..rules import checkpointable_types, known_function, module_spec_for

__all__ = [
    "CONTAINERS",
    "FUNCTION_MODULES",
    "METHODS",
    "TENSOR_ATTRIBUTES",
    "check_attribute_name",
    "check_call",
    "check_local_name",
    "check_member_name",
    "check_method",
    "check_path",
    "check_placeholder",
    "container_type",
    "function_name",
    "layer_type",
    "network_type",
    "resolve_function",
    "type_key",
]

#: Modules searched (in this order) for a ``call_function`` target's qualified name.
FUNCTION_MODULES: dict[str, ModuleType] = {
    "operator": operator,
    "builtins": builtins,
    "torch.nn.functional": F,
    "torch": torch,
}

#: The one builtin a graph may call: attribute access, restricted by :func:`check_node_call`.
_BUILTINS_ALLOWED = frozenset({"getattr"})

#: Tensor methods a stored graph may call. Each computes a tensor (or a size) from tensors and
#: plain arguments; none takes a callable, resolves a name, exposes memory or registers hooks.
METHODS = frozenset(
    {
        # elementwise
        "abs", "add", "add_", "clamp", "clamp_", "clamp_max", "clamp_min", "div", "div_", "exp",
        "maximum", "minimum", "mul", "mul_", "neg", "pow", "relu", "relu_", "sigmoid",
        "sigmoid_", "sqrt", "square", "sub", "sub_", "tanh", "tanh_",
        # reductions and normalisations
        "amax", "log_softmax", "mean", "softmax", "sum",
        # shapes and views
        "chunk", "contiguous", "dim", "expand", "expand_as", "flatten", "movedim", "narrow",
        "numel", "permute", "reshape", "reshape_as", "size", "split", "squeeze", "t",
        "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as",
        # copies and conversions between floating types and devices
        "bfloat16", "clone", "detach", "double", "float", "half", "to", "type_as",
    }
)  # fmt: skip

#: Attributes ``getattr`` may read from a graph value.
TENSOR_ATTRIBUTES = frozenset(
    {"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "is_cuda", "layout"}
)

CONTAINERS: dict[str, type[nn.Module]] = {
    t.__name__: t for t in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)
}

_MEMBER = re.compile(r"[A-Za-z0-9_]{1,200}")
_PLACEHOLDER = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]{0,199}")


def _refuse(what: str, value: Any, allowed: str) -> GrowthError:
    shown = repr(value) if len(repr(value)) <= 120 else repr(value)[:117] + "..."
    return GrowthError(f"the checkpoint {what} {shown}, which is not allowed: {allowed}")


def check_member_name(name: Any, what: str) -> str:
    """A module or tensor name: letters, digits and ``_``, not a dunder."""
    if not isinstance(name, str) or not _MEMBER.fullmatch(name) or name.startswith("__"):
        raise _refuse(f"uses the {what} name", name, "names are letters, digits and '_', no dunder")
    return name


def check_local_name(name: Any, what: str) -> str:
    """A Python identifier, not a keyword or dunder (graph node names, keyword arguments)."""
    check_member_name(name, what)
    if not name.isidentifier() or keyword.iskeyword(name):
        raise _refuse(f"uses the {what} name", name, "a Python identifier is required")
    return name


def check_attribute_name(name: Any, what: str) -> str:
    """A public identifier (no leading ``_``, not a keyword)."""
    check_local_name(name, what)
    if name.startswith("_"):
        raise _refuse(f"uses the {what} name", name, "a public Python identifier is required")
    return name


def check_path(path: Any, what: str, *, allow_root: bool = False) -> str:
    """A dotted path of member names (``"layer1.0.conv1"``)."""
    if path == "" and allow_root:
        return path
    if not isinstance(path, str) or len(path) > 4096:
        raise _refuse(f"uses the {what} name", path, "a dotted path of names is required")
    for part in path.split("."):
        check_member_name(part, what)
    return path


def check_placeholder(target: Any) -> str:
    """An input's name: an identifier, optionally ``*args``/``**kwargs``-style."""
    if not isinstance(target, str) or not _PLACEHOLDER.fullmatch(target):
        raise _refuse("names an input", target, "an input name must be a Python identifier")
    if keyword.iskeyword(target.lstrip("*")):
        raise _refuse("names an input", target, "an input name must not be a keyword")
    return target


def type_key(module_type: type) -> str:
    """How a file names a layer type: the bare class name for ``torch.nn`` types, the
    qualified name for others (registered by the packages that own them)."""
    if module_type.__module__.startswith("torch.nn"):
        return module_type.__name__
    return f"{module_type.__module__}.{module_type.__qualname__}"


def layer_type(key: Any, path: str) -> type[nn.Module]:
    """The registered layer type a file names, or a ``GrowthError``."""
    known = {type_key(t): t for t in checkpointable_types().values()}
    cls = known.get(key) if isinstance(key, str) else None
    if cls is None or module_spec_for(cls) is None:
        hint = ""
        if isinstance(key, str) and "." in key and not key.startswith("torch"):
            hint = (
                "; a type from another package is registered by the code that supports it: "
                "import that code before loading (for Avalanche's heads: "
                "import net2grow.strategies)"
            )
        raise _refuse(
            f"builds module {path!r} of type",
            key,
            f"only layer types registered with a growth rule and a checkpoint spec{hint}",
        )
    return cls


def network_type(key: Any) -> type:
    """The ``GrowableNetwork`` class a file names: the engine's own or an imported subclass."""
    from ..network import GrowableNetwork

    if key is None:
        return GrowableNetwork
    classes, todo = {}, [GrowableNetwork]
    while todo:
        cls = todo.pop()
        classes[type_key(cls)] = cls
        todo.extend(cls.__subclasses__())
    if isinstance(key, str) and key in classes:
        return classes[key]
    hint = ""
    if isinstance(key, str) and "." in key:
        hint = f"; import {key.rpartition('.')[0].partition('.')[0]} before loading"
    raise _refuse("is a network of class", key, f"GrowableNetwork or a subclass imported{hint}")


def container_type(key: Any, path: str) -> type[nn.Module]:
    cls = CONTAINERS.get(key) if isinstance(key, str) else None
    if cls is None:
        raise _refuse(f"builds container {path!r} of type", key, ", ".join(CONTAINERS))
    return cls


def _function_allowed(fn: Any) -> bool:
    try:
        return known_function(fn) or fn is getattr
    except TypeError:  # unhashable
        return False


def function_name(fn: Callable[..., Any]) -> str:
    """``"module.attr"`` naming ``fn`` for the file, or a ``GrowthError`` (save side)."""
    label = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    where = getattr(fn, "__module__", None)
    full = f"{where}.{label}" if where else label
    if not _function_allowed(fn):
        raise GrowthError(
            f"cannot save the network: its graph calls {full}, a function with no growth rule. "
            f"A checkpoint rebuilds only functions that growth.rules knows; register a rule for "
            f"it (net2grow.growth.rules.register_function_rule) or keep it inside a module"
        )
    attr = getattr(fn, "__name__", None)
    for mod_name, mod in FUNCTION_MODULES.items():
        if isinstance(attr, str) and _public_in(mod_name, attr) and vars(mod).get(attr) is fn:
            return f"{mod_name}.{attr}"
    for mod_name, mod in FUNCTION_MODULES.items():
        for key, value in vars(mod).items():
            if value is fn and _public_in(mod_name, key):
                return f"{mod_name}.{key}"
    raise GrowthError(
        f"cannot save the network: its graph calls {full}, which is not reachable from "
        f"{', '.join(FUNCTION_MODULES)}; a checkpoint can only name functions found there"
    )


def _public_in(mod_name: str, attr: str) -> bool:
    if attr.startswith("_"):
        return False
    return mod_name != "builtins" or attr in _BUILTINS_ALLOWED


def resolve_function(name: Any) -> Callable[..., Any]:
    """The function a file names, looked up without importing or calling anything."""
    if isinstance(name, str) and len(name) <= 200:
        mod_name, _, attr = name.rpartition(".")
        mod = FUNCTION_MODULES.get(mod_name)
        # vars(), not getattr(): no lazily imported submodules, no module __getattr__
        fn = vars(mod).get(attr) if mod is not None and _public_in(mod_name, attr) else None
        if fn is not None and _function_allowed(fn):
            return fn
    raise _refuse(
        "calls function",
        name,
        "only functions with a growth rule (and getattr/operator.getitem on graph values)",
    )


def check_method(name: Any) -> str:
    if not isinstance(name, str) or name not in METHODS:
        raise _refuse(
            "calls method", name, f"only these tensor methods: {', '.join(sorted(METHODS))}"
        )
    return name


def check_call(op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Arguments of a call node: ``getattr``, ``getitem`` and methods act on graph values only."""
    if op == "call_method" and not (args and isinstance(args[0], fx.Node)):
        raise _refuse("calls a method on", args[:1], "methods are called on graph values only")
    if op != "call_function":
        return
    if target is getattr and not (
        len(args) == 2
        and not kwargs
        and isinstance(args[0], fx.Node)
        and isinstance(args[1], str)
        and args[1] in TENSOR_ATTRIBUTES
    ):
        raise _refuse(
            "reads attribute",
            args[1:2],
            f"getattr reads only {', '.join(sorted(TENSOR_ATTRIBUTES))} of a graph value",
        )
    if target is operator.getitem and not (
        len(args) == 2 and not kwargs and isinstance(args[0], fx.Node)
    ):
        raise _refuse("indexes", args[:1], "operator.getitem indexes graph values only")
