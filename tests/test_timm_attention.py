"""Attention in timm's fused form grows exactly: ``qkv(x).reshape(B, N, 3, H, D).permute(2, 0,
3, 1, 4)``, then ``unbind(0)`` (or ``qkv[0]``, ``qkv[1]``, ``qkv[2]``), scaled dot-product
attention, ``transpose(1, 2).reshape(B, N, C)``. More heads and wider heads are exact in eval
and train mode; what cannot follow is refused with the network unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import assert_computes_like
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError

torch.set_num_threads(1)


class TimmStyleAttention(nn.Module):
    """timm's ``Attention.forward`` written out (no timm needed); ``how`` picks the q/k/v read."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        how: str = "unbind",
        qk_norm: bool = False,
        merge: str = "attn_dim",
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.how, self.merge = heads, head_dim, how, merge
        self.attn_dim = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.how == "unbind":
            q, k, v = qkv.unbind(0)
        elif self.how == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.how == "torch.unbind":
            q, k, v = torch.unbind(qkv, dim=0)
        elif self.how == "unbind_heads":  # 3 heads: the heads dim read as if it were q, k, v
            q, k, v = qkv.transpose(0, 2).unbind(0)
        elif self.how == "sum_blocks":
            q = k = v = qkv.sum(0)
        else:  # "negative index"
            q, k, v = qkv[-3], qkv[-2], qkv[-1]
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        size = {"attn_dim": self.attn_dim, "C": C, "-1": -1}[self.merge]
        x = x.transpose(1, 2).reshape(B, N, size)  # older timm wrote C (from x.shape)
        return self.proj(x)


class Model(nn.Module):
    """Input projection, pre-norm residual attention block, head."""

    def __init__(self, dim: int = 8, heads: int = 2, head_dim: int = 4, **kw) -> None:
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = TimmStyleAttention(dim, heads, head_dim, **kw)
        self.out = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(h + self.attn(self.norm(h)))


def _model(seed: int, **kw) -> Model:
    torch.manual_seed(seed)
    model = Model(**kw)
    for p in model.parameters():  # large weights: attention far from uniform
        nn.init.normal_(p, std=0.5)
    return model


def _snapshot(net: GrowableNetwork) -> tuple[str, dict[str, Tensor]]:
    return net.code, {k: v.clone() for k, v in net.state_dict().items()}


def _unchanged(net: GrowableNetwork, snap: tuple[str, dict[str, Tensor]]) -> None:
    code, state = snap
    assert net.code == code
    now = net.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(v, now[k]) for k, v in state.items())


@pytest.mark.parametrize("how", ["unbind", "index", "torch.unbind", "negative index"])
def test_more_heads_and_wider_heads_are_exact(how: str) -> None:
    model = _model(0, how=how)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 6, 5)
    net = GrowableNetwork(model, x)
    assert set(net.coupled_layers("attn.qkv")) == {"attn.qkv", "attn.proj"}
    rec = net.widen("attn.qkv", 36)  # 2 heads of 4 -> 3 heads of 4, in q, k and v
    assert (rec.details["heads"], rec.details["head_dim"]) == (3, 4)
    assert net.attn.qkv.out_features == 36 and net.attn.proj.in_features == 12
    rec = net.widen_heads("attn.qkv", head_dim=7)  # 3 heads of 7: not a multiple of 4
    assert (rec.details["heads"], rec.details["head_dim"]) == (3, 7)
    rec = net.widen_heads("attn.qkv", heads=4, init="zero")
    assert net.attn.qkv.out_features == 84 and net.attn.proj.in_features == 28
    # the literal sizes follow: 3 blocks stay, heads and head width rewritten, C rewritten
    assert ", 3, 4, 7)" in net.code and ", 28)" in net.code
    assert_computes_like(ref, net, x)
    net.train()
    net(x).sum().backward()  # training goes on: the new heads' rows get gradients
    assert float(net.attn.qkv.weight.grad[8:12].abs().sum()) > 0


def test_refused_widths_name_the_exact_ones_and_change_nothing() -> None:
    net = GrowableNetwork(_model(1), torch.randn(2, 6, 5))
    snap = _snapshot(net)
    with pytest.raises(GrowthError, match=r"exact widths for this layer are 36, 48, 60"):
        net.widen("attn.qkv", 30)
    with pytest.raises(GrowthError, match=r"init='net2net' and noise=0"):
        net.widen_heads("attn.qkv", head_dim=5, init="zero")
    _unchanged(net, snap)


def test_merge_with_minus_one_grows_and_with_c_read_from_the_input_is_refused() -> None:
    model = _model(7, merge="-1")
    ref = copy.deepcopy(model)
    x = torch.randn(2, 6, 5)
    net = GrowableNetwork(model, x)
    net.widen("attn.qkv", 36)
    net.widen_heads("attn.qkv", head_dim=5)
    assert_computes_like(ref, net, x)
    net = GrowableNetwork(_model(7, merge="C"), x)
    snap = _snapshot(net)
    fix = r"merges attention heads back into channels with a size computed in forward.*-1"
    with pytest.raises(GrowthError, match=fix):
        net.widen("attn.qkv", 36)
    with pytest.raises(GrowthError, match=fix):  # C is the hidden size too: it cannot grow
        net.widen("inp", 16)
    _unchanged(net, snap)


