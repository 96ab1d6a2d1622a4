"""No silent change of function: growth is exact in eval *and* train mode, or it is refused.

Each case here is a model that once grew with a silent change of its function (or broke) when
verification was off: an ``Embedding`` with ``max_norm``, tied weights, the second operand of an
in-place ``mul_``/``div_``, stochastic depth (``torchvision.ops.StochasticDepth``, traced with its
train mode frozen in) and an identity insertion after ``Conv -> BatchNorm`` in train mode. The
property at the end runs every widen/deepen with ``verify=False`` on small models covering these
cases: each either raises ``GrowthError`` with the network untouched, or preserves the outputs
in eval mode and in (seeded) train mode within ``1e-5`` of their scale.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import assert_preserved, check_consistent, gen, outputs, randomize_batchnorm, snapshot
from torch import Tensor, nn
from torchvision.ops import StochasticDepth, stochastic_depth

from net2grow.growth import GrowableNetwork, GrowthError, UnsupportedLayerError
from net2grow.growth.checkpoint import load, save
from net2grow.growth.rules import module_rule_for

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def train_outputs(net: nn.Module, *inputs: Tensor, seed: int = 0) -> Tensor:
    """A train-mode forward of a copy of ``net`` (BatchNorm statistics of the copy move), with
    the random generator seeded: stochastic depth draws the same per-sample masks every time."""
    model = copy.deepcopy(net).train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return model(*inputs).detach()


class Untouched:
    """Everything a refusal must leave as it was."""

    def __init__(self, net: GrowableNetwork) -> None:
        self.net = net
        self.state = snapshot(net)
        self.params = dict(net.named_parameters())
        self.modules = [n for n, _ in net.named_modules()]
        self.code = net.code
        self.history = list(net.history)
        self.modes = [m.training for m in net.modules()]

    def check(self) -> None:
        net = self.net
        state = net.state_dict()
        assert list(state) == list(self.state)
        for k, v in self.state.items():
            assert state[k].shape == v.shape and torch.equal(state[k], v), f"{k} changed"
        now = dict(net.named_parameters())
        assert list(now) == list(self.params)
        assert all(now[n] is p for n, p in self.params.items()), "parameter objects replaced"
        assert [n for n, _ in net.named_modules()] == self.modules
        assert net.code == self.code
        assert net.history == self.history
        assert [m.training for m in net.modules()] == self.modes


def tokens(n: int, length: int, vocab: int, seed: int) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=gen(seed))


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=gen(seed))


# --------------------------------------------------------------------------------------------
# 1. Embedding(max_norm=...): refused, before anything changes
# --------------------------------------------------------------------------------------------


class Bag(nn.Module):
    def __init__(self, max_norm: float | None) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, max_norm=max_norm)
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(self.emb(x).mean(1))))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("init", ["net2net", "zero", "random"])
def test_embedding_with_max_norm_is_refused(verify: bool, init: str) -> None:
    torch.manual_seed(0)
    x = tokens(8, 5, 20, seed=1)
    net = GrowableNetwork(Bag(max_norm=1.0), x)
    xh = tokens(8, 5, 20, seed=2)
    before = outputs(net, xh)  # renormalises the rows of xh's tokens once, in place
    frozen = Untouched(net)
    with pytest.raises(UnsupportedLayerError) as info:
        net.widen("emb", 9, init=init, verify=verify)
    msg = str(info.value)
    assert "'emb'" in msg and "max_norm=1.0" in msg and "max_norm=None" in msg
    frozen.check()
    assert torch.equal(outputs(net, xh), before)
    assert "emb" not in net.layers and "fc" in net.layers
    # the layers it does not feed still grow, exactly
    net.widen("fc", 8, verify=False, generator=gen(3))
    assert_preserved(outputs(net, xh), before)


def test_embedding_without_max_norm_still_widens() -> None:
    torch.manual_seed(0)
    x = tokens(8, 5, 20, seed=1)
    net = GrowableNetwork(Bag(max_norm=None), x)
    xh = tokens(8, 5, 20, seed=2)
    before = outputs(net, xh)
    net.widen("emb", 9, verify=False, generator=gen(3))
    assert net.emb.weight.shape == (20, 9) and net.fc.in_features == 9
    assert_preserved(outputs(net, xh), before)


# --------------------------------------------------------------------------------------------
# 2. tied weights and in-place binary ops
# --------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """A decoder tied to the embedding (``out.weight = emb.weight``) around an MLP block."""

    def __init__(self, vocab: int = 17, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.out(h)


class FunctionalTie(nn.Module):
    """The same tie written functionally: the decoder reads the embedding's weight directly."""

    def __init__(self, vocab: int = 17, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.relu(self.fc(self.emb(x))), self.emb.weight)


