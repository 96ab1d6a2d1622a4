"""Net2WiderNet exactness: ``GrowableNetwork.widen`` must not change what the network computes.

Criterion everywhere (the engine's default tolerance): ``max|y' - y| <= 1e-5 * max|y|`` in
float32, eval mode, measured on a batch that is *not* the engine's probe batch, so the engine's
own verification is not the only check.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _models import (
    ACTIVATIONS,
    FunctionalNet,
    GroupedNet,
    TinyDenseNet,
    TinyInception,
    TinyMobileNetV2,
    TinyResNet,
    assert_preserved,
    check_consistent,
    gen,
    mlp,
    mlp_param_formula,
    module_param_count,
    outputs,
    randomize_batchnorm,
    rel_error,
    snapshot,
    widen_checked,
)
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthRecord

pytestmark = pytest.mark.usefixtures("strict_float32")  # conftest.py: no TF32


def grow(model: nn.Module, shape: tuple[int, ...], device: torch.device, seed: int = 0):
    """(GrowableNetwork on ``device``, a fresh test batch) for ``model``."""
    g = gen(seed)
    probe = torch.randn(*shape, generator=g)
    test = torch.randn(*shape, generator=g)
    model = model.to(device)
    dtype = next(model.parameters()).dtype
    return GrowableNetwork(model, probe.to(device, dtype)), test.to(device, dtype)


# --------------------------------------------------------------------------------------------
# Linear -> activation / dropout -> Linear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_linear_activation_linear(act: str, device: torch.device) -> None:
    torch.manual_seed(1)
    net, x = grow(mlp([7, 9, 11, 4], ACTIVATIONS[act]), (32, 7), device)
    assert net.layers == ["0", "2"]
    widen_checked(net, "0", 15, inputs=(x,))  # 6 copies of 9 units
    widen_checked(net, "2", 30, inputs=(x,))  # more copies than units: some copied twice
    widen_checked(net, "0", 16, inputs=(x,))  # grow a grown layer again
    assert net.get_submodule("2").in_features == 16
    assert net.get_submodule("4").in_features == 30


def test_dropout_in_train_mode_still_exact_in_eval(device: torch.device) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    net, x = grow(model, (16, 5), device)
    net.train()
    widen_checked(net, "0", 13, inputs=(x,))
    assert net.training, "widen must restore the training mode it found"


# --------------------------------------------------------------------------------------------
# convolutions: 1d/2d/3d, padding, stride, dilation, bias
# --------------------------------------------------------------------------------------------

CONV_CONFIGS = {
    "plain": dict(stride=1, padding=0, dilation=1),
    "stride2-pad1": dict(stride=2, padding=1, dilation=1),
    "dilated": dict(stride=1, padding=2, dilation=2),
    "stride3-dil2": dict(stride=3, padding=1, dilation=2),
    "same-reflect": dict(stride=1, padding="same", dilation=1, padding_mode="reflect"),
    "circular": dict(stride=2, padding=1, dilation=1, padding_mode="circular"),
}
SPATIAL = {1: 13, 2: 9, 3: 7}


class ConvStack(nn.Module):
    """conv(cfg) -> ReLU -> conv -> tanh -> Flatten -> Linear (channels expand to positions)."""

    def __init__(self, dim: int, bias: bool, **cfg) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        self.c1 = conv(3, 5, 3, bias=bias, **cfg)
        self.act = nn.ReLU()
        self.c2 = conv(5, 4, 2, padding=1, bias=bias)
        self.flat = nn.Flatten()
        with torch.no_grad():
            n = self.flat(self.c2(self.c1(torch.zeros(1, 3, *[SPATIAL[dim]] * dim)))).shape[1]
        self.fc = nn.Linear(n, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flat(torch.tanh(self.c2(self.act(self.c1(x))))))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cfg", sorted(CONV_CONFIGS))
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv(dim: int, cfg: str, bias: bool, device: torch.device) -> None:
    torch.manual_seed(3)
    model = ConvStack(dim, bias, **CONV_CONFIGS[cfg])
    net, x = grow(model, (3, 3, *[SPATIAL[dim]] * dim), device)
    assert net.layers == ["c1", "c2"]
    fc_in = net.get_submodule("fc").in_features
    widen_checked(net, "c1", 8, inputs=(x,))
    widen_checked(net, "c2", 7, inputs=(x,))
    # c2's 4 channels reached fc through Flatten: every channel's positions were replicated
    assert net.get_submodule("fc").in_features == fc_in // 4 * 7
    assert (net.get_submodule("c1").bias is None) == (not bias)


# --------------------------------------------------------------------------------------------
# BatchNorm with non-trivial statistics between producer and consumer
# --------------------------------------------------------------------------------------------


class BNNet(nn.Module):
    """producer -> [BN, act] or [act, BN] -> consumer -> ... -> Linear head."""

    def __init__(self, dim: int, affine: bool, track: bool, bn_first: bool) -> None:
        super().__init__()
        self.dim = dim
        bn = (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim]
        if dim == 0:  # Linear -> BatchNorm1d on (N, C)
            self.p, self.c = nn.Linear(6, 8), nn.Linear(8, 5)
        else:
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
            self.p, self.c = conv(3, 8, 3, padding=1), conv(8, 5, 1)
        self.bn = bn(8, affine=affine, track_running_stats=track)
        self.bn2 = bn(5)
        self.act = nn.ReLU()
        self.bn_first = bn_first
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.p(x)
        h = self.act(self.bn(h)) if self.bn_first else self.bn(self.act(h))
        h = F.elu(self.bn2(self.c(h)))
        if self.dim:
            h = h.mean(dim=tuple(range(2, 2 + self.dim)))
        return self.head(h)


BN_SHAPES = {0: (16, 6), 1: (6, 3, 7), 2: (6, 3, 5, 5), 3: (4, 3, 4, 4, 4)}


@pytest.mark.parametrize("bn_first", [True, False], ids=["bn-act", "act-bn"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "batchstats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dim", [0, 1, 2, 3], ids=["linear-bn1d", "bn1d", "bn2d", "bn3d"])
def test_batchnorm(dim: int, affine: bool, track: bool, bn_first: bool, device) -> None:
    torch.manual_seed(4)
    model = randomize_batchnorm(BNNet(dim, affine, track, bn_first), seed=dim)
    net, x = grow(model, BN_SHAPES[dim], device)
    bn = net.get_submodule("bn")
    widen_checked(net, "p", 13, inputs=(x,))
    assert bn.num_features == 13
    widen_checked(net, "c", 9, inputs=(x,))
    assert net.get_submodule("bn2").num_features == 9


def test_batchnorm_statistics_follow_replicated_channels(device: torch.device) -> None:
    torch.manual_seed(5)
    model = randomize_batchnorm(BNNet(2, True, True, True), seed=11)
    net, x = grow(model, BN_SHAPES[2], device)
    bn = net.get_submodule("bn")
    old = {k: getattr(bn, k).detach().clone() for k in ("weight", "bias", "running_mean",
                                                         "running_var")}
    tracked = bn.num_batches_tracked.clone()
    reference = copy.deepcopy(net)
    net.train()  # verification must not update the running statistics
    widen_checked(net, "p", 20, inputs=(x,))
    assert net.training
    w = net.get_submodule("p").weight.detach()
    for k, before in old.items():
        now = getattr(bn, k).detach()
        assert torch.equal(now[:8], before), f"{k} of the old channels changed"
        for j in range(8, 20):  # each new channel carries the statistics of the unit it copies
            src = [i for i in range(8) if torch.equal(w[i], w[j])]
            assert len(src) == 1
            assert torch.equal(now[j], before[src[0]]), k
    assert torch.equal(bn.num_batches_tracked, tracked)
    # in training mode BatchNorm uses batch statistics: replicated channels normalise alike
    with torch.no_grad():
        y_ref = copy.deepcopy(reference).train()(x)
        y_new = copy.deepcopy(net).train()(x)
    assert_preserved(y_new, y_ref)


# --------------------------------------------------------------------------------------------
# pooling and flatten/view into a Linear
# --------------------------------------------------------------------------------------------

POOLS = ["max", "avg", "adaptive_avg", "adaptive_max", "functional_max", "adaptive_upsample"]
FLATTENS = ["view", "torch.flatten", "nn.Flatten", "flatten_method", "reshape"]


class PoolFlatten(nn.Module):
    def __init__(self, pool: str, flatten: str) -> None:
        super().__init__()
        self.pool_kind, self.flatten_kind = pool, flatten
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = {
            "max": nn.MaxPool2d(2),
            "avg": nn.AvgPool2d(3, stride=2, padding=1),
            "adaptive_avg": nn.AdaptiveAvgPool2d((2, 3)),
            "adaptive_max": nn.AdaptiveMaxPool2d(2),
            "functional_max": nn.Identity(),
            "adaptive_upsample": nn.AdaptiveAvgPool2d(7),  # VGG: 3x3 -> 7x7 repeats positions
        }[pool]
        self.flat = nn.Flatten()
        with torch.no_grad():
            n = self._features(torch.zeros(1, 3, 6, 6)).shape[1]
        self.fc = nn.Linear(n, 4)

    def _features(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x))
        if self.pool_kind == "functional_max":
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        elif self.pool_kind == "adaptive_upsample":
            x = self.pool(F.max_pool2d(x, 2))
        else:
            x = self.pool(x)
        if self.flatten_kind == "view":
            return x.view(x.size(0), -1)
        if self.flatten_kind == "torch.flatten":
            return torch.flatten(x, 1)
        if self.flatten_kind == "nn.Flatten":
            return self.flat(x)
        if self.flatten_kind == "flatten_method":
            return x.flatten(start_dim=1)
        return x.reshape(x.shape[0], -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self._features(x))


@pytest.mark.parametrize("flatten", FLATTENS)
@pytest.mark.parametrize("pool", POOLS)
def test_pool_flatten_linear(pool: str, flatten: str, device: torch.device) -> None:
    torch.manual_seed(6)
    net, x = grow(PoolFlatten(pool, flatten), (4, 3, 6, 6), device)
    assert net.layers == ["conv"]
    positions = net.get_submodule("fc").in_features // 5
    widen_checked(net, "conv", 9, inputs=(x,))
    assert net.get_submodule("fc").in_features == 9 * positions


# --------------------------------------------------------------------------------------------
# whole models: nn.Sequential, nested modules, functional calls, residuals, cat, groups
# --------------------------------------------------------------------------------------------

ZOO = {
    # name: (factory, input shape, width step, the layers that must be growable)
    "sequential-mlp": (lambda: mlp([6, 9, 7, 4], nn.GELU), (16, 6), 1, ["0", "2"]),
    "functional": (FunctionalNet, (4, 3, 16, 16), 1, ["conv1", "conv2", "conv3", "fc1", "fc2"]),
    "resnet": (TinyResNet, (4, 3, 8, 8), 1, ["stem.0", "layer1.conv1", "layer1.conv2",
                                             "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"]),
    "densenet": (TinyDenseNet, (4, 3, 8, 8), 1, ["stem", "block.0.conv", "block.1.conv",
                                                 "block.2.conv", "trans"]),
    "inception": (TinyInception, (4, 3, 8, 8), 1, ["stem.0", "inc.b1.0", "inc.b2.0", "inc.b2.2",
                                                   "inc.b3.0", "inc.b3.2", "inc.b4.1", "head"]),
    "mobilenetv2": (TinyMobileNetV2, (4, 3, 16, 16), 1, [
        "features.0.0", "features.1.conv.0.0", "features.1.conv.1.0", "features.1.conv.2",
        "features.2.conv.0.0", "features.2.conv.1.0", "features.2.conv.2", "features.3.conv.0.0",
        "features.3.conv.1.0", "features.3.conv.2", "features.4.0"]),
    "grouped": (GroupedNet, (4, 3, 8, 8), 4, ["c1", "g1", "g2"]),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_model_zoo_every_layer(name: str, device: torch.device) -> None:
    factory, shape, step, expected = ZOO[name]
    torch.manual_seed(7)
    net, x = grow(randomize_batchnorm(factory(), seed=3), shape, device)
    assert net.layers == expected
    y0 = outputs(net, x)
    for rnd in (1, 2):
        for layer in expected:
            widen_checked(net, layer, net.width(layer) + rnd * step, inputs=(x,))
    # errors do not accumulate beyond the criterion over 2 * len(layers) operations
    assert_preserved(outputs(net, x), y0)
    assert module_param_count(net) == net.num_parameters()


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features): the channel dim is the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(F.gelu(self.b(F.gelu(self.a(x)))).mean(1))


class ChannelsLast(nn.Module):
    """ConvNeXt-like: conv, permute to channels-last, pointwise Linear MLP, permute back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pw1, self.pw2, self.o = nn.Linear(6, 12), nn.Linear(12, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(h))).permute(0, 3, 1, 2)
        return self.o(h.mean((2, 3)))