def test_hidden_size_still_grows_around_the_attention() -> None:
    model = _model(2)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 6, 5)
    net = GrowableNetwork(model, x)
    net.widen("inp", 16)  # the residual stream: qkv's input, proj's output, LayerNorm
    assert net.attn.qkv.in_features == 16 and net.attn.proj.out_features == 16
    net.widen("attn.qkv", 48)
    assert_computes_like(ref, net, x)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("unbind_heads", r"reads the q, k and v blocks of a fused projection"),
        ("sum_blocks", r"reads a tensor split into attention heads"),
    ],
)
def test_other_reads_of_the_stacked_blocks_are_refused(how: str, match: str) -> None:
    net = GrowableNetwork(_model(3, dim=12, heads=3, how=how), torch.randn(2, 6, 5))
    snap = _snapshot(net)
    with pytest.raises(GrowthError, match=match):
        net.widen("attn.qkv", 48)
    with pytest.raises(GrowthError, match=match):
        net.widen_heads("attn.qkv", head_dim=5)
    _unchanged(net, snap)


def test_qk_norm_is_refused_naming_the_layer_and_changes_nothing() -> None:
    """A LayerNorm over each head's positions (timm's ``qk_norm=True``): a wider head changes
    its statistics, so head growth through it is refused before anything changes."""
    net = GrowableNetwork(_model(4, qk_norm=True), torch.randn(2, 6, 5))
    snap = _snapshot(net)
    with pytest.raises(GrowthError, match=r"layer 'attn.q_norm' reads a tensor split into"):
        net.widen_heads("attn.qkv", head_dim=5)
    with pytest.raises(GrowthError, match=r"attn.q_norm"):
        net.widen("attn.qkv", 36)
    _unchanged(net, snap)


class ComputedHeads(nn.Module):
    """The head count computed in forward (``C // 4``): its growth cannot be followed."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, C // 4, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_head_count_computed_in_forward_is_refused_with_the_fix() -> None:
    net = GrowableNetwork(ComputedHeads(), torch.randn(2, 5, 8))
    snap = _snapshot(net)
    with pytest.raises(GrowthError, match=r"size computed in forward.*Write the number of heads"):
        net.widen("qkv", 36)
    _unchanged(net, snap)


@settings(max_examples=10, deadline=None)
@given(
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 4),
    more=st.integers(1, 2),
    wider=st.integers(1, 3),
    order=st.booleans(),
    how=st.sampled_from(["unbind", "index"]),
    seed=st.integers(0, 2**16),
)
def test_property_fused_heads_grow_exactly(
    heads: int, head_dim: int, more: int, wider: int, order: bool, how: str, seed: int
) -> None:
    model = _model(seed, dim=6, heads=heads, head_dim=head_dim, how=how)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 5)
    net = GrowableNetwork(model, x)
    gen = torch.Generator().manual_seed(seed)
    ops = [
        lambda: net.widen_heads("attn.qkv", heads=heads + more, generator=gen),
        lambda: net.widen_heads("attn.qkv", head_dim=head_dim + wider, generator=gen),
    ]
    for op in ops if order else ops[::-1]:
        op()
    assert net.attn.qkv.out_features == 3 * (heads + more) * (head_dim + wider)
    assert net.attn.proj.in_features == (heads + more) * (head_dim + wider)
    assert_computes_like(ref, net, x, rel=2e-5)


# --- timm itself ------------------------------------------------------------------------------


def test_timm_attention_grows_heads_exactly() -> None:
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention

    torch.manual_seed(5)
    model = Attention(16, num_heads=2, qkv_bias=True)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 16)
    net = GrowableNetwork(model, x)
    net.widen("qkv", 72)  # 3 heads of 8
    net.widen_heads("qkv", head_dim=11)
    assert net.qkv.out_features == 99 and net.proj.in_features == 33
    assert_computes_like(ref, net, x)


def test_timm_attention_with_qk_norm_is_refused() -> None:
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Attention

    model = Attention(16, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm)
    net = GrowableNetwork(model, torch.randn(2, 5, 16))
    snap = _snapshot(net)
    with pytest.raises(GrowthError, match=r"q_norm"):
        net.widen_heads("qkv", head_dim=9)
    _unchanged(net, snap)


def test_timm_vit_blocks_grow_heads_exactly() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=3
    )
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    net = GrowableNetwork(model, x)
    net.widen("blocks.1.attn.qkv", 3 * 256)  # 3 heads of 64 -> 4
    net.widen_heads("blocks.2.attn.qkv", head_dim=70)
    net.widen_heads("blocks.0.attn.qkv", heads=5, init="zero")
    assert net.blocks[1].attn.proj.in_features == 256
    assert net.blocks[2].attn.proj.in_features == 210
    assert_computes_like(ref, net, x)
