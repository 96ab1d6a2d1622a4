"""``GrowableNetwork``: a traced model that can be widened and deepened, function preserved."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, fx, nn
from torch.utils.hooks import RemovableHandle

from . import deepen, limits, widen
from . import protect as _protect
from .analysis import ChannelAnalysis, analyse
from .arguments import (
    as_inputs,
    check_common,
    check_deepen_options,
    check_network_options,
    check_new_unit_options,
    check_widen_options,
    probe_failure,
    target_width,
)
from .block import insert_block
from .changes import GrowthChanges, GrowthHook
from .concrete_tracing import tracer_factory
from .errors import GrowthError
from .heads import head_target
from .mapping import identity_mapping
from .record import GrowthRecord
from .rules import module_rule_for
from .tracing import FUNCTIONAL_CONTAINER, trace_both_modes
from .transaction import Transaction
from .verify import DEFAULT_TOLERANCE, run_probe

_PROBE_PREFIX = "_probe_"


class _ChildrenFirst:
    """What the generated forward code sees as ``self``: submodules first, then the network."""

    __slots__ = ("_net",)

    def __init__(self, net: nn.Module) -> None:
        self._net = net

    def __getattr__(self, name: str) -> Any:
        child = self._net._modules.get(name)
        return child if child is not None else getattr(self._net, name)


class GrowableNetwork(nn.Module):
    """A PyTorch model traced into a layer graph that can grow without changing its function.

    Parameters
    ----------
    model : nn.Module
        The model to grow. Its modules are adopted, not copied: parameter names stay those of
        ``model`` (``net.state_dict()`` has the same keys), and after growth the
        ``GrowableNetwork`` is the model to use.
    example_inputs : Tensor or tuple of Tensor
        A batch of inputs like the model's. Shapes are read from it, and up to ``probe_size`` of
        its samples are kept (on the network's device) as the probe batch of verification.
    tolerance : float
        Largest accepted output change of a verified operation, relative to the output scale.
    leaf_modules : iterable of types
        Module types not to trace into (modules with data-dependent control flow). Those without
        a growth rule block growth of the units they read.
    probe_size : int
        Number of samples kept for verification.
    tracer : {"auto", "fx", "concrete"} or callable
        How the model is traced. ``"fx"``: plain ``torch.fx``. ``"concrete"``: traced while it
        runs on ``example_inputs``, so Python decisions on shapes or settings (Hugging Face
        models) are taken on the example and fixed in the graph; later ``forward`` parameters
        keep their defaults. ``"auto"`` (default): concrete for Hugging Face ``transformers``
        models, else fx. Or a ``GrowthTracer`` subclass (any ``leaf_types -> fx.Tracer``).
    """

    #: Plain attributes of a subclass that checkpoints store and restore (numbers, strings,
    #: tuples, sets): state the subclass gathers while it is used.
    checkpoint_state: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor | Sequence[Tensor],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        leaf_modules: Iterable[type] = (),
        probe_size: int = 16,
        tracer: Any = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GrowthError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, GrowableNetwork):
            raise GrowthError("model is already a GrowableNetwork: grow it directly")
        inputs = as_inputs(example_inputs)
        probe_size, leaf_modules = check_network_options(tolerance, probe_size, leaf_modules)
        make_tracer = tracer_factory(tracer, model, inputs)
        graph, functional = trace_both_modes(model, leaf_modules, make_tracer)
        if functional:
            container = nn.Module()
            for name, module in functional.items():
                container.add_module(name, module)
            container.train(model.training)
            self.add_module(FUNCTIONAL_CONTAINER, container)
        self._setup(model, graph, inputs, tolerance, probe_size, [], diagnose=True)

    @classmethod
    def from_graph(
        cls,
        root: nn.Module,
        graph: fx.Graph,
        probe: Sequence[Tensor],
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        history: Sequence[GrowthRecord] = (),
    ) -> GrowableNetwork:
        """Rebuild a network from a module tree and a graph over it (used by checkpoints).

        ``root`` holds every module the graph calls, at the graph's target paths (plain
        ``nn.Module`` containers are fine); nothing is traced again.
        """
        net = cls.__new__(cls)
        super(GrowableNetwork, net).__init__()  # the next class in the MRO, as __init__ does
        net._setup(root, graph, tuple(probe), tolerance, len(probe[0]), list(history))
        return net

    def _setup(
        self,
        model: nn.Module,
        graph: fx.Graph,
        inputs: tuple[Tensor, ...],
        tolerance: float,
        probe_size: int,
        history: list[GrowthRecord],
        diagnose: bool = False,
    ) -> None:
        self.training = model.training
        self.tolerance = float(tolerance)
        self.model_class = type(model).__name__
        self.history: list[GrowthRecord] = history
        self._graph = graph
        self._adopt(model)
        device = next((p.device for p in self.parameters()), inputs[0].device)
        for i, t in enumerate(inputs):
            self.register_buffer(
                f"{_PROBE_PREFIX}{i}", t[:probe_size].detach().clone().to(device), persistent=False
            )
        self._analysis: ChannelAnalysis | None = None
        self._growth_hooks: OrderedDict[int, GrowthHook] = OrderedDict()
        self._recompile()
        try:
            run_probe(self)
        except Exception as exc:
            if not diagnose:
                raise
            raise GrowthError(probe_failure(model, self.probe, exc)) from exc
        _protect.attach(self)  # protection state brought back by a checkpoint is active again

    def register_growth_hook(self, hook: GrowthHook) -> RemovableHandle:
        """Call ``hook(record, changes)`` after every successful widen/deepen.

        ``changes`` (:class:`~growth.changes.GrowthChanges`) tells how each parameter grew, so that
        tensors kept elsewhere (importances, moving averages) can follow. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._growth_hooks)
        self._growth_hooks[handle.id] = hook
        return handle

    def copy_without_hooks(self) -> GrowableNetwork:
        """A deep copy with no growth hooks: nothing registered on this network sees the copy
        grow (trial growth, frozen teachers). The hooks are not copied at all."""
        return copy.deepcopy(self, {id(self._growth_hooks): OrderedDict()})

    @contextmanager
    def _atomic(self) -> Iterator[Transaction]:
        """All changes made through the yielded transaction are undone if the block raises."""
        tx = Transaction()
        try:
            yield tx
        except BaseException:
            tx.rollback()
            self._recompile()
            run_probe(self)
            raise

    def _commit(
        self,
        op: str,
        name: str,
        widths: tuple[int, int],
        params_before: int,
        start: float,
        outcome: tuple[float | None, dict[str, Any], GrowthChanges],
    ) -> GrowthRecord:
        """Record a finished operation (begun at ``time.perf_counter()`` ``start``, on a network
        of ``params_before`` parameters) and tell the growth hooks."""
        max_abs_error, details, changes = outcome
        record = GrowthRecord(
            op=op,
            layer=name,
            old_width=widths[0],
            new_width=widths[1],
            params_before=params_before,
            params_after=self.num_parameters(),
            max_abs_error=max_abs_error,
            seconds=time.perf_counter() - start,
            details=details,
        )
        self._analysis = None
        self.history.append(record)
        for hook in list(self._growth_hooks.values()):
            hook(record, changes)
        return record

    # --- structure -----------------------------------------------------------------------------
    def _adopt(self, model: nn.Module) -> None:
        """Take ``model``'s children, parameters and buffers as this module's own."""
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        for node in self._graph.nodes:
            if node.op == "get_attr" and "." not in str(node.target):
                value = getattr(model, str(node.target))
                if not hasattr(self, str(node.target)):
                    if isinstance(value, Tensor):
                        self.register_buffer(str(node.target), value)
                    else:
                        setattr(self, str(node.target), value)

    def _recompile(self) -> None:
        self._graph.lint()
        code = self._graph.python_code(root_module="self")
        namespace: dict[str, Any] = dict(code.globals)
        exec(compile(code.src, f"<net2grow:{self.model_class}>", "exec"), namespace)
        self.__dict__["_forward_fn"] = namespace["forward"]
        self.__dict__["code"] = code.src
        # children named like an attribute of this class (nn.TransformerEncoder's ``layers``):
        # the generated code reaches them through a view that looks up submodules first
        clash = any(hasattr(type(self), n) for n in self._modules)
        self.__dict__["_root_view"] = _ChildrenFirst(self) if clash else None
        self._analysis = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.__dict__["_forward_fn"](self.__dict__.get("_root_view") or self, *args, **kwargs)
        if self.training and _protect.CONTAINER in self._modules:
            _protect.after_forward(self)  # frozen BatchNorm statistics are written back
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_forward_fn", None)
        state.pop("_root_view", None)
        state["_analysis"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._recompile()
        _protect.attach(self)  # copies (deepcopy, pickle) keep their protection active

    def get_submodule(self, target: str) -> nn.Module:
        """Like ``nn.Module.get_submodule``, but children first: a child named like an
        attribute of this class (``layers``) is found under its own name."""
        head, _, rest = target.partition(".")
        child = self._modules.get(head) if head else None
        if child is None:
            return super().get_submodule(target)
        return child.get_submodule(rest) if rest else child

    @property
    def graph(self) -> fx.Graph:
        """The traced layer graph (read it; change the network only through widen/deepen)."""
        return self._graph

    @property
    def probe(self) -> tuple[Tensor, ...]:
        probes = [
            (n, b) for n, b in self.named_buffers(recurse=False) if n.startswith(_PROBE_PREFIX)
        ]
        return tuple(b for _, b in sorted(probes, key=lambda nb: int(nb[0][len(_PROBE_PREFIX) :])))

    @property
    def analysis(self) -> ChannelAnalysis:
        if self._analysis is None:
            self._analysis = analyse(self, self._graph)
        return self._analysis

    # --- queries -------------------------------------------------------------------------------
    def _layer_rule(self, name: str):
        if not isinstance(name, str):
            raise GrowthError(f"layer name must be a str, got {type(name).__name__}")
        if name not in self.analysis.module_nodes:
            try:
                self.get_submodule(name)
                where = "is not called in forward"
            except AttributeError:
                where = "is not a module of this network"
            hint = ", ".join(self.layers[:8]) or "none"
            raise GrowthError(f"unknown layer {name!r}: it {where}. Growable layers: {hint}")
        module = self.get_submodule(name)
        rule = module_rule_for(module)
        if rule is None or not rule.is_layer:
            raise GrowthError(
                f"{name!r} ({type(module).__name__}) is not a layer whose width can be chosen; "
                f"widen the Linear/Conv layer that produces its input"
            )
        return module, rule

    def _group_of(self, name: str) -> tuple[int, int]:
        """(space group, positions per unit) of layer ``name``'s output."""
        layout = self.analysis.layouts[self.analysis.module_nodes[name][0]]
        if layout is None or len(layout.segments) != 1:
            raise GrowthError(f"layer {name!r} has no single growable output")
        seg = layout.segments[0]
        return self.analysis.spaces.find(seg.space), seg.expand

    def _blocked_reason(self, name: str) -> tuple[str, type[GrowthError]] | None:
        self._group_of(name)  # refuses layers without a single growable output
        seg = self.analysis.layouts[self.analysis.module_nodes[name][0]].segments[0]
        return self.analysis.blocked(seg.space)

    @property
    def layers(self) -> list[str]:
        """Names of the layers whose output width can grow, in graph order."""
        names = []
        for name in self.analysis.module_nodes:
            rule = module_rule_for(self.get_submodule(name))
            if rule is not None and rule.is_layer:
                try:
                    group, _ = self._group_of(name)
                except GrowthError:
                    continue
                if self.analysis.spaces.first_block(group) is None:
                    names.append(name)
        return names

    def width(self, name: str) -> int:
        """Current number of output units (features / channels) of layer ``name``."""
        module, rule = self._layer_rule(name)
        return int(rule.width(module))

    def coupled_layers(self, name: str) -> list[str]:
        """Layers whose parameters change when ``name`` is widened (``name`` included)."""
        self._layer_rule(name)
        group, _ = self._group_of(name)
        mapping = identity_mapping(self.analysis.spaces.info(group).width, torch.device("cpu"))
        return [n for n, _, _ in widen.plan_updates(self, self.analysis, group, mapping)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- widen ---------------------------------------------------------------------------------
    def widen(
        self,
        name: str,
        width: int | None = None,
        *,
        factor: float | None = None,
        init: str | None = None,
        split: str = "random",
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        verify: bool = True,
        max_growth_bytes: float | None = None,
        protect: str | None = None,
        optimizer_state: str = "scale",
        batch: Any = None,
        loss_fn: Any = None,
    ) -> GrowthRecord:
        """Net2WiderNet: give layer ``name`` ``width`` outputs (or ``factor`` times as many).

        Every layer coupled to ``name`` through the graph follows with the same unit mapping.
        ``init="net2net"`` (exact): each new unit copies an existing one, and the copies share
        their source's outgoing weights, in random shares (``split="random"``, so that copies
        learn apart) or equal ones (``split="equal"``, the paper's division); ``noise`` adds
        Gaussian noise of that scale, relative to the weights' spread, to the copies' incoming
        weights (it breaks their symmetry; verification allows for the change it makes).
        ``init="zero"`` (exact): new units get random incoming and zero outgoing weights.
        ``init="random"``: both random (the paper's random pad; not exact, not verified).
        ``init="gradmax"`` (exact): zero incoming weights and a small bias, outgoing weights
        along the directions of largest gradient on ``batch=(inputs, targets)`` under
        ``loss_fn`` (default cross-entropy). ``init="vt"`` (exact): new units in pairs with
        shared incoming and opposite outgoing weights (Variance Transfer). Both are always
        verified; see :mod:`growth.initializers` for what they support.
        ``generator`` draws the mapping and every random value (reproducible growth). With
        ``optimizer`` its state is carried over: old units keep theirs, and
        ``optimizer_state`` says what new units get (:data:`growth.optim.NEW_UNIT_STATES`:
        ``"scale"``, copies get their source's state scaled like their gradient, fresh units
        zero; ``"copy"``, copies get it unscaled; ``"zero"``, every new unit zero). On any
        refusal (``GrowthError``) the network and optimizer are left as they were.

        An operation that would allocate more than ``max_growth_bytes`` (default
        ``growth.limits.MAX_GROWTH_BYTES``, 8 GiB; new tensors, optimizer state and index maps,
        counted from the planned shapes) is refused before anything is allocated.

        Protected growth (continual learning, see :meth:`protect`): ``protect="lateral"`` or
        ``"independent"`` first freezes the current units of ``name`` (and of the layers coupled
        to it), then widens; a refusal undoes both. On a protected network ``init`` defaults to
        ``"zero"``, and any other ``init`` is refused when the operation touches frozen units.
        """
        start, params_before = time.perf_counter(), self.num_parameters()
        old_width = self.width(name)
        new_width = target_width(name, old_width, width, factor)
        limit = limits.resolve_limit(max_growth_bytes)
        if protect is not None:
            _protect.check_mode(protect)
        if init is None:
            protected = protect is not None or _protect.is_protected(self)
            init = "zero" if protected else "net2net"
        check_widen_options(init, split, noise, generator)
        check_new_unit_options(init, optimizer_state, batch)
        check_common(optimizer, verify)
        undo = None if protect is None else _protect.freeze(self, protect, [name], activate=False)
        try:
            outcome = widen.widen(
                self,
                name,
                new_width,
                init=init,
                split=split,
                noise=float(noise),
                generator=generator,
                optimizer=optimizer,
                verify=verify,
                limit=limit,
                optimizer_state=optimizer_state,
                batch=batch,
                loss_fn=loss_fn,
            )
        except BaseException:
            if undo is not None:
                undo.rollback()
            raise
        if _protect.is_protected(self):
            _protect.attach(self)  # gradient masks for tensors protected by this operation
            outcome[1]["protect"] = _protect.mode(self)
        return self._commit("widen", name, (old_width, new_width), params_before, start, outcome)

    def widen_heads(
        self,
        name: str,
        *,
        heads: int | None = None,
        head_dim: int | None = None,
        init: str = "net2net",
        split: str = "random",
        generator: torch.Generator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        verify: bool = True,
        optimizer_state: str = "scale",
    ) -> GrowthRecord:
        """Grow the attention heads made by layer ``name`` (a q, k or v projection, or a fused
        qkv one, read by ``F.scaled_dot_product_attention`` through a view into heads).

        ``heads``: the new number of heads (per projection); new heads copy existing ones and
        split their output-projection columns (``init="net2net"``), or are random with zero
        output-projection columns (``init="zero"``). ``head_dim``: the new width of every
        head; new positions copy positions of the same head, scaled so that every attention
        score keeps its value (``init="net2net"`` only, and only where q, k, v go straight
        from ``Linear`` layers into the attention). Give one of them. ``net.widen(name,
        width)`` on such a layer adds heads (``width`` a multiple of the head width). The
        other arguments are ``widen``'s; a refusal (``GrowthError``) changes nothing.
        """
        start, params_before = time.perf_counter(), self.num_parameters()
        old_width = self.width(name)
        new_width, mode = head_target(self, name, heads, head_dim)
        check_widen_options(init, split, 0.0, generator)
        check_new_unit_options(init, optimizer_state, None)
        check_common(optimizer, verify)
        outcome = widen.widen(
            self,
            name,
            new_width,
            init=init,
            split=split,
            noise=0.0,
            generator=generator,
            optimizer=optimizer,
            verify=verify,
            limit=limits.resolve_limit(None),
            optimizer_state=optimizer_state,
            heads=mode,
        )
        return self._commit("widen", name, (old_width, new_width), params_before, start, outcome)

    def protect(self, mode: str = "lateral", layers: Iterable[str] | None = None) -> list[str]:
        """Freeze every current unit of ``layers`` (default: every growable layer; the output
        layer is not one) for continual learning; returns the layers whose units are frozen.

        A frozen unit's incoming weights, bias and per-channel state (BatchNorm affine
        parameters and running statistics) never change again: their gradients are masked, and
        after every step of any ``torch.optim`` optimizer (Adam's moments, momentum, AdamW's
        decoupled weight decay included) and every training-mode forward, the frozen values are
        written back. Widen afterwards (``init="zero"``, the default on a protected network) to
        give the next experience fresh units. ``mode``:

        - ``"lateral"`` (Progressive-Networks-like): new units read old and new units; old
          units never read new ones (those weights are zero and stay zero), so every old unit
          computes exactly what it did before;
        - ``"independent"`` (DER-like): new units also read no frozen unit (block-diagonal
          growth; those weights are zero and stay zero), except the network's input. Widen
          producers before their readers (``net2grow.growth.protect.growth_order``).

        Call it again at the next growth step: the previous new units become frozen too. The
        state lives in ``self.protection`` (buffers: checkpoints keep it, and ``load`` brings it
        back active); ``net2grow.growth.protect`` has queries (``frozen_units``,
        ``violations``) and ``release``. On a refusal (``GrowthError``: a layer whose state
        cannot be frozen per unit, another mode than the network's) nothing changes.
        """
        names = list(self.layers) if layers is None else list(layers)
        _protect.freeze(self, mode, names)
        box = _protect.state(self)
        if box is None:
            return []
        return [n for n, _ in box.units.named_buffers()]

    # --- deepen --------------------------------------------------------------------------------
    def deepen(
        self,
        name: str,
        *,
        kind: str = "identity",
        activation: nn.Module | None = None,
        verify: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        max_growth_bytes: float | None = None,
    ) -> GrowthRecord:
        """Net2DeeperNet: insert a new layer after ``name`` (and its BatchNorm/activation).

        ``kind="identity"``: a layer of the same kind initialised to the identity, followed by a
        copy of ``name``'s activation (or ``activation``); exact when that activation is
        idempotent on its inputs (ReLU after ReLU), otherwise refused. ``kind="residual"``:
        ``x + layer2(act(layer1(x)))`` with ``layer2`` zero, exact for every activation.
        No BatchNorm is inserted, so both kinds are exact in eval and in train mode.
        ``kind="block"``: ``name`` is a pre-norm residual block (a transformer block: ``x +
        attn(norm(x))``, then ``+ ffn(norm(x))``); a copy of it whose output projections are
        zero is inserted after it (the identity, in eval and train mode). Post-norm blocks are
        refused.
        New modules live under the top-level ``grown`` module; existing names never change.
        With ``optimizer``, the new parameters join the param group of ``name``'s weight.
        New layers needing more than ``max_growth_bytes`` (default
        ``net2grow.growth.limits.MAX_GROWTH_BYTES``) are refused before they are built.
        """
        start, params_before = time.perf_counter(), self.num_parameters()
        if kind == "block":
            check_deepen_options(name, kind, activation)
            check_common(optimizer, verify)
            width, outcome = insert_block(
                self,
                name,
                verify=verify,
                optimizer=optimizer,
                limit=limits.resolve_limit(max_growth_bytes),
            )
            return self._commit("deepen", name, (width, width), params_before, start, outcome)
        width = self.width(name)
        check_deepen_options(name, kind, activation)
        _protect.check_deepen(self, name)
        limit = limits.resolve_limit(max_growth_bytes)
        check_common(optimizer, verify)
        outcome = deepen.deepen(
            self,
            name,
            kind=kind,
            activation=activation,
            verify=verify,
            optimizer=optimizer,
            limit=limit,
        )
        return self._commit("deepen", name, (width, width), params_before, start, outcome)

    # --- reporting -----------------------------------------------------------------------------
    def summary(self) -> str:
        """Layers, widths, parameter counts and growth so far, as a text table."""
        rows = [("layer", "type", "width", "params")]
        for name in self.analysis.module_nodes:
            module = self.get_submodule(name)
            rule = module_rule_for(module)
            if rule is None or not rule.is_layer:
                continue
            n = sum(p.numel() for p in module.parameters())
            grow = "" if name in self.layers else " (fixed)"
            rows.append((name, type(module).__name__, f"{rule.width(module)}{grow}", f"{n:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total parameters: {self.num_parameters():,}")
        if self.history:
            lines.append(f"growth so far ({len(self.history)} operations):")
            for i, rec in enumerate(self.history, 1):
                err = (
                    "unverified"
                    if rec.max_abs_error is None
                    else f"max err {rec.max_abs_error:.2g}"
                )
                lines.append(
                    f"  {i}. {rec.op} {rec.layer}: {rec.old_width} -> {rec.new_width}, "
                    f"params {rec.params_before:,} -> {rec.params_after:,}, {err}, "
                    f"{rec.seconds * 1e3:.1f} ms"
                )
        return "\n".join(lines)
