"""Resuming a run that grows with ``init="vt"`` and per-cohort ``"vt"`` learning rates.

A run saved mid-stream with ``strategies.resume`` (``save_run``/``load_run`` or ``ResumePlugin``)
and continued in a fresh strategy must end bitwise identical to the uninterrupted run: the
parameters, the optimizer state and the cohort of every parameter entry (``CohortLRPlugin``),
including the cohorts of a growth that happens after the resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _avalanche import digits_stream, mlp_net
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.supervised import Naive

from net2grow.strategies import CohortLRPlugin, GrowthPlugin
from net2grow.strategies.policies import EveryExperience
from net2grow.strategies.resume import ResumePlugin, load_run, save_run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def experiences() -> list[Any]:
    return list(digits_stream(5).train_stream)[:3]


def build(resume: Path | None = None) -> Naive:
    """Naive on a 64-6-6-10 MLP, widened x2 before every experience but the first, new units
    in (V,V)/(Z,-Z) pairs, each growth's units at Variance Transfer's rate."""
    torch.manual_seed(0)
    net = mlp_net(6)
    plugins: list[Any] = [
        GrowthPlugin(EveryExperience(factor=2.0), init="vt", generator=0),
        CohortLRPlugin(rule="vt"),
    ]
    if resume is not None:
        plugins.append(ResumePlugin(resume, config={"run": "vt"}))
    return Naive(
        model=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
        train_mb_size=64,
        train_epochs=1,
        device="cpu",
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )


def cohort_plugin(strategy: Naive) -> CohortLRPlugin:
    return next(p for p in strategy.plugins if isinstance(p, CohortLRPlugin))


def resume_plugin(strategy: Naive) -> ResumePlugin:
    return next(p for p in strategy.plugins if isinstance(p, ResumePlugin))


def snapshot(strategy: Naive) -> dict[str, Any]:
    c = cohort_plugin(strategy).cohorts
    assert c is not None and c.net is strategy.model
    return {
        "params": {n: p.detach().clone() for n, p in strategy.model.named_parameters()},
        "optimizer": strategy.optimizer.state_dict()["state"],
        "cohorts": {n: t.clone() for n, t in c.cohorts.items()},
        "born": list(c.born),
        "steps": c.steps,
        "factors": c.factors(),
    }


def assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["born"] == b["born"] and a["steps"] == b["steps"] and a["factors"] == b["factors"]
    for key in ("params", "cohorts"):
        assert a[key].keys() == b[key].keys(), key
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for i, s in a["optimizer"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"][i][k]), ("optimizer", i, k)


@pytest.fixture(scope="module")
def whole(experiences) -> dict[str, Any]:
    strategy = build()
    for exp in experiences:
        strategy.train(exp)
    snap = snapshot(strategy)
    # two growths, each its own cohort with its own (non-trivial) Variance Transfer rate
    assert snap["born"][0] == 0 and len(snap["born"]) == 3
    assert all(0.0 < f != 1.0 for c, f in snap["factors"].items() if c)
    assert snap["params"]["4.weight"].shape == (10, 24)
    return snap


def test_save_run_load_run_continues_bitwise_identically(experiences, whole, tmp_path: Path):
    first = build()
    for exp in experiences[:2]:
        first.train(exp)
    saved = snapshot(first)
    assert len(saved["born"]) == 2  # one growth before the save, one after the resume
    save_run(tmp_path / "run.n2g", first, position=2, config="vt")

    torch.manual_seed(1234)  # the file's RNG state must win over the process's
    resumed = build()
    state = load_run(tmp_path / "run.n2g", resumed, config="vt")
    assert state is not None and state.position == 2
    resumed.train(experiences[2])
    assert_identical(whole, snapshot(resumed))


def test_resume_plugin_continues_bitwise_identically(experiences, whole, tmp_path: Path):
    path = tmp_path / "run.n2g"
    first = build(path)
    assert resume_plugin(first).restore(first) is None
    for exp in experiences[:2]:
        first.train(exp)  # saved at the end of each train(); then the process "dies"

    again = build(path)
    state = resume_plugin(again).restore(again)
    assert state is not None and state.position == 2
    for exp in experiences[state.position :]:
        again.train(exp)
    assert_identical(whole, snapshot(again))


def test_the_cohort_state_is_what_makes_it_identical(experiences, whole, tmp_path: Path):
    """Control: the same resume with the cohorts forgotten (every entry in cohort 0, rate 1)
    ends elsewhere, so the tests above do check the cohorts' state."""
    first = build()
    for exp in experiences[:2]:
        first.train(exp)
    save_run(tmp_path / "run.n2g", first, position=2, config="vt")
    resumed = build()
    load_run(tmp_path / "run.n2g", resumed, config="vt")
    cohort_plugin(resumed).load_state_dict({"cohorts": {"cohorts": {}, "born": [0], "steps": 0}})
    resumed.train(experiences[2])
    got = snapshot(resumed)
    assert got["born"] == [0, 0] and got["born"] != whole["born"]
    gap = max(float((whole["params"][n] - p).abs().max()) for n, p in got["params"].items())
    assert gap > 1e-3
