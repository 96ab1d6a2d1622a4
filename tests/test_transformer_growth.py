"""Transformers grow exactly: hidden size through LayerNorm/RMSNorm, heads of
nn.MultiheadAttention, identity blocks; refusals say which widths are exact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError, load, save

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="enable_nested_tensor")


def _out_close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) <= rel * max(scale, 1e-6), float((a - b).abs().max())


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    return vit


class TinyLM(nn.Module):
    """Embedding + learned positions + nn.TransformerEncoder (pre-norm) + LayerNorm + head."""

    def __init__(self, d: int = 16, heads: int = 2, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(13, d)
        self.pos = nn.Parameter(torch.randn(1, 6, d))
        layer = nn.TransformerEncoderLayer(
            d, heads, 2 * d, dropout=dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.ln(self.encoder(self.emb(idx) + self.pos)))


class HFRMSNorm(nn.Module):
    """RMSNorm written as Hugging Face Llama writes it (traced: pow, mean, rsqrt, mul)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.variance_epsilon = 1e-6

    def forward(self, h: Tensor) -> Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


class RMSModel(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.norm1 = HFRMSNorm(d)
        self.fc = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.emb(idx)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.fc(self.norm1(x))
        return self.head(self.norm2(x)[:, 0])


def _both_modes(net: GrowableNetwork, ref: nn.Module, *inputs: Tensor) -> None:
    """``net`` computes what ``ref`` computes, in eval and in train mode (no dropout)."""
    for train in (False, True):
        net.train(train)
        ref.train(train)
        with torch.no_grad():
            _out_close(ref(*inputs), net(*inputs))


def test_vit_hidden_size_grows_exactly_with_heads_positions_and_class_token() -> None:
    torch.manual_seed(0)
    vit = _vit()
    ref = copy.deepcopy(vit)
    x = torch.randn(4, 3, 32, 32)
    net = GrowableNetwork(vit, x)
    rec = net.widen("conv_proj", 32)
    assert rec.max_abs_error is not None
    _both_modes(net, ref, x)
    assert net.class_token.shape == (1, 1, 32)
    assert net.encoder.pos_embedding.shape == (1, 17, 32)
    attn = net.encoder.layers.encoder_layer_0.self_attention
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (32, 4, 8)
    assert net.encoder.layers.encoder_layer_1.ln_1.normalized_shape == (32,)


def test_non_multiple_hidden_width_is_refused_naming_the_exact_widths() -> None:
    torch.manual_seed(0)
    net = GrowableNetwork(_vit(), torch.randn(2, 3, 32, 32))
    before = {n: p.clone() for n, p in net.named_parameters()}
    with pytest.raises(GrowthError, match=r"exact widths for this layer: 32, 48, 64"):
        net.widen("conv_proj", 24)
    with pytest.raises(GrowthError, match=r"init='zero'.*init='net2net'"):
        net.widen("conv_proj", 32, init="zero")
    with pytest.raises(GrowthError, match=r"noise"):
        net.widen("conv_proj", 32, noise=0.01)
    after = dict(net.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_transformer_encoder_traces_and_grows_hidden_size_ffn_and_depth() -> None:
    torch.manual_seed(1)
    model = TinyLM()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 13, (3, 6))
    net = GrowableNetwork(model, x)
    assert "encoder.layers.0.linear1" in net.layers
    net.widen("emb", 48)
    net.widen("encoder.layers.1.linear1", 50)
    net.deepen("encoder.layers.0", kind="block")
    _both_modes(net, ref, x)
    attn = net.encoder.layers[0].self_attn
    assert (attn.embed_dim, attn.num_heads) == (48, 6)
    assert net.pos.shape == (1, 6, 48)


def test_transformer_encoder_as_the_model_itself() -> None:
    torch.manual_seed(2)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True),
        2,
        enable_nested_tensor=False,
    )
    ref = copy.deepcopy(enc)
    x = torch.randn(4, 5, 16)
    net = GrowableNetwork(enc, x)
    assert net.layers == ["layers.0.linear1", "layers.1.linear1"]  # d_model: the input's
    net.widen("layers.0.linear1", 40)
    net.deepen("layers.1", kind="block")
    _both_modes(net, ref, x)


