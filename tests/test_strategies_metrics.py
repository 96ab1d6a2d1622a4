"""Growth and cost metrics reach Avalanche's loggers: read them back from a TensorBoard event
file and from a text logger's output."""

from __future__ import annotations

import io
import re

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from avalanche.training.supervised import EWC, Naive, Replay
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode

from net2grow.strategies import GrowthPlugin, growth_metrics
from net2grow.strategies.metrics import (
    DetailFloat,
    DetailInt,
    TrainingFlopsMetric,
    detail,
    parameter_count_metric,
    training_flops_metric,
)
from net2grow.strategies.policies import EveryExperience, OnPlateau


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def train(stream, log_dir, policy, n: int = 3):
    net = mlp_net()
    logger = TensorboardLogger(tb_log_dir=str(log_dir))
    plugin = GrowthPlugin(policy, generator=0)
    strategy = Naive(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        train_mb_size=8, plugins=[plugin],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), growth_metrics(),
                                   loggers=[logger]),
    )
    for exp in stream.train_stream[:n]:
        strategy.train(exp)
    logger.writer.flush()
    return net, plugin, strategy


def test_tensorboard_receives_params_widths_events_and_time(stream, tmp_path):
    net, plugin, _ = train(stream, tmp_path, EveryExperience(factor=1.5))
    tb = scalars(tmp_path)
    params = tb["Growth/num_parameters"]
    grown = [e for e in plugin.events if e.status == "grown"]
    # One point per experience, after growth: the model's size at each start.
    expected = [sum(p.numel() for p in mlp_net().parameters())] + [
        e.params_after for e in grown if e.layer == "2"]
    assert [v for _, v in params] == expected
    assert params[-1][1] == net.num_parameters()
    assert [v for _, v in tb["Growth/width/0"]] == [32, 48, 72]
    assert [v for _, v in tb["Growth/width/2"]] == [32, 48, 72]
    # Each growth event: its new width at the iteration it happened, and its preservation error.
    assert [(s, v) for s, v in tb["Growth/event/0/new_width"]] == [
        (e.iteration, e.new_width) for e in grown if e.layer == "0"]
    errors = [v for _, v in tb["Growth/event/2/max_abs_error"]]
    assert len(errors) == 2 and all(0 <= v < 1e-4 for v in errors)
    assert [v for _, v in tb["Growth/events"]] == [0, 2, 4]
    seconds = [v for _, v in tb["Growth/seconds_total"]]
    assert seconds[0] == 0 and seconds[1] > 0 and seconds == sorted(seconds)
    assert seconds[-1] == pytest.approx(plugin.growth_seconds, rel=1e-6)


def test_mid_experience_growth_is_logged_when_it_happens(stream, tmp_path):
    policy = OnPlateau(patience=5, min_delta=10.0, factor=1.25, max_growths=1)
    _, plugin, _ = train(stream, tmp_path, policy, n=2)
    tb = scalars(tmp_path)
    steps = [s for s, _ in tb["Growth/width/0"]]
    grown_at = sorted({e.iteration for e in plugin.events if e.status == "grown"})
    assert len(grown_at) == 2 and set(grown_at) <= set(steps)
    assert [v for _, v in tb["Growth/width/0"]][-1] == 50


def test_metric_values_are_python_numbers(stream, tmp_path):
    """TensorboardLogger drops anything but int/float (and images): every value is one; the
    per-layer and per-event ones are detail values (TensorBoard only), the text summary str."""
    _, _, strategy = train(stream, tmp_path, EveryExperience(factor=1.5), n=2)
    last = strategy.evaluator.get_last_metrics()
    growth = {k: v for k, v in last.items() if k.startswith("Growth/")}
    assert len(growth) >= 8
    summary = growth.pop("Growth/summary")
    assert isinstance(summary, str) and "32->48" in summary
    assert all(isinstance(v, (int, float)) for v in growth.values()), growth
    assert type(growth["Growth/num_parameters"]) is int
    assert isinstance(growth["Growth/width/0"], DetailInt)
    assert isinstance(growth["Growth/event/0/max_abs_error"], DetailFloat)
    assert isinstance(growth["Growth/seconds_total"], DetailFloat)


def test_detail_values_behave_as_numbers():
    i, f = detail(48), detail(0.25)
    assert isinstance(i, int) and i == 48 and i + 1 == 49 and type(i + 1) is int
    assert isinstance(f, float) and f == 0.25 and hash(i) == hash(48)
    import numpy as np

    assert np.asarray(i) == 48 and np.array([f])[0] == 0.25
    assert isinstance(detail(True), DetailFloat)  # a bool is not a width


