"""Growth policies: when and how a network grows while an Avalanche strategy trains it.

A policy is asked by :class:`~strategies.plugin.GrowthPlugin` at two points:

- ``before_experience(strategy, net)``: before the optimizer is rebuilt for a new experience;
- ``after_iteration(strategy, net)``: after every training iteration (the actions returned are
  applied at the start of the next iteration, with an explicit optimizer fix-up).

Both return a list of growth actions (:class:`Widen`, :class:`Deepen`); an empty list means no
growth. Subclass :class:`GrowthPolicy` (no-op defaults, ``state_dict``/``load_state_dict``), or
give any object these two methods: ``isinstance(obj, GrowthPolicy)`` holds for it too, which is
what the plugin checks.

The actions returned at once are one *growth step*. Layers whose outputs are coupled (a ResNet
stage's blocks and shortcuts, which feed one sum) share one width, so a step should widen each
group once: the policies here return one ``Widen`` per group (:func:`one_per_group`), and the
plugin merges any further ``Widen`` of a group already widened in the step.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..growth import GrowableNetwork, GrowthError


@dataclass(frozen=True)
class Widen:
    """Widen ``layer`` to ``width`` units, or by ``factor`` (exactly one of them).

    ``init``, ``split`` and ``noise`` are passed to :meth:`GrowableNetwork.widen`.
    """

    layer: str
    width: int | None = None
    factor: float | None = None
    init: str = "net2net"
    split: str = "random"
    noise: float = 0.0

    def __post_init__(self) -> None:
        if (self.width is None) == (self.factor is None):
            raise GrowthError(f"Widen({self.layer!r}): give exactly one of width= and factor=")

    def target_width(self, current: int) -> int:
        """The width asked for, given the layer's ``current`` width."""
        if self.width is not None:
            return int(self.width)
        assert self.factor is not None
        return int(round(current * self.factor))


@dataclass(frozen=True)
class Deepen:
    """Insert a new layer after ``layer`` (``kind``: "identity" or "residual")."""

    layer: str
    kind: str = "identity"


GrowthAction = Widen | Deepen


_CALLBACKS = ("before_experience", "after_iteration")


class _DuckTyped(abc.ABCMeta):
    """``isinstance(obj, GrowthPolicy)`` is true for any object that has both callbacks (as for a
    runtime-checkable protocol); subclasses of ``GrowthPolicy`` are checked nominally."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if cls is not GrowthPolicy:
            return super().__instancecheck__(obj)
        return all(getattr(obj, name, None) is not None for name in _CALLBACKS)


class GrowthPolicy(metaclass=_DuckTyped):
    """A growth policy (see the module docstring): base class with no-op callbacks, override the
    ones the policy needs."""

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> Sequence[GrowthAction]:
        """Actions to apply before training on ``strategy.experience``."""
        return []

    def after_iteration(self, strategy: Any, net: GrowableNetwork) -> Sequence[GrowthAction]:
        """Actions to apply before the next training iteration (``strategy.loss`` is set)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """The policy's state for a resume file (:mod:`strategies.resume`): by default a copy of
        every attribute, which must be plain data (numbers, strings, tensors, lists, tuples,
        sets, dicts, growth actions). Override both methods to store less or other things."""
        return copy.deepcopy(dict(vars(self)))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        for key, value in state.items():
            setattr(self, key, value)


def hidden_layers(net: GrowableNetwork, layers: Sequence[str] | None) -> list[str]:
    """``layers`` if given, else every layer of ``net`` whose width can grow (graph order)."""
    return list(layers) if layers is not None else list(net.layers)


#: Top-level module under which ``GrowableNetwork.deepen`` puts the layers it inserts.
INSERTED_PREFIX = "grown."


def is_inserted(name: str) -> bool:
    """True for a layer that ``deepen`` inserted (it lives under the top-level ``grown``)."""
    return name.startswith(INSERTED_PREFIX)


