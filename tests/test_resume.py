"""Resuming growing runs (strategies.resume, ``python -m net2grow.benchmarks continual --resume``).

The acceptance test kills benchmark runs with SIGKILL at random moments (seeded) and checks that
the resumed runs end bitwise identical to an uninterrupted one: accuracies, compute, parameter
counts, and the final network, optimizer and plugin state. The children are forked from this
process once Avalanche is imported, so each restart costs milliseconds instead of seconds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from net2grow.growth import GrowableNetwork, GrowthError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream():
    from net2grow.benchmarks.data import make_stream

    return make_stream("split-digits", n_experiences=5, seed=0, train_per_exp=48)


def _mlp(hidden: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip


def _growing(*, generator: Any = 0, replay: bool = True, lwf: bool = True, plain: bool = False):
    """A small Growing strategy: mid-experience growth (OnPlateau), replay, LwF."""
    from avalanche.training.plugins import EvaluationPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive

    from net2grow.strategies import Growing
    from net2grow.strategies.policies import OnPlateau

    torch.manual_seed(0)
    plugins = []
    if replay:
        plugins.append(ReplayPlugin(mem_size=30))
    if lwf:
        plugins.append(LwFPlugin())
    common = dict(
        train_mb_size=16,
        train_epochs=1,
        device="cpu",
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if plain:
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), **common)
    net = GrowableNetwork(_mlp(), torch.zeros(2, 64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    policy = OnPlateau(patience=1, min_delta=10.0, factor=1.5, max_growths=1)
    return Growing(net, opt, policy=policy, growth_options={"generator": generator}, **common)


def _snapshot(strategy: Any) -> dict[str, Any]:
    """Everything that decides how training continues, as comparable values."""
    from avalanche.training.plugins import LwFPlugin, ReplayPlugin

    from net2grow.strategies import GrowthPlugin

    snap: dict[str, Any] = {
        "model_id": id(strategy.model),
        "params": {n: p.detach().clone() for n, p in strategy.model.named_parameters()},
        "optimizer": strategy.optimizer.state_dict(),
        "clock": dict(vars(strategy.clock)),
        "rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }
    for p in strategy.plugins:
        if isinstance(p, GrowthPlugin):
            snap["growth"] = p.state_dict()
        if isinstance(p, ReplayPlugin):
            buf = p.storage_policy.buffer
            snap["replay"] = [(buf[i][0].clone(), buf[i][1], buf[i][2]) for i in range(len(buf))]
        if isinstance(p, LwFPlugin):
            prev = p.lwf.prev_model
            snap["lwf"] = None if prev is None else prev.state_dict()
    return snap


def _timed(key: Any) -> bool:
    return isinstance(key, str) and "seconds" in key


def _untimed(value: Any) -> Any:
    """``value`` without wall times (growth events' and metrics' seconds): the only values a
    resumed run may not repeat."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, (list, tuple)):
        kept = [v for v in value if not (isinstance(v, list) and v and _timed(v[0]))]
        return type(value)(_untimed(v) for v in kept)
    if hasattr(value, "to_dict"):  # GrowthEvent
        return _untimed(value.to_dict())
    return value


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    a, b = _untimed(a), _untimed(b)
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _train(strategy: Any, experiences: Any) -> None:
    from net2grow.benchmarks.continual import evaluate

    for exp in experiences:
        strategy.train(exp)
        evaluate(strategy.model, [exp], "cpu")


# --------------------------------------------------------------------------------------------
# library API
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plain", [False, True], ids=["growable", "plain-model"])
def test_save_load_continue_is_bitwise_identical(stream, tmp_path: Path, plain: bool) -> None:
    from net2grow.strategies.resume import load_run, save_run

    bench, _ = stream
    exps = list(bench.train_stream)[:3]
    whole = _growing(plain=plain)
    _train(whole, exps)

    first = _growing(plain=plain)
    _train(first, exps[:2])
    save_run(tmp_path / "run.n2g", first, position=2, results={"acc": [0.5, 0.25]}, config="a")
    if not plain:  # the policy grew the network mid-experience
        assert any(e.phase == "mid_experience" for e in first.plugins[0].events)
    torch.manual_seed(1234)  # the file's RNG state must win over whatever the process holds
    resumed = _growing(plain=plain)
    state = load_run(tmp_path / "run.n2g", resumed, config="a")
    assert state is not None and state.position == 2 and state.results == {"acc": [0.5, 0.25]}
    _train(resumed, exps[state.position :])
    a, b = _snapshot(whole), _snapshot(resumed)
    a.pop("model_id"), b.pop("model_id")
    _assert_same(a, b)


