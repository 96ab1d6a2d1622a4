"""Refused ``widen`` calls: the right error type, a message that names the layer and what to do,
and a network (and optimizer) left exactly as it was."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from _models import (
    GroupedNet,
    assert_preserved,
    assert_state_equal,
    check_consistent,
    gen,
    mlp,
    outputs,
    randomize_batchnorm,
    snapshot,
)
from torch import Tensor, nn

from net2grow import growth
from net2grow.growth import (
    FunctionNotPreservedError,
    GrowableNetwork,
    GrowthError,
    TraceError,
    UnsupportedLayerError,
)
from net2grow.growth.mapping import UnitMapping


class Frozen:
    """Everything observable about a network, to check that a refusal changed nothing."""

    def __init__(self, net: GrowableNetwork, x: Tensor) -> None:
        self.net, self.x = net, x
        self.state = snapshot(net)
        self.y = outputs(net, x)
        self.layers = list(net.layers)
        self.widths = {n: net.width(n) for n in self.layers}
        self.history = list(net.history)
        self.modules = {n: repr(m) for n, m in net.named_modules()}
        self.params = {n: p for n, p in net.named_parameters()}
        self.code = net.code
        self.modes = [m.training for m in net.modules()]

    def check(self) -> None:
        net = self.net
        assert_state_equal(net, self.state)
        assert torch.equal(outputs(net, self.x), self.y), "outputs changed"
        assert net.layers == self.layers
        assert {n: net.width(n) for n in self.layers} == self.widths
        assert net.history == self.history
        assert {n: repr(m) for n, m in net.named_modules()} == self.modules
        named = dict(net.named_parameters())
        assert named.keys() == self.params.keys()
        assert all(named[n] is p for n, p in self.params.items()), "parameter objects replaced"
        assert net.code == self.code
        assert [m.training for m in net.modules()] == self.modes, "train/eval modes changed"
        check_consistent(net)


def refused(net, x, error: type[GrowthError], match: str, *args, **kwargs) -> GrowthError:
    """Call ``net.widen(*args, **kwargs)``: it must raise exactly ``error`` matching ``match``
    and leave the network untouched; then the network must still grow normally."""
    frozen = Frozen(net, x)
    with pytest.raises(error, match=match) as info:
        net.widen(*args, **kwargs)
    assert type(info.value) is error, f"expected {error.__name__}, got {type(info.value).__name__}"
    frozen.check()
    return info.value


def mlp_net(seed: int = 0) -> tuple[GrowableNetwork, Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(16, 4)
    return GrowableNetwork(mlp([4, 8, 8, 3]), x), x


# --------------------------------------------------------------------------------------------
# bad arguments: plain GrowthError
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (
            ("nope", 12),
            {},
            r"unknown layer 'nope'.*not a module of this network.*Growable layers: 0, 2",
        ),
        ((0, 12), {}, r"layer name must be a str, got int"),
        (
            ("1", 12),
            {},
            r"'1' \(ReLU\) is not a layer whose width can be chosen.*widen the Linear/Conv",
        ),
        (("0", 6), {}, r"cannot shrink '0' from 8 to 6 units"),
        (("0", 8), {}, r"'0' already has width 8"),
        (("0", 9.0), {}, r"width must be an int, got 9\.0 \(float\)"),
        (("0", True), {}, r"width must be an int, got True \(bool\)"),
        (("0", "12"), {}, r"width must be an int"),
        (("0",), {}, r"give exactly one of width= and factor="),
        (("0", 12), {"factor": 1.5}, r"give exactly one of width= and factor="),
        (("0",), {"factor": 1.0}, r"factor must be a number > 1, got 1\.0"),
        (("0",), {"factor": 0.5}, r"factor must be a number > 1"),
        (("0",), {"factor": True}, r"factor must be a number > 1, got True"),
        (("0",), {"factor": 1.01}, r"'0' already has width 8"),  # rounds to no growth
        (("0", 12), {"init": "xavier"}, r"init must be one of \('net2net', 'zero', 'random'\)"),
        (("0", 12), {"split": "half"}, r"split must be one of \('random', 'equal'\)"),
        (("0", 12), {"noise": -0.1}, r"noise must be a non-negative number, got -0\.1"),
        (("0", 12), {"noise": float("nan")}, r"noise must be a non-negative number, got nan"),
        (("0", 12), {"noise": "lots"}, r"noise must be a non-negative number"),
        (("0", 12), {"noise": 0.1, "init": "zero"}, r"noise .* use it with init='net2net'"),
        (("0", 12), {"generator": 42}, r"generator must be a torch\.Generator, got int"),
        (("4", 5), {}, r"cannot widen '4': it is \(or feeds\) the network's output"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_arguments(args, kwargs, match: str) -> None:
    net, x = mlp_net()
    refused(net, x, GrowthError, match, *args, **kwargs)
    # the network still grows normally afterwards
    y = outputs(net, x)
    net.widen("0", 12)
    assert_preserved(outputs(net, x), y)


def test_module_not_called_in_forward() -> None:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.spare = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 8)

        def forward(self, x: Tensor) -> Tensor:
            return self.b(F.relu(self.a(x)))

    x = torch.randn(8, 4)
    net = GrowableNetwork(WithSpare(), x)
    refused(net, x, GrowthError, r"unknown layer 'spare': it is not called in forward", "spare", 9)


def test_output_layer_through_activation() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Sigmoid())
    x = torch.randn(8, 4)
    net = GrowableNetwork(model, x)
    assert net.layers == ["0"]
    refused(
        net, x, GrowthError, r"cannot widen '2': it is \(or feeds\) the network's output", "2", 7
    )


@pytest.mark.parametrize("final", ["nn.Softmax", "F.log_softmax"])
def test_output_layer_behind_softmax(final: str) -> None:
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out, self.sm = nn.Linear(4, 8), nn.Linear(8, 5), nn.Softmax(dim=1)

        def forward(self, x: Tensor) -> Tensor:
            logits = self.out(torch.tanh(self.a(x)))
            return self.sm(logits) if final == "nn.Softmax" else F.log_softmax(logits, dim=1)

    x = torch.randn(8, 4)
    net = GrowableNetwork(Classifier(), x)
    assert net.layers == ["a"]
    err = refused(
        net,
        x,
        GrowthError,
        r"cannot widen 'out': it is \(or feeds\) the network's "
        r"output",
        "out",
        7,
    )
    assert "register" not in str(err)


def test_output_reached_through_residual_add() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(x))
            return h + self.b(h)  # the output carries a's units

    x = torch.randn(8, 4)
    net = GrowableNetwork(Skip(), x)
    assert net.layers == []
    refused(net, x, GrowthError, r"cannot widen 'a'.*network's output", "a", 6)


# --------------------------------------------------------------------------------------------
# unsupported layers in the coupled group
# --------------------------------------------------------------------------------------------


class Sandwich(nn.Module):
    """producer -> ``mid`` -> consumer -> head."""

    def __init__(
        self, producer: nn.Module, mid: nn.Module, consumer: nn.Module, head: nn.Module
    ) -> None:
        super().__init__()
        self.a, self.mid, self.b, self.head = producer, mid, consumer, head
        self.spatial = isinstance(producer, nn.Conv2d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(F.relu(self.mid(self.a(x))))
        if self.spatial:
            h = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
        return self.head(h)


def test_layernorm_over_channels_is_refused() -> None:
    torch.manual_seed(1)
    model = Sandwich(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    net = GrowableNetwork(model, x)
    assert "a" in net.layers and "b" in net.layers
    # exact only when every unit is replicated the same number of times: multiples of 8
    refused(
        net,
        x,
        GrowthError,
        r"cannot widen 'a' from 8 to 10: its units are normalised over by layer 'mid' "
        r"\(LayerNorm\).*exact widths for this layer: 16, 24, 32",
        "a",
        10,
    )
    assert net.widen("a", 16).max_abs_error is not None


def test_layernorm_over_other_dims_is_growable() -> None:
    class SeqNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.ln = nn.Conv1d(3, 6, 3, padding=1), nn.LayerNorm(9)
            self.b, self.head = nn.Conv1d(6, 4, 1), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.b(F.gelu(self.ln(self.a(x)))).mean(2))

    torch.manual_seed(2)
    x = torch.randn(6, 3, 9)
    net = GrowableNetwork(SeqNet(), x)
    y = outputs(net, x)
    net.widen("a", 11)
    assert_preserved(outputs(net, x), y)


def test_groupnorm_is_refused() -> None:
    torch.manual_seed(3)
    model = Sandwich(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 5, 1), nn.Linear(5, 2))
    x = torch.randn(4, 3, 6, 6)
    net = GrowableNetwork(model, x)
    assert net.layers == ["b"]
    err = refused(
        net,
        x,
        UnsupportedLayerError,
        r"cannot widen 'a': layer 'mid' \(GroupNorm, 2 groups\)",
        "a",
        10,
    )
    assert "normalises over groups of channels" in str(err)


@pytest.mark.parametrize(
    "norm",
    [
        "LayerNorm",
        "GroupNorm",
    ],
)
def test_norm_refusal_says_what_to_do(norm: str) -> None:
    if norm == "LayerNorm":
        model = Sandwich(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 6), nn.Linear(6, 3))
        x = torch.randn(8, 4)
    else:
        model = Sandwich(
            nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Conv2d(8, 5, 1), nn.Linear(5, 2)
        )
        x = torch.randn(4, 3, 6, 6)
    net = GrowableNetwork(model, x)
    error = GrowthError if norm == "LayerNorm" else UnsupportedLayerError  # LayerNorm: width
    err = refused(net, x, error, rf"'mid' \({norm}", "a", 10)
    assert re.search(r"\b(put|move|register|replace|use|instead)\b", str(err), re.I), str(err)


def test_groupnorm_one_channel_per_group_is_growable() -> None:
    torch.manual_seed(4)
    gn = nn.GroupNorm(8, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.normal_()
    model = Sandwich(nn.Conv2d(3, 8, 3), gn, nn.Conv2d(8, 5, 1), nn.Linear(5, 2))
    x = torch.randn(4, 3, 6, 6)
    net = GrowableNetwork(model, x)
    y = outputs(net, x)
    net.widen("a", 12)
    assert (gn.num_groups, gn.num_channels, gn.weight.shape[0]) == (12, 12, 12)
    assert_preserved(outputs(net, x), y)


class ChannelScale(nn.Module):
    """A custom layer with one learned scale per channel (no growth rule)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Swish(nn.Module):
    """A custom elementwise activation (parameter-free) kept as a leaf."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


@pytest.fixture
def rule_registry():
    """Registrations made by a test are removed afterwards."""
    saved = dict(growth.rules._MODULE_RULES)
    yield growth.rules
    growth.rules._MODULE_RULES.clear()
    growth.rules._MODULE_RULES.update(saved)


def test_custom_leaf_without_rule_says_how_to_register(rule_registry) -> None:
    torch.manual_seed(5)
    model = Sandwich(nn.Linear(4, 8), Swish(), nn.Linear(8, 6), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    net = GrowableNetwork(model, x, leaf_modules=[Swish])
    assert net.layers == ["b"]
    err = refused(
        net, x, UnsupportedLayerError, r"cannot widen 'a': layer 'mid' is a Swish", "a", 10
    )
    assert "growth.rules.register_module_rule" in str(err)
    # following the advice makes it growable (and exact: Swish is elementwise)
    rule_registry.register_module_rule(Swish, rule_registry.PassThroughRule())
    net = GrowableNetwork(copy.deepcopy(model), x, leaf_modules=[Swish])
    assert net.layers == ["a", "b"]
    y = outputs(net, x)
    net.widen("a", 10)
    assert_preserved(outputs(net, x), y)


def test_custom_leaf_with_parameters_is_refused() -> None:
    torch.manual_seed(6)
    model = Sandwich(nn.Linear(4, 8), ChannelScale(8), nn.Linear(8, 6), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    net = GrowableNetwork(model, x, leaf_modules=[ChannelScale])
    err = refused(
        net, x, UnsupportedLayerError, r"ChannelScale, a layer type with no growth rule", "a", 10
    )
    assert "register_module_rule" in str(err)
    # traced through instead of kept as a leaf, the parameter along the channels follows growth
    net = GrowableNetwork(copy.deepcopy(model), x)
    assert net.widen("a", 10).max_abs_error is not None
    assert net.mid.scale.shape == (10,)


def test_view_with_hard_coded_channel_count() -> None:
    class HardView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(F.relu(self.conv(x)).view(-1, 4 * 5 * 5))

    x = torch.randn(4, 3, 5, 5)
    net = GrowableNetwork(HardView(), x)
    assert net.layers == ["conv"]
    # the channel count written as a number (100) is rewritten in the graph (150)
    assert net.widen("conv", 6).max_abs_error is not None
    assert "150" in net.code
    assert net.widen("conv", 8).max_abs_error is not None and "200" in net.code


def test_view_with_hard_coded_channels_dim() -> None:
    class HardView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 25, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = F.relu(self.conv(x)).reshape(x.size(0), 4, 25)
            return self.fc(h.flatten(1))

    x = torch.randn(4, 3, 5, 5)
    net = GrowableNetwork(HardView(), x)
    assert net.widen("conv", 6).max_abs_error is not None  # reshape(n, 4, 25) -> (n, 6, 25)


# --------------------------------------------------------------------------------------------
# untraceable models
# --------------------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if x.sum() > 0:
            h = F.relu(h)
        return h


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.gate = DataDependent()
        self.c = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.c(self.gate(self.a(x)))))


def test_untraceable_model_raises_trace_error() -> None:
    with pytest.raises(TraceError) as info:
        GrowableNetwork(Outer(), torch.randn(8, 4))
    msg = str(info.value)
    assert "could not trace Outer" in msg
    assert "if x.sum() > 0:" in msg, "the message must show the failing call"
    assert "test_widen_refusals.py" in msg
    assert "leaf_modules=[ThatModuleType]" in msg


def test_leaf_modules_make_it_traceable() -> None:
    torch.manual_seed(7)
    model = Outer()
    x = torch.randn(8, 4)
    net = GrowableNetwork(model, x, leaf_modules=[DataDependent])
    assert torch.equal(outputs(net, x), outputs(model, x))
    assert net.layers == ["c"]  # the leaf has no rule: what it reads and writes cannot grow
    refused(net, x, UnsupportedLayerError, r"layer 'gate' is a DataDependent.*register", "a", 10)
    y = outputs(net, x)
    net.widen("c", 9)
    assert_preserved(outputs(net, x), y)


# --------------------------------------------------------------------------------------------
# grouped and depthwise convolutions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "width", "multiple"), [("c1", 10, 4), ("c1", 9, 4), ("g1", 13, 4), ("g2", 11, 2)]
)
def test_grouped_conv_width_not_a_multiple(layer: str, width: int, multiple: int) -> None:
    torch.manual_seed(8)
    net = GrowableNetwork(randomize_batchnorm(GroupedNet()), torch.randn(4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    refused(
        net,
        x,
        GrowthError,
        rf"'{layer}' is coupled to a grouped convolution: width must be a multiple of "
        rf"{multiple} \(it grows by whole groups\), got {width}",
        layer,
        width,
    )


def test_depthwise_multiplier_width_not_a_multiple() -> None:
    class DW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # channel multiplier 2
            self.b, self.head = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.b(F.relu(self.dw(F.relu(self.a(x))))).mean((2, 3)))

    torch.manual_seed(9)
    x = torch.randn(4, 3, 6, 6)
    net = GrowableNetwork(DW(), x)
    refused(
        net,
        x,
        GrowthError,
        r"'dw' has 2 output channels per input channel.*multiple of 2",
        "dw",
        11,
    )
    y = outputs(net, x)
    net.widen("dw", 12)
    assert net.width("a") == 6
    assert_preserved(outputs(net, x), y)


def test_grouped_conv_reading_a_concatenation_is_refused() -> None:
    class CatGroup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
            self.g, self.head = nn.Conv2d(8, 4, 3, padding=1, groups=2), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            return self.head(self.g(h).mean((2, 3)))

    x = torch.randn(4, 3, 5, 5)
    net = GrowableNetwork(CatGroup(), x)
    assert net.layers == ["g"]
    refused(net, x, UnsupportedLayerError, r"grouped conv 'g' reads a concatenation", "a", 6)


# --------------------------------------------------------------------------------------------
# verification failures: FunctionNotPreservedError, and rollback of network and optimizer
# --------------------------------------------------------------------------------------------


def _trained_with_adam(seed: int = 10):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    x = torch.randn(16, 4)
    net = GrowableNetwork(randomize_batchnorm(model), x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=False)
    net(x).pow(2).mean().backward()  # leave gradients in place: they must survive a rollback
    return net, opt, x


def _optimizer_snapshot(opt: torch.optim.Optimizer):
    state = {
        id(p): {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
        for p, s in opt.state.items()
    }
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    grads = {id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]}
    return state, groups, grads


def _assert_optimizer_equal(opt: torch.optim.Optimizer, snap) -> None:
    state, groups, grads = snap
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups
    assert {id(p) for p in opt.state} == set(state)
    for p, s in opt.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            if isinstance(v, Tensor):
                assert v.shape == state[id(p)][k].shape and torch.equal(v, state[id(p)][k]), k
            else:
                assert v == state[id(p)][k], k
    for g in opt.param_groups:
        for p in g["params"]:
            assert p.grad is not None and torch.equal(p.grad, grads[id(p)])


def test_tolerance_violation_restores_network_and_optimizer() -> None:
    net, opt, x = _trained_with_adam()
    osnap = _optimizer_snapshot(opt)
    net.tolerance = -1.0  # nothing can pass
    err = refused(
        net,
        x,
        FunctionNotPreservedError,
        r"growing '0' changed the outputs on the probe batch by .*the network was "
        r"restored",
        "0",
        13,
        optimizer=opt,
    )
    assert "tolerance -1" in str(err)
    _assert_optimizer_equal(opt, osnap)
    # the same call succeeds with the default tolerance, and training goes on
    net.tolerance = 1e-5
    y = outputs(net, x)
    net.widen("0", 13, optimizer=opt)
    assert_preserved(outputs(net, x), y)
    assert opt.state[net.get_submodule("0").weight]["exp_avg"].shape == (13, 4)
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()


def test_broken_mapping_is_caught_and_rolled_back(monkeypatch) -> None:
    """A widening that is not function-preserving (outgoing weights not divided among copies)
    is detected by verification with the default tolerance."""
    net, opt, x = _trained_with_adam(11)
    osnap = _optimizer_snapshot(opt)
    real = growth.widen.build_unit_mapping

    def undivided(*args, **kwargs) -> UnitMapping:
        m = real(*args, **kwargs)
        return UnitMapping(m.source, m.original, torch.ones_like(m.share))

    monkeypatch.setattr(growth.widen, "build_unit_mapping", undivided)
    refused(
        net,
        x,
        FunctionNotPreservedError,
        r"growing '3' changed the outputs.*restored",
        "3",
        16,
        optimizer=opt,
    )
    _assert_optimizer_equal(opt, osnap)
    # verify=False lets the same broken growth through: verification is what caught it
    y = outputs(net, x)
    rec = net.widen("3", 16, verify=False)
    assert rec.max_abs_error is None
    assert not torch.allclose(outputs(net, x), y, rtol=0, atol=1e-3)


def test_broken_mapping_is_caught_in_bfloat16(monkeypatch) -> None:
    torch.manual_seed(16)
    x = torch.randn(16, 6).bfloat16()
    net = GrowableNetwork(mlp([6, 10, 10, 4], nn.Tanh).bfloat16(), x)
    real = growth.widen.build_unit_mapping

    def undivided(*args, **kwargs) -> UnitMapping:
        m = real(*args, **kwargs)
        return UnitMapping(m.source, m.original, torch.ones_like(m.share))

    monkeypatch.setattr(growth.widen, "build_unit_mapping", undivided)
    refused(net, x, FunctionNotPreservedError, r"growing '0' changed the outputs", "0", 20)


def test_rule_that_breaks_the_network_is_rolled_back(monkeypatch) -> None:
    """A rule that forgets to grow BatchNorm leaves a network that cannot run: refused,
    restored, and the next (honest) widen works."""
    net, opt, x = _trained_with_adam(12)
    osnap = _optimizer_snapshot(opt)
    monkeypatch.setattr(growth.rules.norm.ChannelwiseRule, "grow", lambda self, *a: None)
    refused(
        net, x, GrowthError, r"the network no longer runs after growing '0'", "0", 12, optimizer=opt
    )
    _assert_optimizer_equal(opt, osnap)
    monkeypatch.undo()
    y = outputs(net, x)
    net.widen("0", 12, optimizer=opt)
    assert_preserved(outputs(net, x), y)


def test_unsupported_optimizer_state_is_refused_before_any_change() -> None:
    torch.manual_seed(13)
    net, x = mlp_net(13)
    opt = torch.optim.Rprop(net.parameters())
    net(x).sum().backward()
    opt.step()
    state = {
        id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()}
        for p, s in opt.state.items()
    }
    err = refused(
        net, x, GrowthError, r"Rprop keeps per-parameter state 'prev'", "0", 12, optimizer=opt
    )
    assert "build a new optimizer" in str(err)
    for p, s in opt.state.items():
        for k, v in s.items():
            old = state[id(p)][k]
            assert torch.equal(v, old) if isinstance(v, Tensor) else v == old


def test_repeated_refusals_do_not_accumulate_damage() -> None:
    torch.manual_seed(14)
    net = GrowableNetwork(randomize_batchnorm(GroupedNet()), torch.randn(4, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    frozen = Frozen(net, x)
    for args, kw in [
        (("c1", 9), {}),
        (("g1", 12), {}),
        (("fc", 9), {}),
        (("c1", 16), {"init": "bad"}),
        (("bn1", 12), {}),
        (("c1",), {"factor": 0.9}),
    ]:
        with pytest.raises(GrowthError):
            net.widen(*args, **kw)
    frozen.check()
    y = outputs(net, x)
    net.widen("c1", 16, generator=gen(0))
    assert_preserved(outputs(net, x), y)
    assert len(net.history) == 1


def test_refusal_messages_name_the_layer() -> None:
    """Every refusal of a named layer mentions it (messages name the layer and the fix)."""
    net, _ = mlp_net(15)
    cases = [
        (("4", 5), {}),
        (("0", 6), {}),
        (("0", 8), {}),
        (("0",), {"factor": 1.01}),
        (("0", 12), {"factor": 2}),
    ]
    for args, kw in cases:
        with pytest.raises(GrowthError) as info:
            net.widen(*args, **kw)
        assert re.search(rf"'{args[0]}'", str(info.value)), str(info.value)