class TiedLinears(nn.Module):
    """Two Linear layers of one type sharing their weight (biases of their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inp(x))
        h = torch.tanh(self.a(h))
        return self.out(torch.tanh(self.b(h)))


class InPlaceGates(nn.Module):
    """Gating written with in-place ops and a tensor clamp bound: every second operand carries
    the channels of the first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.gate = nn.Linear(5, 7)
        self.scale = nn.Linear(5, 7)
        self.floor = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h.mul_(torch.sigmoid(self.gate(x)))
        h.div_(1 + torch.sigmoid(self.scale(x)))
        h = torch.clamp(h, min=-torch.sigmoid(self.floor(x)))
        return self.out(F.relu(h))


@pytest.mark.parametrize("init", ["net2net", "zero", "random"])
@pytest.mark.parametrize("layer", ["emb", "fc2"])
def test_embedding_tied_to_the_decoder_is_refused(layer: str, init: str) -> None:
    torch.manual_seed(1)
    x = tokens(6, 4, 17, seed=1)
    net = GrowableNetwork(TiedLM(), x)
    xh = tokens(6, 4, 17, seed=2)
    before = outputs(net, xh)
    frozen = Untouched(net)
    with pytest.raises(GrowthError) as info:
        net.widen(layer, 9, init=init, verify=False)
    msg = str(info.value)
    assert f"'{layer}'" in msg and "emb.weight is out.weight" in msg and "tied" in msg
    assert "Untie" in msg or "untie" in msg
    frozen.check()
    assert torch.equal(outputs(net, xh), before)
    assert net.layers == ["fc1"]
    assert net.out.weight is net.emb.weight


def test_tied_model_grows_the_layers_not_coupled_to_the_tie() -> None:
    torch.manual_seed(1)
    x = tokens(6, 4, 17, seed=1)
    net = GrowableNetwork(TiedLM(), x)
    xh = tokens(6, 4, 17, seed=2)
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    net.widen("fc1", 15, verify=False, generator=gen(2))
    assert_preserved(outputs(net, xh), before)
    assert_preserved(train_outputs(net, xh), train_before)
    net.widen("fc1", 18, init="random", verify=False, generator=gen(3))
    assert outputs(net, xh).shape == before.shape  # not exact, by design; but it runs
    assert net.out.weight is net.emb.weight


def test_weight_read_directly_in_forward_is_refused() -> None:
    torch.manual_seed(2)
    x = tokens(6, 4, 17, seed=1)
    net = GrowableNetwork(FunctionalTie(), x)
    frozen = Untouched(net)
    with pytest.raises(GrowthError, match=r"emb\.weight is also read directly in forward"):
        net.widen("emb", 9, init="random", verify=False)
    frozen.check()
    assert "emb" not in net.layers


@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_tied_layers_of_one_type_grow_together_exactly(init: str) -> None:
    torch.manual_seed(3)
    x = randn(12, 5, seed=1)
    net = GrowableNetwork(TiedLinears(), x)
    xh = randn(12, 5, seed=2)
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    assert set(net.coupled_layers("inp")) == {"inp", "a", "b", "out"}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(xh).square().mean().backward()
    opt.step()
    opt.zero_grad()
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    rec = net.widen("a", 9, init=init, verify=False, generator=gen(4), optimizer=opt)
    assert net.b.weight is net.a.weight and net.a.weight.shape == (9, 9)
    assert net.inp.out_features == net.a.in_features == net.b.out_features == 9
    assert_preserved(outputs(net, xh), before)
    assert_preserved(train_outputs(net, xh), train_before)
    assert opt.state[net.a.weight]["exp_avg"].shape == (9, 9)
    assert rec.max_abs_error is None
    net(xh).square().mean().backward()  # and it still trains
    opt.step()
    check_consistent(net)


def test_tied_layers_grown_randomly_still_run() -> None:
    torch.manual_seed(3)
    x = randn(12, 5, seed=1)
    net = GrowableNetwork(TiedLinears(), x)
    net.widen("b", 10, init="random", verify=False, generator=gen(4))
    assert net.b.weight is net.a.weight and net.a.weight.shape == (10, 10)
    assert outputs(net, randn(3, 5, seed=5)).shape == (3, 3)


@pytest.mark.parametrize("layer", ["fc", "gate", "scale", "floor"])
@pytest.mark.parametrize("init", ["net2net", "zero"])
def test_in_place_second_operand_grows_with_the_first(layer: str, init: str) -> None:
    torch.manual_seed(4)
    x = randn(12, 5, seed=1)
    net = GrowableNetwork(InPlaceGates(), x)
    xh = randn(12, 5, seed=2)
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    assert set(net.coupled_layers(layer)) == {"fc", "gate", "scale", "floor", "out"}
    net.widen(layer, 11, init=init, verify=False, generator=gen(5))
    assert all(net.get_submodule(n).out_features == 11 for n in ("fc", "gate", "scale", "floor"))
    assert_preserved(outputs(net, xh), before)
    assert_preserved(train_outputs(net, xh), train_before)
    net.widen("gate", 13, init="random", verify=False, generator=gen(6))
    assert outputs(net, xh).shape == before.shape  # random growth is not exact, but it runs


