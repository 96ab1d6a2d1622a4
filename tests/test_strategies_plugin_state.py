"""EWC, SI, MAS and RWalk state follows growth: penalties are equal right before and right after
a widening; GEM/AGEM's reference gradients follow growth inside an iteration.

Penalties are computed by the plugins themselves (``before_backward`` on a stand-in strategy,
``strategies.plugin_state.penalty``). Weights are perturbed away from the anchors first so that
every parameter contributes.
"""

from __future__ import annotations

import math

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.training.plugins import (
    AGEMPlugin,
    EvaluationPlugin,
    EWCPlugin,
    GEMPlugin,
    MASPlugin,
    RWalkPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import Naive
from torch import nn

from net2grow.growth import GrowableNetwork
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.plugin_state import (
    _RWALK_REMAPS,
    OutOfSyncError,
    penalty,
    remap_ewc,
    remap_importance,
    remap_value,
)
from net2grow.strategies.policies import GrowthPolicy, OnPlateau, Widen

HIDDEN = 16


@pytest.fixture(scope="module")
def stream():
    return digits_stream()


def trained(regulariser, stream, n: int = 2, policy=None):
    """A network trained on ``n`` experiences by Naive + ``regulariser`` + a GrowthPlugin."""
    net = mlp_net(HIDDEN)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plugin = GrowthPlugin(policy or GrowthPolicy(), generator=0)
    strategy = Naive(
        model=net,
        optimizer=opt,
        train_mb_size=8,
        evaluator=EvaluationPlugin(),
        plugins=[plugin, regulariser],
    )
    for exp in stream.train_stream[:n]:
        strategy.train(exp)
    return net, opt, strategy


def perturb(net: nn.Module, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def grow_twice(net: GrowableNetwork, opt) -> None:
    """Widen two consecutive layers: the middle weight grows in both dimensions."""
    g = torch.Generator().manual_seed(3)
    net.widen("0", 24, optimizer=opt, generator=g)
    net.widen("2", 30, optimizer=opt, generator=g)
    net.widen("0", 40, split="equal", optimizer=opt, generator=g)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_penalty_is_equal_across_growth(mode, stream):
    kwargs = {"decay_factor": 0.9} if mode == "online" else {}
    ewc = EWCPlugin(ewc_lambda=1.0, mode=mode, **kwargs)
    net, opt, _ = trained(ewc, stream, n=3)
    perturb(net)
    before = penalty(ewc, net, exp_counter=3)
    assert before > 1e-3
    grow_twice(net, opt)
    after = penalty(ewc, net, exp_counter=3)
    assert after == pytest.approx(before, rel=1e-5)
    stores = [ewc.saved_params, ewc.importances]
    kept = {e for store in stores for e in store if store[e]}
    assert kept == ({0, 1, 2} if mode == "separate" else {2})
    for store in stores:
        for e in kept:
            assert store[e]["2.weight"].shape == net.get_submodule("2").weight.shape


# Regularisers keeping one tensor per parameter and position (SI: flattened, see below).
REGULARISERS = {
    "ewc": lambda: EWCPlugin(ewc_lambda=1.0),
    "mas": lambda: MASPlugin(lambda_reg=0.01),  # importances reach 1e2: larger diverges
    "rwalk": lambda: RWalkPlugin(ewc_lambda=1.0, delta_t=2),
}


@pytest.mark.parametrize("name", list(REGULARISERS))
def test_copies_are_unpenalised_and_originals_penalised(name, stream):
    reg = REGULARISERS[name]()
    net, opt, _ = trained(reg, stream, n=2)
    perturb(net)
    net.widen("0", 24, optimizer=opt, generator=torch.Generator().manual_seed(0))
    base = penalty(reg, net, exp_counter=2)
    w = net.get_submodule("2").weight  # consumer: columns 16.. are copies
    with torch.no_grad():
        w[:, 16:] += 1.0
    assert penalty(reg, net, exp_counter=2) == pytest.approx(base, rel=1e-6)
    with torch.no_grad():
        w[:, :16] += 1.0
    assert penalty(reg, net, exp_counter=2) > base + 1e-3


def _state_shapes(reg, net: nn.Module) -> dict[str, tuple]:
    """(kept shape, parameter shape) of every per-parameter tensor MAS/RWalk keeps."""
    stores = (
        {"params": reg.params, "importance": reg.importance}
        if isinstance(reg, MASPlugin)
        else {k: getattr(reg, k) for k in _RWALK_REMAPS}
    )
    params = dict(net.named_parameters())
    return {
        f"{label}[{n}]": (tuple(pd.data.shape), tuple(params[n].shape))
        for label, store in stores.items()
        for n, pd in (store or {}).items()
    }


@pytest.mark.parametrize("name", ["mas", "rwalk"])
def test_mas_and_rwalk_penalties_are_equal_across_growth(name, stream):
    """Avalanche's MAS/RWalk would assert in ``ParamData.expand`` on "2.weight" (grown in both
    dimensions); remapped, their penalty is unchanged and their state has the grown shapes."""
    reg = REGULARISERS[name]()
    net, opt, strategy = trained(reg, stream, n=2)
    perturb(net)
    before = penalty(reg, net, exp_counter=2)
    assert before > 1e-3
    grow_twice(net, opt)
    assert penalty(reg, net, exp_counter=2) == pytest.approx(before, rel=1e-6)
    shapes = _state_shapes(reg, net)
    assert shapes["importance[2.weight]" if name == "mas" else "exp_penalties[2.weight]"] == (
        (30, 40),
        (30, 40),
    )
    wrong = {k: v for k, v in shapes.items() if v[0] != v[1]}
    assert not wrong, wrong
    # An original column with share s keeps importance Ω/s²: with the random shares here (s down
    # to ~0.1) MAS's penalty gets 100x stiffer there and SGD at lr 0.05 diverges. Smaller steps.
    for group in opt.param_groups:
        group["lr"] = 0.005
    strategy.train(stream.train_stream[2])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert math.isfinite(penalty(reg, net, exp_counter=3))


@pytest.mark.parametrize("name", ["mas", "rwalk"])
def test_mas_and_rwalk_leave_deepened_layers_free_then_learn_them(name, stream):
    reg = REGULARISERS[name]()
    net, opt, strategy = trained(reg, stream, n=1)
    perturb(net)
    before = penalty(reg, net, exp_counter=1)
    net.deepen("2", optimizer=opt)
    new = [n for n, _ in net.named_parameters() if n.startswith("grown.")]
    assert len(new) == 2
    assert penalty(reg, net, exp_counter=1) == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        net.get_parameter(new[0]).add_(1.0)  # the new layer is free to move
    assert penalty(reg, net, exp_counter=1) == pytest.approx(before, rel=1e-6)
    if name == "rwalk":  # running estimates know the new parameters (RWalk indexes them all)
        for key in ("checkpoint_loss", "checkpoint_scores", "exp_scores"):
            assert getattr(reg, key)[new[0]].data.abs().sum() == 0
    strategy.train(stream.train_stream[1])  # no KeyError on the new names
    learned = reg.importance if name == "mas" else reg.exp_penalties
    assert all(n in learned for n in new)  # penalised from the next experience on


def test_remaps_match_the_derivation():
    """θ' - θ*' = s (θ - θ*) on a copied column and Ω' = Ω / s² on the original only."""
    net = GrowableNetwork(
        nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)), torch.zeros(1, 3)
    )
    steps = {}
    net.register_growth_hook(lambda rec, changes: steps.update(changes.tensors))
    w = net.get_submodule("2").weight.detach().clone()
    net.widen("0", 4, generator=torch.Generator().manual_seed(0))
    (step,) = steps["2.weight"]
    share, src = step.amap.share, step.amap.source
    anchor, omega = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 3.0]])
    new_w = net.get_submodule("2").weight.detach()
    torch.testing.assert_close(new_w, w[:, src] * share)
    a2 = remap_value(anchor, [step], "net2net")
    o2 = remap_importance(omega, [step], "net2net")
    torch.testing.assert_close(new_w - a2, (w - anchor)[:, src] * share)
    torch.testing.assert_close(o2[:, :2], omega / share[:2] ** 2)
    assert o2[:, 2:].abs().sum() == 0
    assert float((o2 * (new_w - a2) ** 2).sum()) == pytest.approx(
        float((omega * (w - anchor) ** 2).sum()), rel=1e-6
    )


