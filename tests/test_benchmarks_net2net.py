"""The Net2Net benchmark end to end, in its ``--quick`` size (seconds on two CPU cores)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from net2grow.benchmarks.__main__ import parse_args
from net2grow.benchmarks.data import DataUnavailableError, load_fashion_mnist

EXACT = ("net2wider", "net2wider-equal", "zero-init", "teacher-continued", "net2deeper")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """One ``--quick`` run into a temporary folder (shared by the tests of this file)."""
    try:
        load_fashion_mnist()
    except DataUnavailableError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"Fashion-MNIST is not available here: {exc}")
    from net2grow.benchmarks import net2net

    tmp = tmp_path_factory.mktemp("net2net")
    out_dir, runs_dir = tmp / "results", tmp / "runs"
    args = parse_args(
        [
            "net2net",
            "--quick",
            "--device",
            "cpu",
            "--out-dir",
            str(out_dir),
            "--runs-dir",
            str(runs_dir),
        ]
    )
    return net2net.run(args), out_dir, runs_dir


def test_quick_run_writes_results(quick_run: tuple[dict, Path, Path]) -> None:
    result, out_dir, runs_dir = quick_run
    for suffix in ("json", "md", "png"):
        path = out_dir / f"net2net.{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    assert {Path(p).name for p in result["paths"].values()} == {
        "net2net.json",
        "net2net.md",
        "net2net.png",
    }
    doc = json.loads((out_dir / "net2net.json").read_text())
    from net2grow.benchmarks.net2net import COLUMNS, variants

    keys = [v.key for v in variants(0.01)]
    assert [row["variant"] for row in doc["rows"]] == keys
    assert doc["columns"] == COLUMNS
    md = (out_dir / "net2net.md").read_text()
    for key in keys:
        assert f"| {key} |" in md
        # one TensorBoard run per variant and seed
        events = list((runs_dir / "net2net" / key / "seed0").glob("events.out.tfevents.*"))
        assert events, key


def test_every_variant_has_a_curve(quick_run: tuple[dict, Path, Path]) -> None:
    result, *_ = quick_run
    cfg = result["config"]
    assert cfg["quick"] and cfg["seeds"] == [0]
    (seed,) = result["per_seed"]
    for key, run in seed["variants"].items():
        assert run["steps"][0] == 0, key
        assert run["steps"][-1] == (
            cfg["teacher_steps"] if key == "narrow-scratch" else cfg["steps"]
        ), key
        assert len(run["accuracy"]) == len(run["steps"]) >= 2, key
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"]), key


def test_students_start_at_the_teachers_accuracy(
    quick_run: tuple[dict, Path, Path],
) -> None:
    """Function-preserving growth: step-0 accuracy equals the teacher's; random pad is not."""
    result, *_ = quick_run
    (seed,) = result["per_seed"]
    teacher = seed["teacher_accuracy"]
    assert seed["variants"]["narrow-scratch"]["accuracy"][-1] == pytest.approx(teacher, abs=1e-9)
    for key in EXACT:
        run = seed["variants"][key]
        assert run["accuracy"][0] == pytest.approx(teacher, abs=1e-9), key
        assert run["logit_change_at_0"] < 1e-4, key
        for rec in run["growth"] or []:
            assert rec["max_abs_error"] is not None and rec["max_abs_error"] < 1e-4, (key, rec)
    # random pad changes the function (its accuracy may or may not move with it)
    assert seed["variants"]["random-pad"]["logit_change_at_0"] > 1e-2
    # networks trained from scratch start near chance, far below the teacher
    for key in ("wide-scratch", "deep-scratch", "narrow-scratch"):
        assert seed["variants"][key]["accuracy"][0] < teacher, key
    # grown and scratch networks of one architecture have the same size
    summary = result["summary"]
    for key in ("net2wider", "net2wider-equal", "net2wider-equal-noise", "zero-init", "random-pad"):
        assert summary[key]["params"] == summary["wide-scratch"]["params"], key
    assert summary["net2deeper"]["params"] == summary["deep-scratch"]["params"]
    assert summary["teacher-continued"]["params"] == summary["narrow-scratch"]["params"]


