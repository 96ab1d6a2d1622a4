"""Models and helpers shared by the widen tests (a plain module, not a test file).

Every model here is small enough to run on two CPU cores in milliseconds; together they cover
the graph patterns ``GrowableNetwork.widen`` has to follow: activations, dropout, BatchNorm,
pooling, flatten/view, residual adds (identity and projection shortcuts), channel concatenation,
grouped and depthwise convolutions, nested modules and functional calls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    """A CPU generator with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters.

    Freshly built BatchNorms are identities in eval mode (mean 0, var 1, weight 1, bias 0), which
    would hide a bug that forgets to carry their statistics over to replicated channels.
    """
    g = gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
                    m.num_batches_tracked.fill_(7)
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=g))
                    m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model


def outputs(net: nn.Module, *inputs: Tensor) -> Tensor:
    """``net(*inputs)`` in eval mode without autograd; the modules' modes are restored."""
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            return net(*inputs).detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def capture(net: nn.Module, x: Tensor, probes: tuple[str, ...]) -> dict[str, Tensor]:
    """Outputs of the probed modules (``name<``: the module's input) in eval mode."""
    got: dict[str, Tensor] = {}
    handles = []
    for p in probes:
        module = net.get_submodule(p.rstrip("<"))
        if p.endswith("<"):
            hook = module.register_forward_pre_hook(
                lambda m, a, p=p: got.__setitem__(p, a[0].detach().clone())
            )
        else:
            hook = module.register_forward_hook(
                lambda m, a, o, p=p: got.__setitem__(p, o.detach().clone())
            )
        handles.append(hook)
    was = net.training
    net.eval()
    try:
        net(x)
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    return got


def rel_error(after: Tensor, before: Tensor) -> float:
    """``max|after - before| / max|before|`` in float64."""
    assert after.shape == before.shape, f"output shape changed: {before.shape} -> {after.shape}"
    err = (after.double() - before.double()).abs().max().item()
    scale = before.double().abs().max().item()
    assert scale > 0, "degenerate test: the model's outputs are all zero"
    return err / scale


def assert_preserved(after: Tensor, before: Tensor, rel: float = 1e-5) -> None:
    """The Net2Net exactness criterion: ``max|y' - y| <= rel * max|y|``."""
    r = rel_error(after, before)
    assert r <= rel, f"outputs changed by {r:.3g} of their scale (allowed {rel:g})"


def assert_computes_like(ref: nn.Module, net: nn.Module, x: Tensor, rel: float = 1e-5) -> None:
    """``net`` computes what ``ref`` computes on ``x``, in eval and in train mode (max abs
    difference within ``rel`` of ``ref``'s largest output)."""
    for train in (False, True):
        ref.train(train)
        net.train(train)
        with torch.no_grad():
            a, b = ref(x), net(x)
        err = float((a - b).abs().max())
        assert err <= rel * float(a.abs().max()), (train, err)


def widen_checked(net, name: str, width: int | None = None, *, inputs: Sequence[Tensor], **kw):
    """Widen ``name`` and assert the outputs on ``inputs`` (not the probe) are preserved."""
    before = outputs(net, *inputs)
    probe_scale = outputs(net, *net.probe).abs().max().item()
    old = net.width(name)
    rec = net.widen(name, width, **kw)
    after = outputs(net, *inputs)
    assert_preserved(after, before)
    assert net.width(name) == rec.new_width > old
    assert rec.old_width == old
    # the engine's own measurement on its probe batch agrees with the criterion
    assert rec.max_abs_error is not None
    assert rec.max_abs_error <= 1e-5 * probe_scale
    check_consistent(net)
    return rec


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Clones of every entry of ``module.state_dict()`` (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: nn.Module, snap: dict[str, Tensor]) -> None:
    """Same keys, shapes, dtypes and bitwise-equal values as ``snap``."""
    now = module.state_dict()
    assert list(now) == list(snap), "state_dict keys changed"
    for k, v in snap.items():
        assert now[k].shape == v.shape, f"{k}: shape {tuple(v.shape)} -> {tuple(now[k].shape)}"
        assert now[k].dtype == v.dtype, f"{k}: dtype changed"
        assert torch.equal(now[k], v), f"{k}: values changed"


