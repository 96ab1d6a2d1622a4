"""``python -m net2grow.benchmarks continual``: growing models against Avalanche's baselines.

Every method trains the same model family (``--model``: an MLP or a small CNN,
:mod:`benchmarks.models`) with the same optimizer, epochs and minibatch size on the same stream.
Fixed models are either *small* (the growing models' starting size) or *large* (their
final-size budget); the growing variants start small and, before each experience but the first,
widen every hidden layer to the next width of a geometric schedule from ``--small`` to
``--large`` whose last step is exactly ``--large`` (:func:`schedule.width_schedule`), so that
they end at the large model's size. The methods, growth variants (:mod:`benchmarks.variants`)
and expansion methods (:mod:`benchmarks.expansion`) are built in :mod:`benchmarks.methods`.
Reported per method: final average accuracy, average forgetting, final hidden widths and
parameter count, memory (parameters plus replay buffer, MEMO-style), training compute (FLOPs
counted by ``torch.utils.flop_counter`` over every ``strategy.train()`` call, see
:func:`strategies.metrics.training_flops_metric`) and wall time, over several seeds.

Written: ``<out-dir>/continual-<stream>-<scenario>.json`` and ``.md`` (the table), ``.png``
(accuracy against compute, mean ± std over seeds and every seed's point) and
``-curves.png`` (accuracy on each experience as the stream is learned), and one TensorBoard run
per method and seed, ``<runs-dir>/continual/<stream>-<scenario>/<method>-s<seed>``, with the
same tags for every method (:data:`TB_TAGS`) and the run's settings as TensorBoard hparams.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..growth import GrowthError
from .methods import (
    FIXED,
    GROWING,
    GROWING_BASES,
    Setting,
    all_methods,
    expansion_names,
    hidden_setting,
    is_growing,
    make_strategy,
    variant_names,
)
from .models import FAMILIES, count_params, hidden_widths, memory_bytes, replay_samples

COLUMNS = [
    "method", "hidden", "widths", "final_acc", "forgetting", "params", "memory_kb", "gflops",
    "seconds",
]  # fmt: skip
#: every fixed and plain grow-* method but pnn (task-incremental only), the recommended growth
#: variant and the DER-style expansion
DEFAULT_METHODS = (
    *(m for m in (*FIXED, *GROWING) if m != "pnn"),
    "grow-replay-vtinit",
    "expand",
)

#: TensorBoard tags every run of every method has (scalars, plotted against the step named).
TB_TAGS = {
    "Accuracy/stream": "mean test accuracy over the whole stream; step: experiences trained",
    "Accuracy/exp_<k>": "test accuracy on experience k; step: experiences trained",
    "Accuracy_vs_FLOPs/stream": "Accuracy/stream; step: training FLOPs so far",
    "Forgetting/stream": "mean drop from best to current accuracy over the experiences trained "
    "before the last one; step: experiences trained",
    "Loss/train": "training loss of each minibatch (penalties included); step: iteration",
    "Loss/train_epoch": "mean training loss of each epoch; step: iteration",
    "Model/num_parameters": "parameter count; step: iteration",
    "Model/training_flops": "training FLOPs so far; step: iteration",
    "Model/width/hidden<i>": "width of hidden layer i (PNN: summed over columns); step: iteration",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("continual")
    g.add_argument(
        "--stream",
        default="split-digits",
        choices=["split-digits", "split-fmnist", "permuted-fmnist"],
        help="the stream: scikit-learn's digits split in class pairs, Fashion-MNIST split in "
        "class pairs, or Fashion-MNIST under pixel permutations (default: %(default)s)",
    )
    g.add_argument(
        "--scenario",
        default=None,
        choices=["class", "task", "domain"],
        help="class-, task- (task labels, one head per task) or domain-incremental "
        "(default: domain for permuted-fmnist, class otherwise)",
    )
    g.add_argument(
        "--experiences",
        type=int,
        default=None,
        help="experiences in the stream; split streams need a divisor of 10 "
        "(default: 5 for split-digits and split-fmnist, 10 for permuted-fmnist)",
    )
    g.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods: {', '.join(FIXED)}; grow-<base> and "
        f"grow-<base>-<variant> for base in {', '.join(GROWING_BASES)} and variant in "
        f"{', '.join(variant_names())}; expansion: {', '.join(expansion_names())} "
        f"(default: the fixed and grow-<base> methods but pnn, which needs --scenario task, "
        f"plus grow-replay-vtinit and expand: %(default)s)",
    )
    g.add_argument(
        "--model",
        default="mlp",
        choices=list(FAMILIES),
        help="model family: mlp (two hidden ReLU layers) or cnn (two 3x3 conv layers, the first "
        "strided, max-pool, global average pool); --small/--large are its hidden units or channels "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--small",
        type=int,
        default=16,
        help="hidden width of the small models and the grow-* variants' start "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--large",
        type=int,
        default=64,
        help="hidden width of the large models and the grow-* variants' exact final width "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs per experience (default: 8 on split-digits, 2 on the "
        "Fashion-MNIST streams; --quick: 1)",
    )
    g.add_argument(
        "--mb-size",
        type=int,
        default=None,
        help="training minibatch size (default: 32 on split-digits, 64 otherwise)",
    )
    g.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--train-per-exp",
        type=int,
        default=None,
        help="subsample about this many training images per experience (default: all; "
        "--quick: 500 on the Fashion-MNIST streams)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: %(default)s, the fastest for these small MLPs "
        "on a shared machine)",
    )
    g.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="resume file: saved after every experience; a run restarted with the same "
        "arguments continues where the file stands (finished seeds and methods are skipped, "
        "an interrupted method continues from its last experience) with the same results "
        "(default: none)",
    )



@torch.no_grad()
def evaluate(model: nn.Module, stream: Any, device: str, mb_size: int = 512) -> list[float]:
    """Accuracy on each experience of ``stream``."""
    from avalanche.models import MultiTaskModule
    from avalanche.models.dynamic_modules import avalanche_model_adaptation
    from avalanche.models.utils import avalanche_forward

    model.eval()
    accs = []
    for exp in stream:
        if isinstance(model, MultiTaskModule):  # a head for tasks not trained yet, as Avalanche
            avalanche_model_adaptation(model, exp)
        correct = total = 0
        for x, y, t in DataLoader(exp.dataset, batch_size=mb_size):
            x, y, t = x.to(device), y.to(device), t.to(device)
            pred = avalanche_forward(model, x, t).argmax(1)
            correct += int((pred == y).sum())
            total += len(y)
        accs.append(correct / max(total, 1))
    model.train()
    return accs


def forgetting(matrix: list[list[float]]) -> float:
    """Mean drop from each experience's best accuracy to its final one (last excluded)."""
    if len(matrix) < 2:
        return 0.0  # trained once (joint training): nothing to forget
    final = matrix[-1]
    drops = [max(row[j] for row in matrix[:-1]) - final[j] for j in range(len(final) - 1)]
    return sum(drops) / len(drops) if drops else 0.0


