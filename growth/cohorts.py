"""Per-cohort learning rates: the units each growth adds train at a rate of their own.

A *cohort* is the set of parameter entries one growth phase created (cohort 0: the network as
it was built). Every entry belongs to the newest cohort among the units it connects: a weight
between an old and a new unit is new. :class:`CohortLR` keeps, for every parameter, a tensor of
cohort ids shaped like it; a growth hook keeps them in step with every ``widen``/``deepen``,
however the network is grown (a plugin, user code, a DDP wrapper's ``module``).

The rate is applied to the **update**, not the gradient: :meth:`CohortLR.before_step` keeps a
copy of the parameters, :meth:`CohortLR.after_step` rescales what the optimizer changed,
``p = p_before + m * (p_after - p_before)``, entry by entry. That is a per-entry learning rate
for every ``torch.optim`` optimizer, Adam included (Adam's update does not depend on the
gradient's scale, so a gradient hook could not do it); the optimizer's own state is untouched.
Attach it to an optimizer (:meth:`CohortLR.attach`, step pre/post hooks) or call the two
methods around each step (``strategies.cohort_lr.CohortLRPlugin`` does, from Avalanche's
``before_update``/``after_update``, so optimizer rebuilds do not matter).

Rates (``rule``):

- ``"constant"``: every cohort but 0 gets ``new_unit_lr``; with ``decay_steps``, the factor
  fades linearly back to 1 over that many optimizer steps after the cohort was created;
- ``"vt"`` (Variance Transfer, Yuan et al., NeurIPS 2023): cohort ``t`` gets
  ``||W_t||_F / ||W_0||_F``, the Frobenius norm of its entries over the whole network relative
  to cohort 0's, recomputed at every step (times ``new_unit_lr``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .changes import GrowthChanges
from .errors import GrowthError
from .record import GrowthRecord
from .transform import grow_state

RULES = ("constant", "vt")


class _NoOp:
    """What the growth hook becomes in copies of the network (deepcopy, pickle)."""

    def __call__(self, record: GrowthRecord, changes: GrowthChanges) -> None:
        return None


class _Follow:
    """Growth hook: the cohort ids follow the network's growth (never copied with it)."""

    def __init__(self, owner: CohortLR) -> None:
        self.owner = owner

    def __call__(self, record: GrowthRecord, changes: GrowthChanges) -> None:
        self.owner.follow(changes)

    def __deepcopy__(self, memo: dict) -> _NoOp:
        return _NoOp()

    def __reduce__(self) -> tuple:
        return (_NoOp, ())


