"""``python -m net2grow.benchmarks speed``: how fast networks grow, against the floor of copying
them.

For MLPs and CNNs of about 1M, 10M and 100M parameters (and torchvision's resnet18), measured in
one run on the CPU (and the CUDA device when there is one):

- ``clone_ms``: ``torch.clone`` of every parameter, the memory-bound floor of any growth;
- ``forward_ms``: one forward pass of the example batch (verification runs the probe through it);
- ``trace_ms``: ``GrowableNetwork`` construction (torch.fx trace + shape recording);
- ``widen_ms`` / ``widen_verify_ms``: widening an inner layer by 1.5x, ``verify=False`` / ``True``;
- ``deepen_ms`` / ``deepen_verify_ms``: ``deepen(kind="identity")`` (an identity layer after it);
- ``widen/clone``: ``widen_ms / clone_ms``.

Every time is the median over ``--repeats`` runs, each on a fresh copy of the network.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..growth import GrowableNetwork, GrowthError
from ._report import format_table, save_plot, tensorboard_writer, write_results

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
MODELS = ("mlp", "cnn", "resnet18")
FACTOR = 1.5
MLP_IN, N_OUT, CNN_SIDE = 784, 10, 16

COLUMNS = [
    "model", "size", "device", "params", "layer", "clone_ms", "forward_ms", "trace_ms",
    "widen_ms", "widen_verify_ms", "widen/clone", "deepen_ms", "deepen_verify_ms", "max_err",
]


# --- models ----------------------------------------------------------------------------------
def mlp_params(h: int) -> int:
    """Parameters of :func:`make_mlp` with hidden width ``h``."""
    return (MLP_IN + 1) * h + 2 * (h + 1) * h + (h + 1) * N_OUT


def make_mlp(h: int) -> nn.Module:
    """784 -> h -> h -> h -> 10 with ReLUs; layer ``"2"`` is the inner one that is grown."""
    return nn.Sequential(
        nn.Linear(MLP_IN, h), nn.ReLU(),
        nn.Linear(h, h), nn.ReLU(),
        nn.Linear(h, h), nn.ReLU(),
        nn.Linear(h, N_OUT),
    )


def cnn_params(c: int) -> int:
    """Parameters of :func:`make_cnn` with ``c`` channels."""
    return (27 * c + c) + 3 * (9 * c * c + c) + 4 * 2 * c + (c + 1) * N_OUT


def make_cnn(c: int) -> nn.Module:
    """Four 3x3 conv-BN-ReLU blocks of ``c`` channels on 3x16x16 inputs; ``"4"`` is grown."""

    def block(cin: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]

    return nn.Sequential(
        *block(3), nn.MaxPool2d(2),      # 0-3
        *block(c),                       # 4-6: the grown layer is "4"
        *block(c), nn.MaxPool2d(2),      # 7-10
        *block(c),                       # 11-13
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, N_OUT),
    )


def _width_for(target: int, count: Callable[[int], int]) -> int:
    """Smallest width whose parameter count reaches ``target`` (or the closer neighbour)."""
    lo, hi = 1, 1
    while count(hi) < target:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1 if lo > 1 and target - count(lo - 1) < count(lo) - target else lo


@dataclass
class Case:
    """One network to measure."""

    model: str
    size: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    layer: str


def make_cases(models: list[str], sizes: list[str], resnet_side: int) -> list[Case]:
    """The networks of a run, in table order."""
    cases = []
    for size in sizes:
        target = SIZES[size]
        if "mlp" in models:
            h = _width_for(target, mlp_params)
            cases.append(Case("mlp", size, lambda h=h: make_mlp(h), (MLP_IN,), "2"))
        if "cnn" in models:
            c = _width_for(target, cnn_params)
            cases.append(Case("cnn", size, lambda c=c: make_cnn(c), (3, CNN_SIDE, CNN_SIDE), "4"))
    if "resnet18" in models:
        from torchvision.models import resnet18

        cases.append(Case("resnet18", "11M", lambda: resnet18(num_classes=N_OUT),
                          (3, resnet_side, resnet_side), "layer2.0.conv1"))
    return cases


# --- timing ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(milliseconds, result) of ``fn()``, with the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3, result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _grow_times(
    net: GrowableNetwork, op: Callable[[GrowableNetwork], Any], device: torch.device,
    repeats: int, warmup: bool,
) -> tuple[list[float], list[Any]]:
    """Times (ms) of ``op`` on ``repeats`` fresh deep copies of ``net``, and its records."""
    times, records = [], []
    for i in range(repeats + int(warmup)):
        fresh = copy.deepcopy(net)
        _sync(device)
        ms, rec = _timed(lambda fresh=fresh: op(fresh), device)
        if i >= int(warmup):
            times.append(ms)
            records.append(rec)
        del fresh
    return times, records


def measure(case: Case, device: torch.device, repeats: int, seed: int) -> dict[str, Any]:
    """One table row: every time of ``case`` on ``device`` (medians, in milliseconds)."""
    torch.manual_seed(seed)
    example = torch.randn(2, *case.input_shape, device=device)
    warmup = device.type == "cuda"

    trace_ms = []
    for i in range(repeats + int(warmup)):
        model = case.build().to(device)
        ms, net = _timed(lambda model=model: GrowableNetwork(model, example), device)
        if i >= int(warmup):
            trace_ms.append(ms)
    params = list(net.parameters())
    row: dict[str, Any] = {
        "model": case.model, "size": case.size, "device": str(device),
        "params": net.num_parameters(), "layer": case.layer,
    }
    clones = []
    for _ in range(repeats + 1):
        ms, copies = _timed(lambda: [p.detach().clone() for p in params], device)
        clones.append(ms)
        del copies
    row["clone_ms"] = _median(clones[1:])  # the first clone pays for fresh allocations
    with torch.no_grad():
        net.eval()
        fwd = [_timed(lambda: net(example), device)[0] for _ in range(repeats + 1)][1:]
        net.train()
    row["forward_ms"] = _median(fwd)
    row["trace_ms"] = _median(trace_ms)

    gen = torch.Generator().manual_seed(seed)
    for verify, key in ((False, "widen_ms"), (True, "widen_verify_ms")):
        times, recs = _grow_times(
            net, lambda n, v=verify: n.widen(case.layer, factor=FACTOR, verify=v, generator=gen),
            device, repeats, warmup,
        )
        row[key] = _median(times)
        if verify:
            row["max_err"] = max(r.max_abs_error for r in recs)
        else:
            row["params_after_widen"] = recs[0].params_after
    row["widen/clone"] = row["widen_ms"] / row["clone_ms"] if row["clone_ms"] else None

    row["deepen_ms"] = row["deepen_verify_ms"] = None
    for verify, key in ((False, "deepen_ms"), (True, "deepen_verify_ms")):
        try:
            times, _ = _grow_times(
                net, lambda n, v=verify: n.deepen(case.layer, kind="identity", verify=v),
                device, repeats, warmup,
            )
            row[key] = _median(times)
        except GrowthError as exc:
            row.setdefault("notes", []).append(f"deepen: {type(exc).__name__}: {exc}")
    return row


def warm_up(device: torch.device, seed: int) -> None:
    """Run every measurement once on tiny networks, untimed.

    The first call of a kind in a process pays one-off costs (allocator pools, oneDNN and CUDA
    kernel set-up, lazy imports) that are not growth costs.
    """
    for case in (Case("mlp", "tiny", lambda: make_mlp(16), (MLP_IN,), "2"),
                 Case("cnn", "tiny", lambda: make_cnn(8), (3, CNN_SIDE, CNN_SIDE), "4")):
        measure(case, device, 1, seed)


# --- command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m net2grow.benchmarks speed``."""
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="parameter counts of the MLP and CNN (default: all; --quick: 1M)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                        help="networks to measure (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per measurement, each on a fresh copy; the median is "
                             "reported (default: %(default)s; --quick: 2)")
    parser.add_argument("--resnet-side", type=int, default=224,
                        help="image side of resnet18's example batch (default: %(default)s; "
                             "--quick: 32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice). On a busy "
                             "machine 1 gives far steadier times: idle OpenMP threads spin-wait "
                             "for cores other processes hold")
    parser.set_defaults(seeds=[0])