def test_state_that_missed_a_growth_is_reported_not_misaligned(stream):
    ewc = EWCPlugin(ewc_lambda=1.0)
    trained(ewc, stream, n=1)  # anchors and importances of a 16-unit layer "0"
    other = mlp_net(HIDDEN)
    changes = []
    other.register_growth_hook(lambda rec, ch: changes.append(ch))
    other.widen("0", 20)
    other.widen("0", 24)  # the second growth starts from 20 units: not what EWC holds
    with pytest.raises(OutOfSyncError, match="missed an earlier growth"):
        remap_ewc(ewc, changes[1])


def _fill_si_state(si: SynapticIntelligencePlugin, net: nn.Module) -> None:
    """Non-zero SI state (on CPU, Avalanche 0.6's SI stores views of the weights, so its path
    integral, hence its importance, is always 0)."""
    g = torch.Generator().manual_seed(2)
    for n, p in net.named_parameters():
        si.ewc_data[0][n].data = (p.detach() + 0.1 * torch.randn(p.shape, generator=g)).flatten()
        si.ewc_data[1][n].data = torch.rand(p.numel(), generator=g)
        si.syn_data["cum_trajectory"][n].data = torch.rand(p.numel(), generator=g)
        si.syn_data["trajectory"][n].data = torch.rand(p.numel(), generator=g)