class TransposeConv1d(nn.Module):
    """Token features transposed into a Conv1d, max over time."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.o = nn.Linear(5, 8), nn.Conv1d(8, 6, 3, padding=1), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x)).transpose(1, 2)
        return self.o(F.relu(self.c(h)).amax(dim=2))


class Gated(nn.Module):
    """Two inputs; multiplicative gating joins the two producers; cat on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(3, 8), nn.Linear(5, 3)
        self.o = nn.Linear(11, 2)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        g = torch.tanh(self.a(x)) * torch.sigmoid(self.b(z))
        return self.o(torch.cat([g, F.relu(self.c(x))], dim=-1))


class PerChannel(nn.Module):
    """PReLU and InstanceNorm (per-channel parameters), scalar arithmetic, clamp, upsampling
    and padding before a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.prelu = nn.Conv2d(3, 6, 3, padding=1), nn.PReLU(6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.up, self.pad = nn.Upsample(scale_factor=2), nn.ZeroPad2d(1)
        self.o = nn.Linear(5 * 12 * 12, 2)
        with torch.no_grad():
            self.prelu.weight.uniform_(-1, 1)
            self.inorm.weight.uniform_(0.5, 1.5)
            self.inorm.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.clamp(self.inorm(self.prelu(self.a(x))) * 0.5 + 1, min=0.2)
        h = F.hardswish(self.b(h))
        return self.o(torch.flatten(self.pad(self.up(h)), 1))


class AddThenBN(nn.Module):
    """Two producers summed, then BatchNorm, then a consumer; maximum/minimum of branches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.bn, self.c = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)
        self.d = nn.Conv2d(3, 4, 1)
        self.o = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.c(self.bn(self.a(x) + self.b(x))))
        h = torch.maximum(h, self.d(x)) - torch.minimum(h, self.d(x)) / 2
        return self.o(h.mean((2, 3)))


