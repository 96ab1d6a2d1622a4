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
(:mod:`strategies.compat`), also when user code grows the network itself.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from growth import GrowableNetwork, GrowthError, GrowthRecord

from . import compat
from .policies import Deepen, GrowthAction, GrowthPolicy, Widen
from .rules_avalanche import check_heads

OPTIMIZER_STATES = ("carry", "reset")


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
        compat.remap_regularizers(strategy.plugins, strategy.model, changes)
        if not self.plugin.busy:  # growth by user code: the plugin's own is timed whole
            self.plugin.growth_seconds += time.perf_counter() - start

    def __deepcopy__(self, memo: dict) -> _NoOpHook:
        return _NoOpHook()

    def __reduce__(self) -> tuple:
        return (_NoOpHook, ())


class GrowthPlugin(SupervisedPlugin):
    """Grow ``strategy.model`` (a :class:`~growth.GrowableNetwork`) as ``policy`` decides.

    Parameters
    ----------
    policy : GrowthPolicy
        Decides what to grow (see :mod:`strategies.policies`).
    max_params : int, optional
        Parameter budget: a widening that would exceed it is shrunk to the largest width that
        fits (status "capped") or skipped; a deepening that would exceed it is skipped.
    optimizer_state : {"carry", "reset"}
        "carry": the optimizer state is remapped to the grown parameters (old units keep theirs,
        step counts keep counting). "reset": grown parameters restart with empty state.
    generator : torch.Generator or int, optional
        Randomness of the unit mappings (an int seeds a new generator): same seed, same growth.
    on_refusal : {"warn", "raise"}
        What to do when the engine refuses an action (``GrowthError``).
    """

    def __init__(
        self,
        policy: GrowthPolicy,
        *,
        max_params: int | None = None,
        optimizer_state: str = "carry",
        generator: torch.Generator | int | None = None,
        on_refusal: str = "warn",
    ) -> None:
        super().__init__()
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
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        self.policy = policy
        self.max_params = max_params
        self.optimizer_state = optimizer_state
        self.generator = generator
        self.on_refusal = on_refusal
        self.events: list[GrowthEvent] = []
        self.growth_seconds = 0.0
        self.strategy: Any = None
        self.busy = False  # True while the plugin itself grows the network
        self._pending: list[GrowthAction] = []
        self._hooked: GrowableNetwork | None = None
        self._handle: Any = None

    # --- Avalanche callbacks -------------------------------------------------------------------
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        net = self.network(strategy)
        self.strategy = strategy
        for msg in check_heads(net):
            warnings.warn(msg, stacklevel=2)
        if self._hooked is not net:
            if self._handle is not None:
                self._handle.remove()
            try:
                self._handle = compat.subscribe(net, _RegularizerSync(self))
            except GrowthError:
                if compat.needs_remap(strategy.plugins):
                    raise
                self._handle = None
            self._hooked = net

    def before_train_dataset_adaptation(self, strategy: Any, **kwargs: Any) -> None:
        net = self.network(strategy)
        actions = [*self._pending, *self.policy.before_experience(strategy, net)]
        self._pending = []
        self._apply(strategy, net, actions, "before_experience")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        # After the heads' adaptation: new heads may sit before layers added by deepen.
        compat.align_regularizers(strategy.plugins, strategy.model)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._pending.extend(self.policy.after_iteration(strategy, self.network(strategy)))

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
        """``strategy.model``, checked to be a ``GrowableNetwork``."""
        return require_growable(strategy.model)

    def _apply(
        self, strategy: Any, net: GrowableNetwork, actions: Sequence[GrowthAction], phase: str
    ) -> bool:
        """Apply ``actions`` in order; True when the network changed."""
        if not actions:
            return False
        device = torch.device(strategy.device)
        if any(p.device != device for p in net.parameters()):
            net.to(device)
        changed = False
        for action in actions:
            start = time.perf_counter()
            self.busy = True
            try:
                event = self._grow(strategy, net, action, phase)
            finally:
                self.busy = False
            self.growth_seconds += time.perf_counter() - start
            self.events.append(event)
            changed |= event.status in ("grown", "capped")
        return changed

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
        self, strategy: Any, net: GrowableNetwork, action: GrowthAction, phase: str
    ) -> GrowthEvent:
        optimizer = strategy.optimizer if self.optimizer_state == "carry" else None
        shapes = {id(p): p.shape for p in net.parameters()}
        try:
            if isinstance(action, Widen):
                old = net.width(action.layer)
                asked = action.target_width(old)
                if asked <= old:
                    return self._event(
                        strategy,
                        net,
                        action,
                        phase,
                        requested_width=asked,
                        reason=f"asked for {asked} units, has {old}",
                    )
                width = self._fit_width(net, action, old, asked)
                if width <= old:
                    return self._event(
                        strategy,
                        net,
                        action,
                        phase,
                        requested_width=asked,
                        reason=f"max_params={self.max_params} leaves no room",
                    )
                rec = net.widen(
                    action.layer,
                    width,
                    init=action.init,
                    split=action.split,
                    noise=action.noise,
                    generator=self.generator,
                    optimizer=optimizer,
                )
                status = "grown" if width == asked else "capped"
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
                rec = net.deepen(action.layer, kind=action.kind, optimizer=optimizer)
                status = "grown"
            else:
                raise TypeError(f"unknown growth action {action!r}")
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
        )

    # --- parameter budget ----------------------------------------------------------------------
    def _params_after(self, net: GrowableNetwork, action: GrowthAction, width: int = 0) -> int:
        """Parameter count after ``action`` (at ``width`` for a widening), measured on a copy."""
        trial = copy.deepcopy(net)
        hooks = getattr(trial, "_growth_hooks", None)
        if hooks is not None:
            hooks.clear()  # nothing outside the copy may see its growth
        if isinstance(action, Widen):
            return trial.widen(action.layer, width, init=action.init, verify=False).params_after
        return trial.deepen(action.layer, kind=action.kind, verify=False).params_after

    def _fit_width(self, net: GrowableNetwork, action: Widen, old: int, asked: int) -> int:
        """The largest width in ``(old, asked]`` within ``max_params`` (``old`` if none)."""
        if self.max_params is None:
            return asked
        budget, p0 = self.max_params, net.num_parameters()
        p_asked = self._params_after(net, action, asked)
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
