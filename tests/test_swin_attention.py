"""torchvision's Swin attention (``ShiftedWindowAttention``, V2) and patch merging are layers of
the graph: the hidden size grows by whole heads, exactly in eval and train mode, deepens after
them, saves and loads; refusals name the fix and leave the network unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError, UnsupportedLayerError, load, save

swin = pytest.importorskip("torchvision.models.swin_transformer")

torch.set_num_threads(1)
TOL = 1e-10  # float64 throughout: a change of function is far above rounding


def _swin(v2: bool = False, seed: int = 0) -> nn.Module:
    """A tiny Swin (2 stages of 2 blocks, 2 heads of 8, 2x2 windows), stochastic depth on."""
    torch.manual_seed(seed)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    model = swin.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=[2, 2],
        num_classes=3,
        **(extra if v2 else {}),
    )
    with torch.no_grad():  # torchvision zero-initialises biases and the V2 bias MLP's rows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.double()


def _x(seed: int = 1) -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).double()


def _net(model: nn.Module, x: Tensor) -> GrowableNetwork:
    return GrowableNetwork(model, (x,))


def _run(net: nn.Module, x: Tensor, train: bool) -> Tensor:
    """Output in that mode, with the same stochastic-depth masks each time (seeded)."""
    net.train(train)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return net(x).detach().clone()


def _close(after: Tensor, before: Tensor) -> None:
    assert after.shape == before.shape
    err = float((after - before).abs().max())
    assert err <= TOL * float(before.abs().max()), err


def _state(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _same_state(net: nn.Module, snap: dict[str, Tensor]) -> None:
    now = net.state_dict()
    assert list(now) == list(snap)
    assert all(torch.equal(now[k], v) for k, v in snap.items())


class Windows(nn.Module):
    """Linear in -> one window attention -> Linear out, channels last, no normalisation (any
    multiple of the head width is exact)."""

    def __init__(self, heads: int, head_dim: int, cls: type | None = None, **kw) -> None:
        super().__init__()
        c = heads * head_dim
        self.inp = nn.Linear(3, c)
        self.attn = (cls or swin.ShiftedWindowAttention)(c, [2, 2], [1, 1], heads, **kw)
        self.out = nn.Linear(c, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.attn(self.inp(x)))


def _windows(heads: int = 2, head_dim: int = 4, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    model = Windows(heads, head_dim, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double()


def _grid(seed: int = 1) -> Tensor:
    return torch.randn(2, 4, 4, 3, generator=torch.Generator().manual_seed(seed)).double()


# --- the attention is a layer ----------------------------------------------------------------
@pytest.mark.parametrize("v2", [False, True])
def test_attention_and_merging_are_layers_and_trace_for_both_modes(v2: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "passes self.training" warning: the call is inside
        net = _net(_swin(v2), _x())
    assert {"features.1.0.attn", "features.3.1.attn", "features.2"} <= set(net.layers)
    assert not any(n.startswith("features.1.0.attn.") for n in net.layers)
    assert net.width("features.1.0.attn") == 16
    assert net.width("features.2") == 32


# --- widen: whole heads, exact ---------------------------------------------------------------
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_widen_doubles_heads_of_a_stage_exactly(v2: bool, train: bool) -> None:
    x = _x()
    net = _net(_swin(v2), x)
    before = _run(net, x, train)
    rec = net.widen("features.1.0.attn", 32, verify=False)
    _close(_run(net, x, train), before)
    assert rec.new_width == 32
    for b in ("features.1.0.attn", "features.1.1.attn"):
        attn = net.get_submodule(b)
        assert attn.num_heads == 4
        assert tuple(attn.qkv.weight.shape) == (96, 32)
        assert tuple(attn.proj.weight.shape) == (32, 32)
        if v2:
            assert tuple(attn.logit_scale.shape) == (4, 1, 1)
            assert tuple(attn.cpb_mlp[2].weight.shape) == (4, 512)
        else:
            assert attn.relative_position_bias_table.shape[1] == 4
    merge = net.get_submodule("features.2")
    assert merge.dim == 32 and tuple(merge.reduction.weight.shape) == (32, 128)
    assert net.get_submodule("features.3.0.attn").num_heads == 2  # the next stage is its own


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_widen_through_patch_merging_grows_the_next_stage_exactly(v2: bool, train: bool) -> None:
    x = _x()
    net = _net(_swin(v2), x)
    before = _run(net, x, train)
    net.widen("features.2", 64, verify=False)
    _close(_run(net, x, train), before)
    assert net.get_submodule("features.3.1.attn").num_heads == 4
    assert net.get_submodule("features.2").reduction.out_features == 64


def test_new_heads_copy_their_source_and_split_its_output_columns() -> None:
    model = _windows(heads=2, head_dim=4)
    old, old_inp = copy.deepcopy(model.attn), copy.deepcopy(model.inp)
    net = _net(model, _grid())
    net.widen("inp", 16, verify=False)  # 2 heads of 4 -> 4 heads: head j copies head j % 2
    attn = net.attn
    # which old input unit each grown one copies (its inp row), to fold the split columns back
    source = [
        next(k for k in range(8) if torch.equal(row, old_inp.weight[k]))
        for row in net.get_submodule("inp").weight
    ]
    folded = torch.zeros(48, 8, dtype=torch.float64)
    folded.index_add_(1, torch.tensor(source), attn.qkv.weight.detach())
    rows, old_rows = folded.view(3, 4, 4, 8), old.qkv.weight.view(3, 2, 4, 8)
    bias, old_bias = attn.qkv.bias.view(3, 4, 4), old.qkv.bias.view(3, 2, 4)
    table, old_table = attn.relative_position_bias_table, old.relative_position_bias_table
    for j in range(4):
        src = j % 2
        assert torch.allclose(rows[:, j], old_rows[:, src], atol=1e-12)  # q, k, v rows
        assert torch.equal(bias[:, j], old_bias[:, src])
        assert torch.equal(table[:, j], old_table[:, src])  # its relative position bias
    proj = attn.proj.weight.detach()[:8].view(8, 4, 4)  # the old output units, by head
    old_proj = old.proj.weight.view(8, 2, 4)
    for src in range(2):
        assert torch.allclose(proj[:, src] + proj[:, src + 2], old_proj[:, src], atol=1e-12)
        assert not torch.allclose(proj[:, src], proj[:, src + 2])  # unequal shares


@pytest.mark.parametrize("train", [False, True])
def test_uneven_head_counts_and_zero_init_are_exact_without_normalisation(train: bool) -> None:
    x = _grid()
    for init, width in (("net2net", 12), ("zero", 20)):
        net = _net(_windows(heads=2, head_dim=4), x)
        before = _run(net, x, train)
        net.widen("inp", width, init=init, verify=False)
        _close(_run(net, x, train), before)
        assert net.attn.num_heads == width // 4
        if init == "zero":
            assert torch.count_nonzero(net.attn.proj.weight[:8, 8:]) == 0  # new heads, old units
            assert torch.count_nonzero(net.attn.qkv.weight[24:32, :8]) > 0  # random q rows


# --- refusals: named, network unchanged ------------------------------------------------------
def test_width_not_a_multiple_of_the_head_width_is_refused_with_exact_widths() -> None:
    x = _grid()
    net = _net(_windows(heads=2, head_dim=4), x)
    snap, before = _state(net), _run(net, x, False)
    with pytest.raises(
        GrowthError,
        match=r"whole heads of 4 units.*Exact widths for this layer: "
        r"12, 16, 20",
    ):
        net.widen("inp", 10)
    _same_state(net, snap)
    assert net.attn.num_heads == 2
    _close(_run(net, x, False), before)


def test_swin_stage_widths_are_integer_multiples() -> None:
    x = _x()
    net = _net(_swin(), x)
    snap = _state(net)
    with pytest.raises(GrowthError, match=r"exact widths for this layer: 32, 48"):
        net.widen("features.1.0.attn", 24)
    _same_state(net, snap)


def test_attention_dropout_refuses_copies_and_names_the_fix() -> None:
    x = _grid()
    net = _net(_windows(heads=2, head_dim=4, attention_dropout=0.1), x)
    snap = _state(net)
    for init in ("net2net", "zero"):
        with pytest.raises(
            UnsupportedLayerError,
            match=r"attention_dropout=0\.1.*Set its "
            r"attention_dropout to 0\.0",
        ):
            net.widen("inp", 16, init=init)
    _same_state(net, snap)
    model = _windows(heads=2, head_dim=4, attention_dropout=0.1)
    model.attn.attention_dropout = 0.0  # the fix
    _net(model, x).widen("inp", 16, verify=False)


def test_subclass_overriding_forward_is_refused() -> None:
    class Custom(swin.ShiftedWindowAttention):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2.0

    x = _grid()
    net = _net(_windows(heads=2, head_dim=4, cls=Custom), x)
    snap = _state(net)
    with pytest.raises(UnsupportedLayerError, match=r"overrides forward"):
        net.widen("inp", 16)
    _same_state(net, snap)


def test_channels_first_input_is_refused() -> None:
    class ChannelsFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.attn = swin.ShiftedWindowAttention(4, [2, 2], [0, 0], 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(self.conv(x))  # [B, C, H, W]: C=4 happens to equal W

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    net = _net(ChannelsFirst().double(), x)
    with pytest.raises(UnsupportedLayerError, match=r"channels are not its last dimension"):
        net.widen("conv", 8)


# --- deepen and checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["identity", "residual"])
@pytest.mark.parametrize("train", [False, True])
def test_deepen_after_attention_and_merging_is_exact(kind: str, train: bool) -> None:
    x = _x()
    net = _net(_swin(), x)
    before = _run(net, x, train)
    net.deepen("features.1.0.attn", kind=kind, verify=False)
    net.deepen("features.2", kind=kind, verify=False)
    _close(_run(net, x, train), before)


@pytest.mark.parametrize("v2", [False, True])
def test_grown_swin_saves_loads_and_keeps_growing(v2: bool, tmp_path) -> None:
    x = _x()
    net = _net(_swin(v2), x)
    net.widen("features.1.0.attn", 32, verify=False)
    before = _run(net, x, False)
    save(net, tmp_path / "swin.n2g")
    back = load(tmp_path / "swin.n2g")
    _close(_run(back, x, False), before)
    attn = back.get_submodule("features.1.1.attn")
    assert type(attn) is (swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention)
    assert attn.num_heads == 4 and attn.qkv.in_features == 32
    back.widen("features.3.0.attn", 64, verify=False)
    _close(_run(back, x, True), _run(net, x, True))


def test_widen_with_adam_remaps_the_attention_state() -> None:
    x = _x()
    net = _net(_swin(), x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).square().mean().backward()
    opt.step()
    net.widen("features.1.0.attn", 32, optimizer=opt, verify=False)
    attn = net.get_submodule("features.1.0.attn")
    for p in (attn.qkv.weight, attn.proj.weight, attn.relative_position_bias_table):
        assert opt.state[p]["exp_avg"].shape == p.shape
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()  # the grown parameters are the optimizer's


# --- property: any head count, head width and growth is exact --------------------------------
@settings(max_examples=15, deadline=None)
@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    extra=st.integers(1, 4),
    v2=st.booleans(),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_number_of_new_heads_is_exact(
    heads: int, head_dim: int, extra: int, v2: bool, train: bool, seed: int
) -> None:
    cls = swin.ShiftedWindowAttentionV2 if v2 else swin.ShiftedWindowAttention
    x = _grid(seed)
    net = _net(_windows(heads, head_dim, seed=seed, cls=cls), x)
    before = _run(net, x, train)
    net.widen(
        "inp",
        (heads + extra) * head_dim,
        verify=False,
        generator=torch.Generator().manual_seed(seed),
    )
    _close(_run(net, x, train), before)
    assert net.attn.num_heads == heads + extra
