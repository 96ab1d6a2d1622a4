"""Growth policies decide the right actions from the strategy's state (no training needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _models import TinyResNet
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import (
    Deepen,
    EveryExperience,
    GrowthPolicy,
    NewClasses,
    OnPlateau,
    Widen,
    coupled_groups,
    one_per_group,
)


def net() -> GrowableNetwork:
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    return GrowableNetwork(model, torch.zeros(2, 8))


def strategy(exp_counter: int = 0, classes=(0, 1), tasks=(0,), loss: float = 1.0):
    return SimpleNamespace(
        clock=SimpleNamespace(train_exp_counter=exp_counter, train_iterations=0),
        experience=SimpleNamespace(classes_in_this_experience=list(classes),
                                   task_labels=list(tasks)),
        loss=torch.tensor(loss),
    )


def test_every_experience_skips_the_first_and_widens_all_hidden_layers():
    n = net()
    policy = EveryExperience(factor=1.5)
    assert policy.before_experience(strategy(0), n) == []
    assert policy.before_experience(strategy(1), n) == [Widen("0", factor=1.5),
                                                        Widen("2", factor=1.5)]
    assert [a.target_width(n.width(a.layer)) for a in policy.before_experience(strategy(2), n)] \
        == [9, 6]
    assert policy.after_iteration(strategy(1), n) == []


def test_every_experience_layers_and_deepen():
    n = net()
    assert EveryExperience(2.0, layers=["2"]).before_experience(strategy(1), n) == [
        Widen("2", factor=2.0)]
    assert EveryExperience(2.0, deepen="residual").before_experience(strategy(1), n)[-1] == \
        Deepen("2", kind="residual")
    with pytest.raises(GrowthError, match="factor"):
        EveryExperience(factor=1.0)


def test_new_classes_sizes_layers_by_classes_seen():
    n = net()
    policy = NewClasses(units_per_class=4)
    # 2 classes seen: 8 units; layer "0" already has 6 -> widen both to 8.
    assert policy.before_experience(strategy(0, (0, 1)), n) == [Widen("0", width=8),
                                                               Widen("2", width=8)]
    n.widen("0", 8)
    n.widen("2", 8)
    assert policy.before_experience(strategy(1, (0, 1)), n) == []  # nothing new
    assert policy.before_experience(strategy(2, (2, 3, 4)), n) == [Widen("0", width=20),
                                                                  Widen("2", width=20)]
    # Task-incremental: the same class ids in another task count again.
    tasks = NewClasses(units_per_class=1)
    tasks.before_experience(strategy(0, (0, 1), tasks=(0,)), n)
    assert len(tasks.seen) == 2
    tasks.before_experience(strategy(1, (0, 1), tasks=(1,)), n)
    assert len(tasks.seen) == 4


def test_on_plateau_waits_for_patience_and_resets():
    n = net()
    policy = OnPlateau(patience=3, min_delta=0.01, factor=2.0)
    policy.before_experience(strategy(), n)
    improving = [policy.after_iteration(strategy(loss=1.0 - 0.1 * i), n) for i in range(8)]
    assert improving == [[]] * 8
    flat = [policy.after_iteration(strategy(loss=0.3), n) for _ in range(3)]
    assert flat[:2] == [[], []]
    assert flat[2] == [Widen("0", factor=2.0), Widen("2", factor=2.0)]
    # After growing, the wait starts over: a new reference loss, then `patience` more.
    after = [bool(policy.after_iteration(strategy(loss=0.3), n)) for _ in range(4)]
    assert after == [False, False, False, True]


def test_on_plateau_max_growths_and_new_experience():
    n = net()
    policy = OnPlateau(patience=1, min_delta=1.0, max_growths=1)
    policy.before_experience(strategy(), n)
    grown = [bool(policy.after_iteration(strategy(loss=1.0), n)) for _ in range(6)]
    assert grown == [False, True, False, False, False, False]
    policy.before_experience(strategy(1), n)
    assert [bool(policy.after_iteration(strategy(loss=1.0), n)) for _ in range(2)] == [False, True]


def test_on_plateau_smoothing_ignores_a_single_noisy_batch():
    n = net()
    noisy = [1.0, 0.9, 0.8, 5.0, 0.7, 0.6, 0.5]
    raw = OnPlateau(patience=1, min_delta=0.01)
    smooth = OnPlateau(patience=1, min_delta=0.01, smoothing=0.5)
    for p in (raw, smooth):
        p.before_experience(strategy(), n)
    assert any(raw.after_iteration(strategy(loss=v), n) for v in noisy)
    assert not any(smooth.after_iteration(strategy(loss=v), n) for v in [1.0, 0.9, 0.8, 0.85])


def test_actions_are_validated():
    with pytest.raises(GrowthError, match="exactly one"):
        Widen("0", width=8, factor=2.0)
    with pytest.raises(GrowthError, match="exactly one"):
        Widen("0")
    assert Widen("0", factor=1.5).target_width(5) == 8


class _Custom:
    """A user policy implementing the protocol without the base class."""

    def before_experience(self, strategy, net):
        return [Widen("0", width=net.width("0") + 1)]

    def after_iteration(self, strategy, net):
        return []


def test_the_protocol_is_what_the_plugin_checks():
    assert isinstance(_Custom(), GrowthPolicy)
    assert isinstance(GrowthPolicy(), GrowthPolicy)
    GrowthPlugin(_Custom())
    with pytest.raises(TypeError, match="before_experience"):
        GrowthPlugin(object())


def resnet() -> GrowableNetwork:
    torch.manual_seed(0)
    return GrowableNetwork(TinyResNet(width=8), torch.zeros(2, 3, 8, 8))


def test_policies_widen_each_coupled_group_once():
    n = resnet()
    # stem.0 and layer1.conv2 feed one sum; so do layer2's conv2 and its shortcut.
    assert coupled_groups(n) == [["stem.0", "layer1.conv2"], ["layer1.conv1"],
                                 ["layer2.conv1"], ["layer2.conv2", "layer2.shortcut.0"]]
    reps = ["stem.0", "layer1.conv1", "layer2.conv1", "layer2.conv2"]
    assert one_per_group(n) == reps
    assert EveryExperience(1.5).before_experience(strategy(1), n) == [
        Widen(r, factor=1.5) for r in reps]
    # explicit layers of one group: still one widening
    assert EveryExperience(2.0, layers=["layer1.conv2", "stem.0"]).before_experience(
        strategy(1), n) == [Widen("layer1.conv2", factor=2.0)]
    assert NewClasses(units_per_class=10).before_experience(strategy(0), n) == [
        Widen(r, width=20) for r in reps[:3]] + [Widen("layer2.conv2", width=20)]
    plateau = OnPlateau(patience=1, min_delta=1.0)
    plateau.before_experience(strategy(), n)
    plateau.after_iteration(strategy(), n)
    assert plateau.after_iteration(strategy(), n) == [Widen(r, factor=1.5) for r in reps]


def test_every_experience_deepens_after_one_original_layer():
    n = net()
    policy = EveryExperience(1.5, deepen="residual")
    assert policy.before_experience(strategy(1), n)[-1] == Deepen("2", kind="residual")
    n.deepen("2", kind="residual")
    # The inserted block: its inner layer is a group of its own, its last layer joins "2"'s.
    assert coupled_groups(n) == [["0"], ["2", "grown.2_res1.layer2"], ["grown.2_res1.layer1"]]
    actions = policy.before_experience(strategy(2), n)
    assert actions == [Widen("0", factor=1.5), Widen("2", factor=1.5),
                       Widen("grown.2_res1.layer1", factor=1.5), Deepen("2", kind="residual")]
    assert EveryExperience(1.5, deepen=True, deepen_after="0").before_experience(
        strategy(1), n)[-1] == Deepen("0", kind="identity")
    assert EveryExperience(1.5, layers=["0"], deepen=True).before_experience(
        strategy(1), n) == [Widen("0", factor=1.5), Deepen("0", kind="identity")]
    with pytest.raises(GrowthError, match="deepen_after"):
        EveryExperience(deepen=True, deepen_after=3)
