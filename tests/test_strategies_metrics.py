"""Growth metrics reach Avalanche's loggers: read them back from a TensorBoard event file."""

from __future__ import annotations

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import TensorboardLogger
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from net2grow.strategies import GrowthPlugin, growth_metrics
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


def test_metric_values_are_plain_python_numbers(stream, tmp_path):
    _, _, strategy = train(stream, tmp_path, EveryExperience(factor=1.5), n=2)
    last = strategy.evaluator.get_last_metrics()
    growth = {k: v for k, v in last.items() if k.startswith("Growth/")}
    assert len(growth) >= 8
    assert all(type(v) in (int, float) for v in growth.values()), growth