class RunFile:
    """The ``--resume`` file of a comparison: the finished runs' results and, for the method
    being trained, its strategy's whole state after its last finished experience
    (:mod:`strategies.resume`; one file, replaced atomically at every save).

    Parameters
    ----------
    path : str
        The file; read when it exists (refused when it was written with other arguments).
    config : dict
        The arguments that decide the results: a file written with others is refused.
    """

    def __init__(self, path: str, config: dict[str, Any]) -> None:
        from ..strategies.resume import read_run

        self.path = path
        self.config = config
        self.finished: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        if os.path.exists(path):
            try:
                state = read_run(path, config=config, check_config=True)
            except GrowthError as exc:  # damaged, or written with other arguments
                raise SystemExit(f"continual: cannot resume from {path}: {exc}") from exc
            self.finished = list(state.results["finished"])
            self.current = state.results["current"]

    def done(self, seed: int, method: str) -> dict[str, Any] | None:
        """The result of a finished run, or None."""
        return next((r for r in self.finished if r["seed"] == seed and r["method"] == method), None)

    def restore(self, strategy: Any, seed: int, method: str) -> tuple[int, dict[str, Any]] | None:
        """Restore ``strategy`` when the file holds this run in progress: ``(experiences done,
        progress so far)``; None otherwise."""
        from ..strategies.resume import load_run

        cur = self.current
        if cur is None or cur["seed"] != seed or cur["method"] != method:
            return None
        state = load_run(self.path, strategy, config=self.config)
        return state.position, state.results["current"]

    def save(self, strategy: Any, position: int, current: dict[str, Any] | None) -> None:
        """Save the run in progress (``strategy`` at ``position``) or, with ``strategy=None``,
        only the finished results."""
        from ..strategies.resume import save_run

        self.current = current
        results = {"finished": self.finished, "current": current}
        save_run(self.path, strategy, position=position, results=results, config=self.config)

    def finish(self, result: dict[str, Any], strategy: Any = None, position: int = 0) -> None:
        """Record a finished run; the file keeps ``strategy``'s final state when given."""
        self.finished.append(result)
        self.save(strategy, position, None)


