"""Per-cohort learning rates (``growth.cohorts.CohortLR``, ``strategies.CohortLRPlugin``)."""

from __future__ import annotations

import copy

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.training.supervised import Naive
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError, load_checkpoint, save
from net2grow.growth.cohorts import CohortLR
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.cohort_lr import CohortLRPlugin
from net2grow.strategies.policies import EveryExperience


def net_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
    return GrowableNetwork(model, x[:4]), x, y


def step(net, opt, x, y) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


def params(net) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_new_entries_move_m_times_as_far_old_ones_unchanged(make_opt):
    plain, x, y = net_and_data()
    opt_p = make_opt(plain.parameters())
    step(plain, opt_p, x, y)  # some optimizer state before growth
    scaled = copy.deepcopy(plain)
    opt_s = make_opt(scaled.parameters())
    opt_s.load_state_dict(copy.deepcopy(opt_p.state_dict()))  # (else state tensors are shared)
    cohorts = CohortLR(scaled, new_unit_lr=3.0)
    cohorts.attach(opt_s)
    for net, opt in ((plain, opt_p), (scaled, opt_s)):
        net.widen("0", 7, optimizer=opt, generator=torch.Generator().manual_seed(5))
    before = params(plain)
    assert all(torch.equal(before[n], p) for n, p in params(scaled).items())
    step(plain, opt_p, x, y)
    step(scaled, opt_s, x, y)
    ids = cohorts.cohorts
    assert set(ids) == {"0.weight", "0.bias", "2.weight"}
    assert torch.equal(ids["0.weight"][:4], torch.zeros(4, 5))  # old rows
    assert torch.equal(ids["0.weight"][4:], torch.ones(3, 5))  # new rows
    assert torch.equal(ids["2.weight"][:, 4:], torch.ones(4, 3))  # new columns
    after_p, after_s = params(plain), params(scaled)
    for name in after_p:
        m = torch.ones_like(before[name])
        if name in ids:
            m = torch.where(ids[name] > 0, torch.full_like(m, 3.0), m)
        expected = before[name] + m * (after_p[name] - before[name])
        assert torch.allclose(after_s[name], expected, atol=1e-6), name
    moved = (after_p["0.weight"] - before["0.weight"])[4:].abs().max()
    assert moved > 1e-4  # the comparison is not vacuous


def test_later_growths_make_new_cohorts_and_entries_take_the_newest():
    net, x, y = net_and_data()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    cohorts = CohortLR(net, new_unit_lr=2.0)
    cohorts.attach(opt)
    net.widen("0", 6, optimizer=opt)
    net.widen("2", 6, optimizer=opt)  # same step: the same cohort
    step(net, opt, x, y)
    net.widen("0", 8, optimizer=opt)  # after a step: a new cohort
    w2 = cohorts.cohorts["2.weight"]  # rows: "2"'s units, columns: "0"'s units
    assert w2[:4, :4].eq(0).all() and w2[4:, :6].eq(1).all() and w2[:4, 4:6].eq(1).all()
    assert w2[:, 6:].eq(2).all()
    assert cohorts.born == [0, 0, 1]
    step(net, opt, x, y)
    net.deepen("2", optimizer=opt)  # new parameters: wholly the newest cohort
    new = [n for n in dict(net.named_parameters()) if n.startswith("grown.")]
    assert new and all(cohorts.cohorts[n].eq(3).all() for n in new)


def test_decay_and_vt_rule():
    net, _, _ = net_and_data()
    c = CohortLR(net, new_unit_lr=3.0, decay_steps=4)
    net.widen("0", 6)
    assert c.factors() == {0: 1.0, 1: 3.0}
    for _ in range(2):
        c.before_step(), c.after_step()
    assert c.factors()[1] == pytest.approx(2.0)
    for _ in range(5):
        c.before_step(), c.after_step()
    assert c.factors()[1] == 1.0
    vt = CohortLR(net, rule="vt")
    net.widen("2", 7)
    ids = vt.cohorts
    sq = [0.0, 0.0]
    for n, p in net.named_parameters():
        sel = ids[n] if n in ids else torch.zeros_like(p)
        sq[0] += float(p.detach()[sel == 0].pow(2).sum())
        sq[1] += float(p.detach()[sel == 1].pow(2).sum())
    assert vt.factors()[1] == pytest.approx((sq[1] / sq[0]) ** 0.5, rel=1e-5)


