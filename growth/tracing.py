"""Tracing a model into a ``torch.fx`` graph whose leaves are the layers that have growth rules."""

from __future__ import annotations

import functools
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import TraceError


class GrowthTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps modules with growth rules (and any user leaves) whole."""

    def __init__(self, leaf_types: Iterable[type] = ()) -> None:
        # functions whose ``training`` argument trace_both_modes turns into a module: kept as one
        # call (where forward calls them by a global name), not traced into
        super().__init__(autowrap_functions=tuple(_mode_functions()))
        self.extra_leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .rules import module_rule_for

        if self.extra_leaf_types and isinstance(m, self.extra_leaf_types):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if module_rule_for(m) is not None:
            return True
        from .rules.transformer_layers import TRACED_FORWARDS

        if type(m) in TRACED_FORWARDS:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        from .rules.transformer_layers import TRACED_FORWARDS

        traced = TRACED_FORWARDS.get(type(root)) if isinstance(root, nn.Module) else None
        if traced is None:
            return super().trace(root, concrete_args)
        cls = type(root)  # the model itself is one of them: traced as a subclass using it
        root.__class__ = type(cls.__name__, (cls,), {"forward": traced})
        try:
            return super().trace(root, concrete_args)
        finally:
            root.__class__ = cls

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        # modules whose forward cannot be traced but computes what a traceable one does
        # (nn.TransformerEncoderLayer's fast-path checks) are traced through that one
        from .rules.transformer_layers import TRACED_FORWARDS

        traced = TRACED_FORWARDS.get(type(m))
        if traced is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(traced, m)
        return super().call_module(m, forward, args, kwargs)


def _failing_user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's call that broke tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/growth/" not in f.filename]
    if not user:
        return "unknown location"
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def trace(
    model: nn.Module,
    leaf_types: Iterable[type] = (),
    make_tracer: Callable[[Iterable[type]], fx.Tracer] = GrowthTracer,
) -> fx.Graph:
    """Symbolically trace ``model`` with ``make_tracer(leaf_types)``; raise
    :class:`TraceError` naming the failing call."""
    tracer = make_tracer(leaf_types)
    try:
        return tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        where = _failing_user_frame(exc)
        raise TraceError(
            f"could not trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}. "
            f"The failing call: {where}. Make the module that contains it a leaf "
            f"(GrowableNetwork(model, example_inputs, leaf_modules=[ThatModuleType])) or remove "
            f"data-dependent control flow from its forward (or trace it on the example "
            f"inputs' values: GrowableNetwork(..., tracer=\"concrete\"))."
        ) from exc


#: Functional dropouts and the module each becomes when it follows the module's training flag.
DROPOUT_FUNCTIONS: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout,
    F.dropout1d: nn.Dropout1d,
    F.dropout2d: nn.Dropout2d,
    F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout,
}
FUNCTIONAL_CONTAINER = "functional"


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.kwargs.get(name, node.args[index] if len(node.args) > index else default)


def _mode_functions() -> dict[Any, tuple[str, int, Any]]:
    """Functions with a ``training`` argument that become modules when it follows the mode:
    function -> (module name stem, position of ``training``, ``node -> module``)."""
    table: dict[Any, tuple[str, int, Any]] = {
        fn: ("dropout", 2, lambda n, cls=cls: cls(_arg(n, 1, "p", 0.5)))
        for fn, cls in DROPOUT_FUNCTIONS.items()
    }
    vision = sys.modules.get("torchvision.ops")  # a model calling it has imported it
    if vision is not None and hasattr(vision, "stochastic_depth"):
        table[vision.stochastic_depth] = (
            "stochastic_depth",
            3,
            lambda n: vision.StochasticDepth(_arg(n, 1, "p", None), _arg(n, 2, "mode", None)),
        )
    return table


def _same_args(a: tuple[Any, dict[str, Any]], b: tuple[Any, dict[str, Any]]) -> bool:
    """Whether two calls of the train and eval traces have the same ``(args, kwargs)`` (nodes
    compared by name: both traces name them alike)."""

    def plain(x: Any) -> Any:
        return fx.node.map_arg(x, lambda n: ("node", n.name))

    try:
        return bool(plain(a[0]) == plain(b[0]) and plain(a[1]) == plain(b[1]))
    except Exception:  # values that do not compare (tensors): treated as different
        return False


def _follows_mode(a: fx.Node, b: fx.Node, position: int) -> bool:
    """``a`` (train trace) and ``b`` (eval trace) differ only by ``training=True``/``False``."""
    if _arg(a, position, "training", True) is not True:
        return False
    if _arg(b, position, "training", True) is not False:
        return False

    def rest(n: fx.Node) -> tuple[Any, dict[str, Any]]:
        args = tuple(x for i, x in enumerate(n.args) if i != position)
        return args, {k: v for k, v in n.kwargs.items() if k != "training"}

    return len(a.args) == len(b.args) and _same_args(rest(a), rest(b))


def _describe_call(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or target
    mod = getattr(target, "__module__", "") or ""
    return f"{mod + '.' if mod else ''}{name} (node {node.name!r})"


def trace_both_modes(
    model: nn.Module,
    leaf_types: Iterable[type] = (),
    make_tracer: Callable[[Iterable[type]], fx.Tracer] = GrowthTracer,
) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """Trace ``model`` so that ``F.dropout(x, training=self.training)`` keeps following the mode.

    torch.fx evaluates ``self.training`` at trace time and bakes it into the graph. The model is
    traced in train and in eval mode; each functional dropout (and ``torchvision.ops.
    stochastic_depth``) whose ``training`` argument differs between the two becomes the
    equivalent module (returned, to be registered under ``functional``; it has no parameters, so
    names and ``state_dict`` are unchanged). When the two traces differ in anything else (the
    graph, or any other call's arguments), the graph of the model's current mode is used and a
    warning says that it is fixed to that mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        train_graph = trace(model, leaf_types, make_tracer)
        model.eval()
        eval_graph = trace(model, leaf_types, make_tracer)
    finally:
        for m, mode in modes:
            m.training = mode
    train_nodes, eval_nodes = list(train_graph.nodes), list(eval_graph.nodes)
    same_structure = len(train_nodes) == len(eval_nodes) and all(
        (a.op, a.target) == (b.op, b.target) for a, b in zip(train_nodes, eval_nodes)
    )
    table = _mode_functions()
    follows: list[fx.Node] = []
    differs: list[fx.Node] = []
    for a, b in zip(train_nodes, eval_nodes) if same_structure else ():
        if _same_args((a.args, a.kwargs), (b.args, b.kwargs)):
            continue
        entry = table.get(a.target) if a.op == "call_function" else None
        if entry is not None and _follows_mode(a, b, entry[1]):
            follows.append(a)
        else:
            differs.append(a)
    if not same_structure or differs:
        if same_structure:
            calls = ", ".join(_describe_call(n) for n in differs[:3])
            what = f"forward passes self.training (or another mode-dependent value) to {calls}"
        else:
            what = "forward branches on self.training"
        warnings.warn(
            f"{type(model).__name__}.{what}; the traced graph follows "
            f"{'train' if model.training else 'eval'} mode only. Make the module that does so a "
            f"leaf (leaf_modules=[...]) to keep both behaviours.",
            stacklevel=3,
        )
        return (train_graph if model.training else eval_graph), {}
    modules: dict[str, nn.Module] = {}
    counts: dict[str, int] = {}
    for a in follows:
        stem, _, build = table[a.target]
        name = f"{stem}{counts.get(stem, 0)}"
        counts[stem] = counts.get(stem, 0) + 1
        modules[name] = build(a)
        with train_graph.inserting_after(a):
            new = train_graph.call_module(f"{FUNCTIONAL_CONTAINER}.{name}", (a.args[0],))
        a.replace_all_uses_with(new)
        train_graph.erase_node(a)
    return train_graph, modules


def fetch_path(root: Any, target: str) -> Any:
    """The object at dotted ``target`` below ``root``, submodules first: a child module named
    like an attribute of its parent's class (``nn.TransformerEncoder.layers`` adopted by a
    ``GrowableNetwork``, whose ``layers`` lists layer names) is still found."""
    obj = root
    for atom in target.split(".") if target else ():
        children = obj.__dict__.get("_modules", {}) if hasattr(obj, "__dict__") else {}
        obj = children[atom] if atom in children else getattr(obj, atom)
    return obj


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each tensor-valued node's shape in ``node.meta['shape']``."""

    def fetch_attr(self, target: str) -> Any:
        return fetch_path(self.module, target)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        if isinstance(result, torch.Tensor):
            n.meta["dtype"] = result.dtype
        return result