def test_damaged_file_is_refused_and_nothing_changes(stream, tmp_path: Path) -> None:
    from net2grow.strategies.resume import load_run, save_run

    bench, _ = stream
    first = _growing()
    _train(first, list(bench.train_stream)[:2])
    path = tmp_path / "run.n2g"
    save_run(path, first, position=2, config="a")
    data = path.read_bytes()

    target = _growing()
    _train(target, list(bench.train_stream)[:1])  # some state to keep
    before = _snapshot(target)
    damaged = {
        "truncated": data[: len(data) // 2],
        "flipped byte": data[:-100] + bytes([data[-100] ^ 0x01]) + data[-99:],
        "empty": b"",
    }
    for what, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(GrowthError):
            load_run(path, target, config="a")
        _assert_same(before, _snapshot(target), what)


def test_file_of_another_run_is_refused(stream, tmp_path: Path) -> None:
    from net2grow.strategies.resume import ResumeMismatchError, load_run, save_run

    bench, _ = stream
    first = _growing()
    _train(first, list(bench.train_stream)[:1])
    path = tmp_path / "run.n2g"
    save_run(path, first, position=1, config={"lr": 0.01, "seeds": [0, 1]})
    target = _growing()
    before = _snapshot(target)
    with pytest.raises(ResumeMismatchError, match=r"other arguments(.|\n)*lr: saved 0.01, now 0.1"):
        load_run(path, target, config={"lr": 0.1, "seeds": [0, 1]})
    with pytest.raises(ResumeMismatchError, match="plugins"):  # built without LwF
        load_run(path, _growing(lwf=False), config={"lr": 0.01, "seeds": [0, 1]})
    # refused by the growth plugin's load_state_dict, the first step that changes anything
    no_generator = _growing(generator=None)
    kept = _snapshot(no_generator)
    with pytest.raises(ResumeMismatchError, match="generator"):
        load_run(path, no_generator, config={"lr": 0.01, "seeds": [0, 1]})
    _assert_same(kept, _snapshot(no_generator))
    _assert_same(before, _snapshot(target))


def test_resume_plugin(stream, tmp_path: Path) -> None:
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from net2grow.strategies.resume import ResumePlugin, read_run

    bench, _ = stream
    exps = list(bench.train_stream)[:2]

    def build(path: Path) -> tuple[Any, ResumePlugin]:
        from avalanche.evaluation.metrics import accuracy_metrics

        torch.manual_seed(0)
        model = _mlp()
        resume = ResumePlugin(path, config={"run": 1})
        strategy = Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            train_mb_size=16,
            device="cpu",
            plugins=[resume],
            evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        )
        return strategy, resume

    whole, resume = build(tmp_path / "whole.n2g")
    assert resume.restore(whole) is None
    for exp in exps:
        whole.train(exp)
        whole.eval(bench.test_stream[:1])
    assert read_run(tmp_path / "whole.n2g").results == {"phase": "eval"}

    part, resume = build(tmp_path / "part.n2g")
    resume.restore(part)
    part.train(exps[0])  # killed before its evaluation
    assert read_run(tmp_path / "part.n2g").results == {"phase": "train"}
    again, resume = build(tmp_path / "part.n2g")
    state = resume.restore(again)
    assert state is not None and state.position == 1 and state.results["phase"] == "train"
    again.eval(bench.test_stream[:1])
    for exp in exps[state.position :]:
        again.train(exp)
        again.eval(bench.test_stream[:1])
    a, b = _snapshot(whole), _snapshot(again)
    a.pop("model_id"), b.pop("model_id")
    _assert_same(a, b)
    name = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    _assert_same(
        whole.evaluator.get_all_metrics()[name], again.evaluator.get_all_metrics()[name], name
    )


def test_plain_data_round_trip() -> None:
    from net2grow.strategies.policies import Deepen, Widen
    from net2grow.strategies.resume import decode_state, encode_state

    value = {
        "a": (1, 2.5, None, "x"),
        "s": {(0, 1), (2, 3)},
        3: frozenset({1}),
        "__x": [torch.arange(3), np.arange(2), np.float32(1.5)],
        "actions": [Widen("fc", factor=1.5), Deepen("fc", kind="residual")],
        "size": torch.Size([2, 3]),
    }
    back = decode_state(encode_state(value))
    assert back["a"] == value["a"] and back["s"] == value["s"] and back[3] == value[3]
    assert torch.equal(back["__x"][0], value["__x"][0])
    assert np.array_equal(back["__x"][1], value["__x"][1]) and back["__x"][2] == 1.5
    assert back["actions"] == value["actions"] and back["size"] == torch.Size([2, 3])
    with pytest.raises(GrowthError, match=r"cannot save results\['f'\]"):
        encode_state({"f": lambda: 0}, "results")


