"""The model zoo, small: growth on models nobody here wrote is exact or refused, never silent."""

from __future__ import annotations

import pytest

from net2grow.benchmarks.zoo import MODELS, exact_width, run_model, table_row

#: Exact trials out of all, measured on this sample (see the zoo command for the full one); the
#: floor sits below the measured fraction so that an engine change can only be caught worse.
FLOOR = {
    "torchvision ViT (small config)": 0.8,  # measured 6 of 6 (+ the head's widen: n/a)
    "swin_t": 0.85,  # measured 8 of 8
    "mobilenet_v3_small": 0.85,  # measured 8 of 8
    "efficientnet_b0": 0.85,  # measured 8 of 8
    "timm vit_tiny_patch16_224": 0.85,  # measured 8 of 8
    "HF BERT (tiny)": 0.85,  # measured 8 of 8
    "HF GPT-2 (tiny)": 0.8,  # measured 6 of 6 (tied wte/lm_head, fused c_attn; lm_head n/a)
}


@pytest.mark.parametrize("name", list(FLOOR))
def test_zoo_sample_grows_exactly_or_refuses(name: str) -> None:
    (entry,) = [m for m in MODELS if m.name == name]
    if entry.needs != "torchvision":
        pytest.importorskip(entry.needs)
    result = run_model(entry, layers=2, seed=0)
    assert result["status"] == "ok", result["status"]
    row = table_row(result)
    bad = [t for t in result["trials"] if t["outcome"] in ("silent", "crash")]
    assert not bad, bad
    # 2 layers x (widen, deepen) x (eval, train); an output layer's widen is not a trial
    assert row["trials"] + row["output widen n/a"] == 8
    assert row["exact"] / row["trials"] >= FLOOR[name], result["trials"]
    for t in result["trials"]:
        if t["outcome"] == "n/a":  # only an output layer's widen is left out
            assert t["op"] == "widen" and t["layer"] in ("heads.head", "lm_head"), t
    for t in result["trials"]:
        if t["outcome"] == "refused":
            assert t["message"].split(":")[0].endswith("Error") and len(t["message"]) > 40


@pytest.mark.parametrize(
    "message,width,expected",
    [
        ("cannot widen 'tok': exact widths for this layer: 64, 96, 128, ... (use one)", 48, 64),
        ("exact widths for this layer are 40, 48, 56, ... (or use net.widen_heads(...))", 42, 48),
        ("cannot widen 'x' from 192 to 288: ... Exact widths for this layer: 384, 576, ...", 192,
         384),
        ("cannot widen 'fc': it is the output", 4, None),
    ],
)
def test_exact_width_reads_both_wordings_of_a_refusal(message: str, width: int, expected) -> None:
    assert exact_width(message, width) == expected
