"""``python -m net2grow.benchmarks continual``: growing models against Avalanche's baselines.

Every method trains the same MLP family with the same optimizer, epochs and minibatch size on
the same stream. Fixed models are either *small* (the growing models' starting size) or *large*
(their final-size budget); the growing variants start small and widen every hidden layer after
each experience so that they end at the large size. Reported per method: final average accuracy,
average forgetting, final parameter count, training compute (FLOPs counted by
``torch.utils.flop_counter`` over every training step) and wall time, over several seeds.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..growth import GrowableNetwork, GrowthError

COLUMNS = ["method", "hidden", "final_acc", "forgetting", "params", "gflops", "seconds"]
METHODS = (
    "naive-small",
    "naive-large",
    "ewc",
    "lwf",
    "replay",
    "joint",
    "pnn",
    "grow-naive",
    "grow-replay",
    "grow-ewc",
)


@dataclass(frozen=True)
class Setting:
    """Hyperparameters shared by every method of one run."""

    stream: str
    scenario: str
    small: int
    large: int
    epochs: int
    mb_size: int
    lr: float
    mem_size: int
    ewc_lambda: float
    device: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream",
        default="split-digits",
        choices=["split-digits", "split-fmnist", "permuted-fmnist"],
    )
    parser.add_argument(
        "--scenario",
        default=None,
        choices=["class", "task", "domain"],
        help="default: domain for permuted-fmnist, class otherwise",
    )
    parser.add_argument("--experiences", type=int, default=None)
    parser.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m != "pnn"),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    parser.add_argument("--small", type=int, default=16, help="hidden width of small models")
    parser.add_argument("--large", type=int, default=64, help="hidden width of large models")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--mb-size", type=int, default=None, help="default: 32 on digits, 64 else")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--train-per-exp",
        type=int,
        default=None,
        help="subsample training images per experience (Fashion-MNIST)",
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="PATH",
        help="resume file: saved after every experience; a run restarted with the same "
        "arguments continues where the file stands (finished seeds and methods are skipped, "
        "an interrupted method continues from its last experience) with the same results",
    )


def mlp(in_features: int, hidden: int, n_out: int) -> nn.Sequential:
    """The model family of the comparison: flatten, two hidden ReLU layers, linear head."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


