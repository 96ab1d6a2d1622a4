"""``widen(..., optimizer_state=...)``: what new and copied units get of Adam/SGD state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.strategies import GrowthPlugin
from net2grow.strategies.policies import EveryExperience


def trained(make_opt):
    torch.manual_seed(0)
    net = GrowableNetwork(
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), torch.zeros(2, 5)
    )
    opt = make_opt(net.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


def grow(mode, make_opt, init="net2net"):
    net, opt = trained(make_opt)
    m = dict(net.named_modules())
    w0, w2 = m["0"].weight, m["2"].weight
    old = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in (("0", w0), ("2", w2))}
    rec = net.widen("0", 7, optimizer=opt, optimizer_state=mode, init=init,
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert rec.details["optimizer_state"] == mode
    return net, opt, old, w0, w2


ADAM = (lambda ps: torch.optim.Adam(ps, lr=0.01), "exp_avg", "exp_avg_sq")
SGD = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "momentum_buffer", None)


@pytest.mark.parametrize("opt_spec", [ADAM, SGD], ids=["adam", "sgd"])
@pytest.mark.parametrize("mode", ["scale", "copy", "zero"])
def test_new_units_state(mode, opt_spec):
    make_opt, first, second = opt_spec
    _, opt, old, w0, w2 = grow(mode, make_opt)
    src = torch.tensor([0, 1, 2, 3, *[-1] * 3])
    # which old unit each new unit copies: its incoming weights are the source's
    for j in range(4, 7):
        src[j] = next(i for i in range(4) if torch.equal(w0[j], w0[i]))
    st0, st2 = opt.state[w0], opt.state[w2]
    if mode == "zero":  # old units keep their state exactly; new ones start from zero
        assert torch.equal(st0[first][:4], old["0"][first])
        assert torch.equal(st0[first][4:], torch.zeros(3, 5))
        assert torch.equal(st2[first][:, 4:], torch.zeros(3, 3))
    elif mode == "copy":  # every unit's rows: its source's state as it was
        assert torch.equal(st0[first], old["0"][first][src])
        assert torch.equal(st2[first], old["2"][first][:, src])
    else:  # scale: every unit's rows get its source's state times its share of the source
        share = w2.detach() / old_columns(w2, src)
        s = share[0]
        assert torch.allclose(share, s.expand_as(share), atol=1e-5)
        assert (s[4:] < 1).all()  # the comparison is not vacuous
        assert torch.allclose(st0[first], old["0"][first][src] * s[:, None], atol=1e-7)
        if second is not None:
            expect = old["0"][second][src] * (s**2)[:, None]
            assert torch.allclose(st0[second], expect, atol=1e-9)
        assert torch.equal(st2[first], old["2"][first][:, src])  # columns: copied
    if "step" in st0:
        assert float(st0["step"]) == 3.0  # step counts keep counting


def old_columns(w2, src):
    """The outgoing weight of each unit's source before growth (the sum of its shares)."""
    w = w2.detach()
    total = torch.zeros_like(w[:, :4])
    for j in range(7):
        total[:, src[j]] += w[:, j]
    return total[:, src]


def test_zero_mode_for_fresh_units_and_refusals():
    _, opt, _, w0, _ = grow("scale", ADAM[0], init="zero")
    assert torch.equal(opt.state[w0]["exp_avg"][4:], torch.zeros(3, 5))  # fresh: zero
    net, opt = trained(ADAM[0])
    before = {k: v.clone() for k, v in opt.state[dict(net.named_modules())["0"].weight].items()}
    with pytest.raises(GrowthError, match="optimizer_state must be one of"):
        net.widen("0", 7, optimizer=opt, optimizer_state="reset")
    after = opt.state[dict(net.named_modules())["0"].weight]
    assert net.width("0") == 4 and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="optimizer_state must be one of"):
        GrowthPlugin(EveryExperience(), optimizer_state="fresh")
    with pytest.raises(GrowthError, match="init must be one of"):
        GrowthPlugin(EveryExperience(), init="magic")
