"""Tracing a model into a ``torch.fx`` graph whose leaves are the layers that have growth rules."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import TraceError


class GrowthTracer(fx.Tracer):
    """``torch.fx`` tracer that keeps modules with growth rules (and any user leaves) whole."""

    def __init__(self, leaf_types: Iterable[type] = ()) -> None:
        super().__init__()
        self.extra_leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from .rules import module_rule_for

        if self.extra_leaf_types and isinstance(m, self.extra_leaf_types):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if module_rule_for(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _failing_user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's call that broke tracing."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/growth/" not in f.filename]
    if not user:
        return "unknown location"
    f = user[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


def trace(model: nn.Module, leaf_types: Iterable[type] = ()) -> fx.Graph:
    """Symbolically trace ``model``; raise :class:`TraceError` naming the failing call."""
    tracer = GrowthTracer(leaf_types)
    try:
        return tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        where = _failing_user_frame(exc)
        raise TraceError(
            f"could not trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}. "
            f"The failing call: {where}. Make the module that contains it a leaf "
            f"(GrowableNetwork(model, example_inputs, leaf_modules=[ThatModuleType])) or remove "
            f"data-dependent control flow from its forward."
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


def _training_arg(node: fx.Node) -> Any:
    return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)


def trace_both_modes(
    model: nn.Module, leaf_types: Iterable[type] = ()
) -> tuple[fx.Graph, dict[str, nn.Module]]:
    """Trace ``model`` so that ``F.dropout(x, training=self.training)`` keeps following the mode.

    torch.fx evaluates ``self.training`` at trace time and bakes it into the graph. The model is
    traced in train and in eval mode; each functional dropout whose ``training`` argument differs
    between the two becomes an ``nn.Dropout`` module (returned, to be registered under
    ``functional``; it has no parameters, so names and ``state_dict`` are unchanged). When the two
    traces differ in anything else, the graph of the model's current mode is used and a warning
    says that it is fixed to that mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        train_graph = trace(model, leaf_types)
        model.eval()
        eval_graph = trace(model, leaf_types)
    finally:
        for m, mode in modes:
            m.training = mode
    train_nodes, eval_nodes = list(train_graph.nodes), list(eval_graph.nodes)
    same_structure = len(train_nodes) == len(eval_nodes) and all(
        (a.op, a.target) == (b.op, b.target) for a, b in zip(train_nodes, eval_nodes)
    )
    if not same_structure:
        warnings.warn(
            f"{type(model).__name__}.forward branches on self.training; the traced graph follows "
            f"{'train' if model.training else 'eval'} mode only. Make the branching module a "
            f"leaf (leaf_modules=[...]) to keep both behaviours.",
            stacklevel=3,
        )
        return (train_graph if model.training else eval_graph), {}
    modules: dict[str, nn.Module] = {}
    for a, b in zip(train_nodes, eval_nodes):
        if a.op != "call_function" or a.target not in DROPOUT_FUNCTIONS:
            continue
        if _training_arg(a) is True and _training_arg(b) is False:
            p = a.kwargs.get("p", a.args[1] if len(a.args) > 1 else 0.5)
            name = f"dropout{len(modules)}"
            modules[name] = DROPOUT_FUNCTIONS[a.target](p)
            with train_graph.inserting_after(a):
                new = train_graph.call_module(f"{FUNCTIONAL_CONTAINER}.{name}", (a.args[0],))
            a.replace_all_uses_with(new)
            train_graph.erase_node(a)
    return train_graph, modules


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each tensor-valued node's shape in ``node.meta['shape']``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        if isinstance(result, torch.Tensor):
            n.meta["dtype"] = result.dtype
        return result