class MultiHeadMLP(nn.Module):
    """The same MLP trunk with one head per task (task-incremental streams)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        from avalanche.models import MultiHeadClassifier

        super().__init__()
        self.features = mlp(in_features, hidden, hidden)[:-1]
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=2)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x), task_labels)


def make_model(in_features: int, hidden: int, n_out: int, *, task_aware: bool) -> nn.Module:
    if task_aware:
        from .. import strategies  # noqa: F401  (registers the Avalanche head rules before tracing)

        return MultiHeadMLP(in_features, hidden)
    return mlp(in_features, hidden, n_out)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


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


def _make_strategy(method: str, s: Setting, meta: Any, seed: int, tb_dir: str | None):
    """Build (strategy, model) for ``method``."""
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import EWC, JointTraining, LwF, Naive, PNNStrategy, Replay

    from .. import strategies  # noqa: F401  (its first import draws from torch's RNG: before seeding)

    torch.manual_seed(seed)  # every RNG, so that a run does not depend on the ones before it
    random.seed(seed)
    np.random.seed(seed)
    in_features = math.prod(meta.input_shape)
    n_out = meta.n_classes
    hidden = (
        s.small if method in ("naive-small", "grow-naive", "grow-replay", "grow-ewc") else s.large
    )
    common = dict(
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=s.mb_size,
        train_epochs=s.epochs,
        eval_mb_size=512,
        device=s.device,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if method == "pnn":
        from avalanche.models import PNN

        model = PNN(num_layers=2, in_features=in_features, hidden_features_per_column=s.small)
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        return PNNStrategy(model=model, optimizer=opt, **common), model
    task_aware = s.scenario == "task"
    model = make_model(in_features, hidden, n_out, task_aware=task_aware)
    if task_aware:  # Avalanche passes task labels only to a MultiTaskModule
        from ..strategies import MultiTaskGrowableNetwork

        example = (torch.zeros(2, *meta.input_shape), torch.zeros(2, dtype=torch.long))
        model = MultiTaskGrowableNetwork(model, example)
    plugins = []
    if method.startswith("grow-"):
        from ..strategies import GrowthPlugin, growth_metrics
        from ..strategies.policies import EveryExperience

        if not task_aware:
            model = GrowableNetwork(model, torch.zeros(2, *meta.input_shape))
        growths = max(meta.n_experiences - 1, 1)
        factor = (s.large / s.small) ** (1 / growths)
        # final-size budget: the large model (task heads are added as tasks arrive: no cap)
        budget = None if task_aware else count_params(mlp(in_features, s.large, n_out))
        plugins.append(GrowthPlugin(EveryExperience(factor=factor), max_params=budget))
        if tb_dir is not None:
            from avalanche.logging import TensorboardLogger

            common["evaluator"] = EvaluationPlugin(
                growth_metrics(), loggers=[TensorboardLogger(tb_log_dir=tb_dir)]
            )
    model = model.to(s.device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    base = method.removeprefix("grow-")
    if base in ("naive", "naive-small", "naive-large"):
        return Naive(model=model, optimizer=opt, plugins=plugins, **common), model
    if base == "ewc":
        return EWC(
            model=model, optimizer=opt, ewc_lambda=s.ewc_lambda, plugins=plugins, **common
        ), model
    if base == "lwf":
        return LwF(
            model=model, optimizer=opt, alpha=1.0, temperature=2.0, plugins=plugins, **common
        ), model
    if base == "replay":
        return Replay(
            model=model, optimizer=opt, mem_size=s.mem_size, plugins=plugins, **common
        ), model
    if base == "joint":
        return JointTraining(model=model, optimizer=opt, plugins=plugins, **common), model
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


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


def run_method(
    method: str,
    s: Setting,
    bench: Any,
    meta: Any,
    seed: int,
    tb_dir: str | None,
    run_file: RunFile | None = None,
) -> dict[str, Any]:
    """Train ``method`` on the whole stream; accuracy matrix, compute, size, time.

    With ``run_file``, the strategy's state is saved after every experience (and its
    evaluation) and a run in progress continues from the file.
    """
    strategy, _ = _make_strategy(method, s, meta, seed, tb_dir)
    matrix: list[list[float]] = []
    flops = 0
    seconds_before = 0.0
    first = 0
    within = run_file is not None and resumable_within(method, s)
    if within and run_file is not None:
        restored = run_file.restore(strategy, seed, method)
        if restored is not None:
            first, progress = restored
            matrix = [list(row) for row in progress["matrix"]]
            flops = int(progress["flops"])
            seconds_before = float(progress["seconds"])
    start = time.perf_counter()
    steps = [bench.train_stream] if method == "joint" else list(bench.train_stream)
    for i in range(first, len(steps)):
        counter = FlopCounterMode(display=False)  # entering a counter resets it: one per call
        with counter:
            strategy.train(steps[i])
        flops += counter.get_total_flops()
        matrix.append(evaluate(strategy.model, bench.test_stream, s.device))
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
        "flops": int(flops),
        "seconds": seconds,
        "matrix": matrix,
    }
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
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "pnn" in methods and args.scenario != "task":
        methods.remove("pnn")  # PNN needs task labels
    scenario = "class" if args.scenario == "domain" else args.scenario
    setting = Setting(
        stream=args.stream,
        scenario=args.scenario,
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
            tb = f"{args.runs_dir}/continual/{args.stream}-{args.scenario}/{method}-s{seed}"
            results.append(run_method(method, setting, bench, meta, seed, tb, run_file))
            bar.update()
    bar.close()
    rows = []
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        hidden = setting.small if method in ("naive-small", "pnn") else setting.large
        if method.startswith("grow-"):
            hidden = f"{setting.small}->{setting.large}"
        rows.append(
            {
                "method": method,
                "hidden": hidden,
                "final_acc": fmt_mean_std([r["final_acc"] for r in rs]),
                "forgetting": fmt_mean_std([r["forgetting"] for r in rs]),
                "params": f"{int(mean_std([r['params'] for r in rs])[0]):,}",
                "gflops": fmt_mean_std([r["flops"] / 1e9 for r in rs], digits=2),
                "seconds": fmt_mean_std([r["seconds"] for r in rs], digits=1),
            }
        )
    print(f"\ncontinual: {args.stream} ({args.scenario}-incremental), seeds {seeds}")
    print(format_table(rows, COLUMNS))
    name = f"continual-{args.stream}-{args.scenario}"
    payload = {"setting": setting.__dict__, "seeds": seeds, "runs": results}
    paths = write_results(name, payload, rows, COLUMNS, out_dir=args.out_dir)
    paths["plot"] = save_plot(_plot(results, methods), name, out_dir=args.out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"TensorBoard: tensorboard --logdir {args.runs_dir}")
    return {"rows": rows, "runs": results, "paths": {k: str(v) for k, v in paths.items()}}


def _plot(results: list[dict[str, Any]], methods: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        rs = [r for r in results if r["method"] == method]
        xs = [r["flops"] / 1e9 for r in rs]
        ys = [r["final_acc"] for r in rs]
        marker = "^" if method.startswith("grow-") else "o"
        ax.scatter(xs, ys, marker=marker, label=method)
    ax.set_xlabel("training compute (GFLOPs, torch.utils.flop_counter)")
    ax.set_ylabel("final average accuracy")
    ax.set_title("accuracy against compute")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
