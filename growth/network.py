"""``GrowableNetwork``: a traced model that can be widened and deepened, function preserved."""

from __future__ import annotations

import copy
import math
import numbers
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, fx, nn
from torch.utils.hooks import RemovableHandle

from . import limits
from . import optim as optim_state
from .analysis import ChannelAnalysis, analyse
from .deepen import (
    KINDS,
    channel_stats,
    check_identity_exact,
    find_chain,
    identity_norm,
    insert_after,
)
from .errors import REGISTER_HINT, FunctionNotPreservedError, GrowthError, UnsupportedLayerError
from .hooks import GrowthChanges, GrowthHook
from .mapping import SPLITS, build_unit_mapping, grown_layout
from .random import DeviceGenerators
from .record import GrowthRecord
from .rules import module_rule_for
from .tracing import FUNCTIONAL_CONTAINER, ShapeRecorder, trace_both_modes
from .transaction import Transaction
from .transform import INITS
from .verify import (
    DEFAULT_TOLERANCE,
    allowed_error,
    eval_mode,
    exact_float32,
    output_difference,
)
from .widen import compute_values, growth_bytes, plan_updates, resolve

_PROBE_PREFIX = "_probe_"


#: Largest width ``widen`` accepts: no tensor dimension can be longer (torch indexes in int64).
_MAX_UNITS = 2**62


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """``example_inputs`` as a tuple of tensors, each with a non-empty batch dimension."""
    fix = (
        "pass a batch of real inputs like the model's, e.g. example_inputs=torch.randn(16, 4) for "
        "a model taking (batch, 4) tensors, or a tuple of tensors for several inputs"
    )
    if isinstance(example_inputs, Tensor):
        inputs: tuple[Tensor, ...] = (example_inputs,)
    elif isinstance(example_inputs, (list, tuple)):
        if not example_inputs:
            raise GrowthError(f"example_inputs is an empty {type(example_inputs).__name__}: {fix}")
        for i, t in enumerate(example_inputs):
            if not isinstance(t, Tensor):
                raise GrowthError(
                    f"example_inputs[{i}] is a {type(t).__name__}, not a tensor: {fix} "
                    f"(non-tensor arguments cannot be traced as inputs; set them in the model)"
                )
        inputs = tuple(example_inputs)
    else:
        raise GrowthError(
            "example_inputs must be a tensor or a tuple of tensors shaped like the model's inputs "
            f"(with a batch dimension), got {type(example_inputs).__name__}: {fix}"
        )
    for i, t in enumerate(inputs):
        where = "example_inputs" if len(inputs) == 1 else f"example_inputs[{i}]"
        if t.dim() == 0:
            raise GrowthError(
                f"{where} is a 0-dim tensor: inputs need a batch dimension; pass e.g. "
                f"x.unsqueeze(0) or a batch of samples"
            )
        if t.shape[0] == 0:
            raise GrowthError(
                f"{where} has an empty batch (shape {tuple(t.shape)}): pass at least one sample "
                f"(up to probe_size of them are kept to verify every growth)"
            )
        if t.is_meta:
            raise GrowthError(
                f"{where} is on the meta device and holds no values: pass real tensors "
                f"(e.g. torch.randn(...)) on the model's device"
            )
        if t.layout != torch.strided:
            raise GrowthError(f"{where} is a {t.layout} tensor: pass a dense tensor (x.to_dense())")
    return inputs


def _big(n: int) -> str:
    """A huge int in a few characters (``1.2e+300``)."""
    digits = str(n)
    return digits if len(digits) <= 12 else f"{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"