def _plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = ["clone_ms", "forward_ms", "widen_ms", "widen_verify_ms", "deepen_ms",
            "deepen_verify_ms", "trace_ms"]
    keys = [k for k in keys if any(r.get(k) for r in rows)]
    labels = [f"{r['model']} {r['size']}\n{r['device']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r.get(key) or math.nan for r in rows], width, label=key.removesuffix("_ms"))
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds (median, log scale)")
    ax.set_title(f"net2grow growth speed: widen x{FACTOR} vs. cloning every parameter")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return fig


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure, print the table, write results/speed.{json,md,png} and a TensorBoard run."""
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = ["1M"] if args.quick else list(dict.fromkeys(args.sizes))
    repeats = 2 if args.quick else max(1, int(args.repeats))
    resnet_side = 32 if args.quick else int(args.resnet_side)
    seed = int(args.seeds[0])
    main_device = torch.device(args.device)
    devices = [torch.device("cpu")]
    if main_device.type != "cpu":
        devices.append(main_device)
    cases = make_cases(list(args.models), sizes, resnet_side)

    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    for device in devices:
        warm_up(device, seed)
        for case in cases:
            label = f"{case.model} {case.size} on {device}"
            print(f"speed: {label} ...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(case, device, repeats, seed))
            except (GrowthError, RuntimeError) as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
                print(f"speed: {label} failed: {exc}", file=sys.stderr, flush=True)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    table = format_table(rows, COLUMNS)
    print(table)
    payload = {
        "command": "speed",
        "args": {"sizes": sizes, "models": list(args.models), "repeats": repeats,
                 "resnet_side": resnet_side, "seed": seed, "quick": bool(args.quick),
                 "devices": [str(d) for d in devices], "threads": torch.get_num_threads()},
        "factor": FACTOR,
        "units": "milliseconds, median over repeats; widen/clone = widen_ms / clone_ms",
        "errors": errors,
    }
    paths = write_results("speed", payload, rows, COLUMNS, out_dir=args.out_dir)
    if rows:
        paths["png"] = save_plot(_plot(rows), "speed", out_dir=args.out_dir)
    writer = tensorboard_writer(f"speed/{time.strftime('%Y%m%d-%H%M%S')}", root=args.runs_dir)
    try:
        for r in rows:
            for key in ("clone_ms", "forward_ms", "trace_ms", "widen_ms", "widen_verify_ms",
                        "deepen_ms", "deepen_verify_ms", "widen/clone"):
                if isinstance(r.get(key), float):
                    tag = f"{r['model']}_{r['device']}/{key.replace('/', '_per_')}"
                    writer.add_scalar(tag, r[key], global_step=int(r["params"]))
        writer.add_text("speed/table", "    " + table.replace("\n", "\n    "))
    finally:
        writer.close()
    for kind, path in paths.items():
        print(f"speed: wrote {path} ({kind})", file=sys.stderr)
    return {"rows": rows, "errors": errors, "paths": paths, "table": table}

