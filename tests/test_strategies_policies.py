"""Growth policies decide the right actions from the strategy's state (no training needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import (
    Deepen,
    EveryExperience,
    GrowthPolicy,
    NewClasses,
    OnPlateau,
    Policy,
    Widen,
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
    assert isinstance(Policy(), GrowthPolicy)
    GrowthPlugin(_Custom())
    with pytest.raises(TypeError, match="before_experience"):
        GrowthPlugin(object())
