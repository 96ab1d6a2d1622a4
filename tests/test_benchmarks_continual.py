"""The continual-learning comparison end to end, in its ``--quick`` size on split-digits: the
results, the files the help says it writes, and one TensorBoard run per method read back."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import subprocess
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from net2grow.benchmarks import __main__ as cli
from net2grow.benchmarks.__main__ import parse_args
from net2grow.benchmarks.continual import (
    forgetting,
    forgetting_after,
    tensorboard_command,
)
from net2grow.benchmarks.schedule import width_schedule

METHODS = "naive-small,naive-large,joint,grow-naive,grow-replay"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path, str]:
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
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = continual.run(args)
    return result, out_dir, runs_dir, printed.getvalue()


def _runs(result: dict, method: str) -> list[dict]:
    return [r for r in result["runs"] if r["method"] == method]


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_outputs_written(quick_run) -> None:
    _, out_dir, runs_dir, _ = quick_run
    payload = json.loads((out_dir / "continual-split-digits-class.json").read_text())
    assert {row["method"] for row in payload["rows"]} == set(METHODS.split(","))
    assert (out_dir / "continual-split-digits-class.md").read_text().count("|") > 20
    # exactly the files the help lists, one TensorBoard run per method (and seed)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "continual-split-digits-class-curves.png",
        "continual-split-digits-class.json",
        "continual-split-digits-class.md",
        "continual-split-digits-class.png",
    ]
    for name in ("continual-split-digits-class.png", "continual-split-digits-class-curves.png"):
        assert (out_dir / name).stat().st_size > 10_000, name
    tb_root = runs_dir / "continual" / "split-digits-class"
    assert sorted(p.name for p in tb_root.iterdir()) == sorted(
        f"{m}-s0" for m in METHODS.split(",")
    )


def test_every_method_logs_the_same_tags_to_tensorboard(quick_run) -> None:
    """One ``tensorboard --logdir runs`` compares all methods: each run has accuracy (per
    experience, stream, against FLOPs), forgetting, loss, parameters, FLOPs and widths, with
    the values of the results table."""
    result, _, runs_dir, _ = quick_run
    tb_root = runs_dir / "continual" / "split-digits-class"
    for method in METHODS.split(","):
        (run,) = _runs(result, method)
        tb = _scalars(tb_root / f"{method}-s0")
        for tag in (
            "Accuracy/stream",
            "Accuracy/exp_000",
            "Accuracy/exp_004",
            "Accuracy_vs_FLOPs/stream",
            "Forgetting/stream",
            "Loss/train",
            "Loss/train_epoch",
            "Model/num_parameters",
            "Model/training_flops",
            "Model/width/hidden1",
            "Model/width/hidden2",
        ):
            assert tb.get(tag), (method, tag, sorted(tb))
        steps = len(run["matrix"])
        accs = tb["Accuracy/stream"]
        assert len(accs) == steps and accs[-1][0] == 5, method  # step: experiences trained
        assert accs[-1][1] == pytest.approx(run["final_acc"], abs=1e-6), method
        assert tb["Accuracy/exp_003"][-1][1] == pytest.approx(run["matrix"][-1][3], abs=1e-6)
        assert tb["Forgetting/stream"][-1][1] == pytest.approx(run["forgetting"], abs=1e-6)
        assert tb["Accuracy_vs_FLOPs/stream"][-1][0] == run["flops"], method
        flops = [v for _, v in tb["Model/training_flops"]]
        assert flops == sorted(flops) and flops[0] > 0, method
        assert flops[-1] == pytest.approx(run["flops"], rel=1e-6), method
        assert tb["Model/num_parameters"][-1][1] == run["params"], method
        assert [v for _, v in tb["Model/width/hidden2"]][-1] == run["widths"][1], method
        losses = [v for _, v in tb["Loss/train"]]
        assert len(losses) > 10 and all(0 < v < 10 for v in losses), method
        # the run's settings and results: a TensorBoard hparams session in the child run
        hp = EventAccumulator(str(tb_root / f"{method}-s0" / "hparams"))
        hp.Reload()
        content = hp.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
        start = hparams_metadata.parse_session_start_info_plugin_data(
            content[hparams_metadata.SESSION_START_INFO_TAG]
        )
        assert start.hparams["method"].string_value == method
        assert start.hparams["large"].number_value == 64
        assert start.hparams["lr"].number_value == pytest.approx(1e-3)
        final = hp.Scalars("hparams/final_acc")[-1].value
        assert final == pytest.approx(run["final_acc"], abs=1e-6)


def test_growing_runs_log_their_growth_events(quick_run) -> None:
    _, _, runs_dir, _ = quick_run
    tb = _scalars(runs_dir / "continual" / "split-digits-class" / "grow-naive-s0")
    widths = [v for _, v in tb["Model/width/hidden1"]]
    assert widths[0] == 16 and widths[-1] == 64 and widths == sorted(widths)
    assert [v for _, v in tb["Growth/event/3/new_width"]] == [23, 32, 45, 64]
    assert [v for _, v in tb["Growth/event/3/old_width"]] == [16, 23, 32, 45]
    errors = [v for _, v in tb["Growth/event/1/max_abs_error"]]
    assert len(errors) == 4 and all(0 <= v < 1e-4 for v in errors)
    assert len(tb["Growth/event/1/seconds"]) == 4
    # the parameter count steps at each growth (old and new count at the same iteration)
    params = tb["Model/num_parameters"]
    grown_at = [s for s, _ in tb["Growth/event/1/new_width"]]
    for step in grown_at:
        at = [v for s, v in params if s == step]
        assert len(at) == 2 and at[0] < at[1], (step, at)


def test_growing_models_end_exactly_at_the_large_size(quick_run) -> None:
    result, _, _, printed = quick_run
    large = _runs(result, "naive-large")[0]
    small = _runs(result, "naive-small")[0]
    assert small["widths"] == [16, 16] and large["widths"] == [64, 64]
    for method in ("grow-naive", "grow-replay"):
        (run,) = _runs(result, method)
        assert run["widths"] == [64, 64], method
        assert run["params"] == large["params"], method
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["grow-naive"]["hidden"] == "16->64" and rows["grow-naive"]["widths"] == "64/64"
    assert rows["naive-small"]["widths"] == "16/16"
    table = printed[printed.index("method ") :]
    assert "widths" in table.splitlines()[0]


def test_compute_is_counted_and_growth_saves_it(quick_run) -> None:
    result, *_ = quick_run
    flops = {m: _runs(result, m)[0]["flops"] for m in METHODS.split(",")}
    assert all(f > 0 for f in flops.values())
    # same data and epochs: a model that is small for most of the stream costs less
    assert flops["naive-small"] < flops["grow-naive"] < flops["naive-large"]


def test_joint_training_beats_naive_fine_tuning(quick_run) -> None:
    result, *_ = quick_run
    joint = _runs(result, "joint")[0]
    naive = _runs(result, "naive-large")[0]
    assert len(joint["matrix"]) == 1 and len(naive["matrix"]) == 5
    assert joint["final_acc"] > naive["final_acc"] + 0.1


def test_last_line_starts_tensorboard_without_the_venv(quick_run) -> None:
    _, _, runs_dir, printed = quick_run
    last = printed.strip().splitlines()[-1]
    assert last == f"TensorBoard: {tensorboard_command(str(runs_dir))}"
    exe, *rest = shlex.split(last.removeprefix("TensorBoard: "))
    assert rest == ["--logdir", str(runs_dir)]
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_tensorboard_command_is_relative_to_the_checkout(monkeypatch) -> None:
    venv_python = REPO / ".venv" / "bin" / "python"
    if not (REPO / ".venv" / "bin" / "tensorboard").exists():
        pytest.skip("no .venv with tensorboard in this checkout")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr("sys.executable", str(venv_python))
    assert tensorboard_command("runs") == ".venv/bin/tensorboard --logdir runs"


def test_width_schedule_ends_exactly_at_large() -> None:
    assert width_schedule(16, 64, 4) == [16, 23, 32, 45, 64]
    for small, large, growths in [(16, 64, 9), (6, 12, 4), (16, 17, 4), (10, 10, 3), (3, 100, 1)]:
        widths = width_schedule(small, large, growths)
        assert len(widths) == growths + 1 and widths[0] == small and widths[-1] == large
        assert widths == sorted(widths)
    assert width_schedule(16, 64, 0) == [16]  # one experience: no growth
    with pytest.raises(ValueError):
        width_schedule(64, 16, 4)


def test_task_incremental_growth_and_pnn_widths(tmp_path: Path) -> None:
    """Multi-head models grow to exactly --large too (no parameter cap there: heads come as
    tasks arrive); PNN logs the same tags, its width summed over its columns."""
    from net2grow.benchmarks import continual

    args = parse_args([
        "continual", "--device", "cpu", "--scenario", "task", "--experiences", "5",
        "--epochs", "1", "--train-per-exp", "48", "--mb-size", "16", "--small", "6",
        "--large", "12", "--seeds", "0", "--methods", "naive-large,pnn,grow-naive",
        "--out-dir", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs"),
    ])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        result = continual.run(args)
    runs = {r["method"]: r for r in result["runs"]}
    assert runs["grow-naive"]["widths"] == [12, 12]
    assert runs["grow-naive"]["params"] == runs["naive-large"]["params"]
    assert runs["pnn"]["widths"] == [30, 30]  # 5 columns of 6
    tb = _scalars(tmp_path / "runs" / "continual" / "split-digits-task" / "pnn-s0")
    assert [v for _, v in tb["Model/width/hidden1"]][-1] == 30
    assert tb["Accuracy/stream"] and tb["Model/training_flops"] and tb["Loss/train"]


def test_forgetting_measure() -> None:
    matrix = [[0.9, 0.0], [0.5, 0.8]]
    assert forgetting(matrix) == pytest.approx(0.4)
    assert forgetting([[0.7, 0.6]]) == 0.0
    three = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.1], [0.3, 0.5, 0.9]]
    assert forgetting_after(three, 0) == 0.0
    assert forgetting_after(three, 1) == pytest.approx(0.3)
    assert forgetting_after(three, 2) == pytest.approx(forgetting(three))


def test_help_gives_every_default_and_the_files_written(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["continual", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "--epochs EPOCHS training epochs per experience (default: 8 on split-digits, 2 on the "
        "Fashion-MNIST streams; --quick: 1)",
        "--lr LR Adam learning rate (default: 0.001)",
        "(default: 5 for split-digits and split-fmnist, 10 for permuted-fmnist)",
        "variants' start (default: 16)",
        "exact final width (default: 64)",
        "--data-root DATA_ROOT folder with Fashion-MNIST's IDX files",
        "default: none, read Debian's /usr/share/datasets/fashion-mnist",
        "(default: the fixed and grow-<base> methods but pnn, which needs --scenario task, plus "
        "grow-replay-vtinit and expand: naive-small,naive-large,ewc,lwf,replay,joint,grow-naive,"
        "grow-replay,grow-ewc,grow-replay-vtinit,expand)",
        "--model {mlp,cnn} model family",
        "results/continual-<stream>-<scenario>-curves.png",
        "runs/continual/<stream>-<scenario>/<method>-s<seed>/",
    ):
        assert expected in text, expected
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for expected in (
        "results/continual-<stream>-<scenario>.json",
        "results/net2net.json, .md, .png",
        "runs/net2net/<variant>/seed<seed>/",
        "results/speed.json, .md, .png",
        "runs/speed/<date-time>/",
        ".venv/bin/tensorboard --logdir runs",
    ):
        assert expected in text, expected


def test_cnn_family_grows_to_the_large_width_and_counts_memory(tmp_path: Path) -> None:
    from net2grow.benchmarks import continual

    args = parse_args(
        ["continual", "--quick", "--device", "cpu", "--model", "cnn", "--methods",
         "replay,grow-replay", "--small", "4", "--large", "8", "--out-dir",
         str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        result = continual.run(args)
    fixed, grown = (_runs(result, m)[0] for m in ("replay", "grow-replay"))
    assert fixed["widths"] == grown["widths"] == [8, 8]  # two conv layers, exactly --large
    assert grown["params"] == fixed["params"]
    # MEMO-style memory: 4 bytes per parameter + the replay buffer's 64-pixel digits images
    buffer = (fixed["memory_bytes"] - 4 * fixed["params"]) // 64
    assert 0 < buffer <= 200 and (fixed["memory_bytes"] - 4 * fixed["params"]) % 64 == 0
    assert grown["flops"] < fixed["flops"]  # trained narrower for most of the stream


def test_cnn_family_unflattens_flat_square_inputs() -> None:
    import torch

    from net2grow.benchmarks.models import cnn, image_shape

    assert image_shape((64,)) == (1, 8, 8) and image_shape((1, 28, 28)) == (1, 28, 28)
    with pytest.raises(ValueError, match="flat square"):
        image_shape((63,))
    x = torch.rand(3, 64)
    model = cnn((64,), 5, 10)
    assert model(x).shape == (3, 10)
    reference = model[1:](x.view(3, 1, 8, 8))  # the same net on the image form
    torch.testing.assert_close(model(x), reference)
