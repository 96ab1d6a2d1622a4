"""Growth steps grow what they say: each coupled group once by the factor, one deepening per
step after one original layer, a parameter budget shared by every group, per-layer caps.

The plugin's growth before an experience is driven directly (no training): a stand-in strategy
holds what ``GrowthPlugin.before_train_dataset_adaptation`` reads.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from _models import GroupedNet, TinyDenseNet, TinyInception, TinyMobileNetV2, TinyResNet
from torch import nn

from net2grow.growth import GrowableNetwork
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import EveryExperience, GrowthPolicy, Widen, coupled_groups


def grow_step(plugin: GrowthPlugin, net: GrowableNetwork, k: int) -> None:
    """The plugin's growth before experience ``k`` (``k`` experiences trained before it)."""
    strategy = SimpleNamespace(
        clock=SimpleNamespace(train_exp_counter=k, train_iterations=0),
        device=torch.device("cpu"),
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        plugins=[plugin],
    )
    plugin.before_train_dataset_adaptation(strategy)


def tiny_resnet(width: int = 8) -> GrowableNetwork:
    torch.manual_seed(0)
    return GrowableNetwork(TinyResNet(width=width), torch.zeros(2, 3, 8, 8))


def mlp_16() -> GrowableNetwork:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    return GrowableNetwork(model, torch.zeros(4, 64))


def widths(net: GrowableNetwork) -> dict[str, int]:
    return {n: net.width(n) for n in net.layers}


class _EveryLayer(GrowthPolicy):
    """A policy written the naive way: every growable layer, coupled or not."""

    def before_experience(self, strategy, net):
        return [Widen(n, factor=1.5) for n in net.layers]


@pytest.mark.parametrize(
    "policy", [EveryExperience(factor=1.5), _EveryLayer()], ids=["every-experience", "every-layer"]
)
def test_one_step_widens_each_coupled_group_once_by_the_factor(policy):
    net = tiny_resnet()
    before = widths(net)
    plugin = GrowthPlugin(policy, generator=0)
    grow_step(plugin, net, 1)
    assert widths(net) == {n: round(w * 1.5) for n, w in before.items()}
    # one engine operation per group, each naming one group's layers
    assert len(net.history) == len(coupled_groups(net)) == 4
    grown = [e.layer for e in plugin.events if e.status == "grown"]
    assert grown == ["stem.0", "layer1.conv1", "layer2.conv1", "layer2.conv2"]
    skipped = [e for e in plugin.events if e.status == "skipped"]
    if isinstance(policy, _EveryLayer):  # the plugin merged the other members of each group
        assert [e.layer for e in skipped] == ["layer1.conv2", "layer2.shortcut.0"]
        assert all("coupled with" in e.reason for e in skipped)
    else:
        assert skipped == []
    grow_step(plugin, net, 2)
    assert widths(net) == {n: round(round(w * 1.5) * 1.5) for n, w in before.items()}


def test_resnet18_one_step_stays_near_factor_squared():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = GrowableNetwork(torchvision.models.resnet18(), torch.zeros(1, 3, 32, 32))
    before = net.num_parameters()
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0)
    grow_step(plugin, net, 1)
    after = net.num_parameters()
    # convolutions grow in both dims (1.5**2 = 2.25), fc in one: 11.7M -> 25.9M (2.22x);
    # widening every member of each stage (the old behaviour) gave 5.1x
    assert after <= 2.3 * before, after / before
    assert (net.width("conv1"), net.width("layer4.1.conv2")) == (96, 768)
    assert sum(e.status == "grown" for e in plugin.events) == 12  # the 12 coupled groups


@pytest.mark.parametrize("kind", ["residual", "identity"])
def test_deepen_every_experience_inserts_one_layer_per_step(kind):
    net = mlp_16()
    plugin = GrowthPlugin(EveryExperience(factor=1.5, deepen=kind), generator=0)
    for k in range(1, 5):
        grow_step(plugin, net, k)
        assert set(widths(net).values()) == {round(16 * 1.5**k)}, widths(net)
    # 16 -> 24 -> 36 -> 54 -> 81 everywhere, four layers inserted after "2", readable names
    suffix = "res" if kind == "residual" else "deep"
    layers = sorted(n for n in net.grown._modules if not n.endswith("_act"))  # identity: +ReLU
    assert layers == [f"2_{suffix}{i}" for i in range(1, 5)]
    deepened = [e for e in plugin.events if e.op == "deepen"]
    assert [(e.layer, e.status) for e in deepened] == [("2", "grown")] * 4
    h = 81
    square = h * h + h
    blocks = 4 * (2 * square if kind == "residual" else square)
    assert net.num_parameters() == (64 * h + h) + square + (h * 10 + 10) + blocks  # 65,863
    x = torch.randn(8, 64)
    assert net(x).shape == (8, 10)


