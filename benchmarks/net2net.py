"""The Net2Net experiment (Chen, Goodfellow & Shlens, ICLR 2016) at CPU scale.

``python -m net2grow.benchmarks net2net`` trains a narrow CNN (the teacher) on Fashion-MNIST
for a fixed number of steps at a constant learning rate, then continues for a fixed number of
steps, with the same optimizer and the same learning-rate schedule (by default cosine from the
teacher's rate to zero), as each of these variants:

===========================  ===============================================================
``net2wider``                Net2WiderNet student, every hidden layer x2, ``split="random"``
``net2wider-equal``          the paper's equal split (copies stay identical: no new capacity)
``net2wider-equal-noise``    equal split plus relative noise on the replicated weights
``zero-init``                new units with small random inputs and zero outgoing weights
``random-pad``               new units random in and out (the paper's baseline; not exact)
``wide-scratch``             the wide network trained from a fresh initialisation
``teacher-continued``        the teacher trained further at its own width (the control)
``narrow-scratch``           the teacher's own training run (narrow network from scratch)
``net2deeper``               Net2DeeperNet student: identity layers after conv2 and fc1
``deep-scratch``             the deeper network trained from a fresh initialisation
===========================  ===============================================================

Students and ``teacher-continued`` continue the teacher's optimizer: the grown network is
passed ``optimizer=`` so the momentum buffers carry over (new deepen parameters start with
none). Networks trained from scratch get a fresh optimizer. Every run that starts from the
teacher sees the same sequence of minibatches. Test accuracy is measured every
``--eval-every`` steps; step 0 is the network as it stands before the first update.

The question is whether a wider student beats simply training the teacher on. Each variant's
final accuracy is therefore also given as a paired difference to ``teacher-continued`` (same
seed, same teacher, same minibatches), with whether that gap exceeds the spread over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..growth import GrowableNetwork
from ._report import (
    fmt_mean_std,
    format_table,
    save_plot,
    tensorboard_hparams,
    tensorboard_writer,
    write_results,
)
from .data import load_fashion_mnist

NAME = "net2net"
#: Fashion-MNIST pixel mean and standard deviation (training set).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
#: Hidden layers of :class:`SmallCNN`, widened together by the Net2WiderNet variants.
WIDEN_LAYERS = ("features.0", "features.3", "classifier.1")
#: Layers after which the Net2DeeperNet student gets an identity layer.
DEEPEN_LAYERS = ("features.3", "classifier.1")

#: The teacher's widths (conv1, conv2, hidden): narrow enough that it is capacity-limited
#: within the CPU budget (the setting in which a wider student can pay).
TEACHER_WIDTH = (4, 8, 32)
#: Learning-rate schedules of the runs after the teacher (see :func:`lr_factor`).
SCHEDULES = ("cosine", "constant")

#: Defaults of the full run and of ``--quick`` (a test-sized run).
FULL = {
    "seeds": 5,
    "steps": 1_500,
    "teacher_steps": 2_000,
    "eval_every": 500,
    "train_size": 60_000,
    "test_size": 10_000,
}
QUICK = {
    "seeds": 1,
    "steps": 30,
    "teacher_steps": 30,
    "eval_every": 10,
    "train_size": 1_000,
    "test_size": 500,
}

COLUMNS = [
    "variant",
    "params",
    "acc@0",
    "logit change @0",
    "steps to teacher acc",
    "steps to control final",
    "adv. vs scratch (1st half)",
    "final acc",
    "final - control (paired)",
    "gap > spread",
    "wall s (no eval)",
]

NOTES = """\
acc@0: test accuracy before the first step after the teacher (grown networks: right after growth).
logit change @0: largest |logit - teacher's logit| on the test set at step 0 (max over seeds).
steps to teacher acc / control final: first evaluated step whose accuracy reaches the teacher's
  final accuracy / the final accuracy of teacher-continued (same seed); "never" within the budget.
adv. vs scratch (1st half): mean accuracy difference to the from-scratch run of the same
  architecture over the evaluations in the first half of the budget (step 0 included).
final - control (paired): final accuracy minus that of teacher-continued of the same seed,
  mean ± sample std over seeds, and in how many seeds it is above.
gap > spread: "yes" when that mean gap is positive and larger than each spread: the std of the
  paired differences and the std over seeds of each run's final accuracy ("-": one seed).