class CohortLR:
    """Learning-rate factors per cohort of units of a growing network.

    Parameters
    ----------
    net : GrowableNetwork
        The network (the ``module`` of a DDP wrapper): its growth hook is registered here.
    new_unit_lr : float
        Factor of the learning rate of every cohort but the first (``rule="constant"``), or a
        multiplier of the ``"vt"`` ratio. 1.0 with ``rule="constant"`` changes nothing.
    rule : {"constant", "vt"}
        How a cohort's factor is set (module docstring).
    decay_steps : int, optional
        ``"constant"`` only: the factor fades back to 1 over this many optimizer steps.
    """

    def __init__(
        self,
        net: nn.Module,
        new_unit_lr: float = 1.0,
        *,
        rule: str = "constant",
        decay_steps: int | None = None,
    ) -> None:
        check_options(new_unit_lr, rule, decay_steps)
        if not hasattr(net, "register_growth_hook"):
            raise GrowthError(
                f"CohortLR follows a GrowableNetwork's growth; got {type(net).__name__} (pass "
                f"the GrowableNetwork, or a DDP wrapper's .module)"
            )
        self.net = net
        self.new_unit_lr = float(new_unit_lr)
        self.rule = rule
        self.decay_steps = decay_steps
        self.cohorts: dict[str, Tensor] = {}  # name -> cohort ids (float, shaped like the param)
        self.born: list[int] = [0]  # optimizer step at which each cohort was created
        self.steps = 0
        self._before: dict[str, Tensor] = {}
        self._handle = net.register_growth_hook(_Follow(self))

    def remove(self) -> None:
        """Stop following the network's growth."""
        self._handle.remove()

    # --- growth ----------------------------------------------------------------------------------
    def _cohort_for_growth(self) -> int:
        """The cohort a growth joins: a new one, unless the last was created at this step."""
        if len(self.born) == 1 or self.born[-1] != self.steps:
            self.born.append(self.steps)
        return len(self.born) - 1

    def follow(self, changes: GrowthChanges) -> None:
        """Grow the cohort ids as ``changes`` grew the parameters (the growth hook)."""
        params = dict(self.net.named_parameters())
        grown = [n for n in changes.tensors if n in params]
        fresh = [n for n in changes.new_parameters if n in params]
        if not grown and not fresh:
            return
        cohort = float(self._cohort_for_growth())
        for name in grown:
            p = params[name]
            steps = changes.tensors[name]
            old_shape = changes.old_shapes.get(name, tuple(p.shape))
            ids = self.cohorts.get(name)
            if ids is None:
                ids = torch.zeros(old_shape, device=p.device)
            kept = grow_state(ids, steps, init="net2net", power=0)  # entries copied as they are
            old = grow_state(torch.ones_like(ids), steps, init="zero", power=0)  # 1: old entry
            self.cohorts[name] = torch.where(old > 0, kept, torch.full_like(kept, cohort))
        for name in fresh:
            self.cohorts[name] = torch.full_like(params[name], cohort, dtype=torch.float32)

    # --- rates -----------------------------------------------------------------------------------
    def factors(self) -> dict[int, float]:
        """The learning-rate factor of every cohort (cohort 0: 1.0)."""
        out = {0: 1.0}
        if self.rule == "constant":
            for c, born in enumerate(self.born[1:], 1):
                m = self.new_unit_lr
                if self.decay_steps is not None:
                    fade = max(0.0, 1.0 - (self.steps - born) / self.decay_steps)
                    m = 1.0 + (m - 1.0) * fade
                out[c] = m
            return out
        sq = [0.0] * len(self.born)
        params = dict(self.net.named_parameters())
        for name, p in params.items():
            ids = self.cohorts.get(name)
            v = p.detach().float().pow(2)
            if ids is None:
                sq[0] += float(v.sum())
                continue
            ids = ids.to(v.device).long().flatten()
            sq_t = torch.zeros(len(self.born), dtype=torch.float64, device=v.device)
            sq_t.index_add_(0, ids, v.flatten().double())
            for c, s in enumerate(sq_t.tolist()):
                sq[c] += s
        base = math.sqrt(sq[0]) if sq[0] > 0 else 1.0
        for c in range(1, len(self.born)):
            out[c] = self.new_unit_lr * math.sqrt(sq[c]) / base
        return out

    def multipliers(self) -> Iterator[tuple[str, nn.Parameter, Tensor]]:
        """``(name, parameter, factor per entry)`` of every parameter with a factor other than 1."""
        f = self.factors()
        if all(v == 1.0 for v in f.values()):
            return
        table = torch.tensor([f[c] for c in range(len(self.born))], dtype=torch.float32)
        params = dict(self.net.named_parameters())
        for name, ids in self.cohorts.items():
            p = params.get(name)
            if p is None or ids.shape != p.shape:
                continue
            m = table.to(ids.device)[ids.long()]
            if bool((m != 1.0).any()):
                yield name, p, m.to(p.device, p.dtype)

    # --- the step --------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Keep a copy of every parameter whose update will be rescaled."""
        self._before = {}
        self._pending = list(self.multipliers())
        for name, p, _ in self._pending:
            self._before[name] = p.detach().clone()

    def after_step(self) -> None:
        """Rescale the update of every entry by its cohort's factor; count the step."""
        with torch.no_grad():
            for name, p, m in getattr(self, "_pending", []):
                before = self._before.get(name)
                if before is None or before.shape != p.shape:
                    continue
                p.sub_(before).mul_(m).add_(before)
        self._before, self._pending = {}, []
        self.steps += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> tuple[RemovableHandle, RemovableHandle]:
        """Run :meth:`before_step`/:meth:`after_step` around every ``optimizer.step()``
        (``torch.optim`` step hooks); returns the two handles."""
        pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step())
        post = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())
        return pre, post

    # --- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (for ``growth.save(..., extra=...)`` or a resume file)."""
        return {
            "cohorts": {n: t.detach().cpu().clone() for n, t in self.cohorts.items()},
            "born": list(self.born),
            "steps": int(self.steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; checked against the network first (a
        ``GrowthError`` changes nothing)."""
        try:
            cohorts, born, steps = dict(state["cohorts"]), list(state["born"]), int(state["steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GrowthError(f"malformed CohortLR state: {exc}") from exc
        params = dict(self.net.named_parameters())
        for name, ids in cohorts.items():
            p = params.get(name)
            if p is None or not isinstance(ids, Tensor) or tuple(ids.shape) != tuple(p.shape):
                raise GrowthError(
                    f"CohortLR state does not fit the network: {name!r} "
                    f"{'is not a parameter' if p is None else 'has another shape'}; load the "
                    f"network saved with it"
                )
            if ids.numel() and (int(ids.max()) >= len(born) or int(ids.min()) < 0):
                raise GrowthError(f"malformed CohortLR state: cohort ids of {name!r} out of range")
        self.cohorts = {n: t.to(params[n].device, torch.float32) for n, t in cohorts.items()}
        self.born, self.steps = [int(b) for b in born], steps


def check_options(new_unit_lr: object, rule: object, decay_steps: object) -> None:
    """Raise ``GrowthError`` for a bad ``new_unit_lr``, ``rule`` or ``decay_steps``."""
    if (
        isinstance(new_unit_lr, bool)
        or not isinstance(new_unit_lr, (int, float))
        or not math.isfinite(new_unit_lr)
        or new_unit_lr <= 0
    ):
        raise GrowthError(
            f"new_unit_lr must be a positive number (a factor of the learning rate), got "
            f"{new_unit_lr!r}"
        )
    if rule not in RULES:
        raise GrowthError(f"rule must be one of {RULES}, got {rule!r}")
    if decay_steps is not None:
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 1:
            raise GrowthError(f"decay_steps must be an int >= 1 or None, got {decay_steps!r}")
        if rule != "constant":
            raise GrowthError("decay_steps is for rule='constant'")
