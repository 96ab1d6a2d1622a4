"""Tracing a model into a ``torch.fx`` graph whose leaves are the layers that have growth rules."""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import torch
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


class ShapeRecorder(fx.Interpreter):
    """Runs the graph once and stores each tensor-valued node's shape in ``node.meta['shape']``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = tuple(result.shape) if isinstance(result, torch.Tensor) else None
        if isinstance(result, torch.Tensor):
            n.meta["dtype"] = result.dtype
        return result


@torch.no_grad()
def record_shapes(root: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...]) -> None:
    """Annotate ``graph`` with tensor shapes by running it in eval mode on ``inputs``."""
    modes = {m: m.training for m in root.modules()}
    root.eval()
    try:
        ShapeRecorder(root, graph=graph).run(*inputs)
    except Exception as exc:
        raise TraceError(
            f"running the traced graph on example_inputs failed: {type(exc).__name__}: {exc}. "
            f"Check that example_inputs match what the model's forward expects."
        ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