wall s (no eval): growth + training seconds, evaluation excluded. Values: mean ± sample std."""


class SmallCNN(nn.Module):
    """conv(1->c1)-relu-pool-conv(c1->c2)-relu-pool-flatten-fc(->hidden)-relu-fc(10).

    Parameters
    ----------
    c1, c2 : int
        Channels of the two 3x3 convolutions.
    hidden : int
        Units of the hidden fully connected layer.
    classes : int
        Number of outputs.
    """

    def __init__(self, c1: int = 4, c2: int = 8, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class Variant:
    """One way of continuing after the teacher.

    ``start`` is ``"teacher"`` (grown from, or continuing, the trained teacher) or ``"scratch"``;
    ``grow`` holds the keyword arguments of ``widen`` (or ``{"deepen": kind}``); ``scratch`` names
    the from-scratch run with the same architecture, the reference of the advantage column;
    ``arch`` is the architecture trained: ``"narrow"`` (the teacher's), ``"wide"`` or ``"deep"``.
    """

    key: str
    label: str
    start: str
    grow: dict[str, Any] | None
    scratch: str | None
    arch: str
    exact: bool = False
    style: dict[str, Any] = field(default_factory=dict)


def variants(noise: float) -> list[Variant]:
    """The variants, in table order (``noise`` is that of ``net2wider-equal-noise``)."""
    return [
        Variant(
            "net2wider",
            "Net2WiderNet, random split",
            "teacher",
            {"init": "net2net", "split": "random"},
            "wide-scratch",
            arch="wide",
            exact=True,
            style={"color": "C0"},
        ),
        Variant(
            "net2wider-equal",
            "Net2WiderNet, equal split",
            "teacher",
            {"init": "net2net", "split": "equal"},
            "wide-scratch",
            arch="wide",
            exact=True,
            style={"color": "C1"},
        ),
        Variant(
            "net2wider-equal-noise",
            f"Net2WiderNet, equal split + noise {noise:g}",
            "teacher",
            {"init": "net2net", "split": "equal", "noise": noise},
            "wide-scratch",
            arch="wide",
            style={"color": "C2"},
        ),
        Variant(
            "zero-init",
            "wider, new units zero-out",
            "teacher",
            {"init": "zero"},
            "wide-scratch",
            arch="wide",
            exact=True,
            style={"color": "C4"},
        ),
        Variant(
            "random-pad",
            "wider, random pad",
            "teacher",
            {"init": "random"},
            "wide-scratch",
            arch="wide",
            style={"color": "C3"},
        ),
        Variant(
            "wide-scratch",
            "wide, from scratch",
            "scratch",
            None,
            None,
            arch="wide",
            style={"color": "k", "linestyle": "--"},
        ),
        Variant(
            "teacher-continued",
            "teacher continued (narrow)",
            "teacher",
            None,
            "narrow-scratch",
            arch="narrow",
            exact=True,
            style={"color": "C7"},
        ),
        Variant(
            "narrow-scratch",
            "narrow, from scratch (teacher's run)",
            "scratch",
            None,
            None,
            arch="narrow",
            style={"color": "C7", "linestyle": "--"},
        ),
        Variant(
            "net2deeper",
            "Net2DeeperNet (identity)",
            "teacher",
            {"deepen": "identity"},
            "deep-scratch",
            arch="deep",
            exact=True,
            style={"color": "C5"},
        ),
        Variant(
            "deep-scratch",
            "deeper, from scratch",
            "scratch",
            None,
            None,
            arch="deep",
            style={"color": "C5", "linestyle": "--"},
        ),
    ]


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this benchmark's options (the common ones come from ``benchmarks.__main__``)."""
    full, quick = FULL, QUICK
    g = parser.add_argument_group("net2net")
    g.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help=f"random seeds, one run each (default: 0 to {full['seeds'] - 1}; quick: 0)",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps after the teacher (default {full['steps']}, quick {quick['steps']})",
    )
    g.add_argument(
        "--teacher-steps",
        type=int,
        default=None,
        help=f"steps of teacher training (default {full['teacher_steps']}, quick "
        f"{quick['teacher_steps']})",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"evaluate every k steps (default {full['eval_every']}, quick {quick['eval_every']})",
    )
    g.add_argument(
        "--train-size",
        type=int,
        default=None,
        help=f"training images used (default {full['train_size']}, quick {quick['train_size']})",
    )
    g.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"test images used (default {full['test_size']}, quick {quick['test_size']})",
    )
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="SGD learning rate of the teacher (constant) and the start of --schedule",
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning rate of every run after the teacher: cosine from --lr to 0 over --steps "
        "(default), or constant",
    )
    g.add_argument(
        "--teacher-width",
        type=int,
        nargs=3,
        default=None,
        metavar=("C1", "C2", "HIDDEN"),
        help=f"the teacher's conv1, conv2 and hidden widths (default "
        f"{' '.join(map(str, TEACHER_WIDTH))})",
    )
    g.add_argument("--widen-factor", type=float, default=2.0)
    g.add_argument(
        "--noise",
        type=float,
        default=0.01,
        help="relative noise of the net2wider-equal-noise variant",
    )
    g.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on shared cores)"
    )


