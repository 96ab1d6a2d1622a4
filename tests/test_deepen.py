"""Net2DeeperNet: ``GrowableNetwork.deepen`` inserts layers without changing the function.

Exactness criterion everywhere: ``max|y' - y| <= 1e-5 * max|y|`` in eval mode *and* in train mode
(BatchNorms normalising with batch statistics, the same random draws for dropout), float32,
measured on inputs that are *not* the probe batch (an insertion must be the identity on every
input, not only on the samples used to verify it). BatchNorms carry randomized statistics.
"""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _models import (
    BasicBlock,
    FunctionalNet,
    GroupedNet,
    TinyDenseNet,
    TinyInception,
    TinyMobileNetV2,
    TinyResNet,
    assert_preserved,
    check_consistent,
    gen,
    module_param_count,
    outputs,
    randomize_batchnorm,
    snapshot,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import (
    FunctionNotPreservedError,
    GrowableNetwork,
    GrowthError,
    UnsupportedLayerError,
)
from net2grow.growth.budget import deepen_parameters

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


IDEMPOTENT = {
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "Hardtanh": nn.Hardtanh,
    "none": None,
}
NOT_IDEMPOTENT = {
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "GELU": nn.GELU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "SiLU": nn.SiLU,
}
EVERY_ACTIVATION = {**IDEMPOTENT, **NOT_IDEMPOTENT, "ELU": nn.ELU, "Softplus": nn.Softplus}


def randn(*shape: int, seed: int = 0, scale: float = 1.0, device=None) -> Tensor:
    return (scale * torch.randn(*shape, generator=gen(seed))).to(device or "cpu")


def build(model: nn.Module, x: Tensor, seed: int = 0) -> GrowableNetwork:
    """Seeded model with randomized BatchNorm statistics, wrapped (on ``x``'s device)."""
    randomize_batchnorm(model, seed)
    model.to(x.device)
    return GrowableNetwork(model, x)


def held_out(x: Tensor, seed: int = 99) -> Tensor:
    """A batch like ``x`` but different from the probe (shifted and rescaled)."""
    if x.is_floating_point():
        return (1.5 * torch.randn(x.shape, generator=gen(seed)) + 0.3).to(x.device)
    return torch.randint(0, int(x.max()) + 1, x.shape, generator=gen(seed)).to(x.device)


def param_objects(net: nn.Module) -> dict[str, nn.Parameter]:
    return dict(net.named_parameters())


def train_outputs(net: nn.Module, x: Tensor, seed: int = 0) -> Tensor:
    """A train-mode forward of a copy of ``net`` (its BatchNorms update the copy's statistics),
    with the random generators seeded: dropout draws the same masks before and after growth."""
    model = copy.deepcopy(net).train()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return model(x).detach()


def deepen_checked(net: GrowableNetwork, name: str, *, inputs: Tensor, **kw):
    """Deepen ``name`` and check everything an insertion promises; returns the record."""
    before = outputs(net, inputs)
    train_before = train_outputs(net, inputs)
    probe_before = outputs(net, *net.probe)
    params = param_objects(net)
    state = snapshot(net)
    modules = set(dict(net.named_modules()))
    count = net.num_parameters()
    n_hist = len(net.history)
    width = net.width(name)

    rec = net.deepen(name, **kw)

    assert_preserved(outputs(net, inputs), before)
    assert_preserved(train_outputs(net, inputs), train_before)  # train mode too
    # old parameters: same names, same objects, same values; old buffers unchanged
    now = param_objects(net)
    for n, p in params.items():
        assert now[n] is p, f"parameter {n} was replaced"
    now_state = net.state_dict()
    for k, v in state.items():
        assert torch.equal(now_state[k], v), f"{k} changed"
    # new parameters: only under grown., names unique, all inside the inserted modules
    new = [n for n in now if n not in params]
    assert new, "deepen added no parameters"
    assert len([n for n, _ in net.named_parameters()]) == len(set(now))
    inserted = rec.details["inserted"]
    assert inserted and len(set(inserted)) == len(inserted)
    for m in inserted:
        assert m.startswith("grown.") and m not in modules
        assert net.get_submodule(m) is not None
    for n in new:
        assert any(n.startswith(m + ".") for m in inserted), n
    # record, history, counts
    assert rec.op == "deepen" and rec.layer == name
    assert rec.old_width == rec.new_width == width == net.width(name)
    assert rec.params_before == count
    assert rec.params_after == net.num_parameters() == module_param_count(net)
    assert rec.params_after - count == sum(now[n].numel() for n in new)
    assert rec.details["kind"] == kw.get("kind", "identity")
    assert rec.max_abs_error is not None
    assert rec.max_abs_error <= 1e-5 * probe_before.abs().max().item()
    assert len(net.history) == n_hist + 1 and net.history[-1] is rec
    check_consistent(net)
    return rec


def grown_module(net: GrowableNetwork, rec, suffix: str = "") -> nn.Module:
    """The inserted module whose name ends with ``_deep<k>`` (+ ``suffix``) or ``_res<k>``."""
    pat = re.compile(r"_(deep\d+|res\d+)" + re.escape(suffix) + "$")
    names = [n for n in rec.details["inserted"] if pat.search(n)]
    assert len(names) == 1, rec.details["inserted"]
    return net.get_submodule(names[0])


def untouched_snapshot(net: GrowableNetwork, x: Tensor) -> dict:
    return {
        "state": snapshot(net),
        "params": param_objects(net),
        "modules": list(dict(net.named_modules())),
        "code": net.code,
        "history": list(net.history),
        "out": outputs(net, x),
        "training": [(n, m.training) for n, m in net.named_modules()],
    }


def assert_untouched(net: GrowableNetwork, x: Tensor, snap: dict) -> None:
    state = net.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), k
    now = param_objects(net)
    assert list(now) == list(snap["params"])
    assert all(now[n] is p for n, p in snap["params"].items())
    assert list(dict(net.named_modules())) == snap["modules"]
    assert net.code == snap["code"]
    assert net.history == snap["history"]
    assert [(n, m.training) for n, m in net.named_modules()] == snap["training"]
    assert torch.equal(outputs(net, x), snap["out"])


