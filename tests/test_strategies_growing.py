"""``Growing``: the ready-made strategy trains and grows like Naive + GrowthPlugin."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from growth import GrowableNetwork
from strategies import Growing, GrowthPlugin
from strategies.policies import EveryExperience, NewClasses


def digits_stream(n_experiences: int = 5, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))

    def subset(idx: torch.Tensor) -> TensorDataset:
        ds = TensorDataset(x[idx], y[idx])
        ds.targets = y[idx].tolist()
        return ds

    return nc_benchmark(
        subset(perm[:1400]), subset(perm[1400:]), n_experiences=n_experiences,
        task_labels=False, seed=seed, fixed_class_order=list(range(10)),
    )


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def mlp_net(hidden: int = 32) -> GrowableNetwork:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    return GrowableNetwork(model, torch.zeros(4, 64))


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