def module_param_count(model: nn.Module) -> int:
    """Parameter count recomputed from the modules' size attributes (not from the tensors)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, _ConvNd):
            k = 1
            for s in m.kernel_size:
                k *= s
            total += m.out_channels * (m.in_channels // m.groups) * k
            total += m.out_channels if m.bias is not None else 0
        elif isinstance(m, _BatchNorm):
            total += 2 * m.num_features if m.affine else 0
        elif isinstance(m, nn.Embedding):
            total += m.num_embeddings * m.embedding_dim
        elif isinstance(m, nn.MultiheadAttention):  # in_proj (3E x E + 3E), out_proj counted
            e = m.embed_dim
            total += 3 * e * e + (3 * e if m.in_proj_bias is not None else 0)
        else:
            assert not list(m.parameters(recurse=False)), f"no formula for {type(m).__name__}"
    return total


def check_consistent(model: nn.Module) -> None:
    """Every layer's tensors agree with its size attributes (what the engine must keep in sync)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features), name
            if m.bias is not None:
                assert m.bias.shape == (m.out_features,), name
        elif isinstance(m, _ConvNd):
            assert m.in_channels % m.groups == 0, f"{name}: in_channels % groups"
            assert m.out_channels % m.groups == 0, f"{name}: out_channels % groups"
            expect = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            assert tuple(m.weight.shape) == expect, f"{name}: {tuple(m.weight.shape)} != {expect}"
            if m.bias is not None:
                assert m.bias.shape == (m.out_channels,), name
        elif isinstance(m, _BatchNorm):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    assert t.shape == (m.num_features,), name


def mlp_param_formula(sizes: Sequence[int]) -> int:
    """Closed form: ``sum_i d_i * d_{i+1} + d_{i+1}`` for an MLP with biases."""
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "GELU": nn.GELU,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
    "ELU": nn.ELU,
    "Softplus": nn.Softplus,
    "Dropout": lambda: nn.Dropout(0.5),
}


def mlp(sizes: Sequence[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """``Linear -> act -> Linear -> act ... -> Linear`` as an ``nn.Sequential``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class ConvBN(nn.Sequential):
    """conv -> BatchNorm -> ReLU (torchvision style), for 1, 2 or 3 spatial dims."""

    def __init__(self, dim: int, cin: int, cout: int, k: int = 3, stride: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
        layers: list[nn.Module] = [
            conv(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            bn(cout),
        ]
        if act:
            layers.append(nn.ReLU6())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block with an identity or a projection (1x1 conv + BN) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """stem -> identity block -> projection block (stride 2) -> global pool -> fc."""

    def __init__(self, width: int = 6, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class TinyDenseNet(nn.Module):
    """DenseNet-style: every layer appends its channels with ``torch.cat``; transition; fc."""

    def __init__(self, stem: int = 6, growth: int = 4, n: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.block = nn.Sequential(*[DenseLayer(stem + i * growth, growth) for i in range(n)])
        c = stem + n * growth
        self.trans_bn = nn.BatchNorm2d(c)
        self.trans = nn.Conv2d(c, 8, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.stem(x))
        x = self.pool(self.trans(F.relu(self.trans_bn(x))))
        return self.fc(x.view(x.size(0), -1))


class InceptionBlock(nn.Module):
    """Four branches (1x1, 1x1->3x3, 1x1->5x5, maxpool->1x1) concatenated on channels."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(cin, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1),
                                nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(cin, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 5, padding=2),
                                nn.ReLU())
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 2, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class TinyInception(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.inc = InceptionBlock(6)
        self.head = nn.Conv2d(14, 7, 1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(7, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.head(self.inc(self.stem(x))))
        return self.fc(self.flat(F.adaptive_max_pool2d(x, 1)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int = 1) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            ConvBN(2, cin, hidden, k=1),
            ConvBN(2, hidden, hidden, k=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBN(2, 3, 8, stride=2),
            InvertedResidual(8, 8, expand=2),
            InvertedResidual(8, 12, expand=2, stride=2),
            InvertedResidual(12, 12, expand=3),
            ConvBN(2, 12, 16, k=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.classifier(x)


class GroupedNet(nn.Module):
    """Plain conv -> grouped conv (4 groups) -> grouped conv (2 groups) -> pool -> fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.g1 = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(12)
        self.g2 = nn.Conv2d(12, 10, 1, groups=2)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.g1(x)))
        x = F.gelu(self.g2(x))
        return self.fc(x.mean(dim=(2, 3)))


class FunctionalNet(nn.Module):
    """Functional style: ``F.relu``, ``x.view(x.size(0), -1)``, ``torch.flatten``, ``x + y``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 9)
        self.fc2 = nn.Linear(9, 9)
        self.out = nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = x + torch.tanh(self.conv2(x))
        x = F.max_pool2d(F.silu(self.conv3(x)), 2)
        h = F.relu(self.fc1(x.view(x.size(0), -1)))
        h = h + F.gelu(self.fc2(h))
        return self.out(h)