def resumable_within(method: str, s: Setting) -> bool:
    """Whether a run of ``method`` can continue from an experience boundary. Not: PNN (its
    columns come from Avalanche's model adaptation, which a resume file does not hold) and LwF
    on task-incremental streams (its teacher lacks the heads that evaluation adds to the model,
    and a resume file holds one network). Those runs restart from their first experience."""
    return method != "pnn" and not (method == "lwf" and s.scenario == "task")


def forgetting_after(matrix: list[list[float]], i: int) -> float:
    """:func:`forgetting` after training step ``i`` (0-based), over the experiences trained
    before it: mean drop from their best accuracy so far to their accuracy after step ``i``."""
    if i < 1:
        return 0.0
    rows, now = matrix[: i + 1], matrix[i]
    drops = [max(row[j] for row in rows[:-1]) - now[j] for j in range(i)]
    return sum(drops) / len(drops)


def _tensorboard(strategy: Any) -> Any:
    """The ``SummaryWriter`` of the strategy's ``TensorboardLogger`` (None without one)."""
    from avalanche.logging import TensorboardLogger

    loggers = strategy.evaluator.loggers
    return next((lg.writer for lg in loggers if isinstance(lg, TensorboardLogger)), None)


def _log_accuracy(
    writer: Any, row: list[float], step: int, flops: int, matrix: list[list[float]], joint: bool
) -> None:
    """Accuracy per experience and over the stream, forgetting, accuracy against FLOPs."""
    stream = sum(row) / len(row)
    for k, acc in enumerate(row):
        writer.add_scalar(f"Accuracy/exp_{k:03d}", acc, step)
    writer.add_scalar("Accuracy/stream", stream, step)
    writer.add_scalar("Accuracy_vs_FLOPs/stream", stream, int(flops))
    writer.add_scalar(
        "Forgetting/stream", 0.0 if joint else forgetting_after(matrix, len(matrix) - 1), step
    )


