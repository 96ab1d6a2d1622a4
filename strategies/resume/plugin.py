"""``ResumePlugin``: an Avalanche plugin that saves a resume file after every ``train()`` call
(and every standalone ``eval()``) and restores it into a freshly built strategy."""

from __future__ import annotations

import os
from typing import Any

from avalanche.training.plugins import SupervisedPlugin

from ...growth.checkpoint.fileformat import PathLike
from .run import RunState, load_run, save_run

__all__ = ["ResumePlugin"]


class ResumePlugin(SupervisedPlugin):
    """Save a resume file at the end of every ``train()`` call and of every ``eval()`` call made
    outside training; :meth:`restore` loads it into a freshly built strategy.

    ``position`` is ``strategy.clock.train_exp_counter`` (experiences trained); the results of
    ``eval()`` live in the evaluator's metric histories, which the file restores
    (``strategy.evaluator.get_all_metrics()``). ``state.results["phase"]`` says whether the last
    save followed a ``train()`` ("train") or an ``eval()`` ("eval")::

        resume = ResumePlugin("run.n2g", config=vars(args))
        strategy = Naive(model, optimizer, plugins=[ReplayPlugin(200), resume], ...)
        state = resume.restore(strategy)
        start = 0 if state is None else state.position
        if state is not None and state.results["phase"] == "train":
            strategy.eval(benchmark.test_stream)  # the evaluation that the crash cut off
        for exp in benchmark.train_stream[start:]:
            strategy.train(exp)
            strategy.eval(benchmark.test_stream)

    Train one experience per ``train()`` call: a call over several experiences saves only at
    its end.

    Parameters
    ----------
    path : str or os.PathLike
        The resume file.
    config : plain data, optional
        What identifies the run (see :func:`~.run.save_run`).
    """

    def __init__(self, path: PathLike, *, config: Any = None) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.config = config
        self._training = False

    def restore(self, strategy: Any) -> RunState | None:
        """:func:`load_run` of the plugin's file into ``strategy``; None when there is none.

        Call it before training, in the first run too: it moves the plugin to the end of
        ``strategy.plugins`` (after the evaluator and the clock), so that each save follows the
        metrics that the evaluator publishes at the end of the call.
        """
        plugins = strategy.plugins
        if any(p is self for p in plugins):
            plugins[:] = [p for p in plugins if p is not self] + [self]
        return load_run(self.path, strategy, config=self.config, missing_ok=True)

    def _save(self, strategy: Any, phase: str) -> None:
        save_run(
            self.path,
            strategy,
            position=int(strategy.clock.train_exp_counter),
            results={"phase": phase},
            config=self.config,
        )

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._training = True

    def after_training(self, strategy: Any, **kwargs: Any) -> None:
        self._training = False
        self._save(strategy, "train")

    def after_eval(self, strategy: Any, **kwargs: Any) -> None:
        if not self._training:
            self._save(strategy, "eval")
