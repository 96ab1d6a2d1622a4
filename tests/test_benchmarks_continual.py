"""The continual-learning comparison end to end, in its ``--quick`` size on split-digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from net2grow.benchmarks.__main__ import parse_args
from net2grow.benchmarks.continual import forgetting

METHODS = "naive-small,naive-large,joint,grow-naive,grow-replay"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    from net2grow.benchmarks import continual

    tmp = tmp_path_factory.mktemp("continual")
    out_dir, runs_dir = tmp / "results", tmp / "runs"
    args = parse_args(
        [
            "continual",
            "--quick",
            "--device",
            "cpu",
            "--methods",
            METHODS,
            "--epochs",
            "2",
            "--out-dir",
            str(out_dir),
            "--runs-dir",
            str(runs_dir),
        ]
    )
    return continual.run(args), out_dir, runs_dir


def _runs(result: dict, method: str) -> list[dict]:
    return [r for r in result["runs"] if r["method"] == method]


def test_outputs_written(quick_run) -> None:
    _, out_dir, runs_dir = quick_run
    payload = json.loads((out_dir / "continual-split-digits-class.json").read_text())
    assert {row["method"] for row in payload["rows"]} == set(METHODS.split(","))
    assert (out_dir / "continual-split-digits-class.md").read_text().count("|") > 20
    assert (out_dir / "continual-split-digits-class.png").stat().st_size > 1000
    # the growing runs log growth to TensorBoard
    assert list(runs_dir.rglob("events.out.tfevents.*"))


def test_growing_model_ends_between_small_and_large(quick_run) -> None:
    result, _, _ = quick_run
    small = _runs(result, "naive-small")[0]["params"]
    large = _runs(result, "naive-large")[0]["params"]
    for method in ("grow-naive", "grow-replay"):
        grown = _runs(result, method)[0]["params"]
        assert small < grown <= large, (method, small, grown, large)


def test_compute_is_counted_and_growth_saves_it(quick_run) -> None:
    result, _, _ = quick_run
    flops = {m: _runs(result, m)[0]["flops"] for m in METHODS.split(",")}
    assert all(f > 0 for f in flops.values())
    # same data and epochs: a model that is small for most of the stream costs less
    assert flops["naive-small"] < flops["grow-naive"] < flops["naive-large"]


def test_joint_training_beats_naive_fine_tuning(quick_run) -> None:
    result, _, _ = quick_run
    joint = _runs(result, "joint")[0]
    naive = _runs(result, "naive-large")[0]
    assert len(joint["matrix"]) == 1 and len(naive["matrix"]) == 5
    assert joint["final_acc"] > naive["final_acc"] + 0.1


def test_forgetting_measure() -> None:
    matrix = [[0.9, 0.0], [0.5, 0.8]]
    assert forgetting(matrix) == pytest.approx(0.4)
    assert forgetting([[0.7, 0.6]]) == 0.0
