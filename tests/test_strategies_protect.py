"""GrowthPlugin(protect=...): protected growth inside Avalanche strategies (split digits).

Old units are frozen at each growth step after the first experience and new units grow with
``init="zero"``; the checks are exact (``torch.equal``), measured after real training with Adam.
"""

from __future__ import annotations

import pytest
import torch
from _avalanche import digits_stream, mh_net, mlp_net
from _models import capture
from avalanche.training.supervised import Naive
from torch import nn

from net2grow.growth import GrowthError
from net2grow.growth import protect as protection
from net2grow.strategies import Growing, GrowthPlugin
from net2grow.strategies.policies import Deepen, EveryExperience, Widen

HIDDEN = 16


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def adam(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(net.parameters(), lr=0.01)


def batch(stream, n: int = 64) -> torch.Tensor:
    ds = stream.test_stream[0].dataset
    return torch.stack([ds[i][0] for i in range(n)])


def hidden(net, x: torch.Tensor, layers=("0", "2")) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` on ``x`` in eval mode (the network's mode is restored)."""
    return capture(net, x, tuple(layers))


def naive(net, plugin, **kw) -> Naive:
    return Naive(
        model=net, optimizer=adam(net), criterion=nn.CrossEntropyLoss(), train_mb_size=16,
        train_epochs=1, eval_mb_size=256, plugins=[plugin], evaluator=None, **kw,
    )


def test_lateral_old_units_compute_exactly_what_they_did_after_experience_0(stream):
    net = mlp_net(HIDDEN)
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0, protect="lateral")
    strategy = naive(net, plugin)
    x = batch(stream)
    strategy.train(stream.train_stream[0])
    assert not protection.is_protected(net)  # nothing to protect before the first growth
    before = hidden(net, x)
    head_before = net.get_submodule("4").weight.detach().clone()
    strategy.train(stream.train_stream[1])
    assert protection.mode(net) == "lateral"
    assert net.width("0") == net.width("2") == 24
    assert [e.status for e in plugin.events] == ["grown", "grown"]
    after = hidden(net, x)
    for name in ("0", "2"):
        frozen = protection.frozen_units(net, name)
        assert frozen[:HIDDEN].all() and not frozen[HIDDEN:].any()
        assert torch.equal(after[name][:, :HIDDEN], before[name]), name
        assert net.get_submodule(name).weight[HIDDEN:].abs().sum() > 0  # new units learned
    # old units never read new ones: their weights from new units are still exactly zero
    assert torch.equal(net.get_submodule("2").weight[:HIDDEN, HIDDEN:], torch.zeros(HIDDEN, 8))
    # the output layer is not frozen: it trained on old and new units alike
    assert not torch.equal(net.get_submodule("4").weight[:, :HIDDEN], head_before)
    assert protection.violations(net) == []
    assert net.num_parameters() == sum(p.numel() for p in net.parameters())  # buffers only


def test_independent_growth_is_block_diagonal(stream):
    net = mlp_net(HIDDEN)
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0, protect="independent")
    strategy = naive(net, plugin)
    x = batch(stream)
    strategy.train(stream.train_stream[0])
    before = hidden(net, x)
    strategy.train(stream.train_stream[1])
    assert protection.mode(net) == "independent"
    w2 = net.get_submodule("2").weight
    assert torch.equal(w2[HIDDEN:, :HIDDEN], torch.zeros(8, HIDDEN))  # new reads no old unit
    assert torch.equal(w2[:HIDDEN, HIDDEN:], torch.zeros(HIDDEN, 8))  # old reads no new unit
    assert w2[HIDDEN:, HIDDEN:].abs().sum() > 0  # the new block trained
    assert net.get_submodule("0").weight[HIDDEN:].abs().sum() > 0  # new units read the input
    after = hidden(net, x)
    for name in ("0", "2"):
        assert torch.equal(after[name][:, :HIDDEN], before[name]), name
    assert protection.violations(net) == []


def test_task_incremental_forgetting_is_exactly_zero():
    stream = digits_stream(5, task_labels=True)
    net = mh_net(HIDDEN)
    plugin = GrowthPlugin(EveryExperience(factor=1.5), generator=0, protect="lateral")
    strategy = naive(net, plugin)
    exp0 = stream.test_stream[0].dataset
    x = torch.stack([exp0[i][0] for i in range(64)])
    t = torch.zeros(64, dtype=torch.long)

    @torch.no_grad()
    def task0_outputs() -> torch.Tensor:
        net.eval()
        return net(x, t).detach().clone()

    strategy.train(stream.train_stream[0])
    before = task0_outputs()
    for exp in stream.train_stream[1:3]:
        strategy.train(exp)
    assert net.width("features.0") > HIDDEN  # it grew (twice)
    assert [e.status for e in plugin.events] == ["grown"] * 4
    assert torch.equal(task0_outputs(), before)
    assert protection.violations(net) == []


class ConsumersFirst:
    """Widen "2" then "0" before every experience but the first (the wrong order)."""

    def before_experience(self, strategy, net):
        if strategy.clock.train_exp_counter == 0:
            return []
        return [Widen("2", factor=1.5), Widen("0", factor=1.5)]

    def after_iteration(self, strategy, net):
        return []


def test_independent_widens_producers_first(stream):
    net = mlp_net(HIDDEN)
    plugin = GrowthPlugin(ConsumersFirst(), generator=0, protect="independent")
    strategy = naive(net, plugin)
    strategy.train(stream.train_stream[0])
    strategy.train(stream.train_stream[1])
    assert [(e.layer, e.status) for e in plugin.events] == [("0", "grown"), ("2", "grown")]
    w2 = net.get_submodule("2").weight
    assert w2[HIDDEN:, HIDDEN:].abs().sum() > 0  # the new units of "2" read those of "0"
    assert torch.equal(w2[HIDDEN:, :HIDDEN], torch.zeros(8, HIDDEN))


class WidenMidExperience:
    """Widen layer "0" before experience 1 and again after its second iteration."""

    def __init__(self) -> None:
        self.seen = 0

    def before_experience(self, strategy, net):
        self.seen = 0
        return [Widen("0", factor=1.5)] if strategy.clock.train_exp_counter > 0 else []

    def after_iteration(self, strategy, net):
        self.seen += 1
        if strategy.clock.train_exp_counter > 0 and self.seen == 2:
            return [Widen("0", factor=1.5)]
        return []


def test_mid_experience_growth_uses_zero_init_and_keeps_old_units(stream):
    net = mlp_net(HIDDEN)
    plugin = GrowthPlugin(WidenMidExperience(), generator=0, protect="lateral")
    strategy = naive(net, plugin)
    x = batch(stream)
    strategy.train(stream.train_stream[0])
    before = hidden(net, x, ("0",))["0"]
    strategy.train(stream.train_stream[1])
    phases = [(e.phase, e.status) for e in plugin.events]
    assert phases == [("before_experience", "grown"), ("mid_experience", "grown")]
    assert net.width("0") == 36
    frozen = protection.frozen_units(net, "0")
    assert frozen[:HIDDEN].all() and not frozen[HIDDEN:].any()  # no second protect
    assert torch.equal(hidden(net, x, ("0",))["0"][:, :HIDDEN], before)


def test_invalid_mode_is_refused_at_construction():
    with pytest.raises(GrowthError, match="protect must be one of"):
        GrowthPlugin(EveryExperience(), protect="frozen")
    with pytest.raises(GrowthError, match="protect must be one of"):
        GrowthPlugin(EveryExperience(), protect=True)
    net = mlp_net(HIDDEN)
    with pytest.raises(GrowthError, match="protect must be one of"):
        Growing(model=net, optimizer=adam(net), policy=EveryExperience(), protect="all")
    assert GrowthPlugin(EveryExperience()).protect is None


def test_growing_passes_protect_and_state_dict_round_trips(stream):
    net = mlp_net(HIDDEN)
    strategy = Growing(
        model=net, optimizer=adam(net), policy=EveryExperience(factor=1.5), protect="lateral",
        growth_options={"generator": 0}, train_mb_size=16, evaluator=None,
    )
    assert strategy.growth.protect == "lateral"
    strategy.train(stream.train_stream[0])
    strategy.train(stream.train_stream[1])
    assert protection.mode(net) == "lateral"
    state = strategy.growth.state_dict()
    assert "protect" not in state  # an option, not run state
    fresh = GrowthPlugin(EveryExperience(factor=1.5), generator=0, protect="lateral")
    fresh.load_state_dict(state)
    assert fresh.events == strategy.growth.events


class Actions:
    """Return ``actions`` before every experience but the first."""

    def __init__(self, *actions) -> None:
        self.actions = list(actions)

    def before_experience(self, strategy, net):
        return self.actions if strategy.clock.train_exp_counter > 0 else []

    def after_iteration(self, strategy, net):
        return []


def test_deepen_after_frozen_units_is_an_ordinary_refusal(stream):
    net = mlp_net(HIDDEN)
    plugin = GrowthPlugin(Actions(Widen("0", factor=1.5), Deepen("0")), protect="lateral")
    strategy = naive(net, plugin)
    strategy.train(stream.train_stream[0])
    with pytest.warns(UserWarning, match="growth refused"):
        strategy.train(stream.train_stream[1])
    assert [(e.op, e.status) for e in plugin.events] == [("widen", "grown"), ("deepen", "refused")]


def test_refused_protect_refuses_the_widenings_of_its_step(stream, monkeypatch):
    def refuse(mode="lateral", layers=None):
        raise GrowthError("cannot freeze this layer per unit")

    net = mlp_net(HIDDEN)
    monkeypatch.setattr(net, "protect", refuse)
    plugin = GrowthPlugin(Actions(Widen("0", factor=1.5)), protect="lateral")
    strategy = naive(net, plugin)
    strategy.train(stream.train_stream[0])
    with pytest.warns(UserWarning, match="protect='lateral' refused"):
        strategy.train(stream.train_stream[1])
    assert [e.status for e in plugin.events] == ["refused"]
    assert net.width("0") == HIDDEN and not protection.is_protected(net)

    strict = GrowthPlugin(Actions(Widen("0", factor=1.5)), protect="lateral", on_refusal="raise")
    strategy = naive(net, strict)
    strategy.train(stream.train_stream[0])  # a new strategy: its clock starts over
    with pytest.raises(GrowthError, match="per unit"):
        strategy.train(stream.train_stream[1])