MORE = {
    "tokens-3d-linear": (Tokens, [(4, 7, 5)], ["a", "b"]),
    "channels-last-mlp": (ChannelsLast, [(4, 3, 5, 5)], ["conv", "pw1", "pw2"]),
    "transpose-conv1d": (TransposeConv1d, [(4, 7, 5)], ["a", "c"]),
    "gated-two-inputs": (Gated, [(4, 5), (4, 3)], ["a", "b", "c"]),
    "per-channel-params": (PerChannel, [(4, 3, 5, 5)], ["a", "b"]),
    "add-then-bn": (AddThenBN, [(4, 3, 5, 5)], ["a", "b", "c", "d"]),
}


@pytest.mark.parametrize("name", sorted(MORE))
def test_more_structures(name: str, device: torch.device) -> None:
    factory, shapes, expected = MORE[name]
    torch.manual_seed(24)
    model = randomize_batchnorm(factory()).to(device)
    g = gen(5)
    probe = tuple(torch.randn(*s, generator=g).to(device) for s in shapes)
    x = tuple(torch.randn(*s, generator=g).to(device) for s in shapes)
    net = GrowableNetwork(model, probe)
    assert net.layers == expected
    for layer in expected:
        widen_checked(net, layer, net.width(layer) + 3, inputs=x)