def test_state_travels_in_a_checkpoint(tmp_path):
    net, x, y = net_and_data()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    c = CohortLR(net, new_unit_lr=0.5)
    c.attach(opt)
    net.widen("0", 6, optimizer=opt)
    step(net, opt, x, y)
    save(net, tmp_path / "n.pt", opt, extra={"cohorts": c.state_dict()})
    ck = load_checkpoint(tmp_path / "n.pt")
    net2, opt2 = ck.network, ck.make_optimizer()
    c2 = CohortLR(net2, new_unit_lr=0.5)
    c2.load_state_dict(ck.extra["cohorts"])
    c2.attach(opt2)
    assert c2.born == c.born and c2.steps == c.steps == 1
    step(net, opt, x, y)
    step(net2, opt2, x, y)
    for (n, p), (_, q) in zip(net.named_parameters(), net2.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_options_and_states_are_refused():
    net, _, _ = net_and_data()
    with pytest.raises(GrowthError, match="new_unit_lr must be a positive number"):
        CohortLR(net, new_unit_lr=0)
    with pytest.raises(GrowthError, match="rule must be one of"):
        CohortLR(net, rule="fast")
    with pytest.raises(GrowthError, match="decay_steps is for rule='constant'"):
        CohortLR(net, rule="vt", decay_steps=3)
    with pytest.raises(GrowthError, match="follows a GrowableNetwork"):
        CohortLR(nn.Linear(2, 2))
    c = CohortLR(net)
    with pytest.raises(GrowthError, match=r"'0\.weight' has another shape"):
        c.load_state_dict({"cohorts": {"0.weight": torch.zeros(9, 5)}, "born": [0], "steps": 0})
    with pytest.raises(GrowthError, match="'nope' is not a parameter"):
        c.load_state_dict({"cohorts": {"nope": torch.zeros(1)}, "born": [0], "steps": 0})
    assert c.cohorts == {} and c.born == [0]  # unchanged


def _train(new_unit_lr: float, tmp_plugins=None):
    stream = digits_stream(5)
    net = mlp_net(8)
    lr = CohortLRPlugin(new_unit_lr)
    plugins = [GrowthPlugin(EveryExperience(factor=2.0), init="zero", generator=0), lr]
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    strategy = Naive(
        model=net, optimizer=opt, train_mb_size=64, train_epochs=1, plugins=plugins,
        evaluator=None,
    )  # fmt: skip
    for exp in stream.train_stream[:3]:
        strategy.train(exp)
    return net, lr


def test_plugin_keeps_rates_across_avalanche_optimizer_rebuilds():
    # init="zero": new units start with zero outgoing weights; at rate 1e-6 they stay ~0
    slow, plugin = _train(1e-6)
    fast, _ = _train(1.0)
    s_cols = dict(slow.named_modules())["4"].weight.detach()
    f_cols = dict(fast.named_modules())["4"].weight.detach()
    assert s_cols.shape == f_cols.shape == (10, 32)
    assert s_cols[:, 16:].abs().max() < 1e-4  # the second growth's units (cohort 2)
    assert s_cols[:, 8:16].abs().max() < 1e-4  # the first's, across a rebuild (cohort 1)
    assert f_cols[:, 8:].abs().max() > 1e-2
    assert s_cols[:, :8].abs().max() > 1e-2  # old units trained normally
    state = plugin.state_dict()
    fresh = CohortLRPlugin(1e-6)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["cohorts"]["born"] == state["cohorts"]["born"]
    with pytest.raises(GrowthError, match="malformed CohortLRPlugin state"):
        fresh.load_state_dict({"nope": 1})
