"""Resume an Avalanche run after a crash, exactly: save at experience boundaries, load, continue.

Avalanche 0.6's ``avalanche.checkpointing.save_checkpoint`` pickles the whole strategy with dill
(it fails here for every model, and loading a pickle runs code). A resume file is a net2grow
checkpoint instead (:func:`growth.save`: one file, written atomically, SHA-256 checked, read
with ``torch.load(weights_only=True)``, no pickled objects), holding everything that decides
how training continues:

- the model: a :class:`~growth.GrowableNetwork` as a network checkpoint (its grown architecture
  is rebuilt from the file); any other ``nn.Module`` as its ``state_dict`` (the strategy's model
  must then have the same architecture when loading);
- the optimizer's state (moments, step counts, param groups, by parameter name) and Avalanche's
  ``strategy.optimized_param_id``, so the next ``make_optimizer`` neither resets nor re-indexes;
- every plugin's state: the clock, :class:`~strategies.plugin.GrowthPlugin` (events, growth
  time, pending actions, its ``torch.Generator``, the policy's state), ``ReplayPlugin``'s
  storage policy (samples stored as tensors with their reservoir weights, rebuilt as a dataset),
  ``EWCPlugin``'s parameters and importances, ``LwFPlugin``'s teacher, the evaluator's metric
  histories, any plugin with ``state_dict()``/``load_state_dict()`` and any plugin whose
  attributes are plain data. A plugin whose state cannot be stored is refused when saving;
- the random number generators: torch (CPU and CUDA), numpy's global ``RandomState``, Python's
  ``random``; data-loader shuffling and replay sampling draw from torch's;
- where the run stands (``position``), your own ``results`` and a ``config`` that a resumed run
  must match.

Typical loop (save after each experience and its evaluation)::

    from net2grow.strategies.resume import load_run, save_run

    strategy = Growing(net, optimizer, policy=..., plugins=[ReplayPlugin(200)], ...)
    state = load_run("run.n2g", strategy, config=vars(args), missing_ok=True)
    position, results = (0, []) if state is None else (state.position, state.results)
    for exp in benchmark.train_stream[position:]:
        strategy.train(exp)
        results.append(strategy.eval(benchmark.test_stream))
        save_run("run.n2g", strategy, position=exp.current_experience + 1,
                 results=results, config=vars(args))

Build the strategy exactly as the first run did (same plugins, same order, same options), then
call :func:`load_run` before the loop continues. Or let :class:`ResumePlugin` save at the end
of every ``train()`` (and standalone ``eval()``) call.

Not restored: loggers (a resumed TensorBoard run writes a new event file beside the old one;
points logged after the last save are logged again), metrics whose state is not plain data
(a warning names them), data-loader worker processes' own RNGs (``num_workers > 0``).

Modules: :mod:`.run` (the file: save, load, read), :mod:`.strategy` (model, optimizer and
plugins of a strategy), :mod:`.plugins` (which handler each plugin gets), :mod:`.replay`,
:mod:`.regularization` (EWC, LwF) and :mod:`.evaluator` (the handlers), :mod:`.objects`
(any object's ``state_dict()`` or attributes), :mod:`.modules`, :mod:`.optimizer`,
:mod:`.rng`, :mod:`.codec` (plain data), :mod:`.steps` (check first, then change),
:mod:`.plugin` (:class:`ResumePlugin`).
"""

from .codec import decode_state, encode_state
from .errors import ResumeMismatchError
from .objects import object_state, prepare_object_state
from .plugin import ResumePlugin
from .run import FORMAT, RunState, load_run, read_run, save_run

__all__ = [
    "FORMAT",
    "ResumeMismatchError",
    "ResumePlugin",
    "RunState",
    "decode_state",
    "encode_state",
    "load_run",
    "object_state",
    "prepare_object_state",
    "read_run",
    "save_run",
]
