"""Avalanche heads inside a GrowableNetwork: their input grows, they keep adapting to new classes.

Importing ``strategies`` registers the head rules. A network built before that import (the
``no_head_rule`` fixture removes the rule for the time of a test) traces an
``IncrementalClassifier`` through, or sees it as a leaf without a rule: refused or reported.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _avalanche import digits_stream, mh_net
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.models import IncrementalClassifier
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth import rules as growth_rules
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import EveryExperience
from net2grow.strategies.rules_avalanche import IncrementalClassifierRule, check_heads


@pytest.fixture(scope="module")
def class_stream():
    return digits_stream()


@pytest.fixture(scope="module")
def task_stream():
    return digits_stream(task_labels=True)


class ICModel(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                      nn.ReLU())
        self.head = IncrementalClassifier(hidden, initial_out_features=2)

    def forward(self, x):
        return self.head(self.features(x))


def ic_net(**kwargs) -> GrowableNetwork:
    torch.manual_seed(0)
    return GrowableNetwork(ICModel(), torch.randn(8, 64), **kwargs)


@pytest.fixture
def no_head_rule(monkeypatch):
    """``IncrementalClassifier`` without its rule, as before ``strategies`` registers it."""
    assert isinstance(growth_rules.module_rule_for(ICModel().head), IncrementalClassifierRule)
    monkeypatch.delitem(growth_rules._MODULE_RULES, IncrementalClassifier)
    assert growth_rules.module_rule_for(ICModel().head) is None


def test_head_traced_through_is_refused(class_stream, no_head_rule):
    with pytest.warns(UserWarning, match="branches on self.training"):  # the head's masking
        net = GrowableNetwork(ICModel(), torch.zeros(2, 64))  # no rule, no leaf: traced through
    with pytest.raises(GrowthError, match="frozen"):
        check_heads(net)
    strategy = Naive(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                     evaluator=EvaluationPlugin(), plugins=[GrowthPlugin(EveryExperience())])
    with pytest.raises(GrowthError, match="leaf_modules"):
        strategy.train(class_stream.train_stream[0])


def test_head_leaf_without_rule_blocks_only_its_input(no_head_rule):
    net = ic_net(leaf_modules=[IncrementalClassifier])
    assert net.layers == ["features.0"]
    (msg,) = check_heads(net)
    assert "without a growth rule" in msg


def test_heads_are_leaves_with_rules_and_all_hidden_layers_grow():
    net = ic_net()
    assert net.layers == ["features.0", "features.2"]
    assert check_heads(net) == []
    assert any(n.op == "call_module" and n.target == "head" for n in net.graph.nodes)


def test_incremental_classifier_input_grows_and_it_keeps_adapting(class_stream):
    net = ic_net()
    avalanche_model_adaptation(net, class_stream.train_stream[0])  # found inside the network
    head = net.get_submodule("head")
    x = torch.randn(32, 64)
    opt = torch.optim.Adam(net.parameters())
    net(x).logsumexp(1).mean().backward()
    opt.step()
    before, weight = net(x).detach(), head.classifier.weight
    rec = net.widen("features.2", 24, optimizer=opt, generator=torch.Generator().manual_seed(0))
    assert "head" in rec.details["coupled"]
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-5)
    assert head.classifier.weight is weight  # same parameter, grown in place
    assert head.classifier.in_features == 24 and weight.shape == (2, 24)
    assert opt.state[weight]["exp_avg"].shape == (2, 24)
    grown = weight.detach().clone()
    # New classes: the head adds rows at the grown width, keeping the old ones.
    avalanche_model_adaptation(net, class_stream.train_stream[1])
    assert head.classifier.weight.shape == (4, 24)
    torch.testing.assert_close(head.classifier.weight[:2], grown)
    assert net(x).shape == (32, 4)


def test_multihead_classifier_input_grows_for_every_head(task_stream):
    net = mh_net(hidden=16)
    for exp in task_stream.train_stream[:2]:
        avalanche_model_adaptation(net, exp)
    head = net.get_submodule("head")
    assert sorted(head.classifiers) == ["0", "1"]
    x = torch.randn(16, 64)
    t = torch.tensor([0, 1] * 8)
    before = net(x, t).detach()
    net.widen("features.2", 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net(x, t), before, rtol=0, atol=1e-5)
    assert head.in_features == 20
    assert all(h.classifier.weight.shape == (2, 20) for h in head.classifiers.values())
    avalanche_model_adaptation(net, task_stream.train_stream[2])  # a new task: a new head
    assert head.classifiers["2"].classifier.in_features == 20
    assert net(x, torch.full((16,), 2)).shape == (16, 2)


def test_class_incremental_run_with_incremental_classifier(class_stream):
    """With the head rules every hidden layer grows, the one feeding the head too."""
    net = ic_net(leaf_modules=[IncrementalClassifier])
    growable = list(net.layers)
    assert growable == ["features.0", "features.2"]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    strategy = Naive(model=net, optimizer=opt, train_mb_size=8, eval_mb_size=512,
                     plugins=[plugin], evaluator=EvaluationPlugin(accuracy_metrics(
                         experience=True)))
    accs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, exp in enumerate(class_stream.train_stream):
            strategy.train(exp)
            res = strategy.eval([class_stream.test_stream[i]])
            accs.append(res[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"])
    assert not [w for w in caught if "growth rule" in str(w.message)]
    assert [net.width(n) for n in growable] == [81] * len(growable)
    head = net.get_submodule("head")
    assert head.classifier.weight.shape == (10, net.width("features.2"))
    assert sum(accs) / len(accs) > 0.8, accs