# --------------------------------------------------------------------------------------------
# 3. stochastic depth
# --------------------------------------------------------------------------------------------


class SDBlock(nn.Module):
    """A residual block whose branch is dropped per sample (torchvision's StochasticDepth)."""

    def __init__(self, c: int, p: float = 0.5, functional: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.p, self.functional = p, functional
        self.drop = StochasticDepth(p, "row")

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.functional:
            h = stochastic_depth(h, self.p, "row", self.training)
        else:
            h = self.drop(h)
        return F.relu(x + h)


class SDNet(nn.Module):
    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block1 = SDBlock(6, 0.5, functional)
        self.block2 = SDBlock(6, 0.3, functional)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def sd_net(functional: bool = False, mode: str = "train") -> tuple[GrowableNetwork, Tensor]:
    torch.manual_seed(5)
    model = randomize_batchnorm(SDNet(functional), seed=5)
    model.train(mode == "train")
    x = randn(6, 3, 8, 8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mode is followed: no "fixed to one mode" warning
        net = GrowableNetwork(model, x)
    return net, randn(6, 3, 8, 8, seed=2)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stochastic_depth_follows_the_mode(functional: bool, mode: str) -> None:
    net, xh = sd_net(functional, mode)
    calls = [n for n in net.graph.nodes if n.op == "call_module"]
    drops = [n for n in calls if isinstance(net.get_submodule(str(n.target)), StochasticDepth)]
    assert [str(n.target) for n in drops] == (
        ["functional.stochastic_depth0", "functional.stochastic_depth1"]
        if functional
        else ["block1.drop", "block2.drop"]
    )
    assert not any(
        "stochastic_depth" in str(n.target) for n in net.graph.nodes if n.op == "call_function"
    )
    # eval mode: the identity, deterministic (it used to run with training=True baked in)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(xh), net(xh))
    # train mode: whole residual branches of some samples dropped, at random
    net.train()
    with torch.no_grad():
        ys = [train_outputs(net, xh, seed=s) for s in range(4)]
    assert any(not torch.equal(ys[0], y) for y in ys[1:])
    assert torch.equal(ys[0], train_outputs(net, xh, seed=0))
    # every layer of the residual stream is growable, the drop layers pass channels through
    assert {"stem", "block1.conv2", "block2.conv1"} <= set(net.layers)


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_stochastic_depth_network_grows_exactly(functional: bool) -> None:
    net, xh = sd_net(functional)
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    for name in ("stem", "block1.conv1", "block2.conv2"):
        rec = net.widen(name, net.width(name) + 3, generator=gen(7))
        assert rec.max_abs_error is not None and rec.max_abs_error <= 1e-5 * before.abs().max()
    rec = net.deepen("block1.conv1", kind="residual")
    assert rec.max_abs_error == 0.0
    net.deepen("block2.conv2", kind="residual", verify=False)
    net.deepen("block2.conv1")  # identity after conv -> BN -> ReLU
    assert_preserved(outputs(net, xh), before)
    assert_preserved(train_outputs(net, xh), train_before)
    assert net.training and all(m.training for m in net.modules())
    check_consistent(net)


def test_stochastic_depth_survives_a_checkpoint(tmp_path) -> None:
    net, xh = sd_net()
    net.widen("stem", 8, generator=gen(8))
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    save(net, tmp_path / "sd.n2g")
    loaded = load(tmp_path / "sd.n2g")
    assert isinstance(loaded.get_submodule("block1.drop"), StochasticDepth)
    assert loaded.get_submodule("block1.drop").p == 0.5
    assert torch.equal(outputs(loaded, xh), before)
    assert torch.equal(train_outputs(loaded, xh), train_before)


@pytest.fixture(scope="module")
def efficientnet() -> tuple[GrowableNetwork, Tensor]:
    """torchvision's efficientnet_b0 (stochastic depth 0.2), traced once for the module."""
    torch.manual_seed(6)
    model = randomize_batchnorm(torchvision.models.efficientnet_b0(num_classes=10), seed=6)
    x = randn(2, 3, 64, 64, seed=1)
    return GrowableNetwork(model, x), randn(2, 3, 64, 64, seed=2)


def test_efficientnet_grows_exactly(efficientnet) -> None:
    net, xh = efficientnet
    net = copy.deepcopy(net)
    assert module_rule_for(net.get_submodule("features.4.2.stochastic_depth")) is not None
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(xh), net(xh))  # eval mode is deterministic
        net.train()
    assert len(net.layers) >= 60
    before, train_before = outputs(net, xh), train_outputs(net, xh)
    # a squeeze-excitation layer, an expansion conv and a residual-stream projection
    for name in ("features.4.2.block.2.fc1", "features.2.0.block.0.0", "features.5.1.block.3.0"):
        assert name in net.layers
        rec = net.widen(name, net.width(name) + 4, generator=gen(9))
        assert rec.max_abs_error is not None and rec.max_abs_error <= 1e-5 * before.abs().max()
    net.deepen("features.4.2.block.2.fc1", kind="residual", verify=False)
    assert_preserved(outputs(net, xh), before)
    assert_preserved(train_outputs(net, xh), train_before)


# --------------------------------------------------------------------------------------------
# 4. the property: every operation with verify=False is exact in both modes, or refused
# --------------------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, padding=1)
        self.b1 = nn.BatchNorm2d(5)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return self.fc(h.flatten(1))


PROPERTY_MODELS = {
    # name: (factory, example input, held-out input)
    "conv-bn": (ConvBN, randn(8, 3, 4, 4, seed=1), randn(8, 3, 4, 4, seed=2)),
    "stochastic-depth": (SDNet, randn(6, 3, 8, 8, seed=1), randn(6, 3, 8, 8, seed=2)),
    "in-place": (InPlaceGates, randn(12, 5, seed=1), randn(12, 5, seed=2)),
    "tied-lm": (TiedLM, tokens(6, 4, 17, seed=1), tokens(6, 4, 17, seed=2)),
    "tied-linears": (TiedLinears, randn(12, 5, seed=1), randn(12, 5, seed=2)),
    "functional-tie": (FunctionalTie, tokens(6, 4, 17, seed=1), tokens(6, 4, 17, seed=2)),
    "max-norm": (lambda: Bag(max_norm=1.0), tokens(8, 5, 20, seed=1), tokens(8, 5, 20, seed=2)),
}

OPERATIONS = {
    "widen-net2net": lambda net, n: net.widen(n, net.width(n) + 2, verify=False, generator=gen(1)),
    "widen-zero": lambda net, n: net.widen(
        n, net.width(n) + 3, init="zero", verify=False, generator=gen(2)
    ),
    "deepen-identity": lambda net, n: net.deepen(n, verify=False),
    "deepen-residual": lambda net, n: net.deepen(n, kind="residual", verify=False),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", list(PROPERTY_MODELS))
def test_no_silent_change(case: str, mode: str) -> None:
    factory, x, xh = PROPERTY_MODELS[case]
    torch.manual_seed(7)
    model = randomize_batchnorm(factory(), seed=7)
    model.train(mode == "train")
    base = GrowableNetwork(model, x)
    outputs(base, xh)  # max_norm: renormalise the held-out rows once, before any comparison
    candidates = [n for n, nodes in base.analysis.module_nodes.items() if _is_layer(base, n)]
    grown = refused = 0
    for name in candidates:
        for op_name, op in OPERATIONS.items():
            net = copy.deepcopy(base)
            before, train_before = outputs(net, xh), train_outputs(net, xh)
            frozen = Untouched(net)
            try:
                op(net, name)
            except GrowthError:
                frozen.check()  # refused before anything changed
                refused += 1
                continue
            where = f"{op_name}({name!r}) in {mode} mode"
            assert [m.training for m in net.modules()] == [mode == "train"] * len(
                list(net.modules())
            ), where
            try:
                assert_preserved(outputs(net, xh), before)
                assert_preserved(train_outputs(net, xh), train_before)
            except AssertionError as exc:
                raise AssertionError(f"{where}: {exc}") from exc
            grown += 1
    assert grown > 0 and (refused > 0 or case in ("conv-bn", "stochastic-depth", "in-place"))


def _is_layer(net: GrowableNetwork, name: str) -> bool:
    rule = module_rule_for(net.get_submodule(name))
    return rule is not None and rule.is_layer


def test_random_growth_without_verification_leaves_a_network_that_runs() -> None:
    """``init="random"`` is not exact by design, but it must never break the network."""
    for case, (factory, x, xh) in PROPERTY_MODELS.items():
        torch.manual_seed(8)
        base = GrowableNetwork(factory(), x)
        shape = outputs(base, xh).shape
        for name in [n for n in base.analysis.module_nodes if _is_layer(base, n)]:
            net = copy.deepcopy(base)
            try:
                net.widen(name, net.width(name) + 2, init="random", verify=False)
            except GrowthError:
                continue
            assert outputs(net, xh).shape == shape, (case, name)
            assert train_outputs(net, xh).shape == shape, (case, name)