def mlp_with(act, bn: bool = False, sizes=(7, 9, 8, 4)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            if act is not None:
                layers.append(act())
    return nn.Sequential(*layers)


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SPATIAL = {1: (9,), 2: (6, 7), 3: (5, 5, 4)}


def conv_net(
    dim: int, kernel, act, bn: bool = False, stride: int = 1, spatial=None
) -> nn.Sequential:
    """conv(k) -> [bn] -> [act] -> conv(3) -> [act] -> flatten -> linear (no pooling: a misplaced
    kernel centre would shift the feature maps, and a flatten + Linear sees every position)."""
    k = kernel if isinstance(kernel, tuple) else (kernel,) * dim
    layers: list[nn.Module] = [CONV[dim](3, 6, k, stride=stride, padding=tuple(i // 2 for i in k))]
    if bn:
        layers.append(BN[dim](6))
    if act is not None:
        layers.append(act())
    layers.append(CONV[dim](6, 5, 3, padding=1))
    if act is not None:
        layers.append(act())
    layers.append(nn.Flatten())
    x = torch.zeros(1, 3, *(spatial or SPATIAL[dim]))
    with torch.no_grad():
        n = nn.Sequential(*layers)(x).shape[1]
    layers.append(nn.Linear(n, 4))
    return nn.Sequential(*layers)


def conv_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


# --------------------------------------------------------------------------------------------
# kind="identity": Linear and Conv after idempotent activations (or none)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(IDEMPOTENT), ids=str)
def test_identity_linear_exact(act: str, device: torch.device) -> None:
    x = randn(16, 7, scale=4.0, device=device)  # pre-activations well beyond ReLU6/Hardtanh bounds
    torch.manual_seed(0)
    net = build(mlp_with(IDEMPOTENT[act]), x)
    xh = held_out(x) * 4
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    for name in linears[:-1]:
        w = net.width(name)
        rec = deepen_checked(net, name, inputs=xh)
        layer = grown_module(net, rec)
        assert isinstance(layer, nn.Linear) and layer.in_features == layer.out_features == w
        z = randn(5, w, seed=3, device=device)
        torch.testing.assert_close(layer(z), z, rtol=0, atol=1e-6)  # literally the identity
        assert rec.params_after - rec.params_before == w * w + w
        expected = None if act == "none" else act
        assert rec.details["activation"] == expected
        if expected is not None:
            assert type(grown_module(net, rec, "_act")) is IDEMPOTENT[act]
    # the output layer can be deepened too (an identity after the logits, no activation)
    rec = deepen_checked(net, linears[-1], inputs=xh)
    assert rec.details["activation"] is None


@pytest.mark.parametrize(
    ("dim", "kernel"),
    [(1, 3), (1, 5), (2, 3), (2, 5), (2, (3, 1)), (2, (1, 5)), (3, 3), (3, 5)],
    ids=str,
)
@pytest.mark.parametrize("act", ["ReLU", "none"])
def test_identity_conv_exact(dim: int, kernel, act: str, device: torch.device) -> None:
    torch.manual_seed(dim)
    x = randn(6, 3, *SPATIAL[dim], device=device)
    net = build(conv_net(dim, kernel, IDEMPOTENT[act]), x)
    first, second = conv_names(net)
    for name in (first, second):
        w = net.width(name)
        k = tuple(net.get_submodule(name).kernel_size)
        rec = deepen_checked(net, name, inputs=held_out(x))
        layer = grown_module(net, rec)
        assert type(layer) is CONV[dim] and tuple(layer.kernel_size) == k
        assert layer.stride == (1,) * dim and layer.groups == 1
        z = randn(2, w, *SPATIAL[dim], seed=4, device=device)
        torch.testing.assert_close(layer(z), z, rtol=0, atol=1e-6)
        kk = 1
        for s in k:
            kk *= s
        assert rec.params_after - rec.params_before == w * w * kk + w


def test_identity_after_strided_conv(device: torch.device) -> None:
    """The inserted conv is stride 1 and padded: it keeps the (smaller) map of a strided conv."""
    torch.manual_seed(1)
    x = randn(4, 3, 9, 8, device=device)
    net = build(conv_net(2, 5, nn.ReLU, bn=True, stride=2, spatial=(9, 8)), x)
    rec = deepen_checked(net, "0", inputs=held_out(x))
    assert grown_module(net, rec).stride == (1, 1)


def test_identity_depthwise_and_grouped(device: torch.device) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=8),  # depthwise, multiplier 2
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 12, (3, 5), padding=(1, 2), groups=4),  # grouped, no activation
        nn.Flatten(),
        nn.Linear(12 * 5 * 5, 3),
    )
    x = randn(8, 4, 5, 5, scale=3.0, device=device)
    net = build(model, x)
    xh = held_out(x) * 3

    rec = deepen_checked(net, "2", inputs=xh)
    dw = grown_module(net, rec)
    assert dw.groups == dw.in_channels == dw.out_channels == 16  # depthwise identity
    assert rec.params_after - rec.params_before == 16 * 9 + 16  # the conv alone: no BatchNorm
    z = randn(3, 16, 5, 5, seed=5, device=device)
    torch.testing.assert_close(dw(z), z, rtol=0, atol=1e-6)

    rec = deepen_checked(net, "5", inputs=xh)
    gc = grown_module(net, rec)
    assert gc.groups == 4 and gc.weight.shape == (12, 3, 3, 5)  # grouped identity
    assert rec.params_after - rec.params_before == 12 * 3 * 15 + 12
    z = randn(3, 12, 5, 5, seed=6, device=device)
    torch.testing.assert_close(gc(z), z, rtol=0, atol=1e-6)

    # the grouped identity grows by whole groups with the layer it follows
    before = outputs(net, xh)
    net.widen("5", 16, generator=gen(1))
    # the identity conv reads the widened channels, grouped by 4; it keeps its own 12 outputs
    assert gc.in_channels == 16 and gc.out_channels == 12 and gc.groups == 4
    assert_preserved(outputs(net, xh), before)
    check_consistent(net)


def test_identity_grouped_net_models(device: torch.device) -> None:
    torch.manual_seed(3)
    x = randn(6, 3, 8, 8, device=device)
    net = build(GroupedNet(), x)
    xh = held_out(x)
    original = outputs(net, xh)
    rec = deepen_checked(net, "g1", inputs=xh)  # grouped conv -> BN -> F.relu
    assert grown_module(net, rec).groups == 4
    deepen_checked(net, "c1", inputs=xh)
    net.widen("g1", 16, generator=gen(1))
    assert grown_module(net, rec).in_channels == 16 and grown_module(net, rec).groups == 4
    assert_preserved(outputs(net, xh), original)


# --------------------------------------------------------------------------------------------
# BatchNorm after the deepened layer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, 2, 3], ids=["Linear+BN1d", "Conv1d", "Conv2d", "Conv3d"])
@pytest.mark.parametrize("act", ["ReLU", "none"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_identity(dim: int, act: str, mode: str, device: torch.device) -> None:
    """After ``layer -> BatchNorm [-> act]`` the identity insertion is the new layer (and the
    activation) only: a BatchNorm set to undo its own normalisation would do so in eval mode
    only, since in train mode it normalises with each batch's statistics. The insertion is exact
    in both modes, whichever mode the network is in when it is deepened."""
    torch.manual_seed(4 + dim)
    if dim == 0:
        model, x = mlp_with(IDEMPOTENT[act], bn=True), randn(16, 7, device=device)
    else:
        model, x = conv_net(dim, 3, IDEMPOTENT[act], bn=True), randn(8, 3, *SPATIAL[dim])
    x = x.to(device)
    net = build(model, x)
    net.train(mode == "train")
    xh = held_out(x, seed=5) * 2  # statistics unlike the probe's
    norms = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    train_before = train_outputs(net, xh)

    rec = deepen_checked(net, "0", inputs=xh)  # eval and train outputs preserved

    assert [n.rsplit("_", 1)[-1] for n in rec.details["inserted"]] == (
        ["deep1", "act"] if act == "ReLU" else ["deep1"]
    )
    after = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert after == norms, "no BatchNorm may be inserted"
    assert all(m.training == (mode == "train") for m in net.modules())
    # a training step's forward: bitwise-close outputs, and the running statistics of the
    # existing BatchNorm move exactly as they would have
    train_model = copy.deepcopy(net).train()
    with torch.no_grad():
        y = train_model(xh)
    torch.testing.assert_close(y, train_before, rtol=1e-5, atol=1e-5 * train_before.abs().max())
    reference = copy.deepcopy(model).to(device).train()  # the adopted modules: same BatchNorm
    with torch.no_grad():
        reference.load_state_dict(
            {k: v for k, v in net.state_dict().items() if k in reference.state_dict()}
        )
        reference(xh)
    bn_new, bn_ref = train_model.get_submodule("1"), reference.get_submodule("1")
    torch.testing.assert_close(bn_new.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn_new.running_var, bn_ref.running_var)


def test_deepen_keeps_eval_mode(device: torch.device) -> None:
    torch.manual_seed(6)
    x = randn(16, 3, 6, 7, device=device)
    net = build(conv_net(2, 3, nn.ReLU, bn=True), x)
    xh = held_out(x)
    net.eval()
    with torch.no_grad():
        before = net(xh)
    net.deepen("0")
    with torch.no_grad():
        after = net(xh)  # no net.eval() in between: the user never left eval mode
    assert_preserved(after, before)
    assert all(not m.training for m in net.modules())


def test_deepen_keeps_train_mode(device: torch.device) -> None:
    torch.manual_seed(7)
    x = randn(16, 7, device=device)
    net = build(mlp_with(nn.ReLU, bn=True), x)
    net.train()
    deepen_checked(net, "0", inputs=held_out(x))
    deepen_checked(net, "3", kind="residual", inputs=held_out(x))
    assert all(m.training for m in net.modules())


# --------------------------------------------------------------------------------------------
# refusal for non-idempotent activations; kind="residual" for everything
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(NOT_IDEMPOTENT))
@pytest.mark.parametrize("layer", ["Linear", "Conv2d"])
def test_identity_refused_for_non_idempotent(act: str, layer: str, device: torch.device) -> None:
    torch.manual_seed(8)
    if layer == "Linear":
        model, x = mlp_with(NOT_IDEMPOTENT[act]), randn(16, 7, device=device)
    else:
        model, x = conv_net(2, 3, NOT_IDEMPOTENT[act]), randn(6, 3, 6, 7, device=device)
    net = build(model, x)
    xh = held_out(x)
    snap = untouched_snapshot(net, xh)
    with pytest.raises(GrowthError) as info:
        net.deepen("0")
    assert not isinstance(info.value, FunctionNotPreservedError)  # refused up front
    msg = str(info.value)
    assert "kind='residual'" in msg and "'0'" in msg and type(NOT_IDEMPOTENT[act]()).__name__ in msg
    assert_untouched(net, xh, snap)
    assert "grown" not in dict(net.named_children())
    # what the message suggests works, exactly
    deepen_checked(net, "0", kind="residual", inputs=xh)
    # as does the other way out it names: no activation after the identity layer
    rec = deepen_checked(net, "0", activation=nn.Identity(), inputs=xh)
    assert rec.details["activation"] == "Identity"


def test_identity_refused_for_explicit_activation_that_would_change_values() -> None:
    torch.manual_seed(9)
    x = randn(16, 7)
    net = build(mlp_with(None), x)  # no activation: values are negative too
    snap = untouched_snapshot(net, held_out(x))
    with pytest.raises(GrowthError, match="residual"):
        net.deepen("0", activation=nn.ReLU())
    assert_untouched(net, held_out(x), snap)
    net = build(mlp_with(nn.ReLU), x)
    with pytest.raises(GrowthError, match="residual"):
        net.deepen("0", activation=nn.Tanh())
    # ReLU after ReLU6 is exact (relu(relu6(x)) == relu6(x)) and allowed
    net = build(mlp_with(nn.ReLU6), x * 4)
    rec = deepen_checked(net, "0", activation=nn.ReLU(), inputs=held_out(x) * 4)
    assert rec.details["activation"] == "ReLU"


@pytest.mark.parametrize("act", list(EVERY_ACTIVATION))
@pytest.mark.parametrize("layer", ["Linear", "Conv2d", "Conv1d"])
def test_residual_exact(act: str, layer: str, device: torch.device) -> None:
    torch.manual_seed(10)
    if layer == "Linear":
        model, x = mlp_with(EVERY_ACTIVATION[act], bn=True), randn(16, 7, device=device)
    else:
        dim = 2 if layer == "Conv2d" else 1
        model = conv_net(dim, 3, EVERY_ACTIVATION[act], bn=True)
        x = randn(6, 3, *SPATIAL[dim], device=device)
    net = build(model, x)
    xh = held_out(x)
    w = net.width("0")
    rec = deepen_checked(net, "0", kind="residual", inputs=xh)
    block = grown_module(net, rec)
    assert set(dict(block.named_children())) == {"layer1", "act", "layer2"}
    assert type(block.layer1) is type(block.layer2) is type(net.get_submodule("0"))
    assert block.layer1.weight.shape[:2] == (w, w)
    expected_act = EVERY_ACTIVATION[act]() if EVERY_ACTIVATION[act] else nn.ReLU()
    assert type(block.act) is type(expected_act)
    assert rec.details["activation"] == (None if act == "none" else type(expected_act).__name__)
    assert torch.count_nonzero(block.layer2.weight) == 0
    assert torch.count_nonzero(block.layer2.bias) == 0
    assert block.layer1.weight.abs().sum() > 0  # a trainable branch, not a dead one
    # gradients reach the zero layer (so the block learns); layer1 gets none until layer2 moves
    net.train()
    net.zero_grad()
    net(xh).square().mean().backward()
    assert block.layer2.weight.grad.abs().max() > 0
    assert block.layer1.weight.grad.abs().max() == 0
    # the residual block's layers can be widened afterwards, exactly
    net.eval()
    before = outputs(net, xh)
    lname = rec.details["inserted"][0] + ".layer1"
    net.widen(lname, w + 3)
    assert_preserved(outputs(net, xh), before)


# --------------------------------------------------------------------------------------------
# positions in the graph
# --------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 7))

    def forward(self, x: Tensor) -> Tensor:
        return self.block(F.relu(self.proj(x)))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.ModuleDict({"fc": nn.Linear(7, 3)})

    def forward(self, x: Tensor) -> Tensor:
        return self.head["fc"](torch.relu(self.encoder(x)))


class FlattenNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 5, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 4 * 4, 9),
            nn.ReLU(),
            nn.Linear(9, 3),
        )