# --------------------------------------------------------------------------------------------
# the benchmark, killed with SIGKILL at random moments
# --------------------------------------------------------------------------------------------

ARGS = [
    "continual",
    "--device", "cpu",
    "--experiences", "5",
    "--epochs", "2",
    "--train-per-exp", "48",
    "--mb-size", "16",
    "--small", "6",
    "--large", "12",
    "--seeds", "0", "1",
    "--methods", "naive-small,grow-ewc,grow-replay",
]  # fmt: skip


def _argv(tmp: Path, tag: str) -> list[str]:
    return [
        *ARGS,
        "--out-dir", str(tmp / f"out-{tag}"),
        "--runs-dir", str(tmp / f"runs-{tag}"),
        "--resume", str(tmp / f"{tag}.n2g"),
    ]  # fmt: skip


@pytest.fixture
def fork_safe_tqdm():
    """tqdm's default lock holds a multiprocessing semaphore, which forked children share: a
    child killed while holding it would leave this process's next tqdm call (or its monitor
    thread) blocked forever. Give tqdm a thread-only lock and no monitor thread meanwhile."""
    from tqdm import tqdm

    interval, had_lock = tqdm.monitor_interval, "_lock" in vars(tqdm)
    old_lock = vars(tqdm).get("_lock")
    tqdm.monitor_interval = 0
    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
    tqdm.set_lock(threading.RLock())
    yield
    tqdm.monitor_interval = interval
    if had_lock:
        tqdm.set_lock(old_lock)
    else:
        del tqdm._lock