def _log_run(
    writer: Any, strategy: Any, method: str, s: Setting, result: dict[str, Any], tb_dir: str
) -> None:
    """A finished run: its settings and results as TensorBoard hparams (the child run
    ``<tb_dir>/hparams``), its growth events as a text table."""
    from ._report import tensorboard_hparams

    settings = {
        "command": "continual",
        "method": method,
        "growing": is_growing(method),
        "seed": int(result["seed"]),
        **dict(s.__dict__),
        "final_widths": "/".join(str(w) for w in result["widths"]),
    }
    values = {
        "hparams/final_acc": float(result["final_acc"]),
        "hparams/forgetting": float(result["forgetting"]),
        "hparams/params": float(result["params"]),
        "hparams/gflops": result["flops"] / 1e9,
        "hparams/seconds": float(result["seconds"]),
    }
    step = len(result["matrix"])
    tensorboard_hparams(tb_dir, settings, values, step)
    events = _growth_events(strategy)
    if events:
        lines = [
            "| experience | iteration | layer | status | old width | new width | params after "
            "| max abs error | seconds |",
            "|---:|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for e in events:
            err = "-" if e.max_abs_error is None else f"{e.max_abs_error:.2e}"
            lines.append(
                f"| {e.experience} | {e.iteration} | {e.layer} | {e.status} | {e.old_width} "
                f"| {e.new_width} | {e.params_after:,} | {err} | {e.seconds:.4f} |"
            )
        writer.add_text("Growth/events", "\n".join(lines), step)
    writer.flush()


def _growth_events(strategy: Any) -> list[Any]:
    from ..strategies import GrowthPlugin

    plugin = next((p for p in strategy.plugins if isinstance(p, GrowthPlugin)), None)
    return list(plugin.events) if plugin is not None else []


def _flops_metric(strategy: Any) -> Any:
    from ..strategies.metrics import TrainingFlopsMetric

    return next(m for m in strategy.evaluator.metrics if isinstance(m, TrainingFlopsMetric))


def _clear_events(tb_dir: str) -> None:
    """Remove the TensorBoard event files a previous run left in ``tb_dir`` (a fresh run
    replaces them; a resumed one adds its file beside them)."""
    if os.path.isdir(tb_dir):
        for name in os.listdir(tb_dir):
            if name.startswith("events.out.tfevents."):
                os.remove(os.path.join(tb_dir, name))


def run_method(
    method: str,
    s: Setting,
    bench: Any,
    meta: Any,
    seed: int,
    tb_dir: str | None,
    run_file: RunFile | None = None,
) -> dict[str, Any]:
    """Train ``method`` on the whole stream; accuracy matrix, compute, size, widths, time.

    With ``run_file``, the strategy's state is saved after every experience (and its
    evaluation) and a run in progress continues from the file. With ``tb_dir``, the run is
    logged to TensorBoard there (:data:`TB_TAGS`, hparams, growth events).
    """
    within = run_file is not None and resumable_within(method, s)
    current = run_file.current if within and run_file is not None else None
    resuming = current is not None and current["seed"] == seed and current["method"] == method
    if tb_dir is not None and not resuming:
        _clear_events(tb_dir)
    strategy, _ = make_strategy(method, s, meta, seed, tb_dir)
    writer = _tensorboard(strategy)
    flops_metric = _flops_metric(strategy)
    matrix: list[list[float]] = []
    flops = 0
    seconds_before = 0.0
    first = 0
    if within and run_file is not None:
        restored = run_file.restore(strategy, seed, method)
        if restored is not None:
            first, progress = restored
            matrix = [list(row) for row in progress["matrix"]]
            flops = int(progress["flops"])
            seconds_before = float(progress["seconds"])
    start = time.perf_counter()
    joint = method == "joint"
    steps = [bench.train_stream] if joint else list(bench.train_stream)
    for i in range(first, len(steps)):
        before = flops_metric.result()
        strategy.train(steps[i])  # FLOPs: counted by the evaluator's training_flops_metric()
        flops += flops_metric.result() - before
        matrix.append(evaluate(strategy.model, bench.test_stream, s.device))
        if writer is not None:
            step = len(bench.train_stream) if joint else i + 1
            _log_accuracy(writer, matrix[-1], step, flops, matrix, joint)
        if within and run_file is not None:
            progress = {
                "seed": seed,
                "method": method,
                "matrix": matrix,
                "flops": int(flops),
                "seconds": seconds_before + time.perf_counter() - start,
            }
            run_file.save(strategy, i + 1, progress)
    seconds = seconds_before + time.perf_counter() - start
    result = {
        "method": method,
        "seed": seed,
        "final_acc": sum(matrix[-1]) / len(matrix[-1]),
        "forgetting": forgetting(matrix),
        "params": count_params(strategy.model),
        "memory_bytes": memory_bytes(strategy.model, replay_samples(strategy), meta.input_shape),
        "widths": hidden_widths(strategy.model),
        "flops": int(flops),
        "seconds": seconds,
        "matrix": matrix,
    }
    if writer is not None:
        _log_run(writer, strategy, method, s, result, str(tb_dir))
        writer.close()
    if run_file is not None:
        run_file.finish(result, strategy if within else None, len(steps) if within else 0)
    return result


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    if args.scenario is None:
        args.scenario = "domain" if args.stream == "permuted-fmnist" else "class"
    if args.epochs is None:
        args.epochs = 8 if args.stream == "split-digits" else 2
    if args.mb_size is None:
        args.mb_size = 32 if args.stream == "split-digits" else 64
    if args.quick:
        args.seeds = min(args.seeds, 1) if isinstance(args.seeds, int) else 1
        args.epochs = 1
        if args.train_per_exp is None and args.stream != "split-digits":
            args.train_per_exp = 500
    return args


def _resume_config(
    args: argparse.Namespace, setting: Setting, seeds: list[int], methods: list[str]
) -> dict[str, Any]:
    """What a resume file must have been written with: everything that decides the results
    (not the output folders)."""
    return {
        "command": "continual",
        # 3: the setting names the model family; 2: grow-* follow width_schedule() (exact
        # final widths), every method's evaluator holds the TensorBoard metrics
        "version": 3,
        "setting": dict(setting.__dict__),
        "seeds": list(seeds),
        "methods": list(methods),
        "experiences": args.experiences,
        "train_per_exp": args.train_per_exp,
        "data_root": args.data_root,
        "threads": args.threads,
    }


def _without_avalanche_deprecations(show: Callable) -> Callable:
    """Avalanche 0.6 re-enables its DeprecationWarnings on every call (ReplayPlugin's storage
    policy prints one per experience): drop those from the output, show everything else."""

    def quiet(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecationWarning) and "avalanche" in str(filename):
            return
        show(message, category, filename, lineno, file, line)

    return quiet


def tensorboard_command(runs_dir: str) -> str:
    """A command line that starts TensorBoard on ``runs_dir`` without activating the venv:
    the ``tensorboard`` script beside this Python (``.venv/bin/tensorboard`` when the venv is
    under the current folder), else ``<python> -m tensorboard.main``."""
    logdir = shlex.quote(str(runs_dir))
    script = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.exists(script):
        return f"{shlex.quote(sys.executable)} -m tensorboard.main --logdir {logdir}"
    rel = os.path.relpath(script)
    exe = script if rel.startswith(os.pardir) else rel if os.sep in rel else f".{os.sep}{rel}"
    return f"{shlex.quote(exe)} --logdir {logdir}"



def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every requested method over the seeds; print, write and plot the comparison."""
    from ._report import (
        fmt_mean_std,
        format_table,
        mean_std,
        save_plot,
        write_results,
    )
    from .data import make_stream

    args = _defaults(args)
    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.showwarning = _without_avalanche_deprecations(warnings.showwarning)
    seeds = list(range(args.seeds)) if isinstance(args.seeds, int) else list(args.seeds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = all_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(known)}")
    if not 1 <= args.small <= args.large:
        raise SystemExit(f"need 1 <= --small <= --large, got {args.small} and {args.large}")
    if "pnn" in methods and args.scenario != "task":
        methods.remove("pnn")  # PNN needs task labels
    scenario = "class" if args.scenario == "domain" else args.scenario
    setting = Setting(
        stream=args.stream,
        scenario=args.scenario,
        model=args.model,
        small=args.small,
        large=args.large,
        epochs=args.epochs,
        mb_size=args.mb_size,
        lr=args.lr,
        mem_size=200 if args.stream == "split-digits" else 1000,
        ewc_lambda=100.0,
        device=args.device,
    )
    # small MLPs: one intra-op thread is several times faster than two on a busy 2-core machine
    torch.set_num_threads(args.threads)
    run_file = None
    if getattr(args, "resume", None):
        run_file = RunFile(args.resume, _resume_config(args, setting, seeds, methods))
    results: list[dict[str, Any]] = []
    tb_root = f"{args.runs_dir}/continual/{args.stream}-{args.scenario}"
    bar = tqdm(total=len(seeds) * len(methods), desc="continual", unit="run")
    for seed in seeds:
        bench = meta = None
        for method in methods:
            done = run_file.done(seed, method) if run_file is not None else None
            if done is not None:  # finished before the restart
                results.append(done)
                bar.update()
                continue
            if bench is None:
                bench, meta = make_stream(
                    args.stream,
                    scenario=scenario,
                    n_experiences=args.experiences,
                    seed=seed,
                    data_root=args.data_root,
                    train_per_exp=args.train_per_exp,
                )
            bar.set_postfix_str(f"{method} seed {seed}")
            tb = f"{tb_root}/{method}-s{seed}"
            results.append(run_method(method, setting, bench, meta, seed, tb, run_file))
            bar.update()
    bar.close()
    rows = []
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        widths = list(dict.fromkeys("/".join(str(w) for w in r["widths"]) for r in rs))
        rows.append(
            {
                "method": method,
                "hidden": hidden_setting(method, setting),
                "widths": " | ".join(widths),
                "final_acc": fmt_mean_std([r["final_acc"] for r in rs]),
                "forgetting": fmt_mean_std([r["forgetting"] for r in rs]),
                "params": f"{int(mean_std([r['params'] for r in rs])[0]):,}",
                "memory_kb": memory_kb(rs),
                "gflops": fmt_mean_std([r["flops"] / 1e9 for r in rs], digits=2),
                "seconds": fmt_mean_std([r["seconds"] for r in rs], digits=1),
            }
        )
    print(f"\ncontinual: {args.stream} ({args.scenario}-incremental), seeds {seeds}")
    print(format_table(rows, COLUMNS))
    print("hidden: the setting; widths: the hidden layers' final widths (PNN: all columns); "
          "memory_kb: parameters (4 B each) + replay buffer (1 B per pixel)")
    name = f"continual-{args.stream}-{args.scenario}"
    payload = {"setting": setting.__dict__, "seeds": seeds, "runs": results}
    paths = write_results(name, payload, rows, COLUMNS, out_dir=args.out_dir)
    paths["plot"] = save_plot(_plot(results, methods, args), name, out_dir=args.out_dir)
    paths["curves"] = save_plot(
        _plot_curves(results, methods, args), f"{name}-curves", out_dir=args.out_dir
    )
    paths["tensorboard"] = Path(tb_root)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"TensorBoard: {tensorboard_command(args.runs_dir)}")
    return {"rows": rows, "runs": results, "paths": {k: str(v) for k, v in paths.items()}}


def memory_kb(runs: list[dict[str, Any]]) -> str:
    """The memory column: mean kB of parameters (float32) plus replay buffer (uint8 images),
    MEMO-style; joint training keeps the whole stream, so it has no comparable figure."""
    if any(r["method"] == "joint" for r in runs):
        return "all data"
    return f"{sum(r['memory_bytes'] for r in runs) / len(runs) / 1000:,.0f}"


def _style(method: str) -> dict[str, Any]:
    return {"marker": "^" if is_growing(method) else "o"}


def _plot(results: list[dict[str, Any]], methods: list[str], args: Any = None) -> Any:
    """Final accuracy against training compute: every seed's point (small, faint) and the
    mean over seeds with ±1 sample-std error bars on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._report import mean_std

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        xs = [r["flops"] / 1e9 for r in rs]
        ys = [r["final_acc"] for r in rs]
        (mx, sx), (my, sy) = mean_std(xs), mean_std(ys)
        bar = ax.errorbar(
            [mx], [my], xerr=[sx], yerr=[sy], linestyle="none", capsize=3, markersize=7,
            label=method, **_style(method),
        )  # fmt: skip
        color = bar[0].get_color()
        if len(rs) > 1:
            ax.scatter(xs, ys, s=12, alpha=0.35, color=color, **_style(method))
    seeds = len({r["seed"] for r in results})
    ax.set_xlabel("training compute (GFLOPs, torch.utils.flop_counter)")
    ax.set_ylabel("final average accuracy")
    where = f"{args.stream}, {args.scenario}-incremental; " if args is not None else ""
    ax.set_title(
        f"accuracy against compute ({where}{seeds} seed(s): mean ± std, faint: each seed)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_curves(results: list[dict[str, Any]], methods: list[str], args: Any = None) -> Any:
    """Accuracy on each test experience (and on the whole stream) after each training
    experience: mean over seeds, shaded ±1 sample std. Joint training is one point at the end.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = max(len(r["matrix"][-1]) for r in results)
    panels = n + 1
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=True, sharey=True, squeeze=False
    )
    flat = axes.ravel()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m_idx, method in enumerate(methods):
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        color = colors[m_idx % len(colors)]
        mats = np.array([r["matrix"] for r in rs], dtype=float)  # seeds x steps x experiences
        xs = np.arange(1, mats.shape[1] + 1) if mats.shape[1] > 1 else np.array([n])
        series = [mats.mean(axis=2)] + [mats[:, :, k] for k in range(n)]
        for ax, values in zip(flat, series):
            mean = values.mean(axis=0)
            std = values.std(axis=0, ddof=1) if len(rs) > 1 else np.zeros_like(mean)
            if len(xs) == 1:  # joint training: one evaluation, at the end
                ax.errorbar(xs, mean, yerr=std, color=color, label=method, capsize=3,
                            markersize=5, linestyle="none", **_style(method))  # fmt: skip
                continue
            style = "--" if is_growing(method) else "-"
            ax.plot(xs, mean, style, color=color, label=method, **_style(method), markersize=4)
            if len(rs) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.12)
    flat[0].set_title("whole stream (mean over experiences)", fontsize=9)
    for k in range(n):
        flat[k + 1].set_title(f"test experience {k}", fontsize=9)
    for ax in flat[panels:]:
        ax.axis("off")
    for ax in flat[:panels]:
        ax.grid(alpha=0.3)
        ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("experiences trained")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    flat[0].legend(fontsize=7)
    seeds = len({r["seed"] for r in results})
    where = f"{args.stream}, {args.scenario}-incremental, " if args is not None else ""
    fig.suptitle(f"accuracy per experience ({where}{seeds} seed(s), mean ± std)", fontsize=10)
    fig.tight_layout()
    return fig