def test_si_penalty_is_equal_across_growth(stream):
    si = SynapticIntelligencePlugin(si_lambda=1.0)
    net, opt, _ = trained(si, stream, n=1)
    _fill_si_state(si, net)
    traj = {n: si.syn_data["trajectory"][n].data.clone() for n in ("4.weight",)}
    before = penalty(si, net, exp_counter=1)
    assert before > 1e-3
    grow_twice(net, opt)
    assert penalty(si, net, exp_counter=1) == pytest.approx(before, rel=1e-5)
    for name, p in net.named_parameters():
        for store in (*si.ewc_data, *si.syn_data.values()):
            assert store[name].data.shape == (p.numel(),)
    # Row-major flattening: "4.weight" grew columns 16 -> 30; its old entries kept their place.
    grown = si.syn_data["trajectory"]["4.weight"].data.view(10, 30)
    torch.testing.assert_close(grown[:, :16], traj["4.weight"].view(10, 16))
    assert grown[:, 16:].abs().sum() == 0


def test_si_gets_unpenalised_entries_for_deepened_layers(stream):
    si = SynapticIntelligencePlugin(si_lambda=1.0)
    net, opt, strategy = trained(si, stream, n=1)
    _fill_si_state(si, net)
    before = penalty(si, net, exp_counter=1)
    rec = net.deepen("2", optimizer=opt)
    new = [n for n, _ in net.named_parameters() if n.startswith("grown.")]
    assert len(new) == 2 and all(n.startswith(rec.details["inserted"][0]) for n in new)
    for n in new:
        assert si.ewc_data[1][n].data.abs().sum() == 0
        torch.testing.assert_close(si.ewc_data[0][n].data, net.get_parameter(n).detach().flatten())
    assert penalty(si, net, exp_counter=1) == pytest.approx(before, rel=1e-6)
    with torch.no_grad():
        net.get_parameter(new[0]).add_(1.0)  # the new layer is free to move
    assert penalty(si, net, exp_counter=1) == pytest.approx(before, rel=1e-6)
    strategy.train(stream.train_stream[1])  # SI knows every parameter: no KeyError


def test_si_and_ewc_survive_mid_experience_growth(stream):
    """SI would fail on the first iteration after growth (its flat tensors keep old shapes) and
    EWC on a weight grown in two dimensions; both keep training and their penalties are equal
    across each growth inside the experience."""
    ewc = EWCPlugin(ewc_lambda=1.0)
    si = SynapticIntelligencePlugin(si_lambda=1.0)
    gaps = []

    def check(record, changes):
        gaps.append(record.layer)

    net = mlp_net(HIDDEN)
    net.register_growth_hook(check)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    plugin = GrowthPlugin(OnPlateau(patience=3, min_delta=10.0, factor=1.5, max_growths=1))
    equal = _PenaltyWitness(plugin, [ewc, si])
    strategy = Naive(
        model=net,
        optimizer=opt,
        train_mb_size=8,
        evaluator=EvaluationPlugin(),
        plugins=[plugin, equal, ewc, si],
    )
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    assert gaps == ["0", "2"] * 3
    assert net.width("0") == net.width("2") == 54
    assert len(equal.pairs) == 2  # growth in experiences 1 and 2 (none before EWC has data)
    for before, after in equal.pairs:
        assert after == pytest.approx(before, rel=1e-5)
        assert before[0] > 0


class _PenaltyWitness(SupervisedPlugin):
    """Placed after the GrowthPlugin: records the EWC and SI penalties, as the plugins compute
    them, right before mid-experience growth (once the GrowthPlugin has queued it) and right
    after it (the GrowthPlugin applies it first at the next iteration)."""

    def __init__(self, growth: GrowthPlugin, regs) -> None:
        super().__init__()
        self.growth, self.regs, self.pairs, self._before = growth, regs, [], None

    def _now(self, strategy):
        n = strategy.clock.train_exp_counter
        return tuple(penalty(r, strategy.model, exp_counter=n) for r in self.regs)

    def after_training_iteration(self, strategy, **kwargs):
        if self.growth._pending and strategy.clock.train_exp_counter > 0:
            self._before = self._now(strategy)

    def before_training_iteration(self, strategy, **kwargs):
        if self._before is not None:
            self.pairs.append((self._before, self._now(strategy)))
            self._before = None


