"""strategies.Expand under ``torch.distributed``: two Gloo processes (localhost), each training
``DistributedHelper.wrap_model(net)`` with protected growth, replay, the auxiliary loss and the
balanced classifier stage. Old units stay bit-identical on every rank, and the ranks agree."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from _launch import launch, run_avalanche_rank

WORLD = 2
JOB_TIMEOUT_S = 300  # hang guard only (seconds normally)

requires_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed Gloo backend",
)


#: Expand's optional plugins, by parametrisation id (passed to the ranks by name).
OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "inherit-align-adjusted": {"inherit": True, "align": True, "adjust_logits": 1.0},
}


def _rank_main(options: dict[str, Any]) -> dict[str, Any]:
    from avalanche.distributed import DistributedHelper
    from avalanche.training.plugins import EvaluationPlugin
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from net2grow.benchmarks.data import make_stream
    from net2grow.growth import GrowableNetwork
    from net2grow.growth import protect as protection
    from net2grow.strategies import Expand

    bench, _ = make_stream("split-digits", n_experiences=5, seed=0, train_per_exp=96)
    torch.manual_seed(0)  # same weights and probe batch on every rank
    model = nn.Sequential(
        nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10)
    )
    net = GrowableNetwork(model, example_inputs=torch.randn(8, 64))
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    strategy = Expand(
        DistributedHelper.wrap_model(net),
        torch.optim.Adam(net.parameters(), lr=0.01),
        growth=4,
        mem_size=40,
        balance_epochs=2,
        train_mb_size=16,
        train_epochs=2,
        evaluator=EvaluationPlugin(loggers=[]),
        device="cpu",
        growth_options={"generator": 0},
        **options,
    )

    @torch.no_grad()
    def hidden() -> dict[str, torch.Tensor]:
        net.eval()
        h0 = torch.relu(net.get_submodule("0")(x))
        h2 = torch.relu(net.get_submodule("2")(h0))
        net.train()
        return {"0": h0.clone(), "2": h2.clone()}

    out: dict[str, Any] = {"hidden": [], "states": [], "aux": []}
    for exp in bench.train_stream[:3]:
        strategy.train(exp)
        out["hidden"].append(hidden())
        out["states"].append({k: v.clone() for k, v in net.state_dict().items()})
        out["aux"].append(list(strategy.aux.losses))
    out["ddp"] = isinstance(strategy.model, DistributedDataParallel)
    out["violations"] = protection.violations(net)
    out["widths"] = [net.width(n) for n in net.layers]
    return out


def _worker_main(out_dir: str, option: str) -> None:
    run_avalanche_rank(out_dir, lambda rank: _rank_main(OPTIONS[option]), timeout_s=60)


@requires_gloo
@pytest.mark.parametrize("option", list(OPTIONS))
def test_expand_keeps_old_units_on_every_rank(tmp_path: Path, option: str) -> None:
    ranks = launch(
        __file__, [str(tmp_path), option], tmp_path, world=WORLD, timeout_s=JOB_TIMEOUT_S,
        label="two-process Expand job",
    )  # fmt: skip
    for r in ranks:
        assert r["ddp"] and r["violations"] == [] and r["widths"] == [20, 20]
        gen0, gen1, gen2 = r["hidden"]
        for name in ("0", "2"):  # old units: bit-identical after later experiences
            assert torch.equal(gen1[name][:, :12], gen0[name])
            assert torch.equal(gen2[name][:, :12], gen0[name])
            assert torch.equal(gen2[name][:, :16], gen1[name][:, :16])
            assert not torch.equal(gen2[name][:, 16:], torch.zeros(32, 4))  # new units work
        assert r["aux"][0] == [] and len(r["aux"][1]) > 0 and len(r["aux"][2]) > 0
    r0, r1 = ranks
    for s0, s1 in zip(r0["states"], r1["states"]):  # replicas equal after every experience
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    assert r0["aux"] != r1["aux"]  # each rank's own minibatches (the loss is rank-local)


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
