"""``widen(init="gradmax")`` and ``widen(init="vt")``: exact, new units learn, clear refusals."""

from __future__ import annotations

import pytest
import torch
from _models import assert_preserved, assert_state_equal, outputs, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth.initializers import GRADMAX_BIAS


def mlp(seed: int = 0, hidden: int = 6, act: type = nn.ReLU, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(8, hidden), act(), nn.Linear(hidden, hidden), act()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, 4))


def data(seed: int = 1, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def modules(net: GrowableNetwork) -> dict[str, nn.Module]:
    return dict(net.named_modules())


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.GELU])
def test_gradmax_is_exact_in_eval_and_train_mode(act):
    x, y = data()
    net = GrowableNetwork(mlp(act=act), x[:4])
    before_eval = outputs(net, x)
    net.train()
    with torch.no_grad():
        before_train = net(x).clone()
    for layer in net.layers:
        net.widen(layer, 11, init="gradmax", batch=(x, y))
    assert_preserved(outputs(net, x), before_eval)
    net.train()
    with torch.no_grad():
        assert_preserved(net(x), before_train)


def test_gradmax_new_units_zero_fan_in_bias_and_top_directions():
    x, y = data()
    net = GrowableNetwork(mlp(), x[:4])
    m = modules(net)
    # the statistic gradmax uses for layer "2": M = sum g x^T (g at "4"'s output, x "2"'s input)
    feats = {}
    h1 = m["2"].register_forward_pre_hook(lambda mod, a: feats.__setitem__("x", a[0]))
    h2 = m["4"].register_forward_hook(lambda mod, a, out: feats.__setitem__("y", out))
    loss = nn.functional.cross_entropy(net.eval()(x), y)
    (g,) = torch.autograd.grad(loss, feats["y"])
    h1.remove(), h2.remove()
    big = g.T.double() @ feats["x"].detach().double()
    net.widen("2", 9, init="gradmax", batch=(x, y))
    w, b, cols = m["2"].weight.detach(), m["2"].bias.detach(), m["4"].weight.detach()[:, 6:]
    assert torch.equal(w[6:], torch.zeros(3, 6))
    assert torch.equal(b[6:], torch.full((3,), GRADMAX_BIAS))
    # the new outgoing columns are M's top left singular vectors (signs free), all one norm
    u = torch.linalg.svd(big).U[:, :3]
    unit = cols.double() / cols.double().norm(dim=0, keepdim=True)
    assert torch.allclose((unit * u).sum(0).abs(), torch.ones(3, dtype=torch.float64), atol=1e-5)
    norms = cols.norm(dim=0)
    assert torch.allclose(norms, norms[0].expand(3), rtol=1e-5)
    # so the gradient they send to the new incoming weights is the largest possible for
    # orthogonal columns of that norm: norm * sqrt(s1^2 + s2^2 + s3^2) (Ky Fan)
    gain = (big.T @ cols.double()).norm()
    s = torch.linalg.svdvals(big)[:3]
    assert torch.isclose(gain, norms[0].double() * s.pow(2).sum().sqrt(), rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rnd = torch.linalg.qr(torch.randn(4, 3, generator=g, dtype=torch.float64)).Q
        rnd = rnd * norms.double()
        assert gain > (big.T @ rnd).norm()


def test_gradmax_new_units_learn():
    x, y = data(n=128)
    net = GrowableNetwork(mlp(), x[:4])
    net.widen("0", 10, init="gradmax", batch=(x, y))
    m = modules(net)
    w0 = m["0"].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    moved = (m["0"].weight.detach() - w0)[6:].norm(dim=1)
    assert (moved > 1e-3).all(), moved  # every new unit's incoming weights left zero
    # a unit with zero incoming weights and zero bias (plain ReLU) would not move at all
    frozen = GrowableNetwork(mlp(), x[:4])
    frozen.widen("0", 10, init="zero")
    f = modules(frozen)
    with torch.no_grad():
        f["0"].weight[6:] = 0
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(frozen(x), y).backward()
        opt.step()
    assert torch.equal(f["0"].weight.detach()[6:], torch.zeros(4, 8))


def test_gradmax_refusals_change_nothing():
    x, y = data()
    net = GrowableNetwork(mlp(), x[:4])
    snap = snapshot(net)
    with pytest.raises(GrowthError, match="needs a batch of training data"):
        net.widen("0", 9, init="gradmax")
    with pytest.raises(GrowthError, match="batch= is for init='gradmax'"):
        net.widen("0", 9, init="zero", batch=(x, y))
    with pytest.raises(GrowthError, match="must return a scalar tensor"):
        net.widen("0", 9, init="gradmax", batch=(x, y), loss_fn=lambda o, t: o)
    assert_state_equal(net, snap)
    drop = GrowableNetwork(mlp(dropout=0.5), x[:4])
    snap = snapshot(drop)
    with pytest.raises(GrowthError, match="not exact in train mode with dropout"):
        drop.widen("0", 9, init="gradmax", batch=(x, y))
    assert_state_equal(drop, snap)
    torch.manual_seed(0)
    bn = GrowableNetwork(
        nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)), x[:4]
    )
    with pytest.raises(GrowthError, match="BatchNorm"):
        bn.widen("0", 9, init="gradmax", batch=(x, y))
    nobias = GrowableNetwork(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4, bias=False)), x[:4]
    )
    with pytest.raises(GrowthError, match="Linear reader with a bias"):
        nobias.widen("0", 9, init="gradmax", batch=(x, y))
    xs = torch.randn(4, 3, 8, 8)
    conv = GrowableNetwork(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)), xs
    )
    with pytest.raises(GrowthError, match="widens Linear layers with a bias"):
        conv.widen("0", 6, init="gradmax", batch=(xs, torch.zeros(4, dtype=torch.long)))


