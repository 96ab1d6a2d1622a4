"""The transformer benchmark: a byte-level GPT on stdlib sources, grown mid-training, exactly."""

from __future__ import annotations

import json
import math

import torch

from net2grow.benchmarks.__main__ import main
from net2grow.benchmarks.gpt import (
    GPT,
    GPTConfig,
    flops_per_token,
    lm_loss,
    stdlib_corpus,
    val_windows,
)
from net2grow.benchmarks.transformer import grow, growth_operations, val_loss
from net2grow.growth import GrowableNetwork


def test_corpus_is_deterministic_and_split() -> None:
    train, val = stdlib_corpus(50_000)
    again, val_again = stdlib_corpus(50_000)
    assert torch.equal(train, again) and torch.equal(val, val_again)
    assert len(train) + len(val) == 50_000 and len(val) == 5_000
    assert b"def " in bytes(train.tolist())  # Python source, not noise


def test_flops_per_token_counts_matrices_and_attention() -> None:
    cfg = GPTConfig(d_model=8, n_layers=1, n_heads=2, d_ff=16, context=4)
    linear = 4 * 8 * 8 + 8 * 16 + 16 * 8 + 8 * 256  # q, k, v, proj, fc1, fc2, head
    assert flops_per_token(GPT(cfg), 4) == 6 * linear + 6 * 2 * 4 * 8


def test_growth_of_the_gpt_keeps_its_loss() -> None:
    torch.manual_seed(0)
    small, large = GPTConfig(16, 1, 2, 32, 16), GPTConfig(32, 3, 4, 96, 16)
    _, val = stdlib_corpus(40_000)
    windows = val_windows(val, 16, 8)
    net = GrowableNetwork(GPT(small), windows)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):  # trained weights and Adam moments, not the initialisation
        loss = lm_loss(net(windows), windows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = net.num_parameters()
    events = grow(net, growth_operations(small, large), opt, windows,
                  torch.Generator().manual_seed(0))
    grown = [e for e in events if e["status"] == "grown"]
    # FFN width, hidden size, heads, then two blocks of depth
    assert [e["op"] for e in events] == ["widen", "widen", "widen_heads", "deepen", "deepen"]
    assert len(grown) == len(events), events
    for e in grown:
        assert e["rel_loss_change"] <= 1e-5, e
    assert net.num_parameters() > params
    assert net.get_submodule("blocks.0.fc1").out_features == 96
    assert net.get_submodule("tok").embedding_dim == 32
    assert net.get_submodule("blocks.0.q").out_features == 32  # 4 heads of width 8
    assert net.num_parameters() == sum(p.numel() for p in GPT(large).parameters())  # its shape
    # the optimizer holds every grown parameter and keeps training it
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in net.parameters())
    before = val_loss(net, windows)
    for _ in range(3):
        loss = lm_loss(net(windows), windows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val_loss(net, windows) < before - 0.01


def test_growth_recipe_options_keep_the_loss_and_change_the_new_units() -> None:
    """--ffn-init vt / --heads-init zero: still exact; new FFN units come in (Z, -Z) pairs of
    outgoing weights and new heads get zero output columns (not copies)."""
    torch.manual_seed(1)
    small, large = GPTConfig(16, 1, 2, 32, 16), GPTConfig(16, 1, 4, 64, 16)
    _, val = stdlib_corpus(40_000)
    windows = val_windows(val, 16, 8)
    net = GrowableNetwork(GPT(small), windows)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ops = growth_operations(small, large, ffn_init="vt", heads_init="zero")
    assert {op[2].get("init") for op in ops} == {"vt", "zero"}
    events = grow(net, ops, opt, windows, torch.Generator().manual_seed(0))
    assert all(e["status"] == "grown" and e["rel_loss_change"] <= 1e-5 for e in events), events
    fc1, fc2 = net.get_submodule("blocks.0.fc1"), net.get_submodule("blocks.0.fc2")
    assert fc2.weight[:, 32:].abs().sum() > 0  # not zero, as copies' split weights are not
    h = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the new units' outgoing (Z, -Z) pairs cancel on any input
        new_part = torch.nn.functional.gelu(fc1(h))[:, 32:] @ fc2.weight[:, 32:].T
    assert new_part.abs().max() < 1e-5
    proj = net.get_submodule("blocks.0.proj").weight
    assert torch.count_nonzero(proj[:, 16:]) == 0  # new heads (2 of width 8) read as zero


def test_quick_run_writes_its_outputs(tmp_path) -> None:
    out, runs = tmp_path / "results", tmp_path / "runs"
    assert main(["transformer", "--quick", "--out-dir", str(out), "--runs-dir", str(runs)]) == 0
    for suffix in ("json", "md", "png"):
        assert (out / f"transformer.{suffix}").stat().st_size > 0
    for key in ("large", "grown"):
        assert list((runs / "transformer" / key / "seed0").glob("events.out.tfevents.*"))
    doc = json.loads((out / "transformer.json").read_text())
    (seed,) = doc["per_seed"]
    events = seed["runs"]["grown"]["events"]
    assert events and all(e["status"] == "grown" for e in events)
    assert max(e["rel_loss_change"] for e in events) <= 1e-5
    for key in ("large", "grown"):
        curve = seed["runs"][key]["curve"]
        assert math.isclose(curve[0]["val_loss"], math.log(256), rel_tol=0.05)  # untrained
        assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 1.0  # training measurably helps
    assert seed["runs"]["grown"]["params"] > 0
    assert "small, grown" in (out / "transformer.md").read_text()
