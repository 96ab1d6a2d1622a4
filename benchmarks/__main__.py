"""``python -m net2grow.benchmarks continual|net2net|speed [options]``.

Each command lives in ``benchmarks/<command>.py`` and exposes ``add_arguments(parser)`` and
``run(args) -> dict``. Command modules are imported only when their command is chosen, so a
broken module does not break the others (nor ``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Sequence
from types import ModuleType

import torch

PROG = "python -m net2grow.benchmarks"

#: Command name -> one-line help. The module ``benchmarks.<name>`` implements it.
COMMANDS = {
    "continual": "continual-learning comparison of growing and fixed networks on a stream",
    "net2net": "the Net2Net reproduction: grown networks vs. networks trained from scratch",
    "speed": "growth speed: widen/deepen/trace time against the parameter-copy floor",
    "transformer": "a byte-level GPT grown mid-training vs. the large one from scratch (FLOPs)",
    "zoo": "widen/deepen sampled layers of torchvision, timm and Hugging Face models: exact?",
}


#: What each command writes (``--out-dir``: results, ``--runs-dir``: runs), for ``--help``.
WRITES = {
    "continual": [
        "results/continual-<stream>-<scenario>.json  every run: accuracy matrix, FLOPs, widths",
        "results/continual-<stream>-<scenario>.md    the table",
        "results/continual-<stream>-<scenario>.png   accuracy vs. compute (mean ± std, seeds)",
        "results/continual-<stream>-<scenario>-curves.png  accuracy per experience",
        "runs/continual/<stream>-<scenario>/<method>-s<seed>/  TensorBoard, every method",
        "--resume PATH                               the resume file, when asked for",
    ],
    "net2net": [
        "results/net2net.json, .md, .png             curves per seed, table, accuracy plot",
        "runs/net2net/<variant>/seed<seed>/           TensorBoard, every variant",
    ],
    "speed": [
        "results/speed.json, .md, .png               timings, table, bar chart",
        "runs/speed/<date-time>/                      TensorBoard",
    ],
    "transformer": [
        "results/transformer.json, .md, .png         curves per seed, table, loss vs. FLOPs",
        "runs/transformer/<large|grown>/seed<seed>/   TensorBoard",
    ],
    "zoo": [
        "results/zoo.json, .md, .png                 every trial, table, outcome bars",
        "runs/zoo/                                    TensorBoard (summary text, fractions)",
    ],
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; help texts wrapped without breaking method names
    such as naive-large at their hyphens."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(
            " ".join(text.split()), width, break_on_hyphens=False, break_long_words=False
        )


def _epilog() -> str:
    lines = ["files written (results/ and runs/ are --out-dir and --runs-dir):"]
    for name, files in WRITES.items():
        lines.append(f"  {name}:")
        lines.extend(f"    {f}" for f in files)
    lines.append("see every run side by side: .venv/bin/tensorboard --logdir runs  (make tb)")
    return "\n".join(lines)


def default_device() -> str:
    """``"cuda"`` when a CUDA device is present, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a torch device: {value!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda asked for, but no CUDA device is present")
    return value


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every command accepts (a command may redefine one in its ``add_arguments``)."""
    g = parser.add_argument_group("common options")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                   help="random seeds, one run each (default: %(default)s)")
    g.add_argument("--device", type=_device, default=default_device(),
                   help="torch device (default: cuda if available, else cpu; now %(default)s)")
    g.add_argument("--out-dir", default="results",
                   help="folder for the JSON, Markdown and PNG files listed below "
                        "(default: %(default)s)")
    g.add_argument("--runs-dir", default="runs",
                   help="folder for TensorBoard runs (default: %(default)s)")
    g.add_argument("--data-root", default=None,
                   help="folder with Fashion-MNIST's IDX files (.gz or not); default: none, "
                        "read Debian's /usr/share/datasets/fashion-mnist, else download with "
                        "torchvision into ./data (split-digits needs no files)")
    g.add_argument("--quick", action="store_true",
                   help="a tiny run (seconds to a minute: one seed, fewer epochs or steps), "
                        "for tests and smoke checks")


def load_command(name: str) -> ModuleType:
    """Import ``benchmarks.<name>``, checking it has ``add_arguments`` and ``run``."""
    if name not in COMMANDS:
        raise KeyError(f"unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    module = importlib.import_module(f".{name}", __package__)
    missing = [f for f in ("add_arguments", "run") if not callable(getattr(module, f, None))]
    if missing:
        raise AttributeError(f"benchmarks/{name}.py does not define {' and '.join(missing)}()")
    return module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only ``command``'s module (if given) is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="net2grow benchmarks: each command prints a results table and writes "
                    "JSON, a Markdown table, PNG plots and TensorBoard runs (listed below).",
        epilog=_epilog(),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, text in COMMANDS.items():
        writes = "writes:\n" + "\n".join(f"  {f}" for f in WRITES.get(name, []))
        p = sub.add_parser(name, help=text, description=text, epilog=writes,
                           conflict_handler="resolve",
                           formatter_class=_Formatter)
        add_common_arguments(p)
        if name == command:
            load_command(name).add_arguments(p)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line (``sys.argv[1:]`` by default) into the chosen command's options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    return build_parser(command if command in COMMANDS else None).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    from .data import DataUnavailableError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = _chosen_command(argv)
    try:
        args = parse_args(argv)
    except Exception as exc:  # a broken command module: say which, keep the others usable
        print(f"{PROG} {command}: cannot load the command: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    try:
        load_command(args.command).run(args)
    except DataUnavailableError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
