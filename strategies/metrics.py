"""Growth metrics for Avalanche's ``EvaluationPlugin``: every logger (TensorBoard, text,
interactive, CSV, W&B) receives them like accuracy.

Scalars (Python ``int``/``float`` only: ``TensorboardLogger`` drops other types silently),
plotted against ``strategy.clock.train_iterations``:

- ``Growth/num_parameters``: parameter count of the model;
- ``Growth/width/<layer>``: width of every growable layer;
- ``Growth/event/<layer>/new_width``, ``.../params_after``, ``.../max_abs_error``: one point per
  growth of ``<layer>``, with its preservation error on the probe batch when verified;
  ``Growth/events``: number of growths so far; ``Growth/skipped``: actions skipped or refused;
- ``Growth/seconds_total``: cumulative wall time spent growing (remaps and checks included).

They are emitted before each training experience (after growth and the heads' adaptation) and
after every mid-experience growth.
"""

from __future__ import annotations

from typing import Any

from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from ..growth import GrowableNetwork
from .plugin import GrowthEvent, GrowthPlugin

PREFIX = "Growth"


def _plugin(strategy: Any) -> GrowthPlugin | None:
    return next((p for p in strategy.plugins if isinstance(p, GrowthPlugin)), None)


class _GrowthMetric(PluginMetric[float]):
    """Emits at ``before_training_exp`` and after each mid-experience growth."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = 0  # events already reported
        self._last: dict[str, float] = {}

    def result(self) -> dict[str, float]:
        return dict(self._last)

    def reset(self) -> None:
        self._last = {}

    def _values(self, strategy: Any, events: list[GrowthEvent]) -> list[tuple[str, float, int]]:
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
    """``Growth/num_parameters``."""

    def _values(self, strategy, events):  # type: ignore[override]
        n = sum(p.numel() for p in strategy.model.parameters())
        return [(f"{PREFIX}/num_parameters", int(n), _now(strategy))]


class LayerWidths(_GrowthMetric):
    """``Growth/width/<layer>`` for every growable layer."""

    def _values(self, strategy, events):  # type: ignore[override]
        net = getattr(strategy.model, "module", strategy.model)  # a DDP wrapper's network
        if not isinstance(net, GrowableNetwork):
            return []
        x = _now(strategy)
        return [(f"{PREFIX}/width/{name}", int(net.width(name)), x) for name in net.layers]


class GrowthEvents(_GrowthMetric):
    """One point per growth event, plus running counts."""

    def __init__(self) -> None:
        super().__init__()
        self.grown = 0
        self.skipped = 0

    def _values(self, strategy, events):  # type: ignore[override]
        out: list[tuple[str, float, int]] = []
        for ev in events:
            if ev.status not in ("grown", "capped"):
                self.skipped += 1
                continue
            self.grown += 1
            base = f"{PREFIX}/event/{ev.layer}"
            out.append((f"{base}/new_width", int(ev.new_width), ev.iteration))
            out.append((f"{base}/params_after", int(ev.params_after), ev.iteration))
            if ev.max_abs_error is not None:
                out.append((f"{base}/max_abs_error", float(ev.max_abs_error), ev.iteration))
        x = _now(strategy)
        out.append((f"{PREFIX}/events", int(self.grown), x))
        out.append((f"{PREFIX}/skipped", int(self.skipped), x))
        return out


class GrowthTime(_GrowthMetric):
    """``Growth/seconds_total``."""

    def _values(self, strategy, events):  # type: ignore[override]
        plugin = _plugin(strategy)
        seconds = plugin.growth_seconds if plugin is not None else 0.0
        return [(f"{PREFIX}/seconds_total", float(seconds), _now(strategy))]


def growth_metrics() -> list[PluginMetric]:
    """The growth metrics, for ``EvaluationPlugin(..., growth_metrics(), loggers=[...])``."""
    return [ParameterCount(), LayerWidths(), GrowthEvents(), GrowthTime()]