def coupled_groups(net: GrowableNetwork, layers: Sequence[str] | None = None) -> list[list[str]]:
    """``layers`` (default: every growable layer) grouped by what widening them changes.

    Layers whose outputs are coupled (a residual stage: every block's last layer, the shortcut
    and the stem all feed one sum) must keep one width: widening any of them widens all of them
    and the layers that read them (``GrowableNetwork.coupled_layers``). Two layers are in one
    group when widening either changes the same layers. Groups are in graph order of their
    first member; within a group, layers of the original network come before inserted ones.
    """
    groups: dict[Any, list[str]] = {}
    for name in hidden_layers(net, layers):
        try:
            key: Any = frozenset(net.coupled_layers(name))
        except Exception:  # not widenable (say, a module swapped in after tracing): a group of
            key = name  # its own, so that widening it gives the engine's refusal
        groups.setdefault(key, []).append(name)
    return [sorted(g, key=is_inserted) for g in groups.values()]  # stable: graph order kept


def one_per_group(net: GrowableNetwork, layers: Sequence[str] | None = None) -> list[str]:
    """One layer of each of :func:`coupled_groups`: a growth step that widens these widens
    every group once (original layers preferred, so that events name them)."""
    return [g[0] for g in coupled_groups(net, layers)]


def last_original_layer(net: GrowableNetwork) -> str | None:
    """The last growable layer (graph order) that ``deepen`` did not insert; None if none."""
    originals = [n for n in net.layers if not is_inserted(n)]
    return originals[-1] if originals else None


def experiences_seen(strategy: Any) -> int:
    """Number of experiences trained before the current one."""
    return int(strategy.clock.train_exp_counter)


class EveryExperience(GrowthPolicy):
    """Widen every coupled group by ``factor`` before every experience but the first.

    One growth step widens each group of coupled layers (:func:`coupled_groups`) exactly once:
    after ``k`` growths every hidden width is ``base * factor**k`` (rounded at each step), and
    a ResNet stage grows by ``factor``, not by ``factor`` once per block.

    Parameters
    ----------
    factor : float
        Growth factor of each group's width (> 1).
    layers : sequence of str, optional
        Layers to widen (one widening per group among them); default: every growable layer at
        that time, layers inserted by ``deepen`` included (each inserted layer grows with its
        group, or as a group of its own when it has one, e.g. a residual block's inner layer).
    deepen : bool or str
        If true, also insert one layer per growth step (``"identity"`` for True, or the
        ``kind`` given: ``"identity"``/``"residual"``), always after the same layer:
        ``deepen_after``.
    deepen_after : str, optional
        The layer new layers go after; default: the last of ``layers`` when given, else the
        last growable layer of the original network (never a layer inserted by ``deepen``, so
        names stay ``grown.<layer>_deep1``, ``grown.<layer>_deep2``, ...).
    """

    def __init__(
        self,
        factor: float = 1.5,
        layers: Sequence[str] | None = None,
        deepen: bool | str = False,
        deepen_after: str | None = None,
    ) -> None:
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1:
            raise GrowthError(f"EveryExperience: factor must be a number > 1, got {factor!r}")
        if deepen not in (False, True, "identity", "residual"):
            raise GrowthError(f"EveryExperience: deepen must be a bool or a kind, got {deepen!r}")
        if deepen_after is not None and not isinstance(deepen_after, str):
            raise GrowthError(
                f"EveryExperience: deepen_after must be a layer name, got {deepen_after!r}"
            )
        self.factor = float(factor)
        self.layers = None if layers is None else list(layers)
        self.deepen = "identity" if deepen is True else deepen
        self.deepen_after = deepen_after

    def state_dict(self) -> dict[str, Any]:
        return {}  # no state: decisions read the clock and the network

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def deepen_anchor(self, net: GrowableNetwork) -> str | None:
        """The layer the next deepening goes after (see ``deepen_after``)."""
        if self.deepen_after is not None:
            return self.deepen_after
        if self.layers is not None:
            return self.layers[-1] if self.layers else None
        return last_original_layer(net)

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        if experiences_seen(strategy) == 0:
            return []
        actions: list[GrowthAction] = [
            Widen(n, factor=self.factor) for n in one_per_group(net, self.layers)
        ]
        anchor = self.deepen_anchor(net) if self.deepen else None
        if anchor is not None:
            actions.append(Deepen(anchor, kind=str(self.deepen)))
        return actions


