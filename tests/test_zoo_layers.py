"""Layers the model zoo met: Hugging Face ``Conv1D``, ConvNeXt's ``LayerNorm2d`` and layer scale,
and the zoo's sampling rule (graph layers only; output layers are not widened)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.benchmarks.zoo import candidate_layers, output_layers
from net2grow.growth import GrowableNetwork, GrowthError, load, save

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import LayerNorm2d  # noqa: E402
from torchvision.ops.misc import Permute  # noqa: E402


def _conv1d() -> type[nn.Module]:
    """Hugging Face's ``Conv1D`` (the test skips without the ``[hf]`` extra)."""
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _both_modes(net: nn.Module, x: Tensor) -> list[Tensor]:
    """Outputs in eval and in train mode (the network's mode restored)."""
    was, outs = net.training, []
    with torch.no_grad():
        for train in (False, True):
            net.train(train)
            outs.append(net(x).clone())
    net.train(was)
    return outs


def _assert_same(before: list[Tensor], after: list[Tensor]) -> None:
    for b, a in zip(before, after):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-9 * max(1.0, float(b.abs().max()))


# --- Hugging Face Conv1D -----------------------------------------------------------------------
class GPT2MLP(nn.Module):
    """GPT-2's block shape with Conv1D projections: ``x + c_proj(gelu(c_fc(ln(x))))``."""

    def __init__(self, d: int = 8, hidden: int = 16) -> None:
        super().__init__()
        Conv1D = _conv1d()
        self.inp = Conv1D(d, 5)
        self.ln = nn.LayerNorm(d)
        self.c_fc, self.act, self.c_proj = Conv1D(hidden, d), nn.GELU(), Conv1D(d, hidden)
        self.out = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        h = h + self.c_proj(self.act(self.c_fc(self.ln(h))))
        return self.out(h)


def _mlp_net(seed: int = 0) -> tuple[GrowableNetwork, Tensor]:
    torch.manual_seed(seed)
    model = GPT2MLP().double()
    for p in model.parameters():  # Conv1D's zero bias would hide a wrong bias growth
        nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 7, 5, generator=_gen(seed), dtype=torch.float64)
    return GrowableNetwork(model, x), x


@settings(max_examples=8, deadline=None)
@given(extra=st.integers(1, 20), seed=st.integers(0, 1000))
def test_conv1d_widens_exactly(extra: int, seed: int) -> None:
    net, x = _mlp_net(seed)
    before = _both_modes(net, x)
    net.widen("c_fc", 16 + extra, generator=_gen(seed), verify=False)
    _assert_same(before, _both_modes(net, x))
    fc, proj = net.get_submodule("c_fc"), net.get_submodule("c_proj")
    assert (fc.nf, fc.nx, tuple(fc.weight.shape), tuple(fc.bias.shape)) == (
        16 + extra, 8, (8, 16 + extra), (16 + extra,)
    )
    assert (proj.nf, proj.nx, tuple(proj.weight.shape)) == (8, 16 + extra, (16 + extra, 8))


def test_conv1d_residual_stream_grows_by_multiples_only() -> None:
    net, x = _mlp_net()
    before = _both_modes(net, x)
    with pytest.raises(GrowthError, match=r"exact widths for this layer: 16, 24"):
        net.widen("inp", 12, verify=False)
    assert net.get_submodule("inp").nf == 8  # nothing changed
    _assert_same(before, _both_modes(net, x))
    net.widen("c_proj", 16, verify=False)  # c_proj writes the stream joined with inp's output
    _assert_same(before, _both_modes(net, x))
    assert net.get_submodule("inp").nf == 16 and net.get_submodule("c_fc").nx == 16
    assert net.get_submodule("ln").normalized_shape == (16,)


@pytest.mark.parametrize("kind", ["identity", "residual"])
def test_conv1d_deepens_exactly(kind: str) -> None:
    net, x = _mlp_net()
    before = _both_modes(net, x)
    rec = net.deepen("c_proj" if kind == "identity" else "c_fc", kind=kind, verify=False)
    _assert_same(before, _both_modes(net, x))
    conv1d = _conv1d()
    new = [m for n, m in net.named_modules() if n.startswith("grown.") and isinstance(m, conv1d)]
    assert new and rec.op == "deepen"


def test_conv1d_network_survives_a_checkpoint(tmp_path) -> None:
    net, x = _mlp_net()
    net.widen("c_fc", 24, generator=_gen(1), verify=False)
    before = _both_modes(net, x)
    save(net, tmp_path / "conv1d.n2g")
    loaded = load(tmp_path / "conv1d.n2g")
    fc = loaded.get_submodule("c_fc")
    assert type(fc) is _conv1d() and (fc.nf, fc.nx) == (24, 8)
    _assert_same(before, _both_modes(loaded, x))


# --- ConvNeXt: LayerNorm2d and a (C, 1, 1) layer scale -----------------------------------------
class CNBlockLike(nn.Module):
    """torchvision's ConvNeXt block, ``x + layer_scale * permute(fc2(gelu(fc1(ln(permute(
    dw(x)))))))``, behind a stem conv and a channels-first ``LayerNorm2d``."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, c, 3, padding=1), LayerNorm2d(c)
        self.block = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c), Permute([0, 2, 3, 1]), nn.LayerNorm(c),
            nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c), Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.stem(x))
        return self.head(h + self.layer_scale * self.block(h))


@pytest.mark.parametrize("size", [1, 5])  # 1x1: the scale's size-1 dims line up with H and W
def test_convnext_stream_with_layer_scale_widens_exactly(size: int) -> None:
    torch.manual_seed(0)
    model = CNBlockLike().double()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    x = torch.randn(4, 3, size, size, generator=_gen(size), dtype=torch.float64)
    net = GrowableNetwork(model, x)
    before = _both_modes(net, x)
    with pytest.raises(GrowthError, match=r"exact widths for this layer: 12, 18"):
        net.widen("block.5", 9, verify=False)
    net.widen("block.5", 12, verify=False)
    _assert_same(before, _both_modes(net, x))
    assert tuple(dict(net.named_parameters())["layer_scale"].shape) == (12, 1, 1)
    assert net.get_submodule("norm").normalized_shape == (12,)
    assert net.get_submodule("block.2").normalized_shape == (12,)


def test_layernorm2d_survives_a_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=_gen(0))
    net = GrowableNetwork(CNBlockLike(), x)
    net.widen("stem", 12, verify=False)
    save(net, tmp_path / "ln2d.n2g")
    loaded = load(tmp_path / "ln2d.n2g")
    assert type(loaded.get_submodule("norm")) is LayerNorm2d
    _assert_same(_both_modes(net, x), _both_modes(loaded, x))


# --- the zoo's sampling rule -------------------------------------------------------------------
class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h)))


def test_zoo_candidates_are_graph_layers_and_output_layers_are_known() -> None:
    net = GrowableNetwork(TinyEncoder(), torch.randn(2, 4, 5))
    names = candidate_layers(net)
    assert names == ["emb", "attn", "fc", "head"]  # not attn.out_proj: grown with attn
    assert output_layers(net) == {"head"}
    ref = copy.deepcopy(net)
    with pytest.raises(GrowthError, match="network's output"):
        ref.widen("head", 4, verify=False)