def test_identity_block_is_exact_with_dropout_in_eval_mode_and_post_norm_is_refused() -> None:
    torch.manual_seed(3)
    model = TinyLM(dropout=0.1)
    x = torch.randint(0, 13, (3, 6))
    net = GrowableNetwork(model, x)
    rec = net.deepen("encoder.layers.1", kind="block")
    assert rec.details["zeroed"] == [
        "grown.encoder_layers_1_block1.linear2",
        "grown.encoder_layers_1_block1.self_attn",
    ]
    post = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1)
    net = GrowableNetwork(post, torch.randn(2, 5, 16))
    code = net.code
    with pytest.raises(GrowthError, match=r"post-norm.*norm_first=True"):
        net.deepen("layers.0", kind="block")
    assert net.code == code and "grown" not in dict(net.named_children())


def test_rmsnorm_traced_and_module_grow_by_multiples_only() -> None:
    torch.manual_seed(4)
    model = RMSModel()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 11, (4, 5))
    net = GrowableNetwork(model, x)
    with pytest.raises(GrowthError, match=r"exact widths for this layer: 16, 24, 32"):
        net.widen("emb", 12)
    net.widen("emb", 24)
    _both_modes(net, ref, x)
    assert net.norm1.weight.shape == (24,) and net.norm2.weight.shape == (24,)
    assert net.cls.shape == (1, 1, 24)


def test_nanogpt_style_model_grows_hidden_size_and_depth() -> None:
    gpt = pytest.importorskip("net2grow.benchmarks.gpt")
    torch.manual_seed(5)
    model = gpt.GPT(gpt.GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, context=8))
    ref = copy.deepcopy(model)
    x = torch.randint(0, 256, (2, 8))
    net = GrowableNetwork(model, x)
    net.widen("tok", 32)
    net.deepen("blocks.1", kind="block")
    _both_modes(net, ref, x)


def test_adam_state_follows_and_training_continues() -> None:
    torch.manual_seed(6)
    x = torch.randint(0, 13, (8, 6))
    y = torch.randint(0, 5, (8, 6))
    net = GrowableNetwork(TinyLM(), x)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step() -> float:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(3):
        step()
    old = opt.state[net.encoder.layers[0].linear1.weight]["exp_avg_sq"].clone()
    net.widen("emb", 32, optimizer=opt)
    net.deepen("encoder.layers.0", kind="block", optimizer=opt)
    for p in net.parameters():
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim():
                assert v.shape == p.shape
    # a consumer's columns: the original units keep their second moments (copies take theirs)
    new = opt.state[net.encoder.layers[0].linear1.weight]["exp_avg_sq"]
    assert torch.equal(new[:, :16], old)
    losses = [step() for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]


def test_checkpoint_round_trip_with_multihead_attention(tmp_path) -> None:
    torch.manual_seed(7)
    x = torch.randint(0, 13, (3, 6))
    net = GrowableNetwork(TinyLM(), x)
    net.widen("emb", 32)
    net.deepen("encoder.layers.0", kind="block")
    path = tmp_path / "lm.pt"
    save(net, path)
    back = load(path)
    net.eval()
    back.eval()
    with torch.no_grad():
        assert torch.equal(net(x), back(x))
    assert back.encoder.layers[0].self_attn.num_heads == 4


@settings(max_examples=8, deadline=None)
@given(
    k=st.integers(2, 3),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.integers(2, 4),
    seed=st.integers(0, 2**16),
    off=st.integers(1, 3),
)
def test_property_hidden_size_exact_for_multiples_refused_otherwise(
    k: int, heads: int, head_dim: int, seed: int, off: int
) -> None:
    torch.manual_seed(seed)
    d = heads * head_dim
    model = TinyLM(d=d, heads=heads, layers=1)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 13, (2, 6))
    net = GrowableNetwork(model, x)
    with pytest.raises(GrowthError, match="exact widths for this layer"):
        net.widen("emb", k * d + off)
    net.widen("emb", k * d, generator=torch.Generator().manual_seed(seed))
    _both_modes(net, ref, x)
    assert net.encoder.layers[0].self_attn.num_heads == k * heads
