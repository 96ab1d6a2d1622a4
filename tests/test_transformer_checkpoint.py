"""Grown transformers (nn.MultiheadAttention; the benchmark GPT with explicit heads) survive a
checkpoint loaded in a fresh process that never imports their classes, and can be deepened by
whole blocks after the reload."""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import torch
from torch import Tensor, nn

from net2grow.benchmarks.gpt import GPT, GPTConfig
from net2grow.growth import GrowableNetwork, load, save

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="enable_nested_tensor")
REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    """Embedding + positions + pre-norm nn.TransformerEncoder + LayerNorm + head."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, d)
        self.pos = nn.Parameter(torch.randn(1, 6, d))
        layer = nn.TransformerEncoderLayer(
            d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.ln(self.encoder(self.emb(idx) + self.pos)))


def _grown_lm() -> tuple[GrowableNetwork, nn.Module, Tensor]:
    torch.manual_seed(0)
    model = TinyLM()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 13, (3, 6))
    net = GrowableNetwork(model, x)
    net.widen("emb", 32)  # hidden size and heads of nn.MultiheadAttention: 2 -> 4
    net.deepen("encoder.layers.0", kind="block")
    return net, ref, x


def _grown_gpt() -> tuple[GrowableNetwork, nn.Module, Tensor]:
    torch.manual_seed(1)
    model = GPT(GPTConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, context=8))
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 256, (3, 8))
    net = GrowableNetwork(model, x)
    net.widen_heads("blocks.0.q", heads=3)
    net.widen_heads("blocks.1.k", head_dim=10)
    net.widen("tok", 32)
    net.deepen("blocks.1", kind="block")
    return net, ref, x


_FRESH = textwrap.dedent(
    """
    import sys
    import torch
    from net2grow import growth

    torch.set_num_threads(1)
    cases = torch.load(sys.argv[1], weights_only=True)
    out = {}
    for name, case in cases.items():
        net = growth.load(case["path"])
        x = case["x"]
        with torch.no_grad():
            out[name] = net.eval()(x)
        rec = net.deepen(case["block"], kind="block")  # blocks are found after the reload
        out[name + ":err"] = rec.max_abs_error
        out[name + ":zeroed"] = rec.details["zeroed"]
        with torch.no_grad():
            out[name + ":deeper"] = net.eval()(x)
    assert "test_transformer_checkpoint" not in sys.modules
    assert "net2grow.benchmarks.gpt" not in sys.modules, "the GPT class is never imported"
    torch.save(out, sys.argv[2])
    """
)


def test_fresh_process_load_and_block_deepening_of_grown_transformers(tmp_path) -> None:
    cases, expected = {}, {}
    for name, (net, ref, x), block in (
        ("mha", _grown_lm(), "encoder.layers.1"),
        ("gpt", _grown_gpt(), "grown.blocks_1_block1"),
    ):
        path = tmp_path / f"{name}.n2g"
        save(net, path)
        cases[name] = {"path": str(path), "x": x, "block": block}
        with torch.no_grad():
            expected[name] = net.eval()(x)
            ref.eval()
            a = ref(x)
        # the grown network still computes the original model's function
        assert float((a - expected[name]).abs().max()) <= 1e-5 * float(a.abs().max())
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, want in expected.items():
        assert torch.equal(out[name], want), name
        assert out[f"{name}:err"] is not None and out[f"{name}:err"] <= 1e-6, name
        assert torch.equal(out[f"{name}:deeper"], want), name
    assert out["gpt:zeroed"] == [
        "grown.grown_blocks_1_block1_block1.fc2",
        "grown.grown_blocks_1_block1_block1.proj",
    ]
    assert out["mha:zeroed"] == [
        "grown.encoder_layers_1_block1.linear2",
        "grown.encoder_layers_1_block1.self_attn",
    ]


def test_reloaded_gpt_keeps_growing_heads_in_process(tmp_path) -> None:
    net, ref, x = _grown_gpt()
    save(net, tmp_path / "gpt.n2g")
    back = load(tmp_path / "gpt.n2g")
    back.widen_heads("blocks.0.v", heads=4)
    back.widen_heads("grown.blocks_1_block1.q", head_dim=12)
    back.deepen("blocks.0", kind="block")
    for train in (False, True):
        back.train(train)
        ref.train(train)
        with torch.no_grad():
            a, b = ref(x), back(x)
        assert float((a - b).abs().max()) <= 2e-5 * float(a.abs().max()), train
