"""Growth and cost metrics for Avalanche's ``EvaluationPlugin``.

:func:`growth_metrics` (growth of a :class:`~growth.GrowableNetwork` under a
:class:`~strategies.plugin.GrowthPlugin`), :func:`parameter_count_metric` and
:func:`training_flops_metric` (any model, any strategy)::

    EvaluationPlugin(accuracy_metrics(stream=True), growth_metrics(),
                     parameter_count_metric(), training_flops_metric(),
                     loggers=[InteractiveLogger(), TensorboardLogger("runs/x")])

Text loggers get a summary, TensorBoard the detail. Avalanche's ``TextLogger`` and
``InteractiveLogger`` print every metric name they received at the end of each epoch: one line
per growable layer would flood them (20 lines per epoch on resnet18). So the per-layer and
per-event values are *detail values* (:class:`DetailInt`, :class:`DetailFloat`): numbers that
``TensorboardLogger`` and ``WandBLogger`` plot like any int or float and that the text loggers
skip (they skip image values, and a detail value is also an Avalanche ``TensorImage``). What the
text loggers print: ``Growth/num_parameters`` and ``Growth/summary``, one line per growth phase
(the layers' old and new widths grouped, the parameter counts, the largest preservation
error), plus ``Model/num_parameters`` and ``Model/training_flops`` when those metrics are used.

Growth scalars, plotted against ``strategy.clock.train_iterations`` (detail values marked *):

- ``Growth/num_parameters``: parameter count of the model;
- ``Growth/width/<layer>`` *: width of every growable layer;
- ``Growth/event/<layer>/old_width`` *, ``.../new_width`` *, ``.../params_after`` *,
  ``.../max_abs_error`` * (its preservation error on the probe batch, when verified) and
  ``.../seconds`` * (its wall time): one point per growth of ``<layer>``, at the iteration it
  happened; ``Growth/events`` *: growths so far; ``Growth/skipped`` *: actions skipped or
  refused;
- ``Growth/seconds_total`` *: cumulative wall time spent growing (remaps and checks included);
- ``Growth/summary``: text (TensorBoard ignores it), the growth phases since the last epoch end.

They are emitted before each training experience (after growth and the heads' adaptation) and
after every mid-experience growth.

Cost scalars (:func:`parameter_count_metric`, :func:`training_flops_metric`):

- ``Model/num_parameters``: parameter count at the start and end of every training experience
  and whenever it changed (checked before every training iteration: mid-experience growth shows
  as a step, the old and the new count at the same iteration);
- ``Model/training_flops``: FLOPs spent in ``strategy.train()`` calls so far, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` from the start to the end of each call (forward
  and backward passes, replay and LwF's teacher passes, EWC's importance pass, growth's
  verification passes), emitted after every training iteration and at the end of every
  experience; the same count as ``python -m net2grow.benchmarks continual``'s ``gflops``.

Values are Python ``int``/``float`` (``TensorboardLogger`` drops other types silently) or
subclasses of them; their state is plain data, so a resume file (:mod:`strategies.resume`)
keeps it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any

import numpy as np
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue, TensorImage

from ..growth import GrowableNetwork
from .plugin import GrowthEvent, GrowthPlugin

PREFIX = "Growth"
MODEL_PREFIX = "Model"

__all__ = [
    "DetailFloat",
    "DetailInt",
    "GrowthSummary",
    "ParameterCountMetric",
    "TrainingFlopsMetric",
    "detail",
    "growth_metrics",
    "parameter_count_metric",
    "training_flops_metric",
]


# --- detail values ---------------------------------------------------------------------------
class DetailInt(int, TensorImage):
    """An ``int`` for TensorBoard and W&B only: Avalanche's text loggers skip it (they skip
    ``TensorImage`` values), ``TensorboardLogger`` and ``WandBLogger`` log it as a scalar (they
    test for ``int``/``float`` first). Arithmetic on it gives plain ints."""

    __slots__ = ()

    def __init__(self, *args: Any) -> None:  # TensorImage's __init__ wants an image
        pass

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(int(self), dtype=dtype)


class DetailFloat(float, TensorImage):
    """A ``float`` for TensorBoard and W&B only (see :class:`DetailInt`)."""

    __slots__ = ()

    def __init__(self, *args: Any) -> None:
        pass

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(float(self), dtype=dtype)


def detail(value: int | float) -> DetailInt | DetailFloat:
    """``value`` as a detail value (:class:`DetailInt` for ints, else :class:`DetailFloat`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return DetailInt(value)
    return DetailFloat(float(value))


# --- growth metrics --------------------------------------------------------------------------
def _plugin(strategy: Any) -> GrowthPlugin | None:
    return next((p for p in strategy.plugins if isinstance(p, GrowthPlugin)), None)


class _GrowthMetric(PluginMetric[float]):
    """Emits at ``before_training_exp`` and after each mid-experience growth."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = 0  # events already reported
        self._last: dict[str, Any] = {}

    def result(self) -> dict[str, Any]:
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def _values(self, strategy: Any, events: list[GrowthEvent]) -> list[tuple[str, Any, int]]:
        raise NotImplementedError

    def _emit(self, strategy: Any) -> list[MetricValue]:
        plugin = _plugin(strategy)
        events = plugin.events if plugin is not None else []
        new, self._seen = events[self._seen :], len(events)
        out = []
        for name, value, x in self._values(strategy, new):
            self._last[name] = value
            out.append(MetricValue(self, name, value, x))
        return out

    def before_training_exp(self, strategy: Any) -> list[MetricValue]:
        return self._emit(strategy)

    def before_training_iteration(self, strategy: Any) -> list[MetricValue] | None:
        plugin = _plugin(strategy)
        if plugin is None or len(plugin.events) == self._seen:
            return None
        return self._emit(strategy)

    def __str__(self) -> str:
        return type(self).__name__


def _now(strategy: Any) -> int:
    return int(strategy.clock.train_iterations)


class ParameterCount(_GrowthMetric):
    """``Growth/num_parameters`` (printed by text loggers)."""

    def _values(self, strategy, events):  # type: ignore[override]
        n = sum(p.numel() for p in strategy.model.parameters())
        return [(f"{PREFIX}/num_parameters", int(n), _now(strategy))]


class LayerWidths(_GrowthMetric):
    """``Growth/width/<layer>`` for every growable layer (detail values)."""

    def _values(self, strategy, events):  # type: ignore[override]
        net = getattr(strategy.model, "module", strategy.model)  # a DDP wrapper's network
        if not isinstance(net, GrowableNetwork):
            return []
        x = _now(strategy)
        return [(f"{PREFIX}/width/{name}", detail(int(net.width(name))), x) for name in net.layers]


class GrowthEvents(_GrowthMetric):
    """One point per growth event, plus running counts (detail values)."""

    def __init__(self) -> None:
        super().__init__()
        self.grown = 0
        self.skipped = 0

    def _values(self, strategy, events):  # type: ignore[override]
        out: list[tuple[str, Any, int]] = []
        for ev in events:
            if ev.status not in ("grown", "capped"):
                self.skipped += 1
                continue
            self.grown += 1
            base = f"{PREFIX}/event/{ev.layer}"
            it = ev.iteration
            out.append((f"{base}/old_width", detail(int(ev.old_width)), it))
            out.append((f"{base}/new_width", detail(int(ev.new_width)), it))
            out.append((f"{base}/params_after", detail(int(ev.params_after)), it))
            if ev.max_abs_error is not None:
                out.append((f"{base}/max_abs_error", detail(float(ev.max_abs_error)), it))
            out.append((f"{base}/seconds", detail(float(ev.seconds)), it))
        x = _now(strategy)
        out.append((f"{PREFIX}/events", detail(int(self.grown)), x))
        out.append((f"{PREFIX}/skipped", detail(int(self.skipped)), x))
        return out


class GrowthTime(_GrowthMetric):
    """``Growth/seconds_total`` (a detail value)."""

    def _values(self, strategy, events):  # type: ignore[override]
        plugin = _plugin(strategy)
        seconds = plugin.growth_seconds if plugin is not None else 0.0
        return [(f"{PREFIX}/seconds_total", detail(float(seconds)), _now(strategy))]


def _widths_text(events: list[GrowthEvent]) -> str:
    """``"2 layers 16->23"`` or ``"20 layers: 8x 64->96, 12x 128->192"``."""
    pairs = Counter((e.old_width, e.new_width) for e in events)
    n = len(events)
    noun = "layer" if n == 1 else "layers"
    if len(pairs) == 1:
        (old, new), _ = pairs.popitem()
        names = f" ({events[0].layer})" if n == 1 else ""
        return f"{n} {noun}{names} {old}->{new}"
    parts = [f"{count}x {old}->{new}" for (old, new), count in sorted(pairs.items())]
    return f"{n} {noun}: " + ", ".join(parts)


def _phase_line(events: list[GrowthEvent]) -> str:
    """One line for the events of one growth phase (same experience and iteration)."""
    first = events[0]
    where = "before" if first.phase == "before_experience" else "during"
    head = f"experience {first.experience} ({where}, iteration {first.iteration}): "
    parts = []
    widened = [e for e in events if e.status in ("grown", "capped") and e.op == "widen"]
    deepened = [e for e in events if e.status in ("grown", "capped") and e.op == "deepen"]
    if widened:
        capped = sum(e.status == "capped" for e in widened)
        note = f" ({capped} capped by the plugin's limits)" if capped else ""
        parts.append("widened " + _widths_text(widened) + note)
    if deepened:
        parts.append("deepened after " + ", ".join(e.layer for e in deepened))
    grown = widened + deepened
    if grown:
        parts.append(f"parameters {grown[0].params_before:,} -> {grown[-1].params_after:,}")
        errors = [e.max_abs_error for e in grown if e.max_abs_error is not None]
        if errors:
            parts.append(f"max error {max(errors):.1e}")
    others = Counter(e.status for e in events if e.status not in ("grown", "capped"))
    parts.extend(f"{count} {status}" for status, count in sorted(others.items()))
    return head + "; ".join(parts)


class GrowthSummary(_GrowthMetric):
    """``Growth/summary``: text, one line per growth phase since the last epoch end (text
    loggers print it once, at that epoch's end; TensorBoard ignores text values)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def _values(self, strategy, events):  # type: ignore[override]
        if not events:
            return []
        phases: dict[tuple[int, int, str], list[GrowthEvent]] = {}
        for ev in events:
            phases.setdefault((ev.experience, ev.iteration, ev.phase), []).append(ev)
        self.lines.extend(_phase_line(evs) for evs in phases.values())
        return [(f"{PREFIX}/summary", "\n\t  ".join(self.lines), _now(strategy))]

    def after_training_epoch(self, strategy: Any) -> None:
        self.lines = []  # the text loggers printed them at this epoch's end

    def after_training_exp(self, strategy: Any) -> None:
        self.lines = []


def growth_metrics() -> list[PluginMetric]:
    """The growth metrics, for ``EvaluationPlugin(..., growth_metrics(), loggers=[...])``."""
    return [ParameterCount(), LayerWidths(), GrowthEvents(), GrowthTime(), GrowthSummary()]


# --- cost metrics ----------------------------------------------------------------------------
def _count_parameters(strategy: Any) -> int:
    return int(sum(p.numel() for p in strategy.model.parameters()))


class ParameterCountMetric(PluginMetric[int]):
    """``Model/num_parameters`` over training (see the module docstring); any model."""

    name = f"{MODEL_PREFIX}/num_parameters"

    def __init__(self) -> None:
        super().__init__()
        self.count: int | None = None

    def result(self) -> int | None:
        return self.count

    def reset(self) -> None:
        self.count = None

    def _emit(self, strategy: Any) -> list[MetricValue]:
        self.count = _count_parameters(strategy)
        return [MetricValue(self, self.name, self.count, _now(strategy))]

    def before_training_exp(self, strategy: Any) -> list[MetricValue]:
        return self._emit(strategy)

    def before_training_iteration(self, strategy: Any) -> list[MetricValue] | None:
        old = self.count
        if old is None or _count_parameters(strategy) == old:
            return None
        before = MetricValue(self, self.name, old, _now(strategy))
        return [before, *self._emit(strategy)]

    def after_training_exp(self, strategy: Any) -> list[MetricValue]:
        return self._emit(strategy)

    def __str__(self) -> str:
        return "ParameterCount"


class TrainingFlopsMetric(PluginMetric[int]):
    """``Model/training_flops`` over training (see the module docstring); any model.

    A ``torch.utils.flop_counter.FlopCounterMode`` is active from ``before_training`` to
    ``after_training`` of every ``strategy.train()`` call. A call that raised leaves its counter
    active; the next call closes it first (its FLOPs are not counted).

    Parameters
    ----------
    every : int
        Emit after every ``every``-th training iteration (0: only at experience ends).
    """

    name = f"{MODEL_PREFIX}/training_flops"

    def __init__(self, every: int = 1) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0, got {every!r}")
        self.every = every
        self.total = 0  # FLOPs of the finished train() calls
        self._counter: Any = None

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a resume file: the FLOPs counted so far."""
        return {"total": int(self.result())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["total"])

    @property
    def counting(self) -> bool:
        """Whether a ``train()`` call is being counted now."""
        return self._counter is not None

    def result(self) -> int:
        """FLOPs of every ``train()`` call so far (the current one up to now)."""
        live = self._counter.get_total_flops() if self._counter is not None else 0
        return int(self.total + live)

    def reset(self) -> None:
        self.total = 0

    def _close(self, stale: bool = False) -> int:
        counter, self._counter = self._counter, None
        if stale:  # left active by a call that raised: the mode stack may have moved on
            with contextlib.suppress(Exception):
                counter.__exit__(None, None, None)
            return 0
        counter.__exit__(None, None, None)
        return int(counter.get_total_flops())

    def _emit(self, strategy: Any) -> list[MetricValue]:
        return [MetricValue(self, self.name, self.result(), _now(strategy))]

    def before_training(self, strategy: Any) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        if self._counter is not None:  # left by a train() call that raised
            self._close(stale=True)
        counter = FlopCounterMode(display=False)
        counter.__enter__()
        self._counter = counter

    def after_training_iteration(self, strategy: Any) -> list[MetricValue] | None:
        super().after_training_iteration(strategy)
        # x: the clock's count before this iteration, as Avalanche's minibatch metrics
        if self.every and (_now(strategy) + 1) % self.every == 0:
            return self._emit(strategy)
        return None

    def after_training_exp(self, strategy: Any) -> list[MetricValue]:
        return self._emit(strategy)

    def after_training(self, strategy: Any) -> list[MetricValue]:
        if self._counter is not None:
            self.total += self._close()
        return self._emit(strategy)

    def __str__(self) -> str:
        return "TrainingFlops"


def parameter_count_metric() -> ParameterCountMetric:
    """``Model/num_parameters`` for ``EvaluationPlugin(..., parameter_count_metric())``."""
    return ParameterCountMetric()


def training_flops_metric(every: int = 1) -> TrainingFlopsMetric:
    """``Model/training_flops`` for ``EvaluationPlugin(..., training_flops_metric())``: FLOPs
    of the ``strategy.train()`` calls so far, counted with ``torch.utils.flop_counter``, emitted
    after every ``every``-th training iteration and at every experience's end."""
    return TrainingFlopsMetric(every)
