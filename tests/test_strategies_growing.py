"""``Growing``: the ready-made strategy trains and grows like Naive + GrowthPlugin."""

from __future__ import annotations

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from torch import nn

from net2grow.growth import GrowthError
from net2grow.strategies import Growing, GrowthPlugin
from net2grow.strategies.policies import EveryExperience, NewClasses, OnPlateau


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def test_growing_with_new_classes_policy_and_replay(stream):
    net = mlp_net(hidden=8)
    strategy = Growing(
        net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), nn.CrossEntropyLoss(),
        policy=NewClasses(units_per_class=8), train_mb_size=8, eval_mb_size=512,
        plugins=[ReplayPlugin(mem_size=200)],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True)),
        growth_options={"generator": 0},
    )
    assert isinstance(strategy.growth, GrowthPlugin) and strategy.plugins[0] is strategy.growth
    widths = []
    for exp in stream.train_stream:
        strategy.train(exp)
        widths.append(net.width("0"))
    assert widths == [16, 32, 48, 64, 80]  # 8 units per class seen so far
    assert net.width("2") == 80
    res = strategy.eval(stream.test_stream)
    assert res["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 0.6


def test_growing_respects_max_params(stream):
    net = mlp_net()
    budget = net.num_parameters() + 2_000
    strategy = Growing(
        net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), None,
        policy=EveryExperience(factor=2.0), max_params=budget, train_mb_size=8,
        evaluator=EvaluationPlugin(),
    )
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
        assert net.num_parameters() <= budget
    assert {e.status for e in strategy.growth.events} >= {"capped", "skipped"}
    assert net.width("0") > 32


def test_growing_needs_a_growable_network():
    model = nn.Linear(64, 10)
    with pytest.raises(TypeError, match="GrowableNetwork"):
        Growing(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                policy=EveryExperience())


def test_growing_refuses_a_second_growth_plugin():
    net = mlp_net()
    with pytest.raises(GrowthError, match=r"installs its own GrowthPlugin.*also holds "
                                          r"GrowthPlugin\(OnPlateau\).*drop the plugin"):
        Growing(net, torch.optim.SGD(net.parameters(), lr=0.1), None, policy=EveryExperience(),
                plugins=[GrowthPlugin(OnPlateau())])


def test_growing_passes_max_width(stream):
    net = mlp_net()
    strategy = Growing(net, torch.optim.SGD(net.parameters(), lr=0.05), None,
                       policy=EveryExperience(factor=2.0), max_width={"2": 40},
                       train_mb_size=8, evaluator=EvaluationPlugin())
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
    assert (net.width("0"), net.width("2")) == (64, 40)
