"""Task-incremental split digits: a MultiHeadClassifier model in a MultiTaskGrowableNetwork grows
inside Naive, Replay, LwF, EWC and SI, and Avalanche hands it the task labels."""

from __future__ import annotations

import pytest
import torch
from _avalanche import STRATEGIES, digits_stream, mh_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import MultiHeadClassifier
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.models.utils import avalanche_forward, is_multi_task_module
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import EWC
from torch import nn

from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import EveryExperience


@pytest.fixture(scope="module")
def stream():
    return digits_stream(task_labels=True)


def test_avalanche_passes_task_labels_to_the_network(stream):
    net = mh_net(leaf_modules=[MultiHeadClassifier])
    assert is_multi_task_module(net)
    for exp in stream.train_stream[:2]:
        avalanche_model_adaptation(net, exp)
    x = torch.randn(6, 64)
    out = avalanche_forward(net, x, torch.zeros(6, dtype=torch.long))
    assert out.shape == (6, 2)
    torch.testing.assert_close(out, net.get_submodule("head")(net.features(x), 0))
    per_task = net(x, None)  # all heads, as LwF asks of multi-task models
    assert isinstance(per_task, dict) and set(per_task) == {0, 1}
    torch.testing.assert_close(per_task[0], out)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_task_incremental_run_grows_and_learns(name, stream):
    cls, kwargs = STRATEGIES[name]
    net = mh_net(leaf_modules=[MultiHeadClassifier])
    growable = list(net.layers)
    # With the head rules the layer feeding the heads grows too.
    assert growable == ["features.0", "features.2"]
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    strategy = cls(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        criterion=nn.CrossEntropyLoss(), train_mb_size=8, eval_mb_size=512, plugins=[plugin],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True)), **kwargs,
    )
    for exp in stream.train_stream:
        strategy.train(exp)
    assert [net.width(n) for n in growable] == [162] * len(growable)
    grown = [e for e in plugin.events if e.status == "grown"]
    assert len(grown) == 4 * len(growable)
    head = net.get_submodule("head")
    assert sorted(head.classifiers) == ["0", "1", "2", "3", "4"]  # adaptation found the head
    assert net.known_train_tasks_labels == {0, 1, 2, 3, 4}
    res = strategy.eval(stream.test_stream)
    accuracy = sum(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"]
                   for t in range(5)) / 5
    # every task after the whole stream, forgetting included (chance: 0.5); about 0.84 to 0.98
    # across model seeds, so a margin below them
    assert accuracy > 0.7, accuracy


def test_online_ewc_with_deepened_layers_and_new_heads(stream):
    """New task heads land before deepened layers in the parameter order; online EWC merges
    importances by position, so the plugin re-aligns them (Avalanche alone asserts)."""
    net = mh_net(leaf_modules=[MultiHeadClassifier])
    strategy = EWC(
        model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        criterion=nn.CrossEntropyLoss(), ewc_lambda=1.0, mode="online", decay_factor=0.9,
        train_mb_size=8, eval_mb_size=512, evaluator=EvaluationPlugin(accuracy_metrics(
            experience=True)),
        plugins=[GrowthPlugin(EveryExperience(factor=1.25, deepen=True), generator=0)],
    )
    accs = []
    for t, exp in enumerate(stream.train_stream[:3]):
        strategy.train(exp)
        res = strategy.eval([stream.test_stream[t]])
        accs.append(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task{t:03d}/Exp{t:03d}"])
    ewc = next(p for p in strategy.plugins if type(p).__name__ == "EWCPlugin")
    names = [n for n, _ in net.named_parameters()]
    assert sum(n.startswith("grown.") for n in names) == 4
    assert list(ewc.importances[2]) == names
    assert min(accs) > 0.85, accs  # each task right after training on it (chance: 0.5)