class NewClasses(GrowthPolicy):
    """Give each layer ``units_per_class`` units per class seen so far (never shrinking).

    Classes are counted as distinct ``(task label, class)`` pairs over the experiences trained
    so far and the current one, so task-incremental streams that reuse class ids count each
    task's classes.

    Parameters
    ----------
    units_per_class : int
        Units per seen class.
    layers : sequence of str, optional
        Layers to grow (one per coupled group); default: every growable hidden layer.
    """

    def __init__(self, units_per_class: int, layers: Sequence[str] | None = None) -> None:
        if isinstance(units_per_class, bool) or not isinstance(units_per_class, int):
            raise GrowthError(f"NewClasses: units_per_class must be an int: {units_per_class!r}")
        if units_per_class < 1:
            raise GrowthError(f"NewClasses: units_per_class must be >= 1, got {units_per_class}")
        self.units_per_class = units_per_class
        self.layers = None if layers is None else list(layers)
        self.seen: set[tuple[int, int]] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"seen": [list(pair) for pair in sorted(self.seen)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = {(int(t), int(c)) for t, c in state["seen"]}

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        exp = strategy.experience
        tasks = sorted({int(t) for t in exp.task_labels})
        for t in tasks:
            self.seen.update((t, int(c)) for c in exp.classes_in_this_experience)
        target = self.units_per_class * len(self.seen)
        return [
            Widen(n, width=target) for n in one_per_group(net, self.layers) if net.width(n) < target
        ]


class OnPlateau(GrowthPolicy):
    """Widen mid-experience when the training loss stops improving.

    The loss (``strategy.loss``, penalties included) is smoothed by an exponential moving
    average; when it has not improved by more than ``min_delta`` for ``patience`` iterations,
    the layers are widened by ``factor`` and the wait starts over. The state is reset at each
    new experience.

    Parameters
    ----------
    patience : int
        Iterations without improvement before growing.
    min_delta : float
        Smallest decrease of the smoothed loss that counts as an improvement.
    factor : float
        Growth factor of each coupled group's width (> 1), once per growth.
    layers : sequence of str, optional
        Layers to widen (one per coupled group); default: every growable hidden layer.
    smoothing : float
        EMA coefficient in ``[0, 1)`` (0: raw mini-batch losses).
    max_growths : int, optional
        Most growths per experience (None: unlimited).
    """

    def __init__(
        self,
        patience: int = 10,
        min_delta: float = 1e-3,
        factor: float = 1.5,
        layers: Sequence[str] | None = None,
        smoothing: float = 0.0,
        max_growths: int | None = None,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise GrowthError(f"OnPlateau: patience must be an int >= 1, got {patience!r}")
        if not 0.0 <= smoothing < 1.0:
            raise GrowthError(f"OnPlateau: smoothing must be in [0, 1), got {smoothing!r}")
        if not isinstance(factor, (int, float)) or factor <= 1:
            raise GrowthError(f"OnPlateau: factor must be a number > 1, got {factor!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.factor = float(factor)
        self.layers = None if layers is None else list(layers)
        self.smoothing = float(smoothing)
        self.max_growths = max_growths
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf
        self.ema: float | None = None
        self.wait = 0
        self.growths = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "ema": self.ema, "wait": self.wait, "growths": self.growths}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best, ema = float(state["best"]), state["ema"]
        self.best, self.ema = best, None if ema is None else float(ema)
        self.wait, self.growths = int(state["wait"]), int(state["growths"])

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        self._reset()
        return []

    def after_iteration(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        loss = float(strategy.loss.detach())
        if not math.isfinite(loss):
            return []
        a = self.smoothing
        self.ema = loss if self.ema is None else a * self.ema + (1 - a) * loss
        if self.ema < self.best - self.min_delta:
            self.best, self.wait = self.ema, 0
            return []
        self.wait += 1
        if self.wait < self.patience:
            return []
        if self.max_growths is not None and self.growths >= self.max_growths:
            return []
        self.wait, self.best, self.ema = 0, math.inf, None
        self.growths += 1
        return [Widen(n, factor=self.factor) for n in one_per_group(net, self.layers)]


# --- batches of the current experience ---------------------------------------------------------
def experience_batch(strategy: Any, n: int, net: GrowableNetwork) -> tuple[Any, Any]:
    """``(inputs, targets)``: up to ``n`` samples of ``strategy.experience``'s training data
    (a seeded draw: the same samples for the same experience), on ``net``'s device; ``inputs``
    is ``(x, task_labels)`` for a network that takes task labels (``MultiTaskModule``)."""
    import torch
    from avalanche.models import MultiTaskModule

    data = strategy.experience.dataset
    g = torch.Generator().manual_seed(1_000_003 * (experiences_seen(strategy) + 1))
    idx = torch.randperm(len(data), generator=g)[:n].tolist()
    items = [data[i] for i in idx]
    device = next(net.parameters()).device
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
    y = torch.as_tensor([int(it[1]) for it in items], device=device)
    if isinstance(net, MultiTaskModule):
        t = torch.as_tensor([int(it[2]) for it in items], device=device)
        return (x, t), y
    return x, y


# --- when to grow: one width schedule, several timings ----------------------------------------
class ScheduledWidths(GrowthPolicy):
    """Base of the policies that walk one list of widths (``widths[0]`` the start, the last the
    final width) at different times: every timing ends at the same final width, by the start
    of the last experience at the latest (``n_experiences``), so that they can be compared at
    the same final size and epochs. ``self.step`` is the index of the width reached."""

    def __init__(
        self, widths: Sequence[int], n_experiences: int, layers: Sequence[str] | None = None
    ) -> None:
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths) or widths != sorted(widths):
            raise GrowthError(
                f"{type(self).__name__}: widths must be a non-empty, non-decreasing list of "
                f"positive ints (start ... final), got {widths!r}"
            )
        if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or (
            n_experiences < 1
        ):
            raise GrowthError(
                f"{type(self).__name__}: n_experiences must be an int >= 1, got {n_experiences!r}"
            )
        self.widths = widths
        self.n_experiences = n_experiences
        self.layers = None if layers is None else list(layers)
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    @property
    def last(self) -> int:
        return len(self.widths) - 1

    def deadline(self, k: int) -> int:
        """The least step reached before experience ``k``: one behind the periodic schedule
        (``widths[k]`` before experience ``k``), and the final width before the last one."""
        if k >= self.n_experiences - 1:
            return self.last
        return max(0, min(k - 1, self.last))

    def grow_to(self, net: GrowableNetwork, step: int) -> list[GrowthAction]:
        """Widen every group narrower than ``widths[step]`` to it; remember ``step``."""
        self.step = max(self.step, min(step, self.last))
        target = self.widths[self.step]
        return [Widen(n, width=target) for n in one_per_group(net, self.layers)
                if net.width(n) < target]


class Early(ScheduledWidths):
    """Reach the final width within the first ``k`` experiences: before experience ``j``
    (``1 <= j <= k``) the width is ``widths[round(j * (len(widths) - 1) / k)]`` (front-loaded
    growth: the large network trains longer)."""

    def __init__(
        self,
        widths: Sequence[int],
        n_experiences: int,
        k: int = 2,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(widths, n_experiences, layers)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise GrowthError(f"Early: k must be an int >= 1, got {k!r}")
        self.k = k

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        j = experiences_seen(strategy)
        if j == 0:
            return []
        return self.grow_to(net, round(min(j, self.k) * self.last / self.k))


class PlateauWidths(ScheduledWidths):
    """Grow one step of ``widths`` when the training loss plateaus (as :class:`OnPlateau`:
    an EMA of the loss without improvement by ``min_delta`` for ``patience`` iterations), at
    most once per experience, and at least as the :meth:`deadline` says (one step behind the
    periodic schedule, the final width before the last experience)."""

    def __init__(
        self,
        widths: Sequence[int],
        n_experiences: int,
        patience: int = 20,
        min_delta: float = 1e-3,
        smoothing: float = 0.9,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(widths, n_experiences, layers)
        self.plateau = OnPlateau(patience, min_delta, 2.0, layers, smoothing, max_growths=1)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.plateau.load_state_dict(state["plateau"])

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        self.plateau.before_experience(strategy, net)
        j = experiences_seen(strategy)
        return self.grow_to(net, self.deadline(j)) if j else []

    def after_iteration(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        if self.step >= self.last or not self.plateau.after_iteration(strategy, net):
            return []
        return self.grow_to(net, self.step + 1)


def effective_rank(features: Any) -> float:
    """Effective rank (Roy & Vetterli 2007) of a ``[samples, units]`` matrix: ``exp`` of the
    entropy of its normalised singular values; between 1 and ``min(samples, units)``."""
    import torch

    f = features.detach().double().reshape(features.shape[0], -1)
    f = f - f.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(f)
    total = float(s.sum())
    if total <= 0:
        return 1.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class RankWidths(ScheduledWidths):
    """Grow one step of ``widths`` before an experience when a layer is saturated: the
    effective rank of its outputs on ``samples`` inputs of the new experience is at least
    ``threshold`` times its width (:func:`effective_rank`). At least as the :meth:`deadline`
    says (one step behind the periodic schedule, the final width before the last experience).
    ``self.utilisation`` holds the last measurement (layer -> rank / width)."""

    def __init__(
        self,
        widths: Sequence[int],
        n_experiences: int,
        threshold: float = 0.5,
        samples: int = 256,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__(widths, n_experiences, layers)
        if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise GrowthError(f"RankWidths: threshold must be in (0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.samples = int(samples)
        self.utilisation: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "utilisation": dict(self.utilisation)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.utilisation = {str(k): float(v) for k, v in state["utilisation"].items()}

    def measure(self, strategy: Any, net: GrowableNetwork) -> dict[str, float]:
        """Effective rank / width of every layer's outputs on the experience's samples."""
        import torch

        names = one_per_group(net, self.layers)
        inputs, _ = experience_batch(strategy, self.samples, net)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        outs: dict[str, Any] = {}
        handles = [
            net.get_submodule(n).register_forward_hook(
                lambda m, a, out, n=n: outs.__setitem__(n, out.detach())
            )
            for n in names
        ]
        was = net.training
        try:
            net.eval()
            with torch.no_grad():
                net(*inputs)
        finally:
            net.train(was)
            for h in handles:
                h.remove()
        util = {}
        for n in names:
            o = outs[n]
            o = o.movedim(1, -1).reshape(-1, o.shape[1]) if o.dim() > 2 else o
            util[n] = effective_rank(o) / net.width(n)
        self.utilisation = util
        return util

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[GrowthAction]:
        j = experiences_seen(strategy)
        if j == 0:
            return []
        step = self.deadline(j)
        if self.step < self.last:
            util = self.measure(strategy, net)
            if util and max(util.values()) >= self.threshold:
                step = max(step, self.step + 1)
        return self.grow_to(net, step)