POSITIONS = {
    # model factory, input shape, [(layer, kind)]
    "sequential": (
        lambda: mlp_with(nn.ReLU, sizes=(5, 6, 7, 8, 3)),
        (16, 5),
        [("2", "identity"), ("4", "residual"), ("0", "identity")],
    ),
    "nested": (
        Nested,
        (16, 6),
        [
            ("encoder.proj", "identity"),
            ("encoder.block.0", "identity"),
            ("encoder.block.2", "identity"),
            ("head.fc", "residual"),
        ],
    ),
    "residual-add": (
        TinyResNet,
        (4, 3, 8, 8),
        [
            ("layer1.conv2", "identity"),
            ("layer2.conv2", "residual"),
            ("layer2.shortcut.0", "identity"),
            ("layer1.conv1", "identity"),
            ("stem.0", "identity"),
        ],
    ),
    "cat-inception": (
        TinyInception,
        (4, 3, 8, 8),
        [
            ("inc.b1.0", "identity"),
            ("inc.b2.2", "identity"),
            ("inc.b4.1", "residual"),
            ("head", "identity"),
        ],
    ),
    "cat-densenet": (
        TinyDenseNet,
        (4, 3, 8, 8),
        [
            ("block.0.conv", "identity"),
            ("block.2.conv", "residual"),
            ("stem", "identity"),
            ("trans", "identity"),
        ],
    ),
    "flatten-functional": (
        FunctionalNet,
        (4, 3, 16, 16),
        [("fc1", "identity"), ("conv3", "residual"), ("conv1", "identity"), ("fc2", "residual")],
    ),
    "flatten-sequential": (FlattenNet, (8, 3, 4, 4), [("0", "identity"), ("3", "identity")]),
    "mobilenet-block": (
        TinyMobileNetV2,
        (4, 3, 8, 8),
        [
            ("features.1.conv.1.0", "identity"),
            ("features.1.conv.2", "identity"),
            ("features.3.conv.0.0", "residual"),
        ],
    ),
}