def test_vt_pairs_cancel_and_learn_apart():
    x, y = data()
    net = GrowableNetwork(mlp(), x[:4])
    before = outputs(net, x)
    net.widen("0", 11, init="vt")  # 5 new units: two pairs and one with zero outgoing weights
    assert_preserved(outputs(net, x), before)
    m = modules(net)
    w, cols = m["0"].weight.detach(), m["2"].weight.detach()
    assert torch.equal(w[6:8], w[8:10])
    assert torch.equal(cols[:, 6:8], -cols[:, 8:10])
    assert (cols[:, 6:8].abs() > 0).all()
    assert torch.equal(cols[:, 10], torch.zeros(6))
    net.train()
    nn.functional.cross_entropy(net(x), y).backward()
    gw = m["0"].weight.grad
    assert (gw[6:8].norm(dim=1) > 1e-6).all()
    assert torch.allclose(gw[6:8], -gw[8:10], atol=1e-7)  # opposite: the pair moves apart


def test_vt_reads_through_convolutions():
    xs = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    net = GrowableNetwork(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3)), xs)
    before = outputs(net, xs)
    net.widen("0", 8, init="vt")
    assert_preserved(outputs(net, xs), before)
    c = modules(net)["2"].weight.detach()
    assert torch.equal(c[:, 4:6], -c[:, 6:8])


@given(
    seed=st.integers(0, 10_000),
    hidden=st.integers(2, 9),
    extra=st.integers(1, 7),
    init=st.sampled_from(["gradmax", "vt"]),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.LeakyReLU]),
)
def test_custom_inits_preserve_the_function(seed, hidden, extra, init, act):
    x, y = data(seed)
    net = GrowableNetwork(mlp(seed, hidden, act), x[:4])
    before = outputs(net, x)
    layer = net.layers[seed % 2]
    kw = {"batch": (x, y)} if init == "gradmax" else {}
    rec = net.widen(layer, hidden + extra, init=init, **kw)
    assert rec.max_abs_error is not None
    assert_preserved(outputs(net, x), before)
