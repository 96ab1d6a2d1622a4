"""What Adam keeps across an exact growth of a transformer (``optimizer=`` passed to growth).

The honest claim, tested here on the benchmark GPT:

- new heads with zero output-projection columns (``init="zero"``): the next Adam step moves every
  old parameter exactly as it moves in the ungrown network (the new units add nothing to the
  output, so no old gradient changes, and old units keep their state);
- copies (``init="net2net"``) with ``optimizer_state="scale"``: the next step moves every old
  entry as in the ungrown network too (to Adam's ``eps``, 1e-12 here): a consumer's columns get
  the ungrown gradient, a producer's rows of a copied head get ``share`` times it, and their
  moments scaled by ``share`` / ``share**2`` make the update scale-free;
- from the step after on the trajectories differ: each copy's outgoing column takes the full
  ungrown update, so the copies together move ``copies`` times as far (and zero columns start to
  learn). A grown network keeps the ungrown trajectory only while its new units stay frozen.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from net2grow.benchmarks.gpt import GPT, GPTConfig, lm_loss
from net2grow.growth import GrowableNetwork

torch.set_num_threads(1)
LR = 1e-2
#: softmax ignores k's bias (it shifts every score of a query alike): its gradient is rounding
#: noise, which Adam scales up to full steps, in the grown and the ungrown run differently
NOISE = {"blocks.0.k.bias"}


def _setup(seed: int) -> tuple[GrowableNetwork, torch.optim.Adam, torch.Tensor]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, context=8))
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randint(0, 256, (4, 8))
    net = GrowableNetwork(model, x)
    opt = torch.optim.Adam(net.parameters(), lr=LR, eps=1e-12)  # eps: see the module doc
    for _ in range(3):
        _step(net, opt, x)
    return net, opt, x


def _step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad()
    loss = lm_loss(net(x), x)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _twins(seed: int, **grow):
    net, opt, x = _setup(seed)
    ref, ref_opt = copy.deepcopy((net, opt))  # the ungrown run, same state
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.widen_heads("blocks.0.q", optimizer=opt, **grow)
    with torch.no_grad():
        assert abs(lm_loss(net(x), x).item() - lm_loss(ref(x), x).item()) < 1e-5
    grown_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _step(net, opt, x)
    _step(ref, ref_opt, x)
    return net, ref, x, opt, ref_opt, before, grown_before


def _old(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The entries of grown ``t`` that existed in ``like`` (old units come first)."""
    return t[tuple(slice(0, s) for s in like.shape)]


def test_zero_heads_keep_the_next_adam_step_of_every_old_parameter() -> None:
    net, ref, x, opt, ref_opt, _before, _grown_before = _twins(0, heads=4, init="zero")
    refs = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        if name in NOISE:
            continue
        assert torch.allclose(_old(p.detach(), refs[name]), refs[name], rtol=0, atol=1e-6), name
    # the new heads' zero output columns start to learn, so the next steps differ
    proj = net.blocks[0].proj.weight
    assert float(proj[:, 16:].abs().min()) > 0.5 * LR
    _step(net, opt, x)
    _step(ref, ref_opt, x)
    diff = (_old(net.blocks[0].fc1.weight, ref.blocks[0].fc1.weight) - ref.blocks[0].fc1.weight)
    assert float(diff.abs().max()) > 1e-5


def test_copied_heads_with_scaled_moments_keep_the_next_update_of_old_entries() -> None:
    net, ref, x, _opt, _ref_opt, before, grown_before = _twins(1, heads=3, init="net2net")
    refs = dict(ref.named_parameters())
    for name, p in net.named_parameters():
        if name in NOISE:
            continue
        ungrown = refs[name] - before[name]  # the ungrown run's update of each old entry
        grown = _old(p.detach() - grown_before[name], before[name])
        # original heads' rows: scaled by their share, moments too: the same update (eps aside)
        assert torch.allclose(grown, ungrown, rtol=1e-4, atol=1e-3 * LR), name
    # a copied head's output-projection columns each take the full update of their source's
    src = net.history[-1]  # heads 2 -> 3: the new head copies one of the two old heads
    assert src.details["heads"] == 3
    w, w0 = net.blocks[0].proj.weight.detach(), grown_before["blocks.0.proj.weight"]
    upd = w - w0
    ref_upd = refs["blocks.0.proj.weight"] - before["blocks.0.proj.weight"]
    matches = [
        torch.allclose(upd[:, 16:24], ref_upd[:, h * 8 : (h + 1) * 8], rtol=1e-4, atol=1e-3 * LR)
        for h in (0, 1)
    ]
    assert any(matches)
    # ... so the function after the step is no longer the ungrown network's
    with torch.no_grad():
        gap = float((net(x) - ref(x)).abs().max())
    assert gap > 1e-4


def test_zero_heads_frozen_keep_the_whole_trajectory() -> None:
    net, opt, x = _setup(2)
    ref, ref_opt = copy.deepcopy((net, opt))
    net.widen_heads("blocks.0.q", heads=3, init="zero", optimizer=opt)
    proj = net.blocks[0].proj.weight
    proj.register_hook(lambda g: torch.cat([g[:, :16], torch.zeros_like(g[:, 16:])], dim=1))
    losses = [(_step(net, opt, x), _step(ref, ref_opt, x)) for _ in range(5)]
    for grown, ungrown in losses:
        assert abs(grown - ungrown) <= 1e-5 * abs(ungrown)
    assert losses[-1][1] < losses[0][1]  # it did train
    assert F.mse_loss(proj[:, 16:], torch.zeros_like(proj[:, 16:])) == 0
