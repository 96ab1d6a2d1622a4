"""Attention written as Hugging Face writes it: sizes read from the head tensors' shapes.

``q.shape[2]`` (the sequence length), ``x.reshape(b, -1, t, v.shape[-1])`` (a reshape of heads to
their own shape) and ``y.reshape(*y.shape[:-2], -1)`` (merging heads) follow the heads when they
grow; any other use of a head count or head width read from a shape is refused, network unchanged.
"""

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


class ShapeReadAttention(nn.Module):
    """q/k/v -> view(b, t, -1, D) -> transpose -> SDPA -> same-shape reshape -> merge -> o."""

    def __init__(self, d: int, head_dim: int, misuse: str | None = None) -> None:
        super().__init__()
        self.head_dim, self.misuse = head_dim, misuse
        self.inp = nn.Linear(5, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        shape = (h.shape[0], h.shape[1], -1, self.head_dim)
        q, k, v = (m(h).view(shape).transpose(1, 2) for m in (self.q, self.k, self.v))
        t = q.shape[2]  # the sequence: free
        causal = t > 1
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = y.reshape(y.shape[0], -1, t, v.shape[-1])  # heads to their own shape
        y = y.reshape(y.shape[0], q.shape[1], t, -1)  # the count read from q: follows it too
        if self.misuse == "width":
            y = y * v.shape[-1]  # the head width as a number: changes when heads widen
        if self.misuse == "swap":
            y = y.reshape(y.shape[0], v.shape[-1], t, -1)  # a width where the count goes
        y = y.transpose(1, 2)
        merged = y.reshape(*y.shape[:-2], -1)
        return self.out(h + self.o(merged))


@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 3), head_dim=st.integers(2, 4), more=st.integers(1, 2),
       wider=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_shape_reads_follow_more_and_wider_heads(heads, head_dim, more, wider, seed) -> None:
    torch.manual_seed(seed)
    model = ShapeReadAttention(heads * head_dim, head_dim)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(seed))
    net = GrowableNetwork(model, x, tracer="concrete")  # as Hugging Face models trace
    net.widen_heads("q", heads=heads + more)
    net.widen_heads("k", head_dim=head_dim + wider)
    assert net.v.out_features == (heads + more) * (head_dim + wider)
    assert net.o.in_features == net.v.out_features
    assert_computes_like(ref, net, x)


@pytest.mark.parametrize("misuse", ["width", "swap"])
def test_other_uses_of_a_head_size_read_from_a_shape_are_refused(misuse: str) -> None:
    torch.manual_seed(0)
    model = ShapeReadAttention(16, 4, misuse)  # 4 heads of 4: the swap runs before growth
    net = GrowableNetwork(model, torch.randn(2, 6, 5), tracer="concrete")
    state = copy.deepcopy(net.state_dict())
    code = net.code
    with pytest.raises(GrowthError) as info:
        net.widen_heads("q", heads=6)
    assert "head_dim of attention heads read from their shape" in str(info.value)
    assert "'q'" in str(info.value)
    assert net.code == code
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert "q" not in net.layers