def _fork_main(argv: list[str], log: Path) -> int:
    """Run ``python -m net2grow.benchmarks argv`` in a forked child (Avalanche already imported)."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    try:
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())  # this child's own (see fork_safe_tqdm)
        out = open(log, "a", buffering=1)  # noqa: SIM115 (the child exits below)
        sys.stdout = sys.stderr = out
        warnings.simplefilter("ignore")
        from net2grow.benchmarks.__main__ import main

        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


#: Hang guard for a child run (each takes seconds); generous so slow machines do not trip it.
_HANG_GUARD_S = 600.0


def _wait(pid: int, timeout: float = _HANG_GUARD_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("a benchmark child ran past its time limit")


def _run_until_killed(argv: list[str], path: Path, log: Path, saves: int, delay: float) -> bool:
    """Start a run; SIGKILL it ``delay`` seconds after it has replaced the resume file
    ``saves`` times. True when it was killed, False when it finished first."""
    pid = _fork_main(argv, log)
    seen, last = 0, _signature(path)
    deadline = time.monotonic() + _HANG_GUARD_S
    while seen < saves:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"a benchmark child stopped saving: {log.read_text()}")
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log.read_text()
            return False
        now = _signature(path)
        if now != last:
            seen, last = seen + 1, now
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    status = _wait(pid)
    if os.WIFEXITED(status):  # finished during the delay
        assert os.WEXITSTATUS(status) == 0, log.read_text()
        return False
    return True


def _results(tmp: Path, tag: str) -> list[dict[str, Any]]:
    payload = json.loads((tmp / f"out-{tag}" / "continual-split-digits-class.json").read_text())
    runs = payload["runs"]
    for r in runs:
        r.pop("seconds")  # wall time: the only thing allowed to differ
    return runs


def test_killed_benchmark_resumes_bitwise_identical(tmp_path: Path, fork_safe_tqdm) -> None:
    import avalanche.training  # noqa: F401  (warm imports before forking)
    import matplotlib.pyplot  # noqa: F401

    import net2grow.benchmarks.continual
    import net2grow.strategies.resume  # noqa: F401
    from net2grow.growth import load_checkpoint
    from net2grow.strategies.resume import read_run

    sys.stdout.flush(), sys.stderr.flush()
    ref_log = tmp_path / "ref.log"
    status = _wait(_fork_main(_argv(tmp_path, "ref"), ref_log))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, ref_log.read_text()
    reference = _results(tmp_path, "ref")
    assert len(reference) == 6

    rng = random.Random(20240607)
    kills = mid_method = 0
    for trial in range(3):
        tag = f"trial{trial}"
        path, log = tmp_path / f"{tag}.n2g", tmp_path / f"{tag}.log"
        for _ in range(2):  # killed twice, then left to finish
            saves, delay = rng.randint(1, 12), rng.uniform(0.0, 0.25)
            if path.exists():
                mid_method += read_run(path).results["current"] is not None
            kills += _run_until_killed(_argv(tmp_path, tag), path, log, saves, delay)
        if path.exists():
            mid_method += read_run(path).results["current"] is not None
        status = _wait(_fork_main(_argv(tmp_path, tag), log))
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, log.read_text()
        assert _results(tmp_path, tag) == reference, f"trial {trial}: {log.read_text()}"
        # the file ends holding the last run's whole state: network, optimizer, plugins, RNG
        ref, got = load_checkpoint(tmp_path / "ref.n2g"), load_checkpoint(path)
        _assert_same(ref.network.state_dict(), got.network.state_dict(), "network")
        _assert_same(ref.optimizer_state, got.optimizer_state, "optimizer")
        _assert_same(ref.extra["strategy"], got.extra["strategy"], "strategy")
        _assert_same(ref.extra["rng"], got.extra["rng"], "rng")
    print(f"resume test: {kills} kills, {mid_method} restarts mid-method")
    assert kills >= 3, "the children finished before they could be killed"
    assert mid_method >= 1, "no restart continued a method mid-way"


def test_cli_refuses_a_file_of_other_arguments(tmp_path: Path) -> None:
    from net2grow.benchmarks.__main__ import main
    from net2grow.strategies.resume import save_run

    path = tmp_path / "run.n2g"
    save_run(path, position=0, results={"finished": [], "current": None}, config={"x": 1})
    with pytest.raises(SystemExit) as exc:
        main([*_argv(tmp_path, "x")[:-1], str(path)])
    message = str(exc.value.code)
    assert "other arguments" in message and str(path) in message
    assert "x: saved 1, now absent" in message and "seeds: not saved, now [0, 1]" in message
    path.write_bytes(path.read_bytes()[:-10])  # damaged
    with pytest.raises(SystemExit, match="corrupt"):
        main([*_argv(tmp_path, "x")[:-1], str(path)])


def test_task_incremental_benchmark_resumes_identical(tmp_path: Path, monkeypatch) -> None:
    """Task labels, multi-head networks (heads added as tasks arrive), replay over several
    tasks: interrupted right after a save, then resumed in this process."""
    from net2grow.benchmarks import continual
    from net2grow.benchmarks.__main__ import main
    from net2grow.growth import load_checkpoint
    from net2grow.strategies.resume import read_run

    argv = [
        "continual", "--device", "cpu", "--scenario", "task", "--experiences", "5",
        "--epochs", "1", "--train-per-exp", "48", "--mb-size", "16", "--small", "6",
        "--large", "12", "--seeds", "0", "--methods", "ewc,grow-replay",
    ]  # fmt: skip

    def args(tag: str) -> list[str]:
        out = ["--out-dir", str(tmp_path / f"out-{tag}"), "--runs-dir", str(tmp_path / "runs")]
        return [*argv, *out, "--resume", str(tmp_path / f"{tag}.n2g")]

    assert main(args("ref")) == 0
    real_save, saves = continual.RunFile.save, []

    def save_then_crash(self, *a: Any, **k: Any) -> None:
        real_save(self, *a, **k)
        saves.append(1)
        if len(saves) == 9:  # ewc done (6 saves), grow-replay after its third experience
            raise KeyboardInterrupt

    monkeypatch.setattr(continual.RunFile, "save", save_then_crash)
    assert main(args("res")) == 130
    state = read_run(tmp_path / "res.n2g")
    assert state.position == 3 and state.results["current"]["method"] == "grow-replay"
    monkeypatch.setattr(continual.RunFile, "save", real_save)
    assert main(args("res")) == 0

    def results(tag: str) -> list[dict[str, Any]]:
        payload = json.loads(
            (tmp_path / f"out-{tag}" / "continual-split-digits-task.json").read_text()
        )
        return [{k: v for k, v in r.items() if k != "seconds"} for r in payload["runs"]]

    assert results("res") == results("ref")
    ref, got = load_checkpoint(tmp_path / "ref.n2g"), load_checkpoint(tmp_path / "res.n2g")
    assert type(got.network).__name__ == "MultiTaskGrowableNetwork"
    _assert_same(ref.network.state_dict(), got.network.state_dict(), "network")
    _assert_same(ref.extra["strategy"], got.extra["strategy"], "strategy")
