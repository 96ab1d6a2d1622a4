"""Weight tying: an embedding whose table the output head reads (``lm_head.weight = wte.weight``).

The hidden size grows exactly: the table keeps copied columns (what the embedding needs) and the
head's Net2WiderNet split moves onto the LayerNorm that feeds it. Checked numerically in eval and
train mode, through an optimizer step and a checkpoint; refusals leave everything as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from net2grow.growth import GrowableNetwork, GrowthError
from net2grow.growth.checkpoint import load, save


class TiedLM(nn.Module):
    """A tiny pre-norm language model with GPT-2's weight tying and final LayerNorm."""

    def __init__(self, vocab: int = 23, hidden: int = 8, norm_before_head: bool = True,
                 norm_read_twice: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.ln_1 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(2 * hidden, hidden)
        self.ln_f = nn.LayerNorm(hidden) if norm_before_head else nn.Identity()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.side = nn.Linear(hidden, 1) if norm_read_twice else None

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.wte(tokens)
        h = h + self.proj(torch.relu(self.fc(self.ln_1(h))))
        out = self.ln_f(h)
        logits = self.lm_head(out.reshape(out.shape[0], out.shape[1], -1)[:, 1:].contiguous())
        if self.side is not None:  # a second reader of the normalised values
            logits = logits + self.side(out[:, 1:])
        return logits


def _tokens(seed: int, vocab: int = 23, n: int = 5, length: int = 7) -> Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _model(seed: int, **kw) -> TiedLM:
    torch.manual_seed(seed)
    model = TiedLM(**kw)
    with torch.no_grad():  # affine parameters away from their (1, 0) initialisation
        for m in (model.ln_1, model.ln_f):
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)
    return model


def _assert_same(a: Tensor, b: Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.integers(2, 4),
       layer=st.sampled_from(["wte", "proj"]), train=st.booleans())
def test_tied_hidden_size_grows_exactly(seed: int, factor: int, layer: str, train: bool) -> None:
    tokens = _tokens(seed)
    net = GrowableNetwork(_model(seed), tokens).train(train)
    assert {"wte", "proj", "fc"} <= set(net.layers)
    held = _tokens(seed + 1)
    before = net(held)
    net.widen(layer, 8 * factor)
    _assert_same(net(held), before)
    assert net.wte.weight is net.lm_head.weight  # still one tensor
    assert net.wte.weight.shape == (23, 8 * factor)
    # the table holds copied columns: every new column equals an old one, unscaled
    old_cols = {tuple(c.tolist()) for c in _model(seed).wte.weight.detach().T}
    assert {tuple(c.tolist()) for c in net.wte.weight.detach().T} == old_cols


def test_tied_growth_under_adam_keeps_one_parameter_and_trains() -> None:
    tokens = _tokens(0)
    net = GrowableNetwork(_model(0), tokens)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = _tokens(3)[:, 1:]

    def loss() -> Tensor:
        return nn.functional.cross_entropy(net(tokens).flatten(0, 1), target.flatten())

    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()
    before = loss().item()
    net.widen("wte", 16, optimizer=opt)
    assert abs(loss().item() - before) <= 1e-5 * before
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is net.wte.weight for p in params) == 1
    assert len(params) == len({id(p) for p in params}) == len(list(net.parameters()))
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * before
    assert net.wte.weight is net.lm_head.weight


def test_tied_growth_survives_a_checkpoint(tmp_path) -> None:
    tokens = _tokens(0)
    net = GrowableNetwork(_model(0), tokens)
    net.widen("proj", 24)
    save(net, tmp_path / "tied.pt")
    back = load(tmp_path / "tied.pt")
    assert back.wte.weight is back.lm_head.weight
    net.eval()
    back.eval()
    assert torch.equal(back(_tokens(5)), net(_tokens(5)))
    before = back(_tokens(5))
    back.widen("wte", 48)  # grows again after a load
    _assert_same(back(_tokens(5)), before)


@pytest.mark.parametrize(
    "kw,text",
    [
        ({"norm_before_head": False}, "none feeds 'lm_head'"),
        ({"norm_read_twice": True}, "none feeds 'lm_head'"),
    ],
)
def test_tied_growth_without_a_norm_of_its_own_is_refused(kw, text) -> None:
    tokens = _tokens(0)
    model = _model(0, **kw)
    net = GrowableNetwork(model, tokens)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(tokens).sum().backward()
    opt.step()
    state = copy.deepcopy(net.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    code = net.code
    assert "wte" not in net.layers  # the analysis already knows
    with pytest.raises(GrowthError) as info:
        net.widen("wte", 16, optimizer=opt)
    message = str(info.value)
    assert "wte.weight is lm_head.weight" in message and text in message
    assert "Untie" in message
    assert net.code == code
    now = net.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert net.wte.weight is net.lm_head.weight
    assert str(opt.state_dict()) == str(opt_state)


def test_tied_vocabulary_cannot_grow() -> None:
    """The head's outputs are the table's rows (tokens): not units that can be widened."""
    net = GrowableNetwork(_model(0), _tokens(0))
    with pytest.raises(GrowthError, match="lm_head"):
        net.widen("lm_head", 30)


def test_hugging_face_gpt2_hidden_size_grows_with_tied_head() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0,
                                  resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = _tokens(0, vocab=50, n=3, length=9)
    net = GrowableNetwork(model, tokens)
    assert net.transformer.wte.weight is net.lm_head.weight
    before = net(tokens)["logits"]
    net.widen("transformer.wte", 32)
    after = net(tokens)["logits"]
    _assert_same(after, before)
    assert net.transformer.wte.weight is net.lm_head.weight
    assert net.transformer.wte.weight.shape == (50, 32)