@pytest.mark.parametrize("case", list(POSITIONS))
def test_deepen_positions(case: str, device: torch.device) -> None:
    factory, shape, places = POSITIONS[case]
    torch.manual_seed(11)
    x = randn(*shape, device=device)
    net = build(factory(), x)
    xh = held_out(x)
    original = outputs(net, xh)
    for name, kind in places:
        deepen_checked(net, name, kind=kind, inputs=xh)
    assert_preserved(outputs(net, xh), original)
    # the original layers still grow, through the inserted ones
    for name, _ in places:
        if name in net.layers:
            net.widen(name, factor=2, generator=gen(1))  # doubling respects group sizes
            check_consistent(net)
    assert_preserved(outputs(net, xh), original)


def test_deepen_before_residual_add_inserts_before_the_join() -> None:
    """In a basic block, conv2 -> bn2 is followed by ``+ shortcut``: the new layer goes between
    bn2 and the add (no activation, since none precedes the add), and the shortcut is untouched."""
    torch.manual_seed(12)
    x = randn(4, 4, 6, 6)
    net = build(BasicBlock(4, 4), x)
    rec = deepen_checked(net, "conv2", inputs=held_out(x))
    assert rec.details["activation"] is None
    assert [n.split(".")[-1] for n in rec.details["inserted"]] == ["conv2_deep1"]
    add = next(n for n in net.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    readers = {str(a.target) for a in add.all_input_nodes}
    assert "grown.conv2_deep1" in readers and "bn2" not in readers


# --------------------------------------------------------------------------------------------
# interleaved widen / deepen
# --------------------------------------------------------------------------------------------


def test_deepen_then_widen_the_new_layer(device: torch.device) -> None:
    torch.manual_seed(13)
    x = randn(16, 7, device=device)
    net = build(mlp_with(nn.ReLU, bn=True), x)
    xh = held_out(x)
    original = outputs(net, xh)
    rec = deepen_checked(net, "0", inputs=xh)
    new = rec.details["inserted"][0]
    assert new in net.layers
    net.widen(new, 13, generator=gen(2))
    assert net.width(new) == 13 and net.width("0") == 9
    net.widen("0", 12, generator=gen(3))
    assert net.get_submodule(new).in_features == 12
    deepen_checked(net, new, inputs=xh)
    rec2 = deepen_checked(net, new, kind="residual", inputs=xh)
    net.widen(rec2.details["inserted"][0] + ".layer1", 20, generator=gen(4))
    net.widen(new, 17, generator=gen(5))
    assert_preserved(outputs(net, xh), original)
    assert net.num_parameters() == module_param_count(net)
    check_consistent(net)


def test_widen_then_deepen(device: torch.device) -> None:
    torch.manual_seed(14)
    x = randn(6, 3, 6, 7, device=device)
    net = build(conv_net(2, 3, nn.ReLU, bn=True), x)
    xh = held_out(x)
    original = outputs(net, xh)
    net.widen("0", 10, generator=gen(6))
    rec = deepen_checked(net, "0", inputs=xh)
    assert grown_module(net, rec).out_channels == 10
    net.widen("0", 13, generator=gen(7))  # the new conv reads the widened channels
    assert grown_module(net, rec).in_channels == 13 and grown_module(net, rec).out_channels == 10
    net.widen(rec.details["inserted"][0], 12, generator=gen(10))  # and has units of its own
    assert grown_module(net, rec).out_channels == 12
    second = "3"  # conv_net: 0 conv, 1 bn, 2 relu, 3 conv, 4 relu, 5 flatten, 6 linear
    net.widen(second, 9, generator=gen(8))
    rec2 = deepen_checked(net, second, kind="residual", inputs=xh)
    net.widen(second, 11, generator=gen(9))
    assert grown_module(net, rec2).layer2.out_channels == 11
    assert_preserved(outputs(net, xh), original)
    assert net.num_parameters() == module_param_count(net)


# --------------------------------------------------------------------------------------------
# names, history, summary
# --------------------------------------------------------------------------------------------


class Collide(nn.Module):
    """Layers ``a.b`` and ``a_b``: both would map to the same flat base name."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(5, 6)
        self.a_b = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.a_b(F.relu(self.a.b(x)))))


def test_names_unique_readable_and_stable() -> None:
    torch.manual_seed(15)
    x = randn(16, 5)
    net = build(Collide(), x)
    xh = held_out(x)
    original_names = [n for n, _ in net.named_parameters()]
    for name, kind in [
        ("a.b", "identity"),
        ("a_b", "identity"),
        ("a.b", "identity"),
        ("a_b", "residual"),
        ("a.b", "residual"),
    ]:
        deepen_checked(net, name, kind=kind, inputs=xh)
    names = [n for n, _ in net.named_parameters()]
    assert names[: len(original_names)] == original_names
    assert len(names) == len(set(names))
    grown = [n for n in dict(net.grown.named_children())]
    assert len(grown) == len(set(grown))
    for n in grown:
        assert re.fullmatch(r"(a_b)_(deep\d+(_act)?|res\d+)", n), n
    assert len([n for n in grown if re.fullmatch(r"a_b_deep\d+", n)]) == 3
    assert len([n for n in grown if re.fullmatch(r"a_b_res\d+", n)]) == 2
    # inserted names in the history are exactly the modules under grown.
    inserted = [m for r in net.history for m in r.details["inserted"]]
    assert sorted(inserted) == sorted(f"grown.{n}" for n in grown)


def test_history_and_summary() -> None:
    torch.manual_seed(16)
    x = randn(16, 7)
    net = build(mlp_with(nn.ReLU, bn=True), x)
    xh = held_out(x)
    p0 = net.num_parameters()
    r1 = deepen_checked(net, "0", inputs=xh)
    r2 = deepen_checked(net, "3", kind="residual", inputs=xh)
    r3 = net.widen(r1.details["inserted"][0], 12, generator=gen(1))
    assert r1.params_before == p0
    assert r1.params_after - p0 == 9 * 9 + 9  # Linear(9, 9); no BatchNorm is inserted
    assert r2.params_after - r2.params_before == 2 * (8 * 8 + 8)  # layer1 + layer2
    assert r2.params_before == r1.params_after and r3.params_before == r2.params_after
    assert [r.op for r in net.history] == ["deepen", "deepen", "widen"]
    text = net.summary()
    lines = text.splitlines()
    assert f"total parameters: {net.num_parameters():,}" in lines
    assert "growth so far (3 operations):" in lines
    assert any(
        re.match(r"\s*1\. deepen 0: 9 -> 9, params " + f"{p0:,} -> {r1.params_after:,}", ln)
        for ln in lines
    )
    assert any(re.match(r"\s*2\. deepen 3: 8 -> 8", ln) for ln in lines)
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln and not ln.startswith(" ")}
    assert rows["grown.0_deep1"][1:3] == ["Linear", "12"]
    assert rows["grown.3_res1.layer2"][1:3] == ["Linear", "8"]
    assert rows["grown.3_res1.layer1"][3] == f"{8 * 8 + 8:,}"


def test_verify_false_is_still_exact_but_unmeasured() -> None:
    torch.manual_seed(17)
    x = randn(16, 7)
    net = build(mlp_with(nn.ReLU), x)
    before = outputs(net, held_out(x))
    rec = net.deepen("0", verify=False)
    assert rec.max_abs_error is None
    assert_preserved(outputs(net, held_out(x)), before)


# --------------------------------------------------------------------------------------------
# refusals leave the network untouched
# --------------------------------------------------------------------------------------------


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc(x))
        return self.out(F.relu(self.shared(F.relu(self.shared(h)))))


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc(self.emb(x).mean(1))))


class EvenKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, (3, 2), padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention returns a tuple (output, weights): what follows reads item 0."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.mha(x, x, x, need_weights=False)[0].mean(1))


def _tanh_mlp() -> nn.Module:
    return mlp_with(nn.Tanh, bn=True)


REFUSALS = {
    # id: (factory, input shape or "tokens", call kwargs, expected error, text in message)
    "even-kernel": (EvenKernel, (4, 3, 6, 6), {"name": "c"}, GrowthError, "odd kernel"),
    "unknown-name": (Embed, "tokens", {"name": "nope"}, GrowthError, "'nope'"),
    "not-called": (Embed, "tokens", {"name": "unused"}, GrowthError, "not called"),
    "not-a-str": (Embed, "tokens", {"name": 0}, GrowthError, "str"),
    "not-a-layer": (_tanh_mlp, (16, 7), {"name": "1"}, GrowthError, "'1'"),
    "called-twice": (Twice, (8, 6), {"name": "shared"}, GrowthError, "2 times"),
    "bad-kind": (Twice, (8, 6), {"name": "fc", "kind": "wide"}, GrowthError, "'wide'"),
    "activation-fn": (
        Twice,
        (8, 6),
        {"name": "fc", "activation": F.relu},
        GrowthError,
        "nn.Module",
    ),
    "activation-str": (
        Twice,
        (8, 6),
        {"name": "fc", "activation": "relu"},
        GrowthError,
        "nn.Module",
    ),
    "tanh-identity": (_tanh_mlp, (16, 7), {"name": "0"}, GrowthError, "kind='residual'"),
    "not-preserved": (
        _tanh_mlp,
        (16, 7),
        {"name": "0", "kind": "residual"},
        FunctionNotPreservedError,
        "restored",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
@pytest.mark.parametrize("already_grown", [False, True])
def test_refusal_leaves_network_untouched(case: str, already_grown: bool) -> None:
    factory, shape, kw, error, text = REFUSALS[case]
    torch.manual_seed(18)
    x = torch.randint(0, 10, (8, 5), generator=gen(0)) if shape == "tokens" else randn(*shape)
    net = build(factory(), x)
    xh = held_out(x)
    if already_grown:  # the refusal must also leave earlier growth alone
        target = "0" if case in ("not-a-layer", "tanh-identity", "not-preserved") else "fc"
        net.deepen(target, kind="residual")
    if case == "not-preserved":
        net.tolerance = -1.0  # every change is "too large": forces the verify-and-restore path
    snap = untouched_snapshot(net, xh)
    kw = dict(kw)
    name = kw.pop("name")
    with pytest.raises(error) as info:
        net.deepen(name, **kw)
    assert text in str(info.value)
    assert_untouched(net, xh, snap)
    assert ("grown" in dict(net.named_children())) == already_grown
    if case == "not-preserved":
        net.tolerance = 1e-5
        rec = deepen_checked(net, "0", kind="residual", inputs=xh)
        # nothing left over from the refused attempt: the same name is chosen again
        k = 2 if already_grown else 1
        assert rec.details["inserted"] == [f"grown.0_res{k}"]


@pytest.mark.parametrize("kind", ["identity", "residual"])
def test_deepen_after_multihead_attention_follows_its_output_item(kind: str) -> None:
    torch.manual_seed(3)
    x = randn(8, 5, 4)
    net = build(SelfAttention(), x)
    rec = deepen_checked(net, "mha", inputs=held_out(x), kind=kind)
    linears = [m for m in grown_module(net, rec).modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.in_features == m.out_features == 4 for m in linears)
    first = "grown.mha_deep1(getitem)" if kind == "identity" else "mha_res1.layer1(getitem)"
    assert "getitem = mha[0]" in net.code and first in net.code  # after item 0, not the tuple


def test_deepen_after_multihead_attention_joins_the_optimizer() -> None:
    """A layer without ``.weight`` (its parameters are in_proj_weight, ...): the new layers
    join the param group of its first parameter."""
    torch.manual_seed(4)
    x = randn(8, 5, 4)
    net = build(SelfAttention(), x)
    opt = torch.optim.Adam([{"params": list(net.mha.parameters()), "lr": 0.5},
                            {"params": list(net.fc.parameters()), "lr": 0.1}])
    rec = net.deepen("mha", kind="residual", optimizer=opt)
    new = list(grown_module(net, rec).parameters())
    assert new and all(any(p is q for q in opt.param_groups[0]["params"]) for p in new)
    net(x).sum().backward()
    opt.step()


class Lookup(nn.Embedding):
    """A layer type whose registered rule has no identity layer."""


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = Lookup(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.emb(x).mean(1))


def test_layer_rule_without_identity_is_refused_with_the_fix() -> None:
    from net2grow.growth import rules
    from net2grow.growth.rules.linear import EmbeddingRule

    class NoIdentity(EmbeddingRule):
        def square_like(self, module, width):  # type: ignore[override]
            return None

    saved = dict(rules._MODULE_RULES)
    rules.register_module_rule(Lookup, NoIdentity())
    try:
        x = torch.randint(0, 10, (8, 5), generator=gen(0))
        net = build(Bigram(), x)
        snap = untouched_snapshot(net, held_out(x))
        for kind in ("identity", "residual"):
            with pytest.raises(UnsupportedLayerError, match=r"'emb' \(Lookup\) has no identity"):
                net.deepen("emb", kind=kind)
            assert_untouched(net, held_out(x), snap)
    finally:
        rules._MODULE_RULES.clear()
        rules._MODULE_RULES.update(saved)


def test_even_kernel_refusal_names_the_layer() -> None:
    net = build(EvenKernel(), randn(4, 3, 6, 6))
    with pytest.raises(GrowthError) as info:
        net.deepen("c")
    assert "'c'" in str(info.value) and "kind='residual'" in str(info.value)


class PatchEmbed(nn.Module):
    """A strided even-kernel convolution (ViT's patch embedding, ConvNeXt's downsampling)."""

    def __init__(self, kernel: tuple[int, int], stride: int) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, kernel, stride=stride)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.gelu(self.bn(self.c(x))).mean((2, 3)))


@pytest.mark.parametrize("kernel,stride", [((2, 2), 2), ((4, 4), 4), ((3, 2), 1), ((8, 8), 8)])
def test_residual_after_even_kernel_conv(kernel, stride) -> None:
    """A zero residual block needs no identity: its branch takes the next smaller odd kernel,
    keeps the size of the map, and the function is unchanged in eval and train mode."""
    x = randn(4, 3, 16, 16)
    net = build(PatchEmbed(kernel, stride), x)
    randomize_batchnorm(net)
    rec = deepen_checked(net, "c", inputs=held_out(x), kind="residual")
    branch = grown_module(net, rec)
    odd = tuple(k if k % 2 else k - 1 for k in kernel)
    assert branch.layer1.kernel_size == odd and branch.layer2.kernel_size == odd
    assert branch.layer1.stride == (1, 1)
    assert torch.count_nonzero(branch.layer2.weight) == 0


@pytest.mark.parametrize("kind", ["identity", "residual"])
def test_deepen_after_embedding_inserts_a_linear_over_its_units(kind: str) -> None:
    """After a lookup the units lie on the last dim: a Linear there is exact, and it learns."""
    tokens = torch.randint(0, 10, (8, 5), generator=gen(0))
    net = build(Embed(), tokens)
    rec = deepen_checked(net, "emb", inputs=held_out(tokens), kind=kind)
    new = grown_module(net, rec)
    linears = [m for m in new.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.in_features == m.out_features == 4 for m in linears)
    net.train()
    net(held_out(tokens)).square().sum().backward()
    assert linears[-1].weight.grad is not None and linears[-1].weight.grad.abs().sum() > 0

    again = build(Embed(), tokens)  # the budget plans the same layer without building it
    assert deepen_parameters(again, "emb", kind) == sum(p.numel() for p in new.parameters())


# --------------------------------------------------------------------------------------------
# property: random architectures, random interleaved widen / deepen sequences
# --------------------------------------------------------------------------------------------

PROP_ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "none": None, "tanh": nn.Tanh, "gelu": nn.GELU}
IDEMPOTENT_KEYS = {"relu", "relu6", "none"}


@st.composite
def architectures(draw):
    conv = draw(st.booleans())
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(2, 6), min_size=depth, max_size=depth))
    acts = draw(st.lists(st.sampled_from(list(PROP_ACTS)), min_size=depth, max_size=depth))
    bns = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=depth, max_size=depth))
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["widen", "identity", "residual"]),
                st.integers(0, 1000),
                st.integers(1, 4),
            ),
            min_size=1,
            max_size=6,
        )
    )
    return conv, widths, acts, bns, kernels, ops, draw(st.integers(0, 2**16))


def _random_model(conv, widths, acts, bns, kernels):
    layers: list[nn.Module] = []
    act_of: dict[str, str] = {}
    cin = 3
    for w, a, b, k in zip(widths, acts, bns, kernels):
        act_of[str(len(layers))] = a
        layers.append(nn.Conv2d(cin, w, k, padding=k // 2) if conv else nn.Linear(cin, w))
        if b:
            layers.append(nn.BatchNorm2d(w) if conv else nn.BatchNorm1d(w))
        if PROP_ACTS[a] is not None:
            layers.append(PROP_ACTS[a]())
        cin = w
    if conv:
        layers.append(nn.Flatten())
        cin *= 16
    act_of[str(len(layers))] = "none"
    layers.append(nn.Linear(cin, 3))
    shape = (8, 3, 4, 4) if conv else (8, 3)
    return nn.Sequential(*layers), act_of, shape


@settings(max_examples=40, deadline=None)
@given(architectures())
def test_property_random_growth_sequences(arch) -> None:
    conv, widths, acts, bns, kernels, ops, seed = arch
    torch.manual_seed(seed)
    model, act_of, shape = _random_model(conv, widths, acts, bns, kernels)
    x = randn(*shape, seed=seed)
    net = build(model, x, seed=seed)
    xh = held_out(x, seed=seed + 1)
    original = outputs(net, xh)
    for op, pick, amount in ops:
        params = param_objects(net)
        if op == "widen":
            name = net.layers[pick % len(net.layers)] if net.layers else None
            if name is None:
                continue
            net.widen(name, net.width(name) + amount, generator=gen(pick))
        else:
            candidates = sorted(act_of)
            name = candidates[pick % len(candidates)]
            if op == "identity" and act_of[name] not in IDEMPOTENT_KEYS:
                snap = untouched_snapshot(net, xh)
                with pytest.raises(GrowthError, match="residual"):
                    net.deepen(name)
                assert_untouched(net, xh, snap)
                continue
            rec = net.deepen(name, kind=op)
            new = rec.details["inserted"][0]
            if op == "identity":
                act_of[new] = act_of[name]
            else:
                act_of[new + ".layer1"] = "relu" if act_of[name] == "none" else act_of[name]
                act_of[new + ".layer2"] = "none"
        # outputs preserved, names stable (same objects), unique, new ones under grown.
        assert_preserved(outputs(net, xh), original)
        now = param_objects(net)
        assert all(now[n] is p for n, p in params.items())
        names = [n for n, _ in net.named_parameters()]
        assert len(names) == len(set(names))
        assert all(n.startswith("grown.") for n in now if n not in params)
        assert net.num_parameters() == module_param_count(net)
        check_consistent(net)


# --------------------------------------------------------------------------------------------
# torchvision reference models
# --------------------------------------------------------------------------------------------

TORCHVISION = {
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        [
            ("conv1", "identity"),
            ("layer1.0.conv1", "identity"),
            ("layer1.0.conv2", "identity"),
            ("layer2.0.downsample.0", "identity"),
            ("layer2.0.conv2", "residual"),
            ("layer3.1.conv1", "residual"),
            ("fc", "identity"),
        ],
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        [
            ("features.0.0", "identity"),
            ("features.2.conv.1.0", "identity"),
            ("features.2.conv.2", "identity"),
            ("features.3.conv.0.0", "residual"),
            ("features.4.conv.1.0", "residual"),
            ("classifier.1", "identity"),
        ],
    ),
    "vgg11_bn": (
        lambda: torchvision.models.vgg11_bn(num_classes=10),
        [
            ("features.0", "identity"),
            ("features.4", "residual"),
            ("features.25", "identity"),
            ("classifier.3", "identity"),
        ],
    ),
    "densenet": (
        lambda: torchvision.models.DenseNet(
            growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=10
        ),
        [
            ("features.conv0", "identity"),
            ("features.denseblock1.denselayer1.conv1", "identity"),
            ("features.denseblock1.denselayer1.conv2", "identity"),
            ("features.denseblock1.denselayer2.conv2", "residual"),
            ("features.transition1.conv", "identity"),
            ("features.denseblock2.denselayer1.conv1", "residual"),
            ("classifier", "residual"),
        ],
    ),
}


@pytest.mark.parametrize("model_name", list(TORCHVISION))
def test_torchvision_models(model_name: str) -> None:
    factory, places = TORCHVISION[model_name]
    torch.manual_seed(19)
    x = randn(4, 3, 32, 32)
    net = build(factory(), x, seed=3)
    xh = held_out(x)
    original = outputs(net, xh)
    n_before = len(list(net.named_parameters()))
    for name, kind in places:
        rec = net.deepen(name, kind=kind)
        assert rec.max_abs_error is not None
        assert_preserved(outputs(net, xh), original)
    assert len(net.history) == len(places)
    assert len(list(net.named_parameters())) > n_before
    assert net.num_parameters() == module_param_count(net)
    if model_name == "vgg11_bn":
        return  # 130M parameters: a backward pass would dominate the file's runtime
    # the deepened model still trains
    net.train()
    y = net(xh)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
