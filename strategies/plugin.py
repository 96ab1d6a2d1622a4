"""``GrowthPlugin``: grows a ``GrowableNetwork`` inside any Avalanche supervised strategy.

Where growth happens in Avalanche 0.6's callback order (``BaseSGDTemplate._before_training_exp``):

1. ``before_train_dataset_adaptation`` — **growth before an experience happens here**, before
   ``check_model_and_optimizer`` runs the heads' ``adaptation`` and rebuilds the optimizer with
   ``update_optimizer``. Widened parameters keep their identity (their ``.data`` is swapped), so
   the name-based rebuild finds them in the optimizer and keeps their (remapped) state; deepen
   adds its parameters to the optimizer itself, so the rebuild finds them too.
2. ``after_training_iteration`` — the policy sees the loss; the actions it returns are applied at
   the next ``before_training_iteration`` (before ``zero_grad``), followed by an explicit
   ``strategy.make_optimizer()`` and a consistency check of the optimizer.

EWC/SI state follows every growth of the model through the engine's growth hook
(:mod:`strategies.plugin_state`), also when user code grows the network itself.

Distributed training (``torch.distributed``): Avalanche 0.6 never wraps the model itself. Its
distributed support is ``DistributedHelper`` (process group, seeds), ``DistributedSampler`` in
the strategy's data loaders, main-process-only loggers and the ``supports_distributed`` plugin
check; gradients are synchronised only when the user gives the strategy a
``DistributedDataParallel`` wrapper, e.g. ``Naive(model=DistributedHelper.wrap_model(net),
...)``, and ``strategy.model`` is then that wrapper. The plugin grows its ``module`` on every rank
alike (see :class:`GrowthPlugin`). Import ``avalanche.training`` before initialising the process
group: the import builds an ``InteractiveLogger``, which Avalanche refuses to create on a
non-main rank once ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from avalanche.training.plugins import SupervisedPlugin
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..growth import GrowableNetwork, GrowthError, GrowthRecord
from ..growth import protect as protection
from ..growth.budget import ParameterModel, growth_group, params_after_deepen, params_after_widen
from ..growth.distributed import (
    check_replicas,
    control_device,
    global_rank,
    grow_ddp,
    shared_generator,
)
from ..growth.initializers import base_init
from . import plugin_state, refusals
from .policies import Deepen, GrowthAction, GrowthPolicy, Widen
from .rules_avalanche import check_heads

OPTIMIZER_STATES = ("carry", "scale", "copy", "zero", "reset")

_SEED_HIGH = 2**63 - 1  # seeds of shared generators are drawn in [0, 2**63 - 1)


class ReplicaGrowthError(GrowthError):
    """Distributed growth failed on some ranks only, or left the replicas different: never a
    refusal (``on_refusal`` does not apply); the DistributedDataParallel wrapper was retired."""


@dataclass(frozen=True)
class _Replicas:
    """How the strategy's model is replicated: the process group that grows together, and the
    DistributedDataParallel wrapper (None when each rank holds a bare GrowableNetwork)."""

    group: Any
    ddp: DistributedDataParallel | None


def replicas_of(model: Any) -> _Replicas | None:
    """The replication of ``model`` under ``torch.distributed``; None on a single process.

    Distributed means: ``model`` is a ``DistributedDataParallel`` wrapper (its process group
    grows together, even of size 1), or a process group of more than one rank is initialised.
    """
    if isinstance(model, DistributedDataParallel):
        return _Replicas(model.process_group, model)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _Replicas(None, None)
    return None


def global_mean(value: Any, group: Any = None) -> torch.Tensor:
    """Mean of ``value`` (a scalar tensor or number) over the ranks of ``group``, the same on
    every rank, shaped and typed like ``value``. A collective call."""
    local = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(float(value))
    flat = local.to(control_device(group), torch.float64, copy=True)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    return flat.to(local.device, local.dtype)


def agree_actions(actions: Sequence[GrowthAction], group: Any = None) -> list[GrowthAction]:
    """Rank 0's ``actions`` on every rank of ``group`` (a collective call: one 8-byte broadcast,
    plus an object broadcast when rank 0 has actions)."""
    src = global_rank(group)
    count = torch.tensor([len(actions)], dtype=torch.int64, device=control_device(group))
    dist.broadcast(count, src=src, group=group)
    if int(count.item()) == 0:
        return []
    box: list[Any] = [list(actions)]
    dist.broadcast_object_list(box, src=src, group=group)
    return list(box[0])


def _prefixed(changes: Any, prefix: str) -> Any:
    """``changes`` (a ``GrowthChanges``) with ``prefix`` on every name (DDP's ``module.``)."""
    out = copy.copy(changes)
    out.tensors = {prefix + k: v for k, v in changes.tensors.items()}
    out.new_parameters = [prefix + k for k in changes.new_parameters]
    if hasattr(changes, "old_shapes"):
        out.old_shapes = {prefix + k: v for k, v in changes.old_shapes.items()}
    return out


@dataclass(frozen=True)
class GrowthEvent:
    """One growth action as the plugin handled it.

    ``status``: "grown", "capped" (grown less than asked, for ``max_params``), "skipped"
    (nothing to grow, or no room under ``max_params``) or "refused" (a ``GrowthError``).
    """

    experience: int
    iteration: int
    phase: str  # "before_experience" | "mid_experience"
    op: str  # "widen" | "deepen"
    layer: str
    status: str
    old_width: int
    new_width: int
    requested_width: int
    params_before: int
    params_after: int
    max_abs_error: float | None
    seconds: float
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Planned:
    """What the plugin will do for one action of a growth step (see ``GrowthPlugin._plan``)."""

    width: int | None = None  # the width to widen to; None: decided when applied
    asked: int = 0  # the width the action asked for (0: not planned)
    skip: str = ""  # why nothing is done ("" : grow)
    capped: str = ""  # why the width is below the one asked


@dataclass
class _GroupPlan:
    """One coupled group widened in a growth step, in units of its space group."""

    index: int  # the action that widens it
    expand: int  # positions per unit of that action's layer
    old_units: int
    asked_units: int
    step: int  # units grow by multiples of this (grouped convolutions)
    units: int = 0  # planned


def check_max_width(max_width: Any) -> int | dict[str, int] | None:
    """``max_width`` checked: None, a positive int, or a mapping of layer names to them."""

    def positive(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    if max_width is None or positive(max_width):
        return max_width
    if isinstance(max_width, Mapping) and all(
        isinstance(k, str) and positive(v) for k, v in max_width.items()
    ):
        return dict(max_width)
    raise ValueError(
        f"max_width must be a positive int or a dict of layer names to positive ints, "
        f"got {max_width!r}"
    )


def describe_plugin(plugin: Any) -> str:
    """``GrowthPlugin(EveryExperience)``: a plugin named by its policy, for messages."""
    policy = getattr(plugin, "policy", None)
    return f"{type(plugin).__name__}({type(policy).__name__})"


def refuse_duplicates(plugin: GrowthPlugin, plugins: Sequence[Any]) -> None:
    """Raise ``GrowthError`` when ``plugins`` holds ``plugin`` twice or another growth plugin:
    each would grow the network at every step (twice per experience, silently)."""
    me = describe_plugin(plugin)
    times = sum(p is plugin for p in plugins)
    if times > 1:
        raise GrowthError(
            f"{me} is in the strategy's plugins {times} times: Avalanche calls each entry, so "
            f"the network would grow {times} times per step. List it once"
        )
    others = [p for p in plugins if isinstance(p, GrowthPlugin) and p is not plugin]
    if others:
        names = " and ".join([me, *map(describe_plugin, others)])
        raise GrowthError(
            f"the strategy has {len(others) + 1} growth plugins, {names}: each grows the "
            f"network at every step, so it would grow {len(others) + 1} times per experience. "
            f"Keep one (a policy that combines both decisions, if you need them); with "
            f"Growing(policy=...), which installs its own GrowthPlugin (strategy.growth), do "
            f"not also pass one in plugins="
        )


class _NoOpHook:
    """What the regulariser hook becomes in copies of the network (LwF's teacher, pickles)."""

    def __call__(self, record: GrowthRecord, changes: Any) -> None:
        return None


class _RegularizerSync:
    """Growth hook: remap the EWC/SI state of the strategy's plugins (never copied)."""

    def __init__(self, plugin: GrowthPlugin) -> None:
        self.plugin = plugin

    def __call__(self, record: GrowthRecord, changes: Any) -> None:
        strategy = self.plugin.strategy
        if strategy is None:
            return
        start = time.perf_counter()
        if isinstance(strategy.model, DistributedDataParallel):
            changes = _prefixed(changes, "module.")  # the plugins saw the wrapper's names
        plugin_state.remap_regularizers(strategy.plugins, strategy.model, changes)
        if not self.plugin.busy:  # growth by user code: the plugin's own is timed whole
            self.plugin.growth_seconds += time.perf_counter() - start

    def __deepcopy__(self, memo: dict) -> _NoOpHook:
        return _NoOpHook()

    def __reduce__(self) -> tuple:
        return (_NoOpHook, ())


class GrowthPlugin(SupervisedPlugin, supports_distributed=True):
    """Grow ``strategy.model`` (a :class:`~growth.GrowableNetwork`) as ``policy`` decides.

    Under ``torch.distributed`` (``strategy.model`` is a ``DistributedDataParallel`` wrapper of a
    ``GrowableNetwork``, or a process group of more than one rank is initialised), every rank
    grows its replica alike:

    - decisions: the policy sees the loss averaged over the ranks (``strategy.loss`` is an
      all-reduced copy while ``after_iteration`` runs), and rank 0's actions are applied on
      every rank (broadcast), whatever other rank-local state a policy reads;
    - randomness: each growth phase draws its generator with
      :func:`growth.distributed.shared_generator` (rank 0's seed; from ``generator`` when one
      is given, so runs repeat);
    - a wrapped model grows through :func:`growth.distributed.grow_ddp` and the new wrapper is
      put back into ``strategy.model``; bare replicas grow in place and are then compared with
      :func:`growth.distributed.check_replicas`. Replicas left different (or a growth that
      failed on some ranks only) raise :class:`ReplicaGrowthError` on every rank.

    Every rank must run the plugin (same policy, same options, a ``GrowableNetwork`` built with
    the same ``example_inputs``) and the same number of training iterations: the plugin makes
    collective calls at every iteration (two small ones) and every growth phase. Avalanche 0.6
    does not wrap the model in DDP itself: give the strategy ``DistributedHelper.wrap_model(net)``
    (or your own ``DistributedDataParallel(net)``) and an optimizer over ``net.parameters()``.
    Bare replicas are for training synchronised by other means; they are also compared before
    growth, so replicas that trained apart are refused with a ``ReplicaGrowthError``.
    Limitations: tested with ``Naive`` (Gloo, CPU); ``growth_metrics()``' per-layer widths read
    ``strategy.model`` and report nothing under a wrapper (parameter counts and events still
    work); EWC/SI state is remapped under the wrapper's ``module.`` names, but their
    importances stay rank-local as in Avalanche (which marks them not distributed-ready).

    Parameters
    ----------
    policy : GrowthPolicy
        Decides what to grow (see :mod:`strategies.policies`).
    max_params : int, optional
        Parameter budget, shared by the widenings of a growth step (the actions a policy returns
        at once): when they do not all fit, every widening gets the same fraction ``s`` of the
        units it asked for (``old + floor(s * (asked - old))``, ``s`` the largest that fits), so
        budgets are shared in proportion to the growth asked; for ``factor`` widenings that is
        in proportion to width: every group grows by the same smaller factor
        ``1 + s * (factor - 1)``, the last layers as much as the first. Shrunk widenings have
        status "capped", those left with nothing "skipped". Deepenings come after the
        widenings of their step and are skipped when the rest does not hold them. Counts are
        computed from the planned shapes (nothing is copied or allocated).
    max_width : int or mapping of str to int, optional
        Per-layer cap on widths: one cap for every layer, or caps by layer name (others
        uncapped). A widening stops at the smallest cap of the layers it widens together
        (status "capped").
    optimizer_state : {"carry", "scale", "copy", "zero", "reset"}
        "carry" (the same as "scale"): the optimizer state is remapped to the grown parameters
        (old units keep theirs, step counts keep counting), a copied unit gets its source's
        state scaled like its gradient, a fresh unit zero state. "copy": copies get their
        source's state unscaled. "zero": every new unit starts from zero state, old units keep
        theirs. "reset": grown parameters restart with empty state (old units' too).
    init : str, optional
        The ``init`` of every widening whose action asks for the default ("net2net"): e.g.
        "zero", "vt" or "gradmax" (:meth:`growth.GrowableNetwork.widen`). For "gradmax" the
        plugin passes a batch of ``gradmax_batch`` samples of the experience about to be
        trained (mid-experience: the last minibatch) and the strategy's criterion.
    gradmax_batch : int
        Samples of the batch that ``init="gradmax"`` draws its gradient statistics from.
    generator : torch.Generator or int, optional
        Randomness of the unit mappings (an int seeds a new generator): same seed, same growth.
    on_refusal : {"warn", "raise"}
        What to do when the engine refuses an action (``GrowthError``).
    protect : {"lateral", "independent"}, optional
        Protected growth for continual learning (see :meth:`growth.GrowableNetwork.protect`).
        At each growth step before an experience but the first that has ``Widen`` actions
        (after the actions left pending by the last iteration), every current unit of the
        growable layers is frozen (``net.protect(protect)``; refused: every ``Widen`` of that
        step is "refused", ``on_refusal`` applies), and the step's widenings run producers
        first (``growth.protect.growth_order``). "lateral": old units never read new ones, so
        in eval mode they compute, bit for bit, what they computed after the growth, however
        long the new units train; "independent": new units also read no old unit (block
        diagonal). The output layer is never frozen. With ``protect`` set, widenings use
        ``init="zero"`` (new units: random incoming, zero outgoing weights) in place of
        ``"net2net"``, which a protected network refuses; mid-experience growth (``OnPlateau``)
        widens that way without freezing anything more. A deepening that frozen units would read
        through is refused by the engine (``on_refusal`` applies). The protection state lives in
        the network's buffers (``net.protection``): parameter counts and ``max_params`` ignore
        it, checkpoints keep it. An option: ``state_dict`` does not include it.

    One growth step widens each group of coupled layers once: two ``Widen`` actions of one
    step on layers of one group (say ``layer1.0.conv2`` and ``layer1.1.conv2`` of a ResNet,
    which feed one sum) are merged into the first (the largest width asked wins; ``factor``
    is relative to the width at the start of the step), the others are recorded as "skipped".
    A strategy takes one ``GrowthPlugin``: a second one (or the same one listed twice) is
    refused with a ``GrowthError`` when training starts.
    """

    def __init__(
        self,
        policy: GrowthPolicy,
        *,
        max_params: int | None = None,
        max_width: int | Mapping[str, int] | None = None,
        optimizer_state: str = "carry",
        generator: torch.Generator | int | None = None,
        on_refusal: str = "warn",
        protect: str | None = None,
        init: str | None = None,
        gradmax_batch: int = 256,
    ) -> None:
        super().__init__()
        from ..growth.arguments import INITS

        if init is not None and init not in INITS:
            raise GrowthError(f"init must be one of {INITS} or None, got {init!r}")
        if isinstance(gradmax_batch, bool) or not isinstance(gradmax_batch, int) or (
            gradmax_batch < 1
        ):
            raise GrowthError(f"gradmax_batch must be an int >= 1, got {gradmax_batch!r}")
        if not isinstance(policy, GrowthPolicy):
            raise TypeError(
                f"policy must implement before_experience and after_iteration "
                f"(see strategies.policies.GrowthPolicy), got {type(policy).__name__}"
            )
        if optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}")
        if on_refusal not in ("warn", "raise"):
            raise ValueError("on_refusal must be 'warn' or 'raise'")
        if max_params is not None and (isinstance(max_params, bool) or max_params < 1):
            raise ValueError(f"max_params must be a positive int, got {max_params!r}")
        max_width = check_max_width(max_width)
        if protect is not None:
            protect = protection.check_mode(protect)  # GrowthError
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        self.policy = policy
        self.max_params = max_params
        self.max_width = max_width
        self.optimizer_state = optimizer_state
        self.init = init
        self.gradmax_batch = gradmax_batch
        self.generator = generator
        self.on_refusal = on_refusal
        self.protect = protect
        self.events: list[GrowthEvent] = []
        self.growth_seconds = 0.0
        self.strategy: Any = None
        self.busy = False  # True while the plugin itself grows the network
        self._pending: list[GrowthAction] = []
        self._hooked: GrowableNetwork | None = None
        self._handle: Any = None
        self._phase_generator: torch.Generator | None = None  # shared one, distributed only

    # --- Avalanche callbacks -------------------------------------------------------------------
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        refuse_duplicates(self, strategy.plugins)
        refusals.refuse_incompatible(strategy)  # GrowthError: GDumb, LFL, ICaRL, FromScratch...
        net = self.network(strategy)
        self._check_max_width_names(net)
        self.strategy = strategy
        for msg in check_heads(net):
            warnings.warn(msg, stacklevel=2)
        if self._hooked is not net:
            if self._handle is not None:
                self._handle.remove()
            self._handle = plugin_state.subscribe(net, _RegularizerSync(self))
            self._hooked = net

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        net = self.network(strategy)
        pending = len(self._pending)  # the same on every rank: pending actions were agreed
        actions = [*self._pending, *self.policy.before_experience(strategy, net)]
        self._pending = []
        replicas = replicas_of(strategy.model)
        if replicas is not None:
            actions = agree_actions(actions, replicas.group)
        # two growth steps: what the last iteration asked for, then the policy's new actions
        self._apply(strategy, net, actions[:pending], "before_experience")
        fresh = actions[pending:]
        protect_step = (
            self.protect is not None
            and int(strategy.clock.train_exp_counter) > 0
            and any(isinstance(a, Widen) for a in fresh)
        )
        self._apply(strategy, net, fresh, "before_experience", protect=protect_step)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # After the heads' adaptation: new heads may sit before layers added by deepen.
        plugin_state.align_regularizers(strategy.plugins, strategy.model)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        replicas = replicas_of(strategy.model)
        if replicas is None:
            self._pending.extend(self.policy.after_iteration(strategy, self.network(strategy)))
            return
        local_loss = strategy.loss
        strategy.loss = global_mean(local_loss, replicas.group)
        try:
            actions = list(self.policy.after_iteration(strategy, self.network(strategy)))
        finally:
            strategy.loss = local_loss
        self._pending.extend(agree_actions(actions, replicas.group))

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if not self._pending:
            return
        actions, self._pending = self._pending, []
        net = self.network(strategy)
        if self._apply(strategy, net, actions, "mid_experience"):
            self.fix_optimizer(strategy)

    # --- growth --------------------------------------------------------------------------------
    @staticmethod
    def network(strategy: Any) -> GrowableNetwork:
        """``strategy.model`` (the ``module`` of a ``DistributedDataParallel`` wrapper), checked
        to be a ``GrowableNetwork``."""
        model = strategy.model
        if isinstance(model, DistributedDataParallel):
            model = model.module
        return require_growable(model)

    def _apply(
        self,
        strategy: Any,
        net: GrowableNetwork,
        actions: Sequence[GrowthAction],
        phase: str,
        *,
        protect: bool = False,
    ) -> bool:
        """Apply ``actions`` in order; True when the network changed. With ``protect``, first
        freeze the network's current units (``self.protect`` mode) and order the widenings
        producers first (``_protect_step``)."""
        if not actions:
            return False
        device = torch.device(strategy.device)
        if any(p.device != device for p in net.parameters()):
            net.to(device)
        replicas = replicas_of(strategy.model)
        bare = replicas if replicas is not None and replicas.ddp is None else None
        if replicas is not None:  # actions agreed: every rank gets here, at the same point
            self._phase_generator = self._shared_generator(replicas.group)
        if bare is not None:
            self._check_replicas(net, bare, f"before growth ({phase})")
        changed = False
        refused = ""  # why every widening of this step is refused (protect failed)
        try:
            start = time.perf_counter()
            if protect:
                actions, refused = self._protect_step(net, actions)
            plans = self._plan(net, actions)
            self.growth_seconds += time.perf_counter() - start
            for action, plan in zip(actions, plans):
                start = time.perf_counter()
                self.busy = True
                try:
                    if refused and isinstance(action, Widen):
                        event = self._event(
                            strategy, net, action, phase, status="refused", reason=refused
                        )
                    else:
                        event = self._grow(strategy, net, action, phase, plan)
                finally:
                    self.busy = False
                self.growth_seconds += time.perf_counter() - start
                self.events.append(event)
                changed |= event.status in ("grown", "capped")
        finally:
            self._phase_generator = None
        if bare is not None:
            self._check_replicas(net, bare, f"after growth ({phase})")
        return changed

    def _protect_step(
        self, net: GrowableNetwork, actions: Sequence[GrowthAction]
    ) -> tuple[list[GrowthAction], str]:
        """Freeze every current unit of ``net`` (``net.protect``, deterministic: every rank
        does it alike) and put the ``Widen`` actions, in the slots they hold among ``actions``,
        in ``growth_order`` (producers first; actions on unknown layers keep their place and are
        refused when applied). Returns the actions and "", or the actions unchanged and the
        reason when protect is refused (raised with ``on_refusal="raise"``)."""
        try:
            net.protect(self.protect)  # type: ignore[arg-type]
        except GrowthError as exc:
            if self.on_refusal == "raise":
                raise
            reason = f"protect={self.protect!r} refused: {exc}"
            warnings.warn(f"growth refused: {reason}", stacklevel=4)
            return list(actions), reason
        slots = [i for i, a in enumerate(actions) if isinstance(a, Widen)]
        known = []
        for i in slots:
            try:
                protection.growth_order(net, [actions[i].layer])
            except GrowthError:
                continue
            known.append(i)
        names = protection.growth_order(net, [actions[i].layer for i in known])
        rank = {n: r for r, n in reversed(list(enumerate(names)))}  # first place of a name
        ordered = sorted(known, key=lambda i: rank[actions[i].layer])  # stable sort
        out = list(actions)
        for slot, i in zip(known, ordered):
            out[slot] = actions[i]
        return out, ""

    def _init_of(self, action: Widen) -> str:
        """The ``init`` a widening uses: with ``protect`` set, "zero" in place of "net2net"
        (which a protected network refuses); other inits are left to the engine."""
        init = self.init if self.init is not None and action.init == "net2net" else action.init
        if self.protect is not None and init == "net2net":
            return "zero"
        return init

    def _new_unit_args(self, strategy: Any, init: str) -> dict[str, Any]:
        """``widen``'s ``optimizer_state`` and, for ``init="gradmax"``, its batch and loss."""
        out: dict[str, Any] = {}
        if self.optimizer_state in ("copy", "zero"):
            out["optimizer_state"] = self.optimizer_state
        if init == "gradmax":
            from .policies import experience_batch

            out["batch"] = experience_batch(strategy, self.gradmax_batch, self.network(strategy))
            out["loss_fn"] = strategy._criterion
        return out

    def _check_replicas(self, net: GrowableNetwork, replicas: _Replicas, when: str) -> None:
        """``check_replicas`` of bare replicas (no DDP wrapper), a collective call."""
        start = time.perf_counter()
        try:
            check_replicas(net, replicas.group, context=when)
        except GrowthError as exc:
            hint = ""
            if when.startswith("before"):
                hint = (
                    " (before growth: the ranks trained apart; give the strategy a "
                    "DistributedDataParallel wrapper, e.g. DistributedHelper.wrap_model(net), "
                    "or synchronise the gradients yourself)"
                )
            raise ReplicaGrowthError(f"{exc}{hint}") from exc
        self.growth_seconds += time.perf_counter() - start

    def _shared_generator(self, group: Any) -> torch.Generator:
        """A generator seeded alike on every rank of ``group`` (a collective call): rank 0's
        seed, drawn from ``self.generator`` when there is one (same seed, same run)."""
        seed = None
        if self.generator is not None:
            g = self.generator
            seed = int(torch.randint(0, _SEED_HIGH, (1,), generator=g, device=g.device))
        return shared_generator(seed, group)

    def _run(
        self,
        strategy: Any,
        net: GrowableNetwork,
        op: Any,
        optimizer: torch.optim.Optimizer | None,
    ) -> GrowthRecord:
        """``op(net)``; through ``grow_ddp`` (the new wrapper put into ``strategy.model``) when
        the strategy's model is a ``DistributedDataParallel`` wrapper."""
        ddp = strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            return op(net)
        local: list[BaseException] = []

        def guarded(n: GrowableNetwork) -> GrowthRecord:
            try:
                return op(n)
            except Exception as exc:
                local.append(exc)
                raise

        try:
            new_ddp, rec = grow_ddp(ddp, guarded, optimizer=optimizer)
        except GrowthError as exc:
            if local and exc is local[0]:
                raise  # refused on every rank, nothing changed: a refusal like on one process
            raise ReplicaGrowthError(str(exc)) from exc
        strategy.model = new_ddp
        return rec

    def _event(
        self, strategy: Any, net: GrowableNetwork, action: GrowthAction, phase: str, **fields: Any
    ) -> GrowthEvent:
        try:
            width = net.width(action.layer)
        except GrowthError:
            width = 0
        params = net.num_parameters()
        base = dict(
            experience=int(strategy.clock.train_exp_counter),
            iteration=int(strategy.clock.train_iterations),
            phase=phase,
            op="widen" if isinstance(action, Widen) else "deepen",
            layer=action.layer,
            status="skipped",
            old_width=width,
            new_width=width,
            requested_width=width,
            params_before=params,
            params_after=params,
            max_abs_error=None,
            seconds=0.0,
        )
        base.update(fields)
        return GrowthEvent(**base)

    def _grow(
        self,
        strategy: Any,
        net: GrowableNetwork,
        action: GrowthAction,
        phase: str,
        plan: _Planned | None = None,
    ) -> GrowthEvent:
        plan = plan if plan is not None else _Planned()
        optimizer = strategy.optimizer if self.optimizer_state != "reset" else None
        shared = self._phase_generator
        generator = shared if shared is not None else self.generator
        shapes = {id(p): p.shape for p in net.parameters()}
        reason = ""
        try:
            if isinstance(action, Widen):
                old = net.width(action.layer)
                asked = plan.asked if plan.asked else action.target_width(old)
                if plan.skip or asked <= old:
                    return self._event(
                        strategy,
                        net,
                        action,
                        phase,
                        requested_width=asked,
                        reason=plan.skip or f"asked for {asked} units, has {old}",
                    )
                target = plan.width if plan.width is not None else asked
                width = self._fit_width(net, action, old, target)
                if width < target:
                    reason = f"max_params={self.max_params}"
                elif width < asked:
                    reason = plan.capped
                if width <= old:
                    return self._event(
                        strategy,
                        net,
                        action,
                        phase,
                        requested_width=asked,
                        reason=f"max_params={self.max_params} leaves no room",
                    )
                rec = self._run(
                    strategy,
                    net,
                    lambda n: n.widen(
                        action.layer,
                        width,
                        init=self._init_of(action),
                        split=action.split,
                        noise=action.noise,
                        generator=generator,
                        optimizer=optimizer,
                        **self._new_unit_args(strategy, self._init_of(action)),
                    ),
                    optimizer,
                )
                status = "grown" if width >= asked else "capped"
            elif isinstance(action, Deepen):
                asked = net.width(action.layer)
                budget = self.max_params
                if budget is not None and self._params_after(net, action) > budget:
                    return self._event(
                        strategy,
                        net,
                        action,
                        phase,
                        reason=f"max_params={self.max_params} leaves no room",
                    )
                rec = self._run(
                    strategy,
                    net,
                    lambda n: n.deepen(action.layer, kind=action.kind, optimizer=optimizer),
                    optimizer,
                )
                status = "grown"
            else:
                raise TypeError(f"unknown growth action {action!r}")
        except ReplicaGrowthError:
            raise
        except GrowthError as exc:
            if self.on_refusal == "raise":
                raise
            warnings.warn(f"growth refused: {exc}", stacklevel=3)
            return self._event(strategy, net, action, phase, status="refused", reason=str(exc))
        if self.optimizer_state == "reset":
            for p in net.parameters():
                if id(p) in shapes and shapes[id(p)] != p.shape:
                    strategy.optimizer.state.pop(p, None)
        return self._event(
            strategy,
            net,
            action,
            phase,
            status=status,
            old_width=rec.old_width,
            new_width=rec.new_width,
            requested_width=asked,
            params_before=rec.params_before,
            params_after=rec.params_after,
            max_abs_error=rec.max_abs_error,
            seconds=rec.seconds,
            reason=reason,
        )

    # --- resume (strategies.resume) ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The plugin's run state as plain data: growth events, growth time, actions pending
        for the next iteration, the generator's state and the policy's state (its
        ``state_dict()``, else its attributes). Options (``max_params``, ...) are not included."""
        from .resume import encode_state, object_state

        gen = self.generator
        return {
            "events": [e.to_dict() for e in self.events],
            "growth_seconds": float(self.growth_seconds),
            "pending": encode_state(list(self._pending), "pending growth actions"),
            "generator": None
            if gen is None
            else {"device": str(gen.device), "state": gen.get_state()},
            "policy": object_state(self.policy, f"policy {type(self.policy).__qualname__}"),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Everything is checked before anything changes;
        a state that does not fit (say, a generator where this plugin has none) raises
        ``GrowthError``."""
        from .resume import ResumeMismatchError, decode_state, prepare_object_state

        events = [GrowthEvent(**e) for e in state["events"]]
        pending = decode_state(state["pending"])
        if not all(isinstance(a, (Widen, Deepen)) for a in pending):
            raise GrowthError("malformed plugin state: pending actions are not growth actions")
        saved_gen = state["generator"]
        if (saved_gen is None) != (self.generator is None):
            raise ResumeMismatchError(
                "GrowthPlugin: the saved run had "
                + ("no generator" if saved_gen is None else "a generator")
                + ", this plugin "
                + ("has none" if self.generator is None else "has one")
            )
        if saved_gen is not None:
            trial = torch.Generator(device=self.generator.device)
            trial.set_state(saved_gen["state"])  # checks the state before it is used
        policy = prepare_object_state(self.policy, state["policy"], "the growth policy")
        policy.apply()
        if saved_gen is not None:
            self.generator.set_state(saved_gen["state"])
        self.events = events
        self.growth_seconds = float(state["growth_seconds"])
        self._pending = list(pending)

    # --- growth steps: one widening per coupled group, a shared budget ------------------------
    def _plan(self, net: GrowableNetwork, actions: Sequence[GrowthAction]) -> list[_Planned]:
        """What each action of one growth step will do: widenings of one coupled group merged
        into the first, ``max_width`` caps, then ``max_params`` shared (see the class docstring).
        Actions the engine will refuse (unknown layers, ...) are left to ``_grow``."""
        plans = [_Planned() for _ in actions]
        groups: dict[int, _GroupPlan] = {}
        for i, action in enumerate(actions):
            if not isinstance(action, Widen):
                continue
            try:
                old = net.width(action.layer)
                found = growth_group(net, action.layer)
            except GrowthError:
                continue  # refused when applied, with the engine's message
            group, expand = found.id, found.expand
            asked = action.target_width(old)
            plans[i].asked = asked
            if asked <= old:
                plans[i].skip = f"asked for {asked} units, has {old}"
                continue
            first = groups.get(group)
            if first is not None:
                plans[i].skip = (
                    f"coupled with {actions[first.index].layer!r}, widened in this step "
                    f"(a coupled group grows once per step)"
                )
                first.asked_units = max(first.asked_units, -(-asked // expand))
                continue
            groups[group] = _GroupPlan(i, expand, found.units, -(-asked // expand), found.step)
        if not groups:
            return plans
        for g in groups.values():
            g.units = g.asked_units
        if self.max_width is not None:
            self._cap_widths(net, groups, actions, plans)
        if self.max_params is not None:
            self._share_budget(net, groups, plans)
        for g in groups.values():
            plan = plans[g.index]
            if g.units <= g.old_units:
                plan.skip = plan.capped
            elif g.units == -(-plan.asked // g.expand):
                plan.width = plan.asked  # as asked (the engine checks it)
            else:
                plan.width = g.units * g.expand  # merged with a larger ask, or capped
        return plans

    def _cap_widths(
        self,
        net: GrowableNetwork,
        groups: dict[int, _GroupPlan],
        actions: Sequence[GrowthAction],
        plans: list[_Planned],
    ) -> None:
        """Lower each group's units to the smallest ``max_width`` cap of its layers."""
        for name in net.layers:
            cap = self._cap_of(name)
            if cap is None:
                continue
            found = growth_group(net, name)
            g = groups.get(found.id)
            per = cap // found.expand
            if g is not None and per < g.units:
                g.units = max(g.old_units + (per - g.old_units) // g.step * g.step, 0)
                plans[g.index].capped = f"max_width: {name!r} at most {cap}"
        for g in groups.values():
            if g.units <= g.old_units and plans[g.index].capped:
                plans[g.index].capped += f", has {net.width(actions[g.index].layer)}"

    def _cap_of(self, name: str) -> int | None:
        if isinstance(self.max_width, int):
            return self.max_width
        if self.max_width is not None:
            return self.max_width.get(name)
        return None

    def _check_max_width_names(self, net: GrowableNetwork) -> None:
        """Refuse ``max_width`` names that are no module of ``net`` (typos); names of layers
        ``deepen`` will insert (under ``grown.``) are accepted."""
        if not isinstance(self.max_width, Mapping):
            return
        modules = dict(net.named_modules())
        unknown = [n for n in self.max_width if n not in modules and not n.startswith("grown.")]
        if unknown:
            hint = ", ".join(net.layers[:8]) or "none"
            raise GrowthError(
                f"GrowthPlugin(max_width=...) names {unknown}, which are not layers of the "
                f"network; growable layers: {hint}"
            )

    def _share_budget(
        self, net: GrowableNetwork, groups: dict[int, _GroupPlan], plans: list[_Planned]
    ) -> None:
        """Scale every group's growth by the largest common fraction that fits ``max_params``."""
        budget = int(self.max_params)  # type: ignore[arg-type]
        live = {k: g for k, g in groups.items() if g.units > g.old_units}
        if not live:
            return
        full = {k: g.units for k, g in live.items()}
        try:
            model = ParameterModel(net, full)
        except Exception:  # refused when applied, or a rule that cannot plan without data:
            return  # each widening is then capped on its own when applied
        if model.count(full) <= budget:
            return

        def units_at(s: float) -> dict[int, int]:
            out = {}
            for k, g in live.items():
                grow = math.floor(s * (full[k] - g.old_units) + 1e-9)
                out[k] = g.old_units + grow // g.step * g.step
            return out

        lo, hi = 0.0, 1.0  # lo fits (or nothing does), hi does not
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if model.count(units_at(mid)) <= budget else (lo, mid)
        chosen = units_at(lo)
        growing = {k: n for k, n in chosen.items() if n > live[k].old_units}
        try:
            exact = ParameterModel(net, growing).count(growing)
        except Exception:
            exact = budget + 1
        if exact > budget:
            return  # the linear model was wrong: each widening is capped when applied
        reason = f"max_params={budget} shared by {len(live)} widenings"
        for k, g in live.items():
            if chosen[k] < g.units:
                g.units = chosen[k]
                plans[g.index].capped = reason + (
                    " (no room left)" if chosen[k] <= g.old_units else ""
                )

    def _params_after(self, net: GrowableNetwork, action: GrowthAction, width: int = 0) -> int:
        """Parameter count after ``action`` (at ``width`` for a widening), counted from the
        planned shapes; measured on a copy when a rule cannot plan without data."""
        if isinstance(action, Widen):
            init = base_init(self._init_of(action))  # planning needs no batch
            return params_after_widen(net, action.layer, width, init=init)
        return params_after_deepen(net, action.layer, action.kind)

    def _fit_width(self, net: GrowableNetwork, action: Widen, old: int, asked: int) -> int:
        """The largest width in ``(old, asked]`` within ``max_params`` (``old`` if none)."""
        if self.max_params is None:
            return asked
        budget, p0 = self.max_params, net.num_parameters()
        try:
            p_asked = self._params_after(net, action, asked)
        except GrowthError:
            return asked  # refused when applied, with the engine's message
        if p_asked <= budget:
            return asked
        per_unit = (p_asked - p0) / (asked - old)
        guess = min(asked - 1, old + int((budget - p0) // per_unit)) if budget > p0 else old
        if guess <= old:
            return old
        if self._params_after(net, action, guess) <= budget:
            return guess  # exact when the count is affine in the width (one grown dim per tensor)
        lo, hi = old, guess  # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._params_after(net, action, mid) <= budget else (lo, mid)
        return lo

    # --- optimizer -----------------------------------------------------------------------------
    def fix_optimizer(self, strategy: Any) -> None:
        """After mid-experience growth: let Avalanche re-index the optimizer's parameters by name
        (state kept), then check that it optimizes every parameter with state of the right shape."""
        if getattr(strategy, "optimized_param_id", None) is not None:
            strategy.make_optimizer()
        check_optimizer(strategy.optimizer, strategy.model)


def require_growable(model: Any) -> GrowableNetwork:
    """``model`` if it is a ``GrowableNetwork``, else a ``TypeError`` that says how to make one."""
    if not isinstance(model, GrowableNetwork):
        raise TypeError(
            f"GrowthPlugin grows a growth.GrowableNetwork, but the strategy's model is a "
            f"{type(model).__name__}: wrap it, e.g. "
            f"GrowableNetwork(model, example_inputs=torch.zeros(1, ...)), and give that to "
            f"the strategy (and its optimizer)"
        )
    return model


def check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise ``GrowthError`` unless ``optimizer`` holds every trainable parameter of ``model``
    and all its per-parameter state tensors have their parameter's shape."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise GrowthError(f"the optimizer does not update {missing[:5]} after growth")
    for n, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise GrowthError(
                    f"optimizer state {key!r} of {n!r} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(p.shape)}: it was not remapped"
                )
