"""Tracing with example values: models whose control flow depends on shapes or configuration.

Plain ``torch.fx`` tracing fails on code such as Hugging Face ``transformers`` models: their
``forward`` takes ``*args, **kwargs`` through decorators, tests tensor shapes (``if q_len >
1``), unpacks shapes (``(*input_shape, -1, head_dim)``) and probes attributes (``hasattr(x,
"jax")``). :class:`ConcreteTracer` runs the model on the example inputs while it traces: every
traced value also carries its real value, so Python-level decisions (``bool``, ``len``,
iteration, ``hasattr``) are taken on the example and fixed in the graph, while tensor
operations, shapes fed to ``view``/``arange``, and slices stay symbolic. Only the given inputs
become graph inputs: every later ``forward`` parameter keeps its default.

The graph is valid for inputs that take the same decisions as the example (for a language
model: any batch and sequence length above one, no attention mask).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate

from .errors import GrowthError
from .tracing import GrowthTracer

#: ``GrowableNetwork(tracer=...)`` names.
TRACERS = ("auto", "fx", "concrete")


class ConcreteProxy(fx.Proxy):
    """A proxy whose ``len`` is that of its example value."""

    def __len__(self) -> int:
        return len(self.node.meta["value"])


class ConcreteTracer(GrowthTracer):
    """:class:`GrowthTracer` that evaluates every node on the example inputs while tracing."""

    def __init__(self, leaf_types: Iterable[type] = (), *, inputs: Sequence[Tensor] = (),
                 fixed: dict[str, Any] | None = None) -> None:
        super().__init__(leaf_types)
        self.example_inputs = tuple(inputs)
        self.fixed = dict(fixed or {})  # keyword arguments passed to forward as constants
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes stay symbolic
        self._placeholders = 0
        self._evaluating = False

    # --- graph inputs: only the given ones, by name -------------------------------------------
    def create_args_for_root(self, root_fn: Any, is_module: bool,
                             concrete_args: Any = None) -> Any:
        params = list(inspect.signature(root_fn).parameters.values())[1 if is_module else 0:]
        named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(named) < len(self.example_inputs):
            raise GrowthError(
                f"forward takes {len(named)} positional inputs, example_inputs has "
                f"{len(self.example_inputs)}: pass one tensor per forward input"
            )
        names = [p.name for p in named[: len(self.example_inputs)]]
        fixed = {k: v for k, v in self.fixed.items() if k in {p.name for p in params}}
        self.input_names = names
        call = ", ".join([f"{n}={n}" for n in names] + [f"{k}=fixed[{k!r}]" for k in fixed])
        src = f"def forward(self, {', '.join(names)}):\n    return root_fn(self, {call})\n"
        namespace: dict[str, Any] = {"root_fn": root_fn, "fixed": fixed}
        exec(src, namespace)
        return super().create_args_for_root(namespace["forward"], is_module, concrete_args)

    # --- every node also gets its example value -----------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any,
                     name: str | None = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> fx.Proxy:
        # the value first: an attribute probe that fails (hasattr) leaves no node behind
        value = self._evaluate(kind, target, map_aggregate(args, _value),
                               map_aggregate(kwargs, _value))
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        proxy.node.meta["value"] = value
        return proxy

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        self._evaluating = True
        try:
            with torch.no_grad():
                if kind == "placeholder":
                    self._placeholders += 1
                    return self.example_inputs[self._placeholders - 1]
                if kind == "get_attr":
                    return functools.reduce(getattr, str(target).split("."), self.root)
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
                return None
        finally:
            self._evaluating = False

    # while a value is computed, modules run as themselves (no nodes recorded)
    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # --- Python decisions are taken on the example ---------------------------------------------
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(obj.node.meta["value"])

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        return iter([obj[i] for i in range(len(obj.node.meta["value"]))])

    def keys(self, obj: fx.Proxy) -> Any:
        return obj.node.meta["value"].keys()


def _value(arg: Any) -> Any:
    if isinstance(arg, fx.Proxy):
        return arg.node.meta["value"]
    if isinstance(arg, fx.Node):
        return arg.meta["value"]
    return arg


def is_huggingface(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model."""
    return type(model).__module__.startswith("transformers.")


def tracer_factory(tracer: Any, model: nn.Module,
                   inputs: Sequence[Tensor]) -> Callable[[Iterable[type]], fx.Tracer]:
    """``leaf_types -> fx.Tracer`` for ``GrowableNetwork(tracer=...)``.

    ``"fx"``: plain ``torch.fx``. ``"concrete"``: :class:`ConcreteTracer` on ``inputs``.
    ``"auto"``: concrete for Hugging Face models, else fx. A callable (a :class:`GrowthTracer`
    subclass, or any ``leaf_types -> fx.Tracer``) is used as it is. Hugging Face models are
    traced with ``use_cache=False``: a key/value cache is state across calls, not a function of
    the inputs.
    """
    if callable(tracer) and not isinstance(tracer, str):
        return tracer
    if tracer not in TRACERS:
        raise GrowthError(
            f"tracer must be one of {', '.join(map(repr, TRACERS))} or a GrowthTracer subclass, "
            f"got {tracer!r}"
        )
    if tracer == "concrete" or (tracer == "auto" and is_huggingface(model)):
        fixed = {"use_cache": False} if is_huggingface(model) else {}
        return functools.partial(ConcreteTracer, inputs=inputs, fixed=fixed)
    return GrowthTracer
