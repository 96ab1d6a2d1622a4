"""The resume file: :func:`save_run` writes a strategy's whole training state and where the run
stands, :func:`load_run` restores it, :func:`read_run` reads where the run stands."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...growth import Checkpoint, GrowthError, load_checkpoint, save
from ...growth.checkpoint.fileformat import PathLike
from .codec import config_diff, decode_state, encode_state, encoded_equal
from .errors import ResumeMismatchError
from .rng import prepare_rng, rng_state
from .strategy import placeholder_network, prepare_strategy, strategy_state

__all__ = ["FORMAT", "VERSION", "RunState", "load_run", "read_run", "save_run"]

#: The ``format`` entry of a resume file's checkpoint ``extra``.
FORMAT = "net2grow-resume"
#: The newest resume format this net2grow writes and reads.
VERSION = 1


@dataclass
class RunState:
    """What :func:`load_run` / :func:`read_run` return.

    Attributes
    ----------
    position : int
        The ``position`` given to :func:`save_run` (e.g. experiences finished).
    results : Any
        The ``results`` given to :func:`save_run`.
    config : Any
        The ``config`` the file was saved with.
    path : str
        The resume file.
    """

    position: int
    results: Any
    config: Any
    path: str


def save_run(
    path: PathLike,
    strategy: Any = None,
    *,
    position: int,
    results: Any = None,
    config: Any = None,
) -> None:
    """Save ``strategy``'s whole training state and where the run stands to ``path``.

    One file, written atomically by :func:`growth.save` (an interrupted save leaves the previous
    file intact). Call it where the run can continue from: between experiences, after the
    evaluation whose results ``results`` holds.

    Parameters
    ----------
    path : str or os.PathLike
        The resume file.
    strategy : Avalanche strategy, optional
        A ``SupervisedTemplate`` (``Naive``, ``Replay``, :class:`~strategies.Growing`, ...);
        None saves only ``position``, ``results`` and ``config``.
    position : int
        Where the run continues (e.g. the number of experiences trained).
    results : plain data, optional
        The run's results so far (numbers, strings, tensors, lists, tuples, sets, dicts).
    config : plain data, optional
        What identifies the run (its arguments): :func:`load_run` refuses a file whose config
        differs from the one it is given.

    Raises
    ------
    GrowthError
        Something that a resume file cannot store (nothing is written): a model or plugin state
        that is not plain data, a storage policy or layer type without support.
    """
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise ValueError(f"position must be an int >= 0, got {position!r}")
    extra: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "position": int(position),
        "results": encode_state(results, "results"),
        "config": encode_state(config, "config"),
        "strategy": None,
        "rng": rng_state(),  # before the strategy's state: reading replay samples may draw
    }
    net, optimizer = placeholder_network(), None
    if strategy is not None:
        net, optimizer, extra["strategy"] = strategy_state(strategy)
    save(net, path, optimizer, extra=extra)


def _read(path: PathLike, config: Any, check_config: bool) -> tuple[Checkpoint, dict[str, Any]]:
    """The resume file's checkpoint and its ``extra``, checked to be a resume file of a format
    this net2grow reads (and, with ``check_config``, saved with ``config``)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    extra = ckpt.extra
    name = os.fspath(path)
    if not isinstance(extra, dict) or extra.get("format") != FORMAT:
        raise GrowthError(f"{name} is a net2grow checkpoint, not a resume file")
    if not isinstance(extra.get("version"), int) or extra["version"] > VERSION:
        raise GrowthError(
            f"{name}: resume format {extra.get('version')!r} is newer than this net2grow reads "
            f"({VERSION}); upgrade net2grow"
        )
    if check_config:
        now = encode_state(config, "config")
        if not encoded_equal(extra["config"], now):
            raise ResumeMismatchError(
                f"{name} was saved by a run with other arguments; refusing to resume it "
                f"(delete it or pass the same arguments):\n{config_diff(extra['config'], now)}"
            )
    return ckpt, extra


def _run_state(extra: dict[str, Any], path: PathLike) -> RunState:
    """Where the run of a resume file's ``extra`` stands."""
    return RunState(
        int(extra["position"]),
        decode_state(extra["results"]),
        decode_state(extra["config"]),
        os.fspath(path),
    )


def read_run(path: PathLike, *, config: Any = None, check_config: bool = False) -> RunState:
    """Read a resume file's position, results and config without restoring anything.

    Raises ``GrowthError`` for a damaged or foreign file, :class:`ResumeMismatchError` when
    ``check_config`` is true and ``config`` differs from the saved one.
    """
    _, extra = _read(path, config, check_config)
    return _run_state(extra, path)


def load_run(
    path: PathLike, strategy: Any, *, config: Any = None, missing_ok: bool = False
) -> RunState | None:
    """Restore ``strategy`` from a file written by :func:`save_run`; returns where to continue.

    The strategy must be built as in the saved run (same class, plugins in the same order, an
    optimizer of the same class); its model is replaced by the saved network (a
    ``GrowableNetwork``) or loaded in place (any other module, which must have the saved
    architecture). The optimizer object is kept and its param groups and state replaced, so
    schedulers holding it keep working. The RNG states are restored last.

    Everything is read and checked before the strategy changes: a damaged file (truncated,
    modified: ``GrowthError``) or a file of another run (:class:`ResumeMismatchError`, a
    ``GrowthError``) leaves it as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The resume file.
    strategy : Avalanche strategy
        Built as the saved run's was.
    config : plain data, optional
        Must equal the ``config`` given to :func:`save_run`.
    missing_ok : bool
        Return None (and change nothing) when ``path`` does not exist.
    """
    if missing_ok and not os.path.exists(path):
        return None
    ckpt, extra = _read(path, config, True)
    restore_strategy = prepare_strategy(strategy, extra["strategy"], ckpt, os.fspath(path))
    restore_rng = prepare_rng(extra["rng"])
    state = _run_state(extra, path)
    restore_strategy()
    restore_rng()
    return state