def test_text_loggers_get_one_line_per_growth_not_one_per_layer(stream, tmp_path):
    """A TextLogger (InteractiveLogger is one) prints what it got at every epoch's end: the
    growth shows as one summary line per growth phase, the per-layer widths and per-event
    values go to TensorBoard only."""
    text = io.StringIO()
    net = mlp_net()
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    strategy = Naive(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), train_mb_size=16,
        train_epochs=2, plugins=[plugin],
        evaluator=EvaluationPlugin(
            growth_metrics(), parameter_count_metric(), training_flops_metric(),
            loggers=[TextLogger(text), TensorboardLogger(tb_log_dir=str(tmp_path))],
        ),
    )  # fmt: skip
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    out = text.getvalue()
    assert "Growth/width" not in out and "Growth/event" not in out and "seconds" not in out
    summaries = re.findall(r"Growth/summary = (.*)", out)
    first, second = plugin.events[:2], plugin.events[2:]
    assert len(second) == 2 and {e.layer for e in first} == {"0", "2"}
    assert summaries == [
        f"experience 1 (before, iteration {first[0].iteration}): widened 2 layers 32->48; "
        f"parameters 3,466 -> 5,962; max error {max(e.max_abs_error for e in first):.1e}",
        f"experience 2 (before, iteration {second[0].iteration}): widened 2 layers 48->72; "
        f"parameters 5,962 -> 10,666; max error {max(e.max_abs_error for e in second):.1e}",
    ]
    per_epoch = out.split("Epoch ")[1:]
    assert len(per_epoch) == 6
    for block in per_epoch:
        growth_lines = [ln for ln in block.splitlines() if "\tGrowth/" in ln]
        assert len(growth_lines) <= 2, block  # num_parameters and the summary
    assert out.count("Model/num_parameters") == 3  # at each experience's start
    assert out.count("Model/training_flops") == 6  # the last value of each epoch
    tb = scalars(tmp_path)
    assert [v for _, v in tb["Growth/width/2"]] == [32, 48, 72]
    assert len(tb["Growth/event/0/seconds"]) == 2


@pytest.mark.parametrize("kind", ["naive", "ewc", "replay"])
def test_training_flops_metric_counts_as_the_benchmark(stream, tmp_path, kind):
    """Model/training_flops: every FLOP of ``strategy.train()`` as a FlopCounterMode around
    the call counts it (EWC's importance pass and growth's checks included), also mid-call."""
    net = mlp_net()
    flops = training_flops_metric()
    logger = TensorboardLogger(tb_log_dir=str(tmp_path))
    cls, extra = {"naive": (Naive, {}), "ewc": (EWC, {"ewc_lambda": 1.0}),
                  "replay": (Replay, {"mem_size": 50})}[kind]  # fmt: skip
    strategy = cls(
        model=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3), train_mb_size=32,
        criterion=nn.CrossEntropyLoss(), plugins=[GrowthPlugin(EveryExperience(1.5))],
        evaluator=EvaluationPlugin(flops, parameter_count_metric(), loggers=[logger]), **extra,
    )  # fmt: skip
    outer = 0
    for exp in stream.train_stream[:3]:
        counter = FlopCounterMode(display=False)
        with counter:
            strategy.train(exp)
        outer += counter.get_total_flops()
        assert flops.result() == outer and not flops.counting
    logger.writer.flush()
    tb = scalars(tmp_path)
    values = [v for _, v in tb["Model/training_flops"]]
    assert values == sorted(values) and values[0] > 0
    assert values[-1] == pytest.approx(outer, rel=1e-6)
    iterations = strategy.clock.train_iterations
    assert len(values) >= iterations  # after every iteration (and every experience's end)
    params = tb["Model/num_parameters"]
    assert params[-1][1] == net.num_parameters() and params[0][1] == mlp_net().num_parameters()


def test_training_flops_metric_state_and_a_failed_call(stream):
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    flops = TrainingFlopsMetric(every=0)

    class Boom(Exception):
        pass

    class Fail(SupervisedPlugin):
        """Raises in the middle of a train() call while armed."""

        armed = True

        def after_training_iteration(self, strategy, **kwargs):
            if self.armed:
                raise Boom

    strategy = Naive(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01), train_mb_size=64,
        criterion=nn.CrossEntropyLoss(), evaluator=EvaluationPlugin(flops, loggers=[]),
    )  # fmt: skip
    depth = len(_get_current_dispatch_mode_stack())
    strategy.train(stream.train_stream[0])
    first = flops.result()
    assert first > 0 and len(_get_current_dispatch_mode_stack()) == depth
    fail = Fail()
    strategy.plugins.insert(0, fail)
    with pytest.raises(Boom):
        strategy.train(stream.train_stream[1])
    assert flops.counting  # left active by the failed call...
    fail.armed = False
    strategy.train(stream.train_stream[1])  # ...and closed by the next one
    assert len(_get_current_dispatch_mode_stack()) == depth and not flops.counting
    assert flops.result() > first
    state = flops.state_dict()
    assert state == {"total": flops.result()}
    again = TrainingFlopsMetric()
    again.load_state_dict(state)
    assert again.result() == flops.result()
    with pytest.raises(ValueError):
        TrainingFlopsMetric(every=-1)


def test_parameter_count_metric_steps_at_mid_experience_growth(stream, tmp_path):
    policy = OnPlateau(patience=5, min_delta=10.0, factor=1.25, max_growths=1)
    net = mlp_net()
    logger = TensorboardLogger(tb_log_dir=str(tmp_path))
    plugin = GrowthPlugin(policy, generator=0)
    strategy = Naive(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05), train_mb_size=8,
        plugins=[plugin], evaluator=EvaluationPlugin(parameter_count_metric(), loggers=[logger]),
    )  # fmt: skip
    strategy.train(stream.train_stream[0])
    logger.writer.flush()
    params = scalars(tmp_path)["Model/num_parameters"]
    (at,) = sorted({e.iteration for e in plugin.events if e.status == "grown"})
    values_at = [v for s, v in params if s == at]
    assert values_at == [mlp_net().num_parameters(), net.num_parameters()]
    assert params[0] == (0, mlp_net().num_parameters())
    assert params[-1][1] == net.num_parameters()