def test_every_variant_logs_accuracy_loss_params_flops_and_hparams(
    quick_run: tuple[dict, Path, Path],
) -> None:
    """One TensorBoard run per variant with the same tags, read back; its settings and final
    results as an hparams session in the child run ``hparams``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    result, _, runs_dir = quick_run
    (seed,) = result["per_seed"]
    for key, run in seed["variants"].items():
        acc = EventAccumulator(str(runs_dir / "net2net" / key / "seed0"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"accuracy/test", "loss/train", "model/num_parameters",
                "model/training_flops"} <= tags, (key, tags)  # fmt: skip
        accuracy = acc.Scalars("accuracy/test")
        assert [e.step for e in accuracy] == run["steps"], key
        assert accuracy[-1].value == pytest.approx(run["accuracy"][-1], abs=1e-6), key
        assert acc.Scalars("model/num_parameters")[-1].value == run["params"], key
        flops = acc.Scalars("model/training_flops")
        assert flops[0].value == 0 and run["flops_per_step"] > 0, key
        assert flops[-1].value == pytest.approx(run["flops_per_step"] * run["steps"][-1], rel=1e-6)
        hp = EventAccumulator(str(runs_dir / "net2net" / key / "seed0" / "hparams"))
        hp.Reload()
        content = hp.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG]
        )
        assert start.hparams["variant"].string_value == key
        assert hp.Scalars("hparams/final_acc")[-1].value == pytest.approx(run["accuracy"][-1])
    # wider networks cost more per step
    per_step = {k: r["flops_per_step"] for k, r in seed["variants"].items()}
    assert per_step["net2wider"] == per_step["wide-scratch"] > per_step["teacher-continued"]


def test_quick_run_compares_every_variant_with_the_control(
    quick_run: tuple[dict, Path, Path],
) -> None:
    """The paired column is each run's final accuracy minus teacher-continued's, same seed."""
    result, out_dir, _ = quick_run
    (seed,) = result["per_seed"]
    control = seed["variants"]["teacher-continued"]["accuracy"][-1]
    rows = {row["variant"]: row for row in result["rows"]}
    assert rows["teacher-continued"]["final - control (paired)"] == "-"
    assert rows["teacher-continued"]["gap > spread"] == "-"
    for key, run in seed["variants"].items():
        if key == "teacher-continued":
            continue
        (diff,) = result["summary"][key]["final_minus_control"]
        assert diff == pytest.approx(run["accuracy"][-1] - control, abs=1e-12), key
        above = int(diff > 0)
        assert rows[key]["final - control (paired)"] == f"{diff:+.4f} ({above}/1 above)", key
        assert rows[key]["gap > spread"] == "-", key  # one seed: no spread to compare with
    md = (out_dir / "net2net.md").read_text()
    assert "| final - control (paired) | gap > spread |" in md


def test_lr_factor_cosine_runs_from_one_towards_zero() -> None:
    from net2grow.benchmarks.net2net import lr_factor

    steps = 8
    cos = [lr_factor("cosine", k, steps) for k in range(1, steps + 1)]
    assert cos[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(cos))
    assert cos[steps // 2] == pytest.approx(0.5, abs=1e-12)  # step 5 of 8: half way
    assert 0 < cos[-1] < 0.05
    assert {lr_factor("constant", k, steps) for k in range(1, steps + 1)} == {1.0}
    with pytest.raises(ValueError, match="unknown schedule 'linear'; choose one of cosine"):
        lr_factor("linear", 1, steps)


def test_train_uses_the_schedule_and_restores_the_learning_rate() -> None:
    """Every SGD step sees base LR x lr_factor; afterwards the optimizer's LR is the base."""
    import argparse

    import torch

    from net2grow.benchmarks import net2net

    seen: list[float] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    cfg = net2net.make_config(argparse.Namespace(quick=True, eval_every=2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    data = net2net.Data(x, y, x[:8], y[:8])
    net = net2net.SmallCNN()
    opt = Recording(net.parameters(), lr=0.2, momentum=0.9)
    curve = net2net.train(net, opt, data, cfg, steps=5, order_seed=0, schedule="cosine")
    assert seen == pytest.approx([0.2 * net2net.lr_factor("cosine", k, 5) for k in range(1, 6)])
    assert opt.param_groups[0]["lr"] == 0.2
    assert curve.steps == [0, 2, 4, 5]


def test_paired_gap_exceeds_the_spread_only_when_it_is_larger_than_every_spread() -> None:
    from net2grow.benchmarks.net2net import paired_gap

    # every seed +0.005..+0.008 above; finals spread 0.005 (run) and 0.0036 (control)
    gap = paired_gap([0.905, 0.910, 0.915], [0.900, 0.902, 0.907])
    assert gap.mean == pytest.approx(0.007)
    assert gap.std == pytest.approx(3e-6**0.5, rel=1e-9)
    assert gap.spread == pytest.approx(0.005)
    assert (gap.above, gap.n, gap.exceeds) == (3, 3, True)
    # the same paired gap, but the finals vary by 0.01 over seeds: within the spread
    wide = paired_gap([0.895, 0.910, 0.915], [0.890, 0.902, 0.907])
    assert wide.mean == pytest.approx(0.007) and wide.exceeds is False
    # below the control: never "exceeds", however steady
    assert paired_gap([0.90, 0.90], [0.91, 0.91]).exceeds is False
    one = paired_gap([0.9], [0.8])
    assert (one.std, one.exceeds) == (0.0, None)
    with pytest.raises(ValueError, match="one final accuracy per seed for both runs, got 2 and 1"):
        paired_gap([0.9, 0.8], [0.8])


def test_config_refuses_bad_schedule_and_teacher_width() -> None:
    from net2grow.benchmarks import net2net

    args = parse_args(["net2net", "--quick", "--teacher-width", "4", "0", "32"])
    with pytest.raises(ValueError, match=r"--teacher-width: need three widths >= 1, got \(4, 0"):
        net2net.make_config(args)
    with pytest.raises(SystemExit):
        parse_args(["net2net", "--schedule", "linear"])
    cfg = net2net.make_config(parse_args(["net2net", "--teacher-width", "8", "16", "64"]))
    assert (cfg.teacher_width, cfg.schedule) == ((8, 16, 64), "cosine")
    assert (cfg.steps, cfg.teacher_steps) == (net2net.FULL["steps"], net2net.FULL["teacher_steps"])


def test_comparison_line_states_the_verdict() -> None:
    from net2grow.benchmarks.net2net import comparison_line

    summary = {
        "teacher-continued": {
            "final_accuracy": [0.900, 0.902, 0.907],
            "final_minus_control": [None, None, None],
        },
        "net2wider": {
            "final_accuracy": [0.905, 0.910, 0.915],
            "final_minus_control": [0.005, 0.008, 0.008],
        },
    }
    assert comparison_line(summary) == (
        "net2wider - teacher-continued, final accuracy: +0.0070 ± 0.0017 (paired over 3 seeds, "
        "above in 3/3); largest spread 0.0050; gap exceeds the spread: yes"
    )
    assert comparison_line(summary, "teacher-continued") == "teacher-continued is the control"