@dataclass
class Config:
    """Resolved settings of one run."""

    seeds: list[int]
    steps: int
    teacher_steps: int
    eval_every: int
    train_size: int
    test_size: int
    batch_size: int
    lr: float
    momentum: float
    schedule: str
    teacher_width: tuple[int, int, int]
    widen_factor: float
    noise: float
    threads: int
    device: str
    data_root: str | None
    out_dir: Path
    runs_dir: Path
    quick: bool


def make_config(args: argparse.Namespace) -> Config:
    """The run's settings from parsed arguments (``--quick`` picks the small defaults)."""
    quick = bool(getattr(args, "quick", False))
    base = QUICK if quick else FULL

    def pick(name: str) -> Any:
        value = getattr(args, name, None)
        return base[name] if value is None else value

    seeds = getattr(args, "seeds", None)
    if seeds is None:
        seeds = list(range(base["seeds"]))
    elif isinstance(seeds, int):
        seeds = [seeds]
    seeds = [int(s) for s in seeds]
    teacher_width = getattr(args, "teacher_width", None) or TEACHER_WIDTH
    cfg = Config(
        seeds=seeds,
        steps=int(pick("steps")),
        teacher_steps=int(pick("teacher_steps")),
        eval_every=int(pick("eval_every")),
        train_size=int(pick("train_size")),
        test_size=int(pick("test_size")),
        batch_size=int(getattr(args, "batch_size", 64)),
        lr=float(getattr(args, "lr", 0.05)),
        momentum=float(getattr(args, "momentum", 0.9)),
        schedule=str(getattr(args, "schedule", None) or "cosine"),
        teacher_width=tuple(int(w) for w in teacher_width),  # type: ignore[arg-type]
        widen_factor=float(getattr(args, "widen_factor", 2.0)),
        noise=float(getattr(args, "noise", 0.01)),
        threads=int(getattr(args, "threads", 1)),
        device=str(getattr(args, "device", None) or "cpu"),
        data_root=getattr(args, "data_root", None),
        out_dir=Path(getattr(args, "out_dir", None) or "results"),
        runs_dir=Path(getattr(args, "runs_dir", None) or "runs"),
        quick=quick,
    )
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds: need at least one seed and no repeats, got {cfg.seeds}")
    for name in (
        "steps",
        "teacher_steps",
        "eval_every",
        "train_size",
        "test_size",
        "batch_size",
        "threads",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.widen_factor <= 1:
        raise ValueError("--widen-factor must be > 1")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if len(cfg.teacher_width) != 3 or min(cfg.teacher_width) < 1:
        raise ValueError(f"--teacher-width: need three widths >= 1, got {cfg.teacher_width}")
    return cfg


# --------------------------------------------------------------------------------------------
# data, models, training
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Normalised training and test tensors on the run's device."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_data(cfg: Config) -> Data:
    """A fixed random subset of Fashion-MNIST (the same for every seed), normalised."""
    x_train, y_train, x_test, y_test = load_fashion_mnist(cfg.data_root)
    g = torch.Generator().manual_seed(12345)
    tr = torch.randperm(len(x_train), generator=g)[: cfg.train_size]
    te = torch.randperm(len(x_test), generator=g)[: cfg.test_size]
    device = torch.device(cfg.device)

    def prep(x: Tensor) -> Tensor:
        return ((x.float() - PIXEL_MEAN) / PIXEL_STD).to(device)

    return Data(
        prep(x_train[tr]),
        y_train[tr].long().to(device),
        prep(x_test[te]),
        y_test[te].long().to(device),
    )


def _seeded(seed: int, build: Any) -> Any:
    """``build()`` with the global RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _optimizer(net: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """Multiplier of the base learning rate at SGD step ``step`` (1-based) of ``steps``.

    ``"constant"``: 1. ``"cosine"``: ``(1 + cos(pi * (step - 1) / steps)) / 2``, from 1 at the
    first step down towards 0 at the last (every step still moves the weights).
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _batches(n: int, batch_size: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """Endless minibatch indices: a fresh permutation of ``range(n)`` each epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size].to(device)


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor, chunk: int = 250) -> tuple[float, Tensor]:
    """Test accuracy and logits of ``net`` (eval mode; the mode is restored)."""
    was_training = net.training
    net.eval()
    try:
        logits = torch.cat([net(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    finally:
        net.train(was_training)
    return float((logits.argmax(1) == y).sum().item()) / len(y), logits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Curve:
    """Test accuracy at evaluation steps, mean training loss since the previous evaluation."""

    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training (and growth) time, evaluation excluded
    flops_per_step: int = 0  # FLOPs of one SGD step (every step has the same shapes)


def train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    cfg: Config,
    *,
    steps: int,
    order_seed: int,
    schedule: str = "constant",
    writer: Any = None,
    progress: Any = None,
) -> Curve:
    """Train ``net`` for ``steps`` SGD steps, evaluating every ``cfg.eval_every`` steps.

    Step 0 is evaluated before the first update; the last step is always evaluated. The
    first step runs under ``torch.utils.flop_counter.FlopCounterMode``: every step has the
    same shapes, so step ``k`` has cost ``k`` times as much (``model/training_flops``).
    Step ``k`` uses each parameter group's learning rate times ``lr_factor(schedule, k,
    steps)``; the groups' learning rates are restored afterwards.
    """
    device = torch.device(cfg.device)
    curve = Curve()
    batches = _batches(
        len(data.x_train), min(cfg.batch_size, len(data.x_train)), order_seed, device
    )
    losses: list[Tensor] = []
    params = sum(p.numel() for p in net.parameters())

    def log(step: int) -> None:
        acc, _ = evaluate(net, data.x_test, data.y_test)
        loss = float(torch.stack(losses).mean()) if losses else math.nan
        losses.clear()
        curve.steps.append(step)
        curve.accuracy.append(acc)
        curve.loss.append(loss)
        if writer is not None:
            writer.add_scalar("accuracy/test", acc, step)
            if not math.isnan(loss):
                writer.add_scalar("loss/train", loss, step)
            writer.add_scalar("model/num_parameters", params, step)
            writer.add_scalar("model/training_flops", curve.flops_per_step * step, step)

    log(0)
    net.train()
    base_lrs = [group["lr"] for group in opt.param_groups]
    for step in range(1, steps + 1):
        _sync(device)
        start = time.perf_counter()
        factor = lr_factor(schedule, step, steps)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        idx = next(batches)
        counter = FlopCounterMode(display=False) if step == 1 else contextlib.nullcontext()
        with counter:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
        if step == 1:
            curve.flops_per_step = int(counter.get_total_flops())
        losses.append(loss.detach())
        _sync(device)
        curve.seconds += time.perf_counter() - start
        if step % cfg.eval_every == 0 or step == steps:
            log(step)
        if progress is not None:
            progress.update(1)
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base
    return curve


def _grow(
    net: GrowableNetwork, opt: torch.optim.Optimizer, v: Variant, cfg: Config, seed: int
) -> list[dict[str, Any]]:
    """Apply ``v``'s growth to ``net`` (the optimizer follows); returns the growth records."""
    if v.grow is None:
        return []
    if "deepen" in v.grow:
        recs = [net.deepen(name, kind=v.grow["deepen"], optimizer=opt) for name in DEEPEN_LAYERS]
    else:
        g = torch.Generator().manual_seed(10_000 + seed)
        recs = [
            net.widen(name, factor=cfg.widen_factor, generator=g, optimizer=opt, **v.grow)
            for name in WIDEN_LAYERS
        ]
    return [
        {
            "op": r.op,
            "layer": r.layer,
            "old_width": r.old_width,
            "new_width": r.new_width,
            "params_after": r.params_after,
            "max_abs_error": r.max_abs_error,
        }
        for r in recs
    ]


def _deep_scratch(example: Tensor, seed: int, width: Sequence[int]) -> GrowableNetwork:
    """The Net2DeeperNet student's architecture (teacher ``width``), freshly initialised."""

    def build() -> GrowableNetwork:
        net = GrowableNetwork(SmallCNN(*width), example_inputs=example)
        for name in DEEPEN_LAYERS:
            net.deepen(name, kind="identity")
        for m in net.modules():
            if m is not net and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return net

    return _seeded(seed, build)


def _continue_from(
    teacher: GrowableNetwork, teacher_opt: torch.optim.Optimizer, cfg: Config
) -> tuple[GrowableNetwork, torch.optim.Optimizer]:
    """A copy of the teacher with a copy of its optimizer (state included)."""
    net = copy.deepcopy(teacher)
    opt = _optimizer(net, cfg)
    opt.load_state_dict(teacher_opt.state_dict())
    return net, opt


# --------------------------------------------------------------------------------------------
# one seed
# --------------------------------------------------------------------------------------------


def run_seed(seed: int, data: Data, cfg: Config, progress: Any = None) -> dict[str, Any]:
    """Teacher, then every variant, for one seed: the raw curves and step-0 measurements."""
    device = torch.device(cfg.device)
    example = data.x_train[:16]
    vs = variants(cfg.noise)
    out: dict[str, Any] = {}

    def writer_for(key: str) -> Any:
        return tensorboard_writer(f"{NAME}/{key}/seed{seed}", root=str(cfg.runs_dir), fresh=True)

    def hparams_for(key: str, result: dict[str, Any]) -> None:
        settings = {
            "command": NAME,
            "variant": key,
            "seed": seed,
            **{k: v for k, v in vars(cfg).items() if k not in ("seeds", "out_dir", "runs_dir")},
        }
        values = {
            "hparams/final_acc": result["accuracy"][-1],
            "hparams/params": float(result["params"]),
            "hparams/gflops": result["flops_per_step"] * result["steps"][-1] / 1e9,
            "hparams/seconds": result["seconds"],
        }
        run_dir = cfg.runs_dir / NAME / key / f"seed{seed}"
        tensorboard_hparams(run_dir, settings, values, result["steps"][-1])

    # the teacher: the narrow network trained from scratch
    teacher_run = next(v for v in vs if v.start == "scratch" and v.arch == "narrow")
    teacher = _seeded(
        seed, lambda: GrowableNetwork(SmallCNN(*cfg.teacher_width), example_inputs=example.cpu())
    )
    teacher.to(device)
    teacher_opt = _optimizer(teacher, cfg)
    writer = writer_for(teacher_run.key)
    try:
        curve = train(
            teacher,
            teacher_opt,
            data,
            cfg,
            steps=cfg.teacher_steps,
            order_seed=1000 + seed,
            writer=writer,
            progress=progress,
        )
    finally:
        writer.close()
    teacher_acc, teacher_logits = evaluate(teacher, data.x_test, data.y_test)
    out[teacher_run.key] = _result(curve, teacher, None, None)
    hparams_for(teacher_run.key, out[teacher_run.key])

    wide_widths = [int(round(teacher.width(n) * cfg.widen_factor)) for n in WIDEN_LAYERS]
    for v in vs:
        if v is teacher_run:
            continue
        start = time.perf_counter()
        records: list[dict[str, Any]] = []
        if v.start == "teacher":
            net, opt = _continue_from(teacher, teacher_opt, cfg)
            records = _grow(net, opt, v, cfg, seed)
        elif v.arch == "wide":
            net = _seeded(20_000 + seed, lambda: SmallCNN(*wide_widths)).to(device)
            opt = _optimizer(net, cfg)
        elif v.arch == "deep":
            net = _deep_scratch(example.cpu(), 30_000 + seed, cfg.teacher_width).to(device)
            opt = _optimizer(net, cfg)
        else:  # pragma: no cover - a new variant without a recipe
            raise ValueError(f"no recipe for variant {v.key!r}")
        grow_seconds = time.perf_counter() - start
        change = None
        if v.start == "teacher":
            _, logits = evaluate(net, data.x_test, data.y_test)
            change = float((logits - teacher_logits).abs().max())
        writer = writer_for(v.key)
        try:
            curve = train(
                net,
                opt,
                data,
                cfg,
                steps=cfg.steps,
                order_seed=2000 + seed,
                schedule=cfg.schedule,
                writer=writer,
                progress=progress,
            )
        finally:
            writer.close()
        curve.seconds += grow_seconds
        out[v.key] = _result(curve, net, change, records)
        hparams_for(v.key, out[v.key])
    return {"seed": seed, "teacher_accuracy": teacher_acc, "variants": out}


def _result(
    curve: Curve, net: nn.Module, change: float | None, records: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "steps": curve.steps,
        "accuracy": curve.accuracy,
        "loss": curve.loss,
        "seconds": curve.seconds,
        "flops_per_step": curve.flops_per_step,
        "params": sum(p.numel() for p in net.parameters()),
        "logit_change_at_0": change,
        "growth": records,
    }


# --------------------------------------------------------------------------------------------
# metrics, table, plot
# --------------------------------------------------------------------------------------------


def steps_to_reach(steps: Sequence[int], acc: Sequence[float], target: float) -> int | None:
    """First evaluated step whose accuracy is at least ``target`` (None: never)."""
    return next((s for s, a in zip(steps, acc) if a >= target), None)


def advantage(run: dict[str, Any], ref: dict[str, Any], horizon: int) -> float | None:
    """Mean accuracy difference ``run - ref`` over the evaluated steps ``<= horizon``."""
    ref_acc = dict(zip(ref["steps"], ref["accuracy"]))
    diffs = [
        a - ref_acc[s]
        for s, a in zip(run["steps"], run["accuracy"])
        if s <= horizon and s in ref_acc
    ]
    return sum(diffs) / len(diffs) if diffs else None


def summarise(per_seed: list[dict[str, Any]], cfg: Config) -> dict[str, dict[str, Any]]:
    """Per-variant metric values over seeds (lists, one entry per seed)."""
    out: dict[str, dict[str, Any]] = {}
    vs = variants(cfg.noise)
    control_key = next(v.key for v in vs if v.start == "teacher" and v.grow is None)
    for v in vs:
        m: dict[str, list[Any]] = {
            k: []
            for k in (
                "acc_at_0",
                "logit_change_at_0",
                "steps_to_teacher",
                "steps_to_control",
                "advantage_first_half",
                "final_accuracy",
                "final_minus_control",
                "seconds",
                "params",
            )
        }
        for s in per_seed:
            run = s["variants"][v.key]
            control = s["variants"][control_key]["accuracy"][-1]
            m["acc_at_0"].append(run["accuracy"][0])
            m["logit_change_at_0"].append(run["logit_change_at_0"])
            m["steps_to_teacher"].append(
                steps_to_reach(run["steps"], run["accuracy"], s["teacher_accuracy"])
            )
            m["steps_to_control"].append(steps_to_reach(run["steps"], run["accuracy"], control))
            m["advantage_first_half"].append(
                advantage(run, s["variants"][v.scratch], cfg.steps // 2) if v.scratch else None
            )
            m["final_accuracy"].append(run["accuracy"][-1])
            m["final_minus_control"].append(
                None if v.key == control_key else run["accuracy"][-1] - control
            )
            m["seconds"].append(run["seconds"])
            m["params"].append(run["params"])
        out[v.key] = m
    return out


@dataclass(frozen=True)
class PairedGap:
    """A run's final accuracy against the control's, paired by seed.

    ``mean`` and ``std`` (sample std; 0 for one seed) of the per-seed differences, ``above``
    the number of seeds in which the run ends above the control, ``spread`` the largest of the
    std of the differences and the stds over seeds of both runs' final accuracies, and
    ``exceeds`` whether ``mean`` is positive and above ``spread`` (None for one seed).
    """

    mean: float
    std: float
    above: int
    n: int
    spread: float
    exceeds: bool | None


def _sample_std(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))


def paired_gap(run_final: Sequence[float], control_final: Sequence[float]) -> PairedGap:
    """Compare final accuracies seed by seed (the two sequences list the same seeds in order).

    Raises
    ------
    ValueError
        When the sequences are empty or differ in length.
    """
    if not run_final or len(run_final) != len(control_final):
        raise ValueError(
            f"paired_gap needs one final accuracy per seed for both runs, got "
            f"{len(run_final)} and {len(control_final)}"
        )
    diffs = [a - b for a, b in zip(run_final, control_final)]
    n = len(diffs)
    mean, std = sum(diffs) / n, _sample_std(diffs)
    spread = max(std, _sample_std(run_final), _sample_std(control_final))
    return PairedGap(
        mean=mean,
        std=std,
        above=sum(d > 0 for d in diffs),
        n=n,
        spread=spread,
        exceeds=None if n < 2 else bool(mean > 0 and mean > spread),
    )


def gap_to_control(summary: dict[str, dict[str, Any]], key: str) -> PairedGap | None:
    """:func:`paired_gap` of variant ``key`` against ``teacher-continued`` (None for itself)."""
    m = summary[key]
    if any(d is None for d in m["final_minus_control"]):
        return None
    return paired_gap(m["final_accuracy"], summary["teacher-continued"]["final_accuracy"])


def comparison_line(summary: dict[str, dict[str, Any]], key: str = "net2wider") -> str:
    """One sentence: does ``key`` end above the teacher-continued control by more than the
    spread over seeds?"""
    gap = gap_to_control(summary, key)
    if gap is None:
        return f"{key} is the control"
    if gap.exceeds is None:
        return f"{key} - teacher-continued, final accuracy: {gap.mean:+.4f} (one seed: no spread)"
    return (
        f"{key} - teacher-continued, final accuracy: {gap.mean:+.4f} ± {gap.std:.4f} "
        f"(paired over {gap.n} seeds, above in {gap.above}/{gap.n}); largest spread "
        f"{gap.spread:.4f}; gap exceeds the spread: {'yes' if gap.exceeds else 'no'}"
    )


def _fmt(values: Sequence[Any], digits: int = 3) -> str:
    vals = [x for x in values if x is not None]
    if not vals:
        return "-"
    return fmt_mean_std(vals, digits=digits)


def _fmt_steps(values: Sequence[int | None]) -> str:
    reached = [x for x in values if x is not None]
    if not reached:
        return "never"
    text = fmt_mean_std(reached, digits=0)
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def _fmt_gap(gap: PairedGap | None) -> str:
    if gap is None:
        return "-"
    text = f"{gap.mean:+.4f}" if gap.n == 1 else f"{gap.mean:+.4f} ± {gap.std:.4f}"
    return f"{text} ({gap.above}/{gap.n} above)"


def table_rows(summary: dict[str, dict[str, Any]], cfg: Config) -> list[dict[str, str]]:
    """One row of formatted cells per variant."""
    rows = []
    for v in variants(cfg.noise):
        m = summary[v.key]
        gap = gap_to_control(summary, v.key)
        changes = [x for x in m["logit_change_at_0"] if x is not None]
        rows.append(
            {
                "variant": v.key,
                "params": f"{m['params'][0]:,}",
                "acc@0": _fmt(m["acc_at_0"]),
                "logit change @0": f"{max(changes):.1e}" if changes else "-",
                "steps to teacher acc": _fmt_steps(m["steps_to_teacher"]),
                "steps to control final": _fmt_steps(m["steps_to_control"]),
                "adv. vs scratch (1st half)": (
                    f"{_fmt(m['advantage_first_half'])} vs {v.scratch}" if v.scratch else "-"
                ),
                "final acc": _fmt(m["final_accuracy"]),
                "final - control (paired)": _fmt_gap(gap),
                "gap > spread": "-" if gap is None or gap.exceeds is None else (
                    "yes" if gap.exceeds else "no"
                ),
                "wall s (no eval)": _fmt(m["seconds"], digits=1),
            }
        )
    return rows


def plot(per_seed: list[dict[str, Any]], cfg: Config) -> Any:
    """Test accuracy against steps after the teacher: mean over seeds, shaded +-1 sample std.

    Left: the widening variants; right: deepening. Top: full range; bottom: zoomed on the runs
    that start exactly at the teacher. The dotted line is the teacher's final accuracy (mean
    over seeds).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = {v.key: v for v in variants(cfg.noise)}
    panels = [
        (
            "widening",
            [
                "net2wider",
                "net2wider-equal",
                "net2wider-equal-noise",
                "zero-init",
                "random-pad",
                "wide-scratch",
                "teacher-continued",
            ],
        ),
        ("deepening", ["net2deeper", "deep-scratch", "teacher-continued", "narrow-scratch"]),
    ]
    teacher = sum(s["teacher_accuracy"] for s in per_seed) / len(per_seed)

    def mean_curve(key: str) -> list[float]:
        runs = [s["variants"][key]["accuracy"] for s in per_seed]
        return [sum(a) / len(a) for a in zip(*runs)]

    # zoom: the range of the runs that start from the (exactly preserved) teacher
    zoomed = [mean_curve(v.key) for v in vs.values() if v.exact]
    low = min(min(c) for c in zoomed) - 0.01
    high = max(max(mean_curve(k)) for k in vs) + 0.01
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
    for col, (title, keys) in enumerate(panels):
        for row in range(2):
            ax = axes[row][col]
            for key in keys:
                runs = [s["variants"][key] for s in per_seed]
                steps = runs[0]["steps"]
                acc = torch.tensor([r["accuracy"] for r in runs], dtype=torch.float64)
                mean = acc.mean(0)
                std = acc.std(0) if len(runs) > 1 else torch.zeros_like(mean)
                ax.plot(steps, mean.tolist(), label=vs[key].label, **vs[key].style)
                ax.fill_between(
                    steps,
                    (mean - std).tolist(),
                    (mean + std).tolist(),
                    alpha=0.15,
                    color=vs[key].style.get("color"),
                )
            ax.axhline(
                teacher, color="grey", linestyle=":", linewidth=1, label="teacher's final accuracy"
            )
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{title} (x{cfg.widen_factor:g})" if col == 0 else title)
                ax.set_ylim(0.0, 1.0)
                ax.legend(fontsize=8, loc="lower right")
            else:
                ax.set_ylim(max(0.0, low), min(1.0, high))
                ax.set_xlabel("SGD steps after the teacher")
            if col == 0:
                ax.set_ylabel("test accuracy" + (" (zoom)" if row else ""))
    fig.suptitle(
        f"Net2Net on Fashion-MNIST ({cfg.train_size} train / {cfg.test_size} test images, "
        f"teacher {cfg.teacher_steps} steps, then {cfg.steps} steps ({cfg.schedule} LR), "
        f"{len(per_seed)} seed(s), mean ± std)"
    )
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; print the table, write results, the plot and TensorBoard runs.

    Returns
    -------
    dict
        ``rows`` (the formatted table), ``summary`` (per-variant values per seed), ``paths``
        (written files), ``config`` and ``per_seed`` (raw curves).
    """
    cfg = make_config(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = load_data(cfg)
        n_cont = len(variants(cfg.noise)) - 1
        total = len(cfg.seeds) * (cfg.teacher_steps + n_cont * cfg.steps)
        per_seed = []
        with tqdm(total=total, desc=NAME, unit="step", mininterval=2.0) as progress:
            for seed in cfg.seeds:
                progress.set_postfix(seed=seed)
                per_seed.append(run_seed(seed, data, cfg, progress))
    finally:
        torch.set_num_threads(threads)
    summary = summarise(per_seed, cfg)
    rows = table_rows(summary, cfg)
    print(format_table(rows, COLUMNS))
    print(NOTES)
    for key in ("net2wider", "net2deeper"):
        print(comparison_line(summary, key))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    config.update(
        model=f"SmallCNN{tuple(cfg.teacher_width)}",
        optimizer="SGD",
        widen_layers=list(WIDEN_LAYERS),
        deepen_layers=list(DEEPEN_LAYERS),
        optimizer_state="students and teacher-continued continue the teacher's SGD state; "
        "scratch runs start a fresh optimizer",
    )
    payload = {
        "config": config,
        "variants": {
            v.key: {
                "label": v.label,
                "start": v.start,
                "grow": v.grow,
                "scratch": v.scratch,
                "exact": v.exact,
            }
            for v in variants(cfg.noise)
        },
        "notes": NOTES,
        "summary": summary,
        "per_seed": per_seed,
    }
    paths = dict(write_results(NAME, payload, rows, COLUMNS, out_dir=str(cfg.out_dir)))
    paths["png"] = save_plot(plot(per_seed, cfg), NAME, out_dir=str(cfg.out_dir))
    return {
        "rows": rows,
        "summary": summary,
        "paths": paths,
        "config": config,
        "per_seed": per_seed,
    }