class FunctionalDropout(nn.Module):
    """The classic PyTorch MNIST idiom: ``F.dropout(x, training=self.training)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.o(F.dropout(F.relu(self.a(x)), 0.5, training=self.training))


def test_functional_dropout_follows_eval_mode(device: torch.device) -> None:
    """torch.fx bakes ``self.training`` into the graph at trace time; the network must still
    stop dropping units in eval mode (else no widen could ever be verified)."""
    torch.manual_seed(25)
    model = FunctionalDropout().to(device)
    x = torch.randn(8, 5, device=device)
    expected = outputs(model, x)
    net = GrowableNetwork(model, x)
    assert torch.equal(outputs(net, x), expected), "eval-mode GrowableNetwork still drops units"
    widen_checked(net, "a", 12, inputs=(x,))


def test_residual_add_shares_one_width(device: torch.device) -> None:
    torch.manual_seed(8)
    net, x = grow(randomize_batchnorm(TinyResNet(), seed=1), (4, 3, 8, 8), device)
    # stem.0 and layer1.conv2 are summed (identity shortcut): one width, grown together
    widen_checked(net, "layer1.conv2", 9, inputs=(x,))
    assert net.width("stem.0") == 9
    assert net.get_submodule("layer1.bn2").num_features == 9
    assert net.get_submodule("layer2.shortcut.0").in_channels == 9
    assert net.width("layer1.conv1") == 6  # inside the block: not coupled
    # the projection shortcut and layer2.conv2 are summed: growing either grows both
    widen_checked(net, "layer2.shortcut.0", 15, inputs=(x,))
    assert net.width("layer2.conv2") == 15
    assert net.get_submodule("layer2.shortcut.1").num_features == 15
    assert net.get_submodule("fc").in_features == 15
    assert net.width("layer2.conv1") == 12


def test_concat_branches_grow_on_their_own(device: torch.device) -> None:
    torch.manual_seed(9)
    net, x = grow(randomize_batchnorm(TinyInception(), seed=2), (4, 3, 8, 8), device)
    branches = ["inc.b1.0", "inc.b2.2", "inc.b3.2", "inc.b4.1"]
    for i, layer in enumerate(branches):
        widths = {b: net.width(b) for b in branches}
        widen_checked(net, layer, widths[layer] + i + 1, inputs=(x,))
        for other in branches:
            if other != layer:
                assert net.width(other) == widths[other], f"{other} grew with {layer}"
        assert net.get_submodule("head").in_channels == sum(net.width(b) for b in branches)


def test_densenet_concat_shifts_consumers(device: torch.device) -> None:
    torch.manual_seed(10)
    net, x = grow(randomize_batchnorm(TinyDenseNet(), seed=5), (4, 3, 8, 8), device)
    # block.0.conv's channels sit in the middle of every later concatenation
    widen_checked(net, "block.0.conv", 7, inputs=(x,))
    assert net.width("stem") == 6
    assert net.get_submodule("block.1.bn").num_features == 6 + 7
    assert net.get_submodule("block.2.conv").in_channels == 6 + 7 + 4
    assert net.get_submodule("trans").in_channels == 6 + 7 + 4 + 4
    widen_checked(net, "stem", 10, inputs=(x,))
    assert net.get_submodule("trans_bn").num_features == 10 + 7 + 4 + 4


def test_grouped_conv_grows_by_whole_groups(device: torch.device) -> None:
    torch.manual_seed(11)
    net, x = grow(randomize_batchnorm(GroupedNet(), seed=6), (4, 3, 8, 8), device)
    widen_checked(net, "c1", 16, inputs=(x,))
    g1 = net.get_submodule("g1")
    assert (g1.in_channels, g1.groups) == (16, 4)
    widen_checked(net, "g1", 20, inputs=(x,))
    g2 = net.get_submodule("g2")
    assert (g1.out_channels, g2.in_channels, g2.groups) == (20, 20, 2)
    widen_checked(net, "g2", 14, inputs=(x,))
    assert net.get_submodule("fc").in_features == 14
    check_consistent(net)


def test_depthwise_inverted_residual(device: torch.device) -> None:
    torch.manual_seed(12)
    net, x = grow(randomize_batchnorm(TinyMobileNetV2(), seed=7), (4, 3, 16, 16), device)
    dw = net.get_submodule("features.3.conv.1.0")
    # widening the expansion conv carries the depthwise conv (and its BN) along
    widen_checked(net, "features.3.conv.0.0", 45, inputs=(x,))
    assert dw.in_channels == dw.out_channels == dw.groups == 45
    assert net.get_submodule("features.3.conv.1.1").num_features == 45
    assert net.get_submodule("features.3.conv.2").in_channels == 45
    # widening the depthwise conv by name grows the same group
    widen_checked(net, "features.3.conv.1.0", 50, inputs=(x,))
    assert net.width("features.3.conv.0.0") == dw.groups == 50
    # projection of a residual block: the block input (previous projection) follows
    widen_checked(net, "features.3.conv.2", 16, inputs=(x,))
    assert net.width("features.2.conv.2") == 16
    assert net.get_submodule("features.4.0").in_channels == 16


# --------------------------------------------------------------------------------------------
# init, noise, factor, generator
# --------------------------------------------------------------------------------------------


def test_init_zero_is_exact_with_zero_outgoing_weights(device: torch.device) -> None:
    torch.manual_seed(13)
    net, x = grow(mlp([6, 10, 8, 3], nn.Tanh), (16, 6), device)
    w_in = net.get_submodule("0").weight.detach().clone()
    w_out = net.get_submodule("2").weight.detach().clone()
    rec = widen_checked(net, "0", 15, inputs=(x,), init="zero")
    assert rec.max_abs_error <= 1e-6  # new units contribute exact zeros
    new_in = net.get_submodule("0").weight.detach()
    new_out = net.get_submodule("2").weight.detach()
    assert torch.equal(new_in[:10], w_in) and torch.equal(new_out[:, :10], w_out)
    assert torch.count_nonzero(new_out[:, 10:]) == 0
    assert (new_in[10:].abs().sum(dim=1) > 0).all(), "new units need non-zero incoming weights"
    assert torch.equal(net.get_submodule("0").bias[10:], torch.zeros(5, device=device))


def test_init_zero_in_conv_residual_model(device: torch.device) -> None:
    torch.manual_seed(14)
    net, x = grow(randomize_batchnorm(TinyResNet(), seed=9), (4, 3, 8, 8), device)
    for layer in ("stem.0", "layer1.conv1", "layer2.conv2"):
        widen_checked(net, layer, net.width(layer) + 3, inputs=(x,), init="zero")


def test_init_random_changes_outputs_and_is_not_verified(device: torch.device) -> None:
    torch.manual_seed(15)
    net, x = grow(mlp([6, 10, 8, 3]), (16, 6), device)
    y = outputs(net, x)
    rec = net.widen("0", 15, init="random", generator=gen(0))
    assert rec.max_abs_error is None
    assert rel_error(outputs(net, x), y) > 1e-2
    new_out = net.get_submodule("2").weight.detach()[:, 10:]
    assert torch.count_nonzero(new_out) == new_out.numel()


@pytest.mark.parametrize("noise", [1e-4, 1e-3, 1e-2])
def test_noise_breaks_exactness_by_about_noise(noise: float, device: torch.device) -> None:
    torch.manual_seed(16)
    net, x = grow(mlp([6, 10, 10, 4], nn.Tanh), (64, 6), device)
    y = outputs(net, x)
    rec = net.widen("0", 20, noise=noise, generator=gen(1))
    r = rel_error(outputs(net, x), y)
    assert noise / 50 < r <= 10 * noise, f"relative change {r:.3g} for noise {noise:g}"
    assert rec.max_abs_error is not None and rec.max_abs_error > 0


def test_noise_is_relative_to_the_weight_scale(device: torch.device) -> None:
    torch.manual_seed(17)
    model = mlp([6, 10, 10, 4], nn.Tanh)
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # tiny weights: absolute noise would swamp them
        model[0].bias.mul_(1e-3)
    net, x = grow(model, (64, 6), device)
    y = outputs(net, x)
    net.widen("0", 20, noise=1e-3, generator=gen(2))
    assert 0 < rel_error(outputs(net, x), y) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_other_dtypes(dtype: torch.dtype) -> None:
    """Widening keeps the model's dtype and is exact up to that dtype's rounding."""
    torch.manual_seed(26)
    net, x = grow(mlp([6, 10, 10, 4], nn.Tanh).to(dtype), (16, 6), torch.device("cpu"))
    y = outputs(net, x)
    net.widen("0", 20, generator=gen(3))
    net.widen("2", 13, generator=gen(4))
    assert all(p.dtype == dtype for p in net.parameters())
    bound = 1e-5 if dtype == torch.float64 else 8 * torch.finfo(dtype).eps
    assert rel_error(outputs(net, x), y) <= bound


@pytest.mark.parametrize(("factor", "expected"), [(1.5, 15), (2, 20), (1.26, 13)])
def test_factor(factor: float, expected: int, device: torch.device) -> None:
    torch.manual_seed(18)
    net, x = grow(mlp([6, 10, 8, 3]), (16, 6), device)
    rec = widen_checked(net, "0", factor=factor, inputs=(x,))
    assert rec.new_width == net.width("0") == expected == round(10 * factor)


def _model_and_inputs():
    torch.manual_seed(19)
    return randomize_batchnorm(TinyResNet(), seed=4), torch.randn(4, 3, 8, 8)


@pytest.mark.parametrize("split", ["random", "equal"])
def test_same_seed_same_growth(split: str, device: torch.device) -> None:
    model, x = _model_and_inputs()
    a = GrowableNetwork(copy.deepcopy(model).to(device), x.to(device))
    b = GrowableNetwork(copy.deepcopy(model).to(device), x.to(device))
    for net in (a, b):
        net.widen("layer1.conv1", 11, split=split, noise=1e-3, generator=gen(1234))
        net.widen("layer2.conv2", 17, split=split, generator=gen(99))
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_different_seeds_differ(device: torch.device) -> None:
    model, x = _model_and_inputs()
    a = GrowableNetwork(copy.deepcopy(model).to(device), x.to(device))
    b = GrowableNetwork(copy.deepcopy(model).to(device), x.to(device))
    a.widen("layer1.conv1", 11, generator=gen(1))
    b.widen("layer1.conv1", 11, generator=gen(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    # both remain exact
    y = outputs(GrowableNetwork(copy.deepcopy(model).to(device), x.to(device)), x.to(device))
    assert_preserved(outputs(a, x.to(device)), y)
    assert_preserved(outputs(b, x.to(device)), y)


def test_global_rng_reproducible_without_generator() -> None:
    model, x = _model_and_inputs()
    states = []
    for _ in range(2):
        net = GrowableNetwork(copy.deepcopy(model), x)
        torch.manual_seed(2024)
        net.widen("layer1.conv1", 11)
        states.append(snapshot(net))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --------------------------------------------------------------------------------------------
# symmetry: split="random" lets copies learn apart, split="equal" keeps them identical
# --------------------------------------------------------------------------------------------


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data, target = load_digits(return_X_y=True)
    return torch.tensor(data / 16.0, dtype=torch.float32), torch.tensor(target)


def _copy_pairs(w: Tensor, old: int) -> list[tuple[int, int]]:
    """(source, copy) for every new row: the old row it is bitwise equal to."""
    pairs = []
    for j in range(old, w.shape[0]):
        src = [i for i in range(old) if torch.equal(w[i], w[j])]
        assert len(src) == 1, f"new unit {j} should replicate exactly one old unit, got {src}"
        pairs.append((src[0], j))
    return pairs


def _train_after_widen(split: str, device: torch.device) -> tuple[Tensor, Tensor, list, float]:
    data, target = _digits()
    torch.manual_seed(20)
    model = mlp([64, 12, 10], nn.Tanh).to(device)
    net = GrowableNetwork(model, data[:32].to(device))
    net.widen("0", 24, split=split, generator=gen(0))
    w = net.get_submodule("0").weight
    pairs = _copy_pairs(w.detach(), 12)
    w0 = w.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = gen(1)
    for _ in range(10):
        idx = torch.randint(0, len(data), (64,), generator=g)
        loss = F.cross_entropy(net(data[idx].to(device)), target[idx].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = (w.detach() - w0).abs().max().item()
    return w.detach(), net.get_submodule("2").weight.detach(), pairs, moved


def test_random_split_copies_learn_apart(device: torch.device) -> None:
    w, v, pairs, moved = _train_after_widen("random", device)
    assert moved > 1e-3, "degenerate test: training did not move the weights"
    drift = [(w[i] - w[j]).abs().max().item() for i, j in pairs]
    assert min(drift) > 0.01 * moved, f"copies did not drift apart: {min(drift):.3g}"
    # their outgoing weights were split unequally in the first place, and stay different
    assert min((v[:, i] - v[:, j]).abs().max().item() for i, j in pairs) > 1e-4


def test_equal_split_copies_stay_identical(device: torch.device) -> None:
    w, v, pairs, moved = _train_after_widen("equal", device)
    assert moved > 1e-3, "degenerate test: training did not move the weights"
    for i, j in pairs:
        assert (w[i] - w[j]).abs().max().item() <= 1e-6, (i, j)
        assert (v[:, i] - v[:, j]).abs().max().item() <= 1e-6, (i, j)


# --------------------------------------------------------------------------------------------
# parameter counts and history
# --------------------------------------------------------------------------------------------


def test_mlp_parameter_count_closed_form(device: torch.device) -> None:
    torch.manual_seed(21)
    sizes = [5, 7, 9, 3]
    net, x = grow(mlp(sizes), (16, 5), device)
    assert net.num_parameters() == mlp_param_formula(sizes)
    for layer, idx, new in (("0", 1, 12), ("2", 2, 13), ("0", 1, 20)):
        before = mlp_param_formula(sizes)
        sizes[idx] = new
        rec = widen_checked(net, layer, new, inputs=(x,))
        assert rec.params_before == before
        assert rec.params_after == mlp_param_formula(sizes) == net.num_parameters()
        assert sum(p.numel() for p in net.parameters()) == rec.params_after


def test_history_records(device: torch.device) -> None:
    torch.manual_seed(22)
    net, _ = grow(randomize_batchnorm(TinyResNet(), seed=8), (4, 3, 8, 8), device)
    assert net.history == []
    calls = [("layer1.conv1", dict(width=9)), ("stem.0", dict(factor=1.5)),
             ("layer2.conv1", dict(width=20, init="zero")),
             ("layer2.conv2", dict(width=14, verify=False)),
             ("layer1.conv1", dict(width=10, init="random"))]
    expected = []
    for layer, kw in calls:
        old, params = net.width(layer), net.num_parameters()
        rec = net.widen(layer, **kw)
        expected.append((layer, old, net.width(layer), params, net.num_parameters()))
        assert isinstance(rec, GrowthRecord) and net.history[-1] is rec
    assert len(net.history) == len(calls)
    for rec, (layer, old, new, pb, pa), (_, kw) in zip(net.history, expected, calls):
        assert rec.op == "widen"
        assert (rec.layer, rec.old_width, rec.new_width) == (layer, old, new)
        assert (rec.params_before, rec.params_after) == (pb, pa)
        assert pa > pb
        verified = kw.get("verify", True) and kw.get("init") != "random"
        if verified:
            assert rec.max_abs_error is not None and 0 <= rec.max_abs_error < 1e-4
        else:
            assert rec.max_abs_error is None
        assert rec.seconds > 0 and math.isfinite(rec.seconds)
    for prev, nxt in zip(net.history, net.history[1:]):
        assert nxt.params_before == prev.params_after
    assert net.history[1].new_width == 9  # stem.0 from 6 by factor 1.5
    summary = net.summary()
    assert "layer2.conv1" in summary and str(net.num_parameters()) in summary.replace(",", "")


def test_optimizer_stays_usable_after_widen(device: torch.device) -> None:
    torch.manual_seed(23)
    net, x = grow(mlp([6, 10, 8, 3], nn.Tanh), (16, 6), device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    untouched = net.get_submodule("4").weight
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    kept = {k: v.clone() for k, v in opt.state[untouched].items()}
    widen_checked(net, "0", 14, inputs=(x,), optimizer=opt)
    grown = net.get_submodule("0").weight
    assert any(p is grown for g in opt.param_groups for p in g["params"])
    assert opt.state[grown]["exp_avg"].shape == grown.shape
    assert all(torch.equal(opt.state[untouched][k], v) for k, v in kept.items())
    before = grown.detach().clone()
    opt.zero_grad()
    net(x).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(grown.detach(), before)
