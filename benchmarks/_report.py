"""Results shared by every benchmark command: tables, JSON + Markdown, plots, TensorBoard."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "fmt_mean_std",
    "format_table",
    "machine_info",
    "markdown_table",
    "mean_std",
    "save_plot",
    "tensorboard_hparams",
    "tensorboard_writer",
    "write_results",
]


# --- cells -----------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    """Text of one table cell: floats to 4 significant digits, missing values as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _cell(value.item())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _cell(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table of ``rows`` (dicts) showing ``columns`` in that order.

    Numbers are right-aligned, text left-aligned; a key missing from a row shows as ``-``.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [
        any(_is_number(row.get(c)) for row in rows)
        and all(_is_number(row.get(c)) or row.get(c) is None for row in rows)
        for c in columns
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w)
                 for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """GitHub-flavoured Markdown table of ``rows`` showing ``columns``."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    numeric = [any(_is_number(row.get(c)) for row in rows) for c in columns]
    out = [
        "| " + " | ".join(esc(c) for c in columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    out.extend("| " + " | ".join(esc(_cell(row.get(c))) for c in columns) + " |" for row in rows)
    return "\n".join(out)


# --- statistics ------------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def fmt_mean_std(values: Iterable[float], digits: int = 3) -> str:
    """``"0.871 ± 0.004"`` (mean ± sample std); a single value prints as its mean alone."""
    vals = list(values)
    mean, std = mean_std(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# --- machine and JSON ------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Where a result was measured: platform, Python, torch, CPUs and load, CUDA device, date."""
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cuda": torch.version.cuda if cuda else None,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback for tensors, numpy values, paths, dataclasses and sets."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    return str(obj)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(
    name: str,
    payload: dict,
    rows: list[dict],
    columns: list[str],
    out_dir: str | Path = "results",
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``.

    The JSON holds ``payload``'s keys plus ``name``, ``columns``, ``rows`` and ``machine``
    (see :func:`machine_info`); the Markdown file holds the table and the machine line.

    Returns
    -------
    dict
        ``{"json": path, "md": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    doc = {**payload, "name": name, "columns": list(columns), "rows": rows, "machine": machine}
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    _write_text(json_path, json.dumps(doc, indent=2, default=_jsonable, allow_nan=True) + "\n")
    where = (
        f"{machine['cuda_device'] or 'CPU only'}; {machine['cpu_count']} CPUs "
        f"({machine['torch_threads']} torch threads, load {machine['load_avg_1min']}); "
        f"torch {machine['torch']}; {machine['platform']}; {machine['date']}"
    )
    md = f"# {name}\n\n{markdown_table(rows, columns)}\n\nMeasured on: {where}\n"
    _write_text(md_path, md)
    return {"json": json_path, "md": md_path}


# --- plots and TensorBoard -------------------------------------------------------------------
def save_plot(fig: Any, name: str, out_dir: str | Path = "results") -> Path:
    """Save a matplotlib figure as ``<out_dir>/<name>.png`` and close it; return the path."""
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / (name if name.endswith(".png") else f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def tensorboard_writer(run_name: str, root: str | Path = "runs", fresh: bool = False) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` logging to ``<root>/<run_name>``.

    ``fresh``: first remove the event files an earlier run left there (a rerun replaces the
    run instead of drawing a second curve over it).
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(root) / run_name
    log_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for old in log_dir.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(log_dir=str(log_dir))


def tensorboard_hparams(
    log_dir: str | Path, hparams: dict[str, Any], metrics: dict[str, float], step: int = 0
) -> Path:
    """Record a finished run's settings and results for TensorBoard's HPARAMS tab.

    Written to the child run ``<log_dir>/hparams``: a session (``hparams``: values that are
    str, bool, int or float; others as text) and the ``metrics`` as scalars at ``step``. No
    experiment summary is written, so TensorBoard lists the union of the settings of every
    session under its ``--logdir`` (whichever command wrote them) and, as metrics, the scalars
    of these child runs. Returns the child run's folder.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    values = {
        k: v if isinstance(v, (str, bool, int, float)) else str(v) for k, v in hparams.items()
    }
    path = Path(log_dir) / "hparams"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("events.out.tfevents.*"):
        old.unlink()  # one session per run: a rerun replaces it
    writer = SummaryWriter(log_dir=str(path))
    try:
        _, start, end = hparams_summary(values, dict(metrics))
        file_writer = writer._get_file_writer()
        file_writer.add_summary(start)
        file_writer.add_summary(end)
        for tag, value in metrics.items():
            writer.add_scalar(tag, float(value), step)
    finally:
        writer.close()
    return path
