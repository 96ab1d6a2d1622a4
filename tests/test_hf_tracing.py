"""Tracing models that plain torch.fx cannot: the tracer hook, concrete tracing, Hugging Face."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, fx, nn

from net2grow.growth import GrowableNetwork, GrowthError, TraceError
from net2grow.growth.tracing import GrowthTracer


class ShapeBranch(nn.Module):
    """Python control flow on a shape, and a forward with ``**kwargs``: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor, scale: float = 2.0, **kwargs: object) -> Tensor:
        h = torch.relu(self.fc1(x))
        if h.shape[-1] > 4:  # decided on the example, like Hugging Face's shape checks
            h = h * scale
        return self.fc2(h)


def _x(n: int) -> Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(n))


def test_fx_refuses_and_names_the_concrete_tracer() -> None:
    with pytest.raises(TraceError, match='tracer="concrete"'):
        GrowableNetwork(ShapeBranch(), _x(4), tracer="fx")
    # "auto" is fx for models that are not Hugging Face's
    with pytest.raises(TraceError, match="could not trace ShapeBranch"):
        GrowableNetwork(ShapeBranch(), _x(4))


def test_unknown_tracer_is_refused() -> None:
    with pytest.raises(GrowthError, match="tracer must be one of 'auto', 'fx', 'concrete'"):
        GrowableNetwork(ShapeBranch(), _x(4), tracer="jit")


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 9))
def test_concrete_trace_computes_the_model(n: int) -> None:
    torch.manual_seed(0)
    model = ShapeBranch()
    net = GrowableNetwork(model, _x(4), tracer="concrete")
    x = _x(n)
    assert torch.equal(net(x), model(x))
    before = net(x)
    net.widen("fc1", 12)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


def test_a_user_tracer_class_is_used() -> None:
    used = []

    class Recording(GrowthTracer):
        def trace(self, root, concrete_args=None) -> fx.Graph:
            used.append(type(root).__name__)
            return super().trace(root, concrete_args)

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    net = GrowableNetwork(model, _x(4), tracer=Recording)
    assert used == ["Sequential", "Sequential"]  # train and eval traces
    assert net.layers == ["0"]


# --- Hugging Face ------------------------------------------------------------------------------
def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=96, max_position_embeddings=32,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _tokens(n: int, length: int) -> Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(length))


def test_plain_fx_cannot_trace_gpt2() -> None:
    with pytest.raises(TraceError, match="could not trace GPT2LMHeadModel"):
        GrowableNetwork(_gpt2(), _tokens(2, 12), tracer="fx")


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_huggingface_models_trace_and_compute_the_same(build) -> None:
    model = build()
    net = GrowableNetwork(model, _tokens(2, 12))
    with torch.no_grad():
        for n, length in ((2, 12), (3, 20)):  # other batch and sequence lengths too
            x = _tokens(n, length)
            assert torch.equal(net(x)["logits"], model(x).logits)


def test_bert_ffn_and_depth_grow_exactly() -> None:
    net = GrowableNetwork(_bert(), _tokens(4, 12))
    x = _tokens(3, 16)
    with torch.no_grad():
        before = net(x)["logits"]
    layer = "bert.encoder.layer.0.intermediate.dense"
    rec = net.widen(layer, factor=1.5, generator=torch.Generator().manual_seed(0))
    assert (rec.old_width, rec.new_width) == (64, 96)
    net.deepen("bert.encoder.layer.1.output.dense", kind="residual")
    with torch.no_grad():
        after = net(x)["logits"]
    assert net.get_submodule(layer).out_features == 96
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