# --- plugins placed before the GrowthPlugin, growth inside an experience -------------------------
class _GrowOnce(GrowthPolicy):
    """Widen both hidden layers x1.5 once, after the 3rd iteration of experience 1."""

    def __init__(self) -> None:
        self.done = False

    def after_iteration(self, strategy, net):
        if self.done or strategy.clock.train_exp_counter != 1:
            return []
        if strategy.clock.train_epoch_iterations < 3:
            return []
        self.done = True
        return [Widen("0", factor=1.5), Widen("2", factor=1.5)]


class _AfterGrowth(SupervisedPlugin):
    """Placed after the GrowthPlugin: calls ``check(strategy)`` at the iteration the network
    grew, after the plugins before it (and the growth) ran."""

    def __init__(self, check) -> None:
        super().__init__()
        self.check, self.calls, self._params = check, 0, None

    def before_training_iteration(self, strategy, **kwargs):
        n = sum(p.numel() for p in strategy.model.parameters())
        if self._params is not None and n != self._params:
            self.check(strategy)
            self.calls += 1
        self._params = n


def _train_growing_mid_experience(first, check, stream):
    """Naive with ``first`` placed before a GrowthPlugin that grows inside experience 1."""
    net = mlp_net(HIDDEN)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    growth = GrowthPlugin(_GrowOnce(), generator=0, on_refusal="raise")
    witness = _AfterGrowth(check)
    strategy = Naive(
        model=net,
        optimizer=opt,
        train_mb_size=16,
        evaluator=EvaluationPlugin(),
        plugins=[first, growth, witness],
    )
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
    assert [e.phase for e in growth.events] == ["mid_experience"] * 2
    assert (net.width("0"), net.width("2")) == (24, 24)
    assert witness.calls == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())
    return net


def test_gem_reference_gradients_are_those_of_the_grown_network(stream):
    """GEM computed its reference gradients on the network before growth; remapped, they equal
    the gradients it computes on the grown network (and have its size: no size mismatch)."""
    gem = GEMPlugin(patterns_per_experience=16, memory_strength=0.5)
    pairs = []

    def check(strategy):
        remapped = gem.G.clone()
        gem.before_training_iteration(strategy)  # recomputed on the grown network
        pairs.append((remapped, gem.G.clone()))

    net = _train_growing_mid_experience(gem, check, stream)
    ((remapped, fresh),) = pairs
    assert fresh.shape == (1, net.num_parameters())
    assert fresh.abs().max() > 1e-3
    torch.testing.assert_close(remapped, fresh, rtol=1e-4, atol=1e-6)


def test_agem_reference_gradient_follows_growth(stream):
    """AGEM would assert "Different model parameters in AGEM projection" after growth."""
    agem = AGEMPlugin(patterns_per_experience=16, sample_size=16)
    sizes = []
    net = _train_growing_mid_experience(
        agem, lambda s: sizes.append(agem.reference_gradients.numel()), stream
    )
    assert sizes == [net.num_parameters()]


@pytest.mark.parametrize("name", ["mas", "rwalk"])
def test_mas_and_rwalk_placed_first_survive_mid_experience_growth(name, stream):
    """RWalk placed first computed this iteration's gradient, parameters and importance on the
    network before growth; MAS's state dates from the last experience. Both penalties are
    unchanged by the growth, and every RWalk tensor has the grown shape."""
    reg = REGULARISERS[name]()
    pairs, shapes = [], {}

    before = []

    def check(strategy):
        shapes.update(_state_shapes(reg, strategy.model))
        pairs.append((before[-1], penalty(reg, strategy.model, exp_counter=1)))

    class _Before(SupervisedPlugin):  # right before the GrowthPlugin grows
        def before_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 1:
                before.append(penalty(reg, strategy.model, exp_counter=1))

    net = mlp_net(HIDDEN)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    growth = GrowthPlugin(_GrowOnce(), generator=0, on_refusal="raise")
    strategy = Naive(
        model=net,
        optimizer=opt,
        train_mb_size=16,
        evaluator=EvaluationPlugin(),
        plugins=[reg, _Before(), growth, _AfterGrowth(check)],
    )
    for exp in stream.train_stream[:2]:
        strategy.train(exp)
    ((before_growth, after_growth),) = pairs
    assert before_growth > 1e-4
    assert after_growth == pytest.approx(before_growth, rel=1e-6)
    assert shapes["importance[2.weight]" if name == "mas" else "iter_grad[2.weight]"] == (
        (24, 24),
        (24, 24),
    )
    wrong = {k: v for k, v in shapes.items() if v[0] != v[1]}
    assert not wrong, wrong
    assert all(torch.isfinite(p).all() for p in net.parameters())
