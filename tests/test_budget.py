"""``growth.budget``: parameter counts of planned growth equal those of the real growth.

Planned counts come from the rules' plans on ``meta`` tensors; every test compares them with
the parameter count of a copy that was really grown.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import GroupedNet, TinyInception, TinyMobileNetV2, TinyResNet
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth.budget import (
    GrowthGroup,
    ParameterModel,
    deepen_parameters,
    growth_group,
    params_after_deepen,
    params_after_widen,
    planned_parameters,
)


def mlp() -> GrowableNetwork:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)
    )
    return GrowableNetwork(model, torch.zeros(4, 12))


def conv(model: nn.Module) -> GrowableNetwork:
    torch.manual_seed(0)
    return GrowableNetwork(model, torch.zeros(2, 3, 8, 8))


MODELS = {
    "mlp": mlp,
    "resnet": lambda: conv(TinyResNet(width=6)),  # residual sums couple layers
    "grouped": lambda: conv(GroupedNet()),  # grouped convolutions: units grow by groups
    "inception": lambda: conv(TinyInception()),  # concatenation of four branches
    "mobilenet": lambda: conv(TinyMobileNetV2()),  # depthwise convolutions
}


def groups_of(net: GrowableNetwork) -> dict[int, tuple[str, GrowthGroup]]:
    """One layer of each growth group of ``net`` (the first in graph order), by group id."""
    out: dict[int, tuple[str, GrowthGroup]] = {}
    for name in net.layers:
        g = growth_group(net, name)
        out.setdefault(g.id, (name, g))
    return out


def grown_copy(net: GrowableNetwork, widths: dict[str, int]) -> GrowableNetwork:
    trial = copy.deepcopy(net)
    for name, width in widths.items():
        trial.widen(name, width, verify=False)
    return trial


def test_growth_group_of_coupled_and_grouped_layers():
    net = conv(TinyResNet(width=6))
    stem = growth_group(net, "stem.0")
    assert stem == GrowthGroup(stem.id, 1, 6, 1)
    # one residual stage: the block's last layer widens with the stem
    assert growth_group(net, "layer1.conv2").id == stem.id
    assert growth_group(net, "layer1.conv1").id != stem.id
    assert growth_group(net, "layer2.shortcut.0").id == growth_group(net, "layer2.conv2").id
    grouped = conv(GroupedNet())
    assert growth_group(grouped, "c1").step == 4  # read by a convolution of 4 groups
    assert growth_group(grouped, "g1").step == 4  # written by 4 groups, read by 2
    assert growth_group(grouped, "g1").units == 12
    for bad in ("nope", "stem.1"):  # no module; a BatchNorm, not a layer
        with pytest.raises(GrowthError):
            growth_group(net, bad)


@pytest.mark.parametrize("model", list(MODELS))
def test_planned_count_of_each_group_is_the_real_one(model):
    net = MODELS[model]()
    before = net.num_parameters()
    for name, g in groups_of(net).values():
        units = g.units + 2 * g.step
        real = grown_copy(net, {name: units * g.expand}).num_parameters()
        assert planned_parameters(net, {g.id: units}) == real, name
        assert params_after_widen(net, name, units * g.expand) == real, name
    assert net.num_parameters() == before  # nothing grown


@pytest.mark.parametrize("model", list(MODELS))
def test_planned_count_of_every_group_at_once_is_the_real_one(model):
    net = MODELS[model]()
    groups = groups_of(net)
    units = {k: g.units + 3 * g.step for k, (_, g) in groups.items()}
    real = grown_copy(net, {n: units[k] * g.expand for k, (n, g) in groups.items()})
    model_ = ParameterModel(net, units)
    assert model_.count(units) == real.num_parameters()
    assert model_.count({}) == net.num_parameters()  # groups left out keep their width
    # fewer units than planned: never under the real count (exact for the MLP)
    fewer = {k: g.units + g.step for k, (_, g) in groups.items()}
    smaller = grown_copy(net, {n: fewer[k] * g.expand for k, (n, g) in groups.items()})
    assert model_.count(fewer) >= smaller.num_parameters()
    if model == "mlp":
        assert model_.count(fewer) == smaller.num_parameters()


@pytest.mark.parametrize(
    ("model", "layer", "kind"),
    [
        ("mlp", "0", "identity"),
        ("mlp", "2", "residual"),
        ("resnet", "stem.0", "identity"),
        ("resnet", "layer1.conv1", "residual"),
        ("grouped", "c1", "residual"),
        ("inception", "head", "identity"),
    ],
)
def test_deepen_count_is_the_real_one(model, layer, kind):
    net = MODELS[model]()
    trial = copy.deepcopy(net)
    rec = trial.deepen(layer, kind=kind, verify=False)
    added = rec.params_after - rec.params_before
    assert added > 0
    assert deepen_parameters(net, layer, kind) == added
    assert params_after_deepen(net, layer, kind) == rec.params_after


def test_deepen_count_after_a_layer_with_per_channel_parameters():
    torch.manual_seed(0)
    net = GrowableNetwork(
        nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, 3)), torch.zeros(2, 6)
    )
    rec = copy.deepcopy(net).deepen("0", kind="residual", verify=False)
    assert deepen_parameters(net, "0", "residual") == rec.params_after - rec.params_before
    # PReLU is per-channel, not an activation deepen copies: the block's activation is a ReLU
    assert deepen_parameters(net, "0", "residual") == 2 * (4 * 4 + 4)


def test_refusals_raise_the_engines_error():
    net = mlp()
    with pytest.raises(GrowthError):
        deepen_parameters(net, "0", "sideways")
    with pytest.raises(GrowthError, match="kind must be one of"):
        params_after_deepen(net, "0", "sideways")
    with pytest.raises(GrowthError, match="unknown layer"):
        params_after_widen(net, "nope", 20)
    with pytest.raises(GrowthError, match="unknown layer"):
        deepen_parameters(net, "nope")


class _Uncopyable:
    """A growth hook that refuses to be copied and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, record, changes) -> None:
        self.calls += 1

    def __deepcopy__(self, memo):
        raise AssertionError("growth hooks must not be copied")


def test_copy_without_hooks_grows_unseen():
    net = mlp()
    hook = _Uncopyable()
    net.register_growth_hook(hook)
    trial = net.copy_without_hooks()
    trial.widen("0", 20)
    assert hook.calls == 0
    assert net.width("0") == 16 and trial.width("0") == 20
    net.widen("0", 18)  # the original keeps its hook
    assert hook.calls == 1


def test_counts_fall_back_to_a_copy_when_a_rule_cannot_plan(monkeypatch):
    from net2grow.growth import budget

    def cannot_plan(*args, **kwargs):
        raise NotImplementedError("reads the mapping's values")

    net = mlp()
    expected = grown_copy(net, {"0": 20}).num_parameters()
    deepened = copy.deepcopy(net).deepen("0", verify=False).params_after
    hook = _Uncopyable()
    net.register_growth_hook(hook)
    monkeypatch.setattr(budget, "plan_updates", cannot_plan)
    monkeypatch.setattr(budget, "find_chain", cannot_plan)
    with pytest.raises(NotImplementedError):
        planned_parameters(net, {growth_group(net, "0").id: 20})
    assert params_after_widen(net, "0", 20) == expected
    assert params_after_deepen(net, "0") == deepened
    assert hook.calls == 0 and net.width("0") == 16