def _check_optimizer(optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GrowthError(
            f"optimizer must be a torch.optim.Optimizer over this network's parameters (or "
            f"None), got {type(optimizer).__name__}"
        )


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise GrowthError(f"{name} must be True or False, got {value!r}")


def _probe_failure(model: nn.Module, inputs: Sequence[Tensor], exc: Exception) -> str:
    """Why the model failed on ``example_inputs``, and what to do about it."""
    params = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dtypes = sorted({str(p.dtype) for p in params})
    devices = sorted({str(p.device) for p in params})
    name = type(model).__name__
    what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    hints = []
    if len(dtypes) == 1:
        dtype = params[0].dtype
        for i, t in enumerate(inputs):
            if t.dtype == dtype:
                continue
            where = "example_inputs" if len(inputs) == 1 else f"example_inputs[{i}]"
            if t.is_floating_point():
                hints.append(
                    f"{where} is {t.dtype} but the model's parameters are {dtype}: cast the "
                    f"inputs (x.to({dtype})) or the model (model.to({t.dtype})) so they match"
                )
            else:
                hints.append(
                    f"{where} is {t.dtype} but the model's parameters are {dtype}: if the model "
                    f"expects floating-point inputs, pass x.to({dtype})"
                )
    elif len(dtypes) > 1:
        hints.append(f"the model's parameters mix dtypes ({', '.join(dtypes)})")
    if len(devices) > 1:
        hints.append(
            f"the model's parameters are on several devices ({', '.join(devices)}); the probe "
            f"batch is kept on the first one: put the model on one device"
        )
    advice = (
        "; ".join(hints)
        if hints
        else (
            "pass example_inputs the model accepts (right shape, dtype and device for its forward)"
        )
    )
    return f"{name} failed on example_inputs ({what}). {advice}. Nothing was changed."


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
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GrowthError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, GrowableNetwork):
            raise GrowthError("model is already a GrowableNetwork: grow it directly")
        inputs = _as_tuple(example_inputs)
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, numbers.Real)
            or math.isnan(tolerance)
            or tolerance < 0
        ):
            raise GrowthError(
                f"tolerance must be a number >= 0 (largest output change accepted, relative to "
                f"the output scale), got {tolerance!r}; the default is {DEFAULT_TOLERANCE:g}"
            )
        if isinstance(probe_size, bool) or not isinstance(probe_size, numbers.Integral):
            raise GrowthError(f"probe_size must be an int >= 1, got {probe_size!r}")
        if probe_size < 1:
            raise GrowthError(
                f"probe_size must be an int >= 1 (samples kept to verify growth), got {probe_size}"
            )
        if isinstance(leaf_modules, type) or not isinstance(leaf_modules, Iterable):
            raise GrowthError(
                f"leaf_modules must be a list of module types, got {leaf_modules!r}; "
                f"e.g. leaf_modules=[MyBlock]"
            )
        leaf_modules = tuple(leaf_modules)
        for leaf in leaf_modules:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise GrowthError(
                    f"leaf_modules must hold nn.Module subclasses (types, not instances), got "
                    f"{leaf!r}"
                )
        graph, functional = trace_both_modes(model, leaf_modules)
        if functional:
            container = nn.Module()
            for name, module in functional.items():
                container.add_module(name, module)
            container.train(model.training)
            self.add_module(FUNCTIONAL_CONTAINER, container)
        self._setup(model, graph, inputs, tolerance, int(probe_size), [], diagnose=True)

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
            self._run_probe()
        except Exception as exc:
            if not diagnose:
                raise
            raise GrowthError(_probe_failure(model, self.probe, exc)) from exc

    def register_growth_hook(self, hook: GrowthHook) -> RemovableHandle:
        """Call ``hook(record, changes)`` after every successful widen/deepen.

        ``changes`` (:class:`~growth.hooks.GrowthChanges`) tells how each parameter grew, so that
        tensors kept elsewhere (importances, moving averages) can follow. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._growth_hooks)
        self._growth_hooks[handle.id] = hook
        return handle

    @contextmanager
    def _atomic(self) -> Iterator[Transaction]:
        """All changes made through the yielded transaction are undone if the block raises."""
        tx = Transaction()
        try:
            yield tx
        except BaseException:
            tx.rollback()
            self._recompile()
            self._run_probe()
            raise

    def _commit(self, record: GrowthRecord, changes: GrowthChanges) -> GrowthRecord:
        """Record a finished operation and tell the growth hooks."""
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
        self._analysis = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_forward_fn"](self, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_forward_fn", None)
        state["_analysis"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._recompile()

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

    def _run_probe(self) -> Any:
        """Forward the probe in eval mode, recording every node's shape; returns the output."""
        with torch.no_grad(), eval_mode(self), exact_float32():
            return ShapeRecorder(self, graph=self._graph).run(*self.probe)

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
        from .mapping import identity_mapping

        mapping = identity_mapping(self.analysis.spaces.info(group).width, torch.device("cpu"))
        return [n for n, _, _ in plan_updates(self, self.analysis, group, mapping)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- widen ---------------------------------------------------------------------------------
    def widen(
        self,
        name: str,
        width: int | None = None,
        *,
        factor: float | None = None,
        init: str = "net2net",
        split: str = "random",
        noise: float = 0.0,
        generator: torch.Generator | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        verify: bool = True,
        max_growth_bytes: float | None = None,
    ) -> GrowthRecord:
        """Net2WiderNet: give layer ``name`` ``width`` outputs (or ``factor`` times as many).

        Every layer coupled to ``name`` through the graph follows with the same unit mapping. See
        DESIGN.md for ``init``, ``split`` and ``noise``. With ``optimizer`` its state is carried
        over. On any refusal (``GrowthError``) the network and optimizer are left as they were.

        An operation that would allocate more than ``max_growth_bytes`` (default
        ``growth.limits.MAX_GROWTH_BYTES``, 8 GiB; new tensors, optimizer state and index maps,
        counted from the planned shapes) is refused before anything is allocated.
        """
        start = time.perf_counter()
        module, rule = self._layer_rule(name)
        old_width = int(rule.width(module))
        new_width = self._target_width(name, old_width, width, factor)
        limit = limits.resolve_limit(max_growth_bytes)
        if not isinstance(init, str) or init not in INITS:
            raise GrowthError(f"init must be one of {INITS}, got {init!r}")
        if not isinstance(split, str) or split not in SPLITS:
            raise GrowthError(f"split must be one of {SPLITS}, got {split!r}")
        if (
            isinstance(noise, bool)
            or not isinstance(noise, numbers.Real)
            or not math.isfinite(noise)
            or noise < 0
        ):
            raise GrowthError(
                f"noise must be a non-negative number, got {noise!r}: a finite scale relative to "
                f"the weights' spread, e.g. noise=0.01, or 0 for none"
            )
        if noise and init != "net2net":
            raise GrowthError(
                "noise breaks the symmetry of replicated units: use it with init='net2net'"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise GrowthError(
                f"generator must be a torch.Generator, got {type(generator).__name__}"
            )
        _check_optimizer(optimizer)
        _check_flag("verify", verify)
        blocked = self._blocked_reason(name)
        if blocked is not None:
            reason, error = blocked
            raise error(f"cannot widen {name!r}: {reason}")
        group, expand = self._group_of(name)
        info = self.analysis.spaces.info(group)
        if new_width % expand:
            raise GrowthError(
                f"{name!r} has {expand} output channels per input channel (depthwise multiplier): "
                f"width must be a multiple of {expand}"
            )
        new_units = new_width // expand
        if new_units % info.groups:
            raise GrowthError(
                f"{name!r} is coupled to a grouped convolution: width must be a multiple of "
                f"{info.groups * expand} (it grows by whole groups), got {new_width}"
            )
        limits.check_growth_bytes(
            growth_bytes(self, self.analysis, group, new_units, optimizer),
            limit,
            f"widen({name!r}) from {old_width} to {new_width} units",
        )
        device = next(module.parameters()).device
        gens = DeviceGenerators(generator)
        mapping = build_unit_mapping(
            info.width,
            new_units,
            groups=info.groups,
            split=split,
            generator=gens.mapping,
            device=device,
        )
        plans = plan_updates(self, self.analysis, group, mapping)
        params = [getattr(*resolve(m, t)) for _, m, u in plans for t in u.tensors]
        if optimizer is not None:
            optim_state.check_supported(
                optimizer, [p for p in params if isinstance(p, nn.Parameter)]
            )
        before = self._reference_output() if verify and init != "random" else None
        params_before = self.num_parameters()
        planned = compute_values(plans, init=init, noise=float(noise), generators=gens)
        old_shapes: dict[tuple[int, str], tuple[int, ...]] = {}
        with self._atomic() as tx:
            for pm in planned:
                for tname, value in pm.values.items():
                    owner, leaf = resolve(pm.module, tname)
                    p = getattr(owner, leaf)
                    old_shapes[(id(pm.module), tname)] = tuple(p.shape)
                    if optimizer is not None and isinstance(p, nn.Parameter):
                        new_state = optim_state.remapped_state(
                            optimizer, p, pm.update.tensors[tname].steps, init
                        )
                        if new_state is not None:
                            tx.set_state(optimizer, p, new_state)
                    tx.set_tensor(owner, leaf, value)
                for attr, value in pm.update.attrs.items():
                    tx.set_attr(*resolve(pm.module, attr), value)
            if before is None:  # not verified: shapes follow from the layouts, no forward
                self._grow_recorded_shapes(group, new_units)
                err = None
            else:
                err = self._check(before, noise, name)
        record = GrowthRecord(
            op="widen",
            layer=name,
            old_width=old_width,
            new_width=new_width,
            params_before=params_before,
            params_after=self.num_parameters(),
            max_abs_error=err,
            seconds=time.perf_counter() - start,
            details={
                "init": init,
                "split": split,
                "noise": float(noise),
                "coupled": [pm.name for pm in planned],
            },
        )
        prefix = {id(m): n for n, m in self.named_modules()}
        changes = GrowthChanges(init=init)
        for pm in planned:
            for tname in pm.values:
                full = f"{prefix[id(pm.module)]}.{tname}".lstrip(".")
                changes.tensors[full] = pm.update.tensors[tname].steps
                changes.old_shapes[full] = old_shapes[(id(pm.module), tname)]
        return self._commit(record, changes)

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
        New modules live under the top-level ``grown`` module; existing names never change.
        With ``optimizer``, the new parameters join the param group of ``name``'s weight.
        New layers needing more than ``max_growth_bytes`` (default
        ``growth.limits.MAX_GROWTH_BYTES``) are refused before they are built.
        """
        start = time.perf_counter()
        module, rule = self._layer_rule(name)
        if not isinstance(kind, str) or kind not in KINDS:
            raise GrowthError(f"deepen({name!r}): kind must be one of {KINDS}, got {kind!r}")
        if isinstance(activation, type) and issubclass(activation, nn.Module):
            raise GrowthError(
                f"deepen({name!r}): activation must be an nn.Module instance, got the class "
                f"{activation.__name__}: pass activation={activation.__name__}() instead"
            )
        if activation is not None and not isinstance(activation, nn.Module):
            raise GrowthError(
                f"deepen({name!r}): activation must be an nn.Module instance (e.g. nn.ReLU()), "
                f"got {activation!r}"
            )
        limit = limits.resolve_limit(max_growth_bytes)
        _check_optimizer(optimizer)
        _check_flag("verify", verify)
        nodes = self.analysis.module_nodes[name]
        if len(nodes) != 1:
            raise GrowthError(
                f"{name!r} is called {len(nodes)} times in forward; deepen a layer called once"
            )
        width = int(rule.width(module))
        chain = find_chain(self, nodes[0])
        new_act = activation if activation is not None else chain.activation
        if kind == "identity":
            check_identity_exact(name, chain, new_act)
        try:
            needed = _deepen_bytes(rule, module, width, kind, chain.norm is not None, new_act)
        except GrowthError as exc:
            raise type(exc)(f"cannot deepen {name!r}: {exc}") from exc
        limits.check_growth_bytes(needed, limit, f"deepen({name!r}) at width {width}")
        try:
            layer = rule.square_like(module, width)
        except GrowthError as exc:
            raise type(exc)(f"cannot deepen {name!r}: {exc}") from exc
        if layer is None:
            raise UnsupportedLayerError(
                f"{name!r} ({type(module).__name__}) has no identity rule, so nothing can be "
                f"inserted after it; {REGISTER_HINT} (with square_like/set_identity)"
            )
        base = name.replace(".", "_")
        grown = self._modules.get("grown")
        taken = set(grown._modules) if grown is not None else set()
        k = 1
        while f"{base}_deep{k}" in taken or f"{base}_res{k}" in taken:
            k += 1
        new_modules: list[tuple[str, nn.Module]] = []
        if kind == "identity":
            rule.set_identity(layer)
            new_modules.append((f"{base}_deep{k}", layer))
            if chain.norm is not None:
                value = self._probe_value(chain.nodes[-1])
                dim = self.analysis.layouts[chain.nodes[-1]].dim
                mean, var = channel_stats(value, dim)
                new_modules.append((f"{base}_deep{k}_bn", identity_norm(chain.norm, mean, var)))
            if new_act is not None:
                new_modules.append((f"{base}_deep{k}_act", copy.deepcopy(new_act)))
            targets = [f"grown.{n}" for n, _ in new_modules]
        else:
            block = nn.Module()
            block.layer1 = layer
            block.act = copy.deepcopy(new_act) if new_act is not None else nn.ReLU()
            block.layer2 = rule.square_like(module, width)
            with torch.no_grad():
                for p in block.layer2.parameters():
                    p.zero_()
            new_modules.append((f"{base}_res{k}", block))
            targets = [f"grown.{base}_res{k}.{c}" for c in ("layer1", "act", "layer2")]
        for _, m in new_modules:
            m.train(module.training)  # new layers follow the mode of the layer they extend
        new_graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        new_graph.output(new_graph.graph_copy(self._graph, val_map))
        insert_after(new_graph, val_map[chain.nodes[-1]], targets, residual=kind == "residual")

        before = self._reference_output() if verify else None
        params_before = self.num_parameters()
        old_graph = self._graph
        with self._atomic() as tx:
            if grown is None:
                grown = nn.Module()
                grown.train(self.training)
                tx.set_attr(self, "grown", grown)
            for n, m in new_modules:
                tx.set_attr(grown, n, m)
            new_params = [p for _, m in new_modules for p in m.parameters()]
            if optimizer is not None:
                optim_state.add_params(optimizer, new_params, module.weight)
                tx.on_rollback(lambda: optim_state.remove_params(optimizer, new_params))
            tx.on_rollback(lambda: setattr(self, "_graph", old_graph))
            self._graph = new_graph
            self._recompile()
            err = self._check(before, 0.0, name)
        inserted = [f"grown.{n}" for n, _ in new_modules]
        record = GrowthRecord(
            op="deepen",
            layer=name,
            old_width=width,
            new_width=width,
            params_before=params_before,
            params_after=self.num_parameters(),
            max_abs_error=err,
            seconds=time.perf_counter() - start,
            details={
                "kind": kind,
                "inserted": inserted,
                "activation": type(new_act).__name__ if new_act is not None else None,
            },
        )
        names = {id(p): n for n, p in self.named_parameters()}
        return self._commit(
            record, GrowthChanges("identity", {}, [names[id(p)] for p in new_params])
        )

    def _probe_value(self, node: fx.Node) -> Tensor:
        """The value ``node`` takes on the probe batch (eval mode)."""
        captured: dict[str, Tensor] = {}

        class _Capture(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                if n is node:
                    captured["value"] = result
                return result

        with torch.no_grad(), eval_mode(self), exact_float32():
            _Capture(self, graph=self._graph).run(*self.probe)
        return captured["value"]

    def _target_width(self, name: str, old: int, width: int | None, factor: float | None) -> int:
        if (width is None) == (factor is None):
            raise GrowthError(f"widen({name!r}): give exactly one of width= and factor=")
        if width is not None:
            if isinstance(width, bool) or not isinstance(width, numbers.Integral):
                raise GrowthError(
                    f"width must be an int, got {width!r} ({type(width).__name__}): give the new "
                    f"number of output units of {name!r} (now {old}), e.g. width={2 * old}, or "
                    f"factor=2.0"
                )
            new = int(width)
        else:
            if (
                isinstance(factor, bool)
                or not isinstance(factor, numbers.Real)
                or not math.isfinite(factor)
                or factor <= 1
            ):
                raise GrowthError(
                    f"factor must be a number > 1, got {factor!r}: a finite ratio of new to "
                    f"current width of {name!r} (now {old}), e.g. factor=2.0 for {2 * old} units, "
                    f"or width=<units>"
                )
            product = old * float(factor)
            if not product <= _MAX_UNITS:  # also inf
                raise GrowthError(
                    f"factor={float(factor):g} would give {name!r} {old} x {float(factor):g} "
                    f"units: no tensor dimension can be that long (at most 2**62); ask for a "
                    f"smaller factor"
                )
            new = int(round(product))
        if new < old:
            raise GrowthError(
                f"cannot shrink {name!r} from {old} to {new} units: net2grow only grows; ask for "
                f"more than {old} units"
            )
        if new == old:
            raise GrowthError(f"{name!r} already has width {old}: ask for more units")
        if new > _MAX_UNITS:
            raise GrowthError(
                f"cannot widen {name!r} to {_big(new)} units: no tensor dimension can be that long "
                f"(at most 2**62 here); ask for a smaller width"
            )
        return new

    # --- verification --------------------------------------------------------------------------
    def _reference_output(self) -> Any:
        with torch.no_grad(), eval_mode(self), exact_float32():
            return self(*self.probe)

    def _grow_recorded_shapes(self, group: int, new_units: int) -> None:
        """Update every recorded shape after ``group`` grew to ``new_units`` units.

        Widening changes only the channel dimension of the tensors that carry the group, by an
        amount the analysis knows; the next analysis then runs without a forward pass.
        """
        analysis = self.analysis
        for node, layout in analysis.layouts.items():
            if layout is None or node.meta.get("shape") is None:
                continue
            new = grown_layout(layout, analysis.spaces, group, new_units).size
            if new != layout.size:
                shape = list(node.meta["shape"])
                shape[layout.dim] = new
                node.meta["shape"] = tuple(shape)

    def _check(self, before: Any, noise: float, name: str) -> float | None:
        """Re-record shapes on the probe and compare with ``before``; raise if not preserved."""
        try:
            after = self._run_probe()
        except Exception as exc:
            raise GrowthError(
                f"the network no longer runs after growing {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if before is None:
            return None
        err, scale = output_difference(before, after)
        dtype = next(self.parameters()).dtype
        if not err <= allowed_error(scale, self.tolerance, noise, dtype):
            raise FunctionNotPreservedError(
                f"growing {name!r} changed the outputs on the probe batch by {err:.3g} "
                f"(output scale {scale:.3g}, tolerance {self.tolerance:g} relative); "
                f"the network was restored"
            )
        return err

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


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are ``meta`` tensors (no data copied)."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else meta
        )
    return copy.deepcopy(module, memo)


def _deepen_bytes(
    rule: Any,
    module: nn.Module,
    width: int,
    kind: str,
    with_norm: bool,
    activation: nn.Module | None,
) -> int:
    """Bytes of the layers ``deepen`` would insert after ``module``, computed without building
    them: the rule builds its layer from a ``meta`` copy of ``module`` (a bound when it cannot)."""
    try:
        layer = rule.square_like(_meta_copy(module), width)
        one = 0 if layer is None else _tensor_bytes(layer)
    except GrowthError:
        raise
    except Exception:  # a rule that cannot build on meta tensors: width x width per kernel tap
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor):
            one = (width * width * math.prod(w.shape[2:]) + width) * w.element_size()
        else:
            one = _tensor_bytes(module)
    elem = next((p.element_size() for p in module.parameters()), 4)
    total = one * (2 if kind == "residual" else 1)
    if kind == "identity" and with_norm:
        total += 4 * width * elem  # weight, bias, running mean and variance
    if activation is not None:
        total += _tensor_bytes(activation)
    return total