def test_budget_is_shared_by_every_group():
    net = tiny_resnet(width=16)
    old = {g[0]: net.width(g[0]) for g in coupled_groups(net)}
    full = copy.deepcopy(net)
    for name in old:
        full.widen(name, factor=2.0, verify=False)
    budget = (net.num_parameters() + full.num_parameters()) // 2
    plugin = GrowthPlugin(EveryExperience(factor=2.0), max_params=budget, generator=0)
    grow_step(plugin, net, 1)
    assert net.num_parameters() <= budget
    factors = {name: net.width(name) / w for name, w in old.items()}
    # one common fraction of the asked growth: the factors differ by rounding only (< 1/16),
    # the last stage ("layer2.conv2") as much as the stem
    assert max(factors.values()) - min(factors.values()) < 1 / 16, factors
    assert min(factors.values()) > 1.3, factors
    assert {e.status for e in plugin.events} == {"capped"}
    assert all(f"max_params={budget} shared by 4 widenings" in e.reason for e in plugin.events)
    # the next step finds no room
    grow_step(plugin, net, 2)
    assert {e.status for e in plugin.events[4:]} == {"skipped"}


@pytest.mark.parametrize(
    "make", [TinyResNet, TinyDenseNet, TinyInception, TinyMobileNetV2, GroupedNet]
)
def test_budget_counts_are_exact(make):
    """A budget of exactly the grown size lets the whole step through; one less caps it."""
    torch.manual_seed(0)
    size = 16 if make is TinyMobileNetV2 else 8
    net = GrowableNetwork(make(), torch.zeros(2, 3, size, size))
    full = copy.deepcopy(net)
    for group in coupled_groups(full):
        full.widen(group[0], factor=2.0, verify=False)
    exact = full.num_parameters()
    for budget in (exact, exact - 1):
        trial = copy.deepcopy(net)
        plugin = GrowthPlugin(EveryExperience(factor=2.0), max_params=budget, generator=0)
        grow_step(plugin, trial, 1)
        statuses = {e.status for e in plugin.events}
        if budget == exact:
            assert statuses == {"grown"} and trial.num_parameters() == exact
        else:
            assert "capped" in statuses and trial.num_parameters() <= budget


def test_deepening_takes_what_the_widenings_leave():
    net = mlp_16()
    full = copy.deepcopy(net)
    for name in ("0", "2"):
        full.widen(name, factor=1.5, verify=False)
    widened = full.num_parameters()
    full.deepen("2", kind="residual", verify=False)
    for budget, status in (
        (full.num_parameters(), "grown"),
        (full.num_parameters() - 1, "skipped"),
    ):
        trial = copy.deepcopy(net)
        plugin = GrowthPlugin(EveryExperience(1.5, deepen="residual"), max_params=budget)
        grow_step(plugin, trial, 1)
        assert [e.status for e in plugin.events] == ["grown", "grown", status]
        assert trial.num_parameters() == (budget if status == "grown" else widened)


def test_max_width_caps_layers():
    net = tiny_resnet()  # widths 8 (stem group, layer1.conv1), 16 (layer2)
    plugin = GrowthPlugin(EveryExperience(factor=1.5), max_width={"layer2.shortcut.0": 20})
    grow_step(plugin, net, 1)
    # the cap of one member holds its whole group; the others grow by 1.5
    assert widths(net) == {
        "stem.0": 12,
        "layer1.conv1": 12,
        "layer1.conv2": 12,
        "layer2.conv1": 24,
        "layer2.conv2": 20,
        "layer2.shortcut.0": 20,
    }
    capped = [e for e in plugin.events if e.status == "capped"]
    assert [(e.layer, e.requested_width, e.new_width) for e in capped] == [("layer2.conv2", 24, 20)]
    assert "max_width" in capped[0].reason and "layer2.shortcut.0" in capped[0].reason
    everywhere = GrowthPlugin(EveryExperience(factor=1.5), max_width=10)
    net = tiny_resnet()
    grow_step(everywhere, net, 1)
    assert widths(net) == {
        "stem.0": 10,
        "layer1.conv1": 10,
        "layer1.conv2": 10,
        "layer2.conv1": 16,
        "layer2.conv2": 16,
        "layer2.shortcut.0": 16,
    }
    assert [e.status for e in everywhere.events] == ["capped", "capped", "skipped", "skipped"]
    for bad in (0, True, {"stem.0": 0}, {3: 10}, "10"):
        with pytest.raises(ValueError, match="max_width"):
            GrowthPlugin(EveryExperience(), max_width=bad)
