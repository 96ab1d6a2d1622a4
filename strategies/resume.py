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

    from .resume import load_run, save_run

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
"""

from __future__ import annotations

import copy
import math
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..growth import GrowableNetwork, GrowthError, load_checkpoint, save
from .policies import Deepen, Widen

__all__ = [
    "FORMAT",
    "ResumeMismatchError",
    "ResumePlugin",
    "RunState",
    "decode_state",
    "encode_state",
    "load_run",
    "read_run",
    "save_run",
]

FORMAT = "net2grow-resume"
VERSION = 1

PathLike = str | os.PathLike


class ResumeMismatchError(GrowthError):
    """The resume file is intact but belongs to another run: other ``config`` (arguments),
    another strategy class, other plugins."""


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
    """

    position: int
    results: Any
    config: Any
    path: str


# --------------------------------------------------------------------------------------------
# plain-data encoding
# --------------------------------------------------------------------------------------------

_TAGS = ("__tuple__", "__set__", "__frozenset__", "__dict__", "__action__", "__size__", "__np__")


def encode_state(value: Any, where: str = "state") -> Any:
    """``value`` as data a resume file stores: None, bool, int, float, str, tensors, lists and
    str-keyed dicts; tuples, sets, other dict keys, ``torch.Size``, numpy values and growth
    actions are tagged. Anything else raises a ``GrowthError`` naming ``where``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value) if isinstance(value, torch.device) else value
    if isinstance(value, np.generic):
        return encode_state(value.item(), where)
    if isinstance(value, np.ndarray):
        return {"__np__": torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, torch.Size):
        return {"__size__": [int(v) for v in value]}
    if isinstance(value, (Widen, Deepen)):
        return {"__action__": {"op": type(value).__name__, **asdict(value)}}
    if isinstance(value, list):
        return [encode_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, (set, frozenset)):
        tag = "__set__" if isinstance(value, set) else "__frozenset__"
        return {tag: [encode_state(v, f"{where} item") for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "__dict__": [
                [encode_state(k, f"{where} key"), encode_state(v, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise GrowthError(
        f"cannot save {where}: it is a {type(value).__module__}.{type(value).__qualname__}; a "
        f"resume file stores plain data only (numbers, strings, tensors, lists, tuples, sets, "
        f"dicts)"
    )


def decode_state(value: Any) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(value, list):
        return [decode_state(v) for v in value]
    if isinstance(value, tuple):
        return tuple(decode_state(v) for v in value)
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, data),) = value.items()
        if tag in _TAGS:
            if tag == "__tuple__":
                return tuple(decode_state(v) for v in data)
            if tag == "__set__":
                return {decode_state(v) for v in data}
            if tag == "__frozenset__":
                return frozenset(decode_state(v) for v in data)
            if tag == "__dict__":
                return {decode_state(k): decode_state(v) for k, v in data}
            if tag == "__size__":
                return torch.Size(data)
            if tag == "__np__":
                return data.numpy().copy()
            if tag == "__action__":
                fields = dict(data)
                op = fields.pop("op")
                cls = {"Widen": Widen, "Deepen": Deepen}.get(op)
                if cls is None:
                    raise GrowthError(f"malformed resume file: unknown growth action {op!r}")
                return cls(**fields)
    return {k: decode_state(v) for k, v in value.items()}


def _same(a: Any, b: Any) -> bool:
    """Equality of encoded values (tensors compared exactly, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _config_diff(saved: Any, now: Any, prefix: str = "") -> str:
    """The differing entries of two encoded configs, one line each (nested keys dotted)."""
    if (
        isinstance(saved, dict)
        and isinstance(now, dict)
        and not any(len(d) == 1 and next(iter(d)) in _TAGS for d in (saved, now))
    ):
        lines = []
        for k in sorted(set(saved) | set(now), key=str):
            key = f"{prefix}{k}"
            if k not in now:
                lines.append(f"  {key}: saved {decode_state(saved[k])!r}, now absent")
            elif k not in saved:
                lines.append(f"  {key}: not saved, now {decode_state(now[k])!r}")
            elif not _same(saved[k], now[k]):
                lines.append(_config_diff(saved[k], now[k], f"{key}."))
        return "\n".join(lines)
    where = prefix[:-1] or "config"
    return f"  {where}: saved {decode_state(saved)!r}, now {decode_state(now)!r}"


# --------------------------------------------------------------------------------------------
# state of arbitrary objects (plugins, policies, metrics)
# --------------------------------------------------------------------------------------------


def _has_state_dict(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def object_state(obj: Any, where: str) -> dict[str, Any]:
    """``obj.state_dict()`` when it has ``state_dict``/``load_state_dict``, else its attributes
    (all of which must be plain data), encoded."""
    if _has_state_dict(obj):
        return {"kind": "state_dict", "state": encode_state(obj.state_dict(), where)}
    try:
        return {"kind": "attributes", "state": encode_state(dict(vars(obj)), where)}
    except GrowthError as exc:
        raise GrowthError(
            f"{exc}. Give {type(obj).__qualname__} state_dict() and load_state_dict() methods "
            f"that return and take plain data"
        ) from exc


class _Commit:
    """A prepared restore step: ``apply()`` changes the object; ``undo()`` (only for steps
    that may fail, i.e. user ``load_state_dict`` methods) puts the old state back."""

    def __init__(
        self,
        apply: Callable[[], None],
        undo: Callable[[], None] | None = None,
        fallible: bool = False,
    ) -> None:
        self.apply = apply
        self.undo = undo
        self.fallible = fallible


def _set_attributes(obj: Any, values: dict[str, Any]) -> None:
    for k, v in values.items():
        current = getattr(obj, k, None)
        if isinstance(current, defaultdict) and isinstance(v, dict):
            v = defaultdict(current.default_factory, v)
        setattr(obj, k, v)


def prepare_object_state(obj: Any, saved: Any, where: str) -> _Commit:
    """Decode ``saved`` (from :func:`object_state`) for ``obj``; nothing changes until the
    returned step is applied."""
    if not isinstance(saved, dict) or saved.get("kind") not in ("state_dict", "attributes"):
        raise GrowthError(f"malformed resume file: bad state of {where}")
    state = decode_state(saved["state"])
    if saved["kind"] == "state_dict":
        if not _has_state_dict(obj):
            raise ResumeMismatchError(
                f"{where} was saved with state_dict(), but {type(obj).__qualname__} has no "
                f"load_state_dict()"
            )
        previous = obj.state_dict()
        return _Commit(
            lambda: obj.load_state_dict(state),
            lambda: obj.load_state_dict(previous),
            fallible=True,
        )
    if not isinstance(state, dict):
        raise GrowthError(f"malformed resume file: bad attributes of {where}")
    return _Commit(lambda: _set_attributes(obj, state))


# --------------------------------------------------------------------------------------------
# Avalanche plugins with their own state handlers
# --------------------------------------------------------------------------------------------


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _dataset_samples(dataset: Any, where: str) -> dict[str, Any]:
    """Every ``(x, y, t)`` of an Avalanche classification dataset as stacked tensors."""
    xs, ys, ts = [], [], []
    y_kind = "int"
    for i in range(len(dataset)):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 3):
            raise GrowthError(
                f"cannot save {where}: its samples are not (x, y, task label) triples"
            )
        x, y, t = item
        if not isinstance(x, torch.Tensor):
            raise GrowthError(
                f"cannot save {where}: its inputs are {type(x).__name__}, not tensors (apply a "
                f"ToTensor transform to the stream)"
            )
        if isinstance(y, torch.Tensor):
            y_kind = "tensor"
        xs.append(x.detach())
        ys.append(int(y))
        ts.append(int(t))
    if not xs:
        return {
            "x": None,
            "y": torch.zeros(0, dtype=torch.long),
            "t": torch.zeros(0, dtype=torch.long),
            "y_kind": y_kind,
        }
    return {
        "x": torch.stack(xs),
        "y": torch.tensor(ys, dtype=torch.long),
        "t": torch.tensor(ts, dtype=torch.long),
        "y_kind": y_kind,
    }


class _Samples(torch.utils.data.Dataset):
    """Stored replay samples: ``(x, y)`` from tensors (task labels are added by Avalanche)."""

    def __init__(self, x: torch.Tensor, y: list[Any]) -> None:
        self.x = x
        self.targets = y

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        return self.x[index], self.targets[index]


def _rebuild_dataset(samples: dict[str, Any]) -> Any:
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )

    y = samples["y"].tolist()
    if samples["y_kind"] == "tensor":
        y_items: list[Any] = [torch.tensor(v) for v in y]
    else:
        y_items = y
    tasks = samples["t"].tolist()
    # one task label: an int, which Avalanche stores as a ConstantSequence like the streams'
    # datasets (concatenating a per-sample list with a ConstantSequence fails in Avalanche 0.6)
    task_labels: int | list[int] = tasks[0] if len(set(tasks)) == 1 else tasks
    return _make_taskaware_classification_dataset(
        _Samples(samples["x"], y_items), task_labels=task_labels, targets=y
    )


def _reservoir_state(buf: Any, where: str) -> dict[str, Any]:
    return {
        "max_size": int(buf.max_size),
        "weights": buf._buffer_weights.detach().clone(),
        "samples": _dataset_samples(buf.buffer, where),
    }


def _rebuild_reservoir(state: dict[str, Any]) -> Any:
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    buf = ReservoirSamplingBuffer(int(state["max_size"]))
    if len(state["samples"]["y"]):
        buf.buffer = _rebuild_dataset(state["samples"])
    buf._buffer_weights = state["weights"]
    return buf


def _storage_state(policy: Any, where: str) -> dict[str, Any]:
    from avalanche.training.storage_policy import (
        BalancedExemplarsBuffer,
        ReservoirSamplingBuffer,
    )

    attrs = {k: v for k, v in vars(policy).items() if k not in ("_buffer", "buffer_groups")}
    if isinstance(policy, ReservoirSamplingBuffer) and type(policy) is ReservoirSamplingBuffer:
        attrs.pop("_buffer_weights", None)
        return {
            "type": "reservoir",
            "attrs": encode_state(attrs, where),
            "buffer": _reservoir_state(policy, where),
        }
    if isinstance(policy, BalancedExemplarsBuffer) and all(
        type(g) is ReservoirSamplingBuffer for g in policy.buffer_groups.values()
    ):
        groups = [
            [encode_state(k, where), _reservoir_state(g, f"{where} group {k!r}")]
            for k, g in policy.buffer_groups.items()
        ]
        return {"type": "balanced", "attrs": encode_state(attrs, where), "groups": groups}
    raise GrowthError(
        f"cannot save {where}: storage policy {type(policy).__qualname__} is not supported "
        f"(supported: ReservoirSamplingBuffer, ExperienceBalancedBuffer, ClassBalancedBuffer)"
    )


def _prepare_storage(policy: Any, state: dict[str, Any], where: str) -> _Commit:
    attrs = decode_state(state["attrs"])
    if state["type"] == "reservoir":
        rebuilt = _rebuild_reservoir(state["buffer"])

        def apply() -> None:
            _set_attributes(policy, attrs)
            policy.buffer = rebuilt.buffer
            policy._buffer_weights = rebuilt._buffer_weights

        return _Commit(apply)
    if state["type"] == "balanced":
        groups = {decode_state(k): _rebuild_reservoir(g) for k, g in state["groups"]}

        def apply_groups() -> None:
            _set_attributes(policy, attrs)
            policy.buffer_groups = groups

        return _Commit(apply_groups)
    raise GrowthError(f"malformed resume file: bad replay buffer of {where}")


def _param_data_state(table: Any, where: str) -> Any:
    """``{experience: {name: ParamData}}`` (EWC) as plain data."""
    out = []
    for exp, params in table.items():
        entries = []
        for name, pd in params.items():
            entries.append(
                {
                    "name": str(name),
                    "key": str(name),
                    "shape": [int(s) for s in pd.shape],
                    "data": pd.data.detach().clone(),
                    "device": str(pd.device),
                }
            )
        out.append([int(exp), entries])
    return out


def _rebuild_param_data(saved: Any) -> defaultdict:
    from avalanche.training.utils import ParamData

    table: defaultdict = defaultdict(dict)
    for exp, entries in saved:
        for e in entries:
            device = torch.device(e["device"])
            if device.type == "cuda" and not torch.cuda.is_available():
                device = torch.device("cpu")
            pd = ParamData(e["name"], init_tensor=e["data"].to(device), device=device)
            pd.shape = torch.Size(e["shape"])
            table[int(exp)][e["key"]] = pd
    return table


def _module_flags(model: nn.Module) -> list[bool]:
    return [bool(m.training) for m in model.modules()]


def _set_module_flags(model: nn.Module, flags: list[bool]) -> None:
    for m, flag in zip(model.modules(), flags):
        m.training = flag


def _lwf_state(lwf: Any, model: nn.Module, where: str) -> dict[str, Any]:
    prev = lwf.prev_model
    teacher = None
    if prev is not None:
        ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        theirs = {k: (tuple(v.shape), v.dtype) for k, v in prev.state_dict().items()}
        if ours != theirs or type(prev) is not type(model):
            raise GrowthError(
                f"cannot save {where}: the LwF teacher (the model copied after the last "
                f"experience) no longer has the model's architecture; save at the experience "
                f"boundary, before the model grows"
            )
        teacher = {
            "state": {k: v.detach().clone() for k, v in prev.state_dict().items()},
            "training": _module_flags(prev),
        }
    return {
        "expcount": int(lwf.expcount),
        "prev_classes_by_task": encode_state(dict(lwf.prev_classes_by_task), where),
        "teacher": teacher,
    }


def _plugin_state(plugin: Any, strategy: Any, index: int) -> dict[str, Any]:
    from avalanche.training.plugins import (
        EvaluationPlugin,
        EWCPlugin,
        LwFPlugin,
        ReplayPlugin,
    )

    where = f"plugin {index} ({type(plugin).__qualname__})"
    entry: dict[str, Any] = {"class": _qualname(plugin)}
    if isinstance(plugin, ResumePlugin):
        entry["kind"] = "none"
    elif isinstance(plugin, EvaluationPlugin):
        entry.update(kind="evaluator", state=_evaluator_state(plugin, where))
    elif _has_state_dict(plugin):
        entry.update(kind="object", state=object_state(plugin, where))
    elif isinstance(plugin, ReplayPlugin):
        entry.update(kind="replay", state=_storage_state(plugin.storage_policy, where))
    elif isinstance(plugin, EWCPlugin):
        entry.update(
            kind="ewc",
            state={
                "saved_params": _param_data_state(plugin.saved_params, where),
                "importances": _param_data_state(plugin.importances, where),
            },
        )
    elif isinstance(plugin, LwFPlugin):
        entry.update(kind="lwf", state=_lwf_state(plugin.lwf, strategy.model, where))
    else:
        entry.update(kind="object", state=object_state(plugin, where))
    return entry


def _prepare_plugin(
    plugin: Any, entry: dict[str, Any], model: nn.Module, strategy: Any, index: int
) -> _Commit | None:
    where = f"plugin {index} ({type(plugin).__qualname__})"
    kind, state = entry.get("kind"), entry.get("state")
    if kind == "none":
        return None
    if kind == "evaluator":
        return _prepare_evaluator(plugin, state, where)
    if kind == "object":
        return prepare_object_state(plugin, state, where)
    if kind == "replay":
        return _prepare_storage(plugin.storage_policy, state, where)
    if kind == "ewc":
        saved = _rebuild_param_data(state["saved_params"])
        importances = _rebuild_param_data(state["importances"])

        def apply_ewc() -> None:
            plugin.saved_params = saved
            plugin.importances = importances

        return _Commit(apply_ewc)
    if kind == "lwf":
        lwf = plugin.lwf
        classes = defaultdict(set, decode_state(state["prev_classes_by_task"]))
        teacher_state = state["teacher"]
        teacher = None
        if teacher_state is not None:
            teacher = _detached_copy(model)
            _check_state_dict(teacher, teacher_state["state"], f"{where} teacher")
            teacher.load_state_dict(teacher_state["state"])
            _set_module_flags(teacher, teacher_state["training"])

        def apply_lwf() -> None:
            lwf.expcount = int(state["expcount"])
            lwf.prev_classes_by_task = classes
            lwf.prev_model = teacher

        return _Commit(apply_lwf)
    raise GrowthError(f"malformed resume file: unknown state kind {kind!r} of {where}")


def _detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without its growth hooks (as LwF's own copies behave)."""
    teacher = copy.deepcopy(model)
    hooks = getattr(teacher, "_growth_hooks", None)
    if hooks is not None:
        hooks.clear()
    return teacher


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=4)


def _evaluator_state(ev: Any, where: str) -> dict[str, Any]:
    metrics = []
    for metric in ev.metrics:
        try:
            metrics.append({"class": _qualname(metric), "state": object_state(metric, where)})
        except GrowthError:
            _warn_once(
                f"metric:{_qualname(metric)}",
                f"resume: the state of metric {type(metric).__qualname__} is not plain data and "
                f"is not saved (a resumed run restarts it)",
            )
            metrics.append({"class": _qualname(metric), "state": None})

    def plain_entries(table: dict[str, Any]) -> list[Any]:
        out = []
        for name, value in table.items():
            try:
                out.append([str(name), encode_state(value, f"metric {name!r}")])
            except GrowthError:
                _warn_once(
                    f"value:{name}",
                    f"resume: values of metric {name!r} are not plain data and are not saved",
                )
        return out

    return {
        "metrics": metrics,
        "all": plain_entries(dict(ev.all_metric_results)),
        "last": plain_entries(dict(ev.last_metric_results)),
    }


def _prepare_evaluator(ev: Any, state: dict[str, Any], where: str) -> _Commit:
    steps = []
    if len(state["metrics"]) != len(ev.metrics):
        raise ResumeMismatchError(
            f"{where}: the resume file has {len(state['metrics'])} metrics, the evaluator "
            f"{len(ev.metrics)}"
        )
    for i, (metric, saved) in enumerate(zip(ev.metrics, state["metrics"])):
        if saved["class"] != _qualname(metric):
            raise ResumeMismatchError(
                f"{where}: metric {i} is a {_qualname(metric)}, the resume file's a "
                f"{saved['class']}"
            )
        if saved["state"] is not None:
            steps.append(prepare_object_state(metric, saved["state"], f"{where} metric {i}"))
    all_results = {name: decode_state(v) for name, v in state["all"]}
    last = {name: decode_state(v) for name, v in state["last"]}

    def apply() -> None:
        for step in steps:
            step.apply()
        table = ev.all_metric_results
        fresh = defaultdict(table.default_factory) if isinstance(table, defaultdict) else {}
        for name, (xs, values) in all_results.items():
            fresh[name] = (list(xs), list(values))
        ev.all_metric_results = fresh
        ev.last_metric_results = dict(last)

    fallible = [s for s in steps if s.fallible]
    if fallible:  # user load_state_dict methods: run them as one fallible step

        def undo() -> None:
            for s in fallible:
                if s.undo is not None:
                    s.undo()

        return _Commit(apply, undo, fallible=True)
    return _Commit(apply)


# --------------------------------------------------------------------------------------------
# model, optimizer, RNG
# --------------------------------------------------------------------------------------------


def _placeholder() -> GrowableNetwork:
    """The network of a resume file whose model is not a GrowableNetwork (its state is in the
    file's plain data)."""
    return GrowableNetwork(nn.Identity(), torch.zeros(1, 1))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in group["params"] if id(p) not in names]
        if missing:
            raise GrowthError(
                f"cannot save the optimizer: its param group {i} holds parameters of shapes "
                f"{missing} that are not the model's (stale parameters: build the optimizer "
                f"with make_optimizer(remove_params=True))"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return groups


def _check_state_dict(model: nn.Module, state: dict[str, Any], where: str) -> None:
    ours = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise ResumeMismatchError(
            f"{where}: the resume file's tensors do not fit the strategy's model (another "
            f"architecture); differing: {diff[:8]}"
        )


def _optimizer_groups(
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    names: list[list[str]],
    state: dict[str, Any],
    saved_class: str | None,
) -> list[dict[str, Any]]:
    """Param groups for ``optimizer`` over ``params``, checked against the saved state."""
    if saved_class != type(optimizer).__name__:
        raise ResumeMismatchError(
            f"the resume file holds {saved_class} state, the strategy's optimizer is a "
            f"{type(optimizer).__name__}"
        )
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(names):
        raise GrowthError("malformed resume file: optimizer groups and names differ")
    groups, by_index = [], {}
    for names_g, saved in zip(names, saved_groups):
        missing = [n for n in names_g if n not in params]
        if missing:
            raise ResumeMismatchError(
                f"the optimizer's parameters {missing[:5]} are not the model's"
            )
        group = {k: v for k, v in saved.items() if k != "params"}
        group["params"] = [params[n] for n in names_g]
        if len(saved["params"]) != len(names_g):
            raise GrowthError("malformed resume file: optimizer group sizes differ")
        for idx, p in zip(saved["params"], group["params"]):
            by_index[idx] = p
        groups.append(group)
    for idx, per_param in state["state"].items():
        p = by_index.get(idx)
        if p is None:
            raise GrowthError(f"malformed resume file: optimizer state of unknown parameter {idx}")
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise GrowthError(
                    f"malformed resume file: optimizer state {key!r} has shape "
                    f"{tuple(value.shape)}, its parameter {tuple(p.shape)}"
                )
    return groups


def _load_optimizer(
    optimizer: torch.optim.Optimizer, groups: list[dict[str, Any]], state: dict[str, Any]
) -> None:
    """Put ``groups`` and ``state`` into the existing ``optimizer`` object (schedulers and
    plugins holding it keep working)."""
    optimizer.param_groups.clear()
    optimizer.state.clear()
    for group in groups:
        optimizer.add_param_group(group)
    optimizer.load_state_dict(state)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": int(version),
            "internal": torch.tensor(list(internal), dtype=torch.int64),
            "gauss": gauss,
        },
    }


def _prepare_rng(state: dict[str, Any]) -> Callable[[], None]:
    cpu = state["torch"]
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8):
        raise GrowthError("malformed resume file: bad torch RNG state")
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    numpy_tuple = (
        np_state["name"],
        keys,
        int(np_state["pos"]),
        int(np_state["has_gauss"]),
        float(np_state["cached"]),
    )
    py = state["python"]
    gauss = py["gauss"]
    python_tuple = (
        int(py["version"]),
        tuple(int(v) for v in py["internal"].tolist()),
        None if gauss is None else float(gauss),
    )
    # check the states before anything changes
    np.random.RandomState().set_state(numpy_tuple)
    random.Random().setstate(python_tuple)
    torch.Generator().set_state(cpu)
    cuda = state.get("cuda")

    def apply() -> None:
        torch.set_rng_state(cpu)
        np.random.set_state(numpy_tuple)
        random.setstate(python_tuple)
        if cuda is not None:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
                torch.cuda.set_rng_state_all(cuda)
            else:
                warnings.warn(
                    "resume: the file holds the RNG states of "
                    f"{len(cuda)} CUDA devices; this process has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: CUDA "
                    "random streams are not restored",
                    stacklevel=3,
                )

    return apply


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _strategy_state(strategy: Any) -> tuple[GrowableNetwork, Any, dict[str, Any]]:
    """(network for growth.save, optimizer for growth.save or None, plain strategy state)."""
    model = strategy.model
    if isinstance(model, DistributedDataParallel):
        raise GrowthError(
            "save_run does not support a DistributedDataParallel model yet: save from a "
            "single process"
        )
    optimizer = getattr(strategy, "optimizer", None)
    state: dict[str, Any] = {"class": _qualname(strategy)}
    if isinstance(model, GrowableNetwork):
        net, net_optimizer = model, optimizer
        state["model"] = {"kind": "network"}
        state["optimizer"] = None
    else:
        net, net_optimizer = _placeholder(), None
        state["model"] = {
            "kind": "state_dict",
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": _module_flags(model),
        }
        state["optimizer"] = None
        if optimizer is not None:
            sd = optimizer.state_dict()
            state["optimizer"] = {
                "class": type(optimizer).__name__,
                "state_dict": sd,
                "param_names": _param_names(model, optimizer),
            }
    state["has_optimizer"] = optimizer is not None
    opt_ids = getattr(strategy, "optimized_param_id", None)
    if opt_ids is None:
        state["optimized_param_names"] = None
    else:
        current = dict(model.named_parameters())
        stale = [n for n, p in opt_ids.items() if current.get(n) is not p]
        if stale:
            raise GrowthError(
                f"cannot save: strategy.optimized_param_id names parameters {stale[:5]} that are "
                f"no longer the model's; save at an experience boundary (or call "
                f"strategy.make_optimizer() first)"
            )
        state["optimized_param_names"] = list(opt_ids)
    state["plugins"] = [_plugin_state(p, strategy, i) for i, p in enumerate(strategy.plugins)]
    return net, net_optimizer, state


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
        "rng": _rng_state(),
    }
    net, optimizer = _placeholder(), None
    if strategy is not None:
        net, optimizer, extra["strategy"] = _strategy_state(strategy)
    save(net, path, optimizer, extra=extra)


def _read(path: PathLike, config: Any, check_config: bool) -> tuple[Any, dict[str, Any]]:
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
        if not _same(extra["config"], now):
            raise ResumeMismatchError(
                f"{name} was saved by a run with other arguments; refusing to resume it "
                f"(delete it or pass the same arguments):\n{_config_diff(extra['config'], now)}"
            )
    return ckpt, extra


def read_run(path: PathLike, *, config: Any = None, check_config: bool = False) -> RunState:
    """Read a resume file's position, results and config without restoring anything.

    Raises ``GrowthError`` for a damaged or foreign file, :class:`ResumeMismatchError` when
    ``check_config`` is true and ``config`` differs from the saved one.
    """
    _, extra = _read(path, config, check_config)
    return RunState(
        int(extra["position"]),
        decode_state(extra["results"]),
        decode_state(extra["config"]),
        os.fspath(path),
    )


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
    strategy : Avalanche strategy
    config : plain data, optional
        Must equal the ``config`` given to :func:`save_run`.
    missing_ok : bool
        Return None (and change nothing) when ``path`` does not exist.
    """
    if missing_ok and not os.path.exists(path):
        return None
    ckpt, extra = _read(path, config, True)
    name = os.fspath(path)
    saved = extra["strategy"]
    if saved is None:
        raise ResumeMismatchError(f"{name} holds no strategy state (saved with strategy=None)")
    if saved["class"] != _qualname(strategy):
        raise ResumeMismatchError(
            f"{name} was saved from a {saved['class']} strategy, this one is a "
            f"{_qualname(strategy)}"
        )
    classes = [p["class"] for p in saved["plugins"]]
    ours = [_qualname(p) for p in strategy.plugins]
    if classes != ours:
        raise ResumeMismatchError(
            f"{name} was saved by a strategy with plugins {classes}; this strategy has {ours} "
            f"(build it with the same plugins in the same order)"
        )
    model = strategy.model
    if isinstance(model, DistributedDataParallel):
        raise GrowthError("load_run does not support a DistributedDataParallel model yet")
    optimizer = getattr(strategy, "optimizer", None)
    if bool(saved["has_optimizer"]) != (optimizer is not None):
        raise ResumeMismatchError(f"{name}: saved with and loaded without an optimizer, or back")

    # --- prepare: read and check everything; nothing of the strategy changes ---------------------
    device = torch.device(strategy.device)
    model_state = saved["model"]
    if model_state["kind"] == "network":
        if not isinstance(model, GrowableNetwork):
            raise ResumeMismatchError(
                f"{name} holds a GrowableNetwork; the strategy's model is a {type(model).__name__}"
            )
        new_model: nn.Module = ckpt.network.to(device)
        opt_names = ckpt.optimizer_param_names
        opt_state = ckpt.optimizer_state
        opt_class = ckpt.optimizer_class
    elif model_state["kind"] == "state_dict":
        if isinstance(model, GrowableNetwork):
            raise ResumeMismatchError(
                f"{name} holds the state_dict of a plain model; the strategy's model is a "
                f"GrowableNetwork"
            )
        _check_state_dict(model, model_state["state"], name)
        if len(model_state["training"]) != len(list(model.modules())):
            raise ResumeMismatchError(f"{name}: the model's module tree differs")
        new_model = model
        opt = saved["optimizer"]
        opt_names = None if opt is None else opt["param_names"]
        opt_state = None if opt is None else opt["state_dict"]
        opt_class = None if opt is None else opt["class"]
    else:
        raise GrowthError(f"malformed resume file {name}: model kind {model_state['kind']!r}")
    params = dict(new_model.named_parameters())
    groups = None
    if optimizer is not None:
        if opt_state is None or opt_names is None:
            raise GrowthError(f"malformed resume file {name}: no optimizer state")
        groups = _optimizer_groups(optimizer, params, opt_names, opt_state, opt_class)
    opt_ids = None
    if saved["optimized_param_names"] is not None:
        missing = [n for n in saved["optimized_param_names"] if n not in params]
        if missing:
            raise GrowthError(f"malformed resume file {name}: unknown parameters {missing[:5]}")
        opt_ids = {n: params[n] for n in saved["optimized_param_names"]}
    steps = []
    for i, (plugin, entry) in enumerate(zip(strategy.plugins, saved["plugins"])):
        step = _prepare_plugin(plugin, entry, new_model, strategy, i)
        if step is not None:
            steps.append(step)
    restore_rng = _prepare_rng(extra["rng"])
    state = RunState(
        int(extra["position"]),
        decode_state(extra["results"]),
        decode_state(extra["config"]),
        name,
    )

    # --- commit ----------------------------------------------------------------------------------
    done: list[_Commit] = []
    try:
        for step in steps:
            if step.fallible:
                step.apply()
                done.append(step)
    except BaseException:
        for step in reversed(done):
            if step.undo is not None:
                step.undo()
        raise
    if model_state["kind"] == "network":
        strategy.model = new_model
    else:
        model.load_state_dict(model_state["state"])
        _set_module_flags(model, model_state["training"])
    if optimizer is not None and groups is not None:
        _load_optimizer(optimizer, groups, opt_state)
    if hasattr(strategy, "optimized_param_id"):
        strategy.optimized_param_id = opt_ids
    for step in steps:
        if not step.fallible:
            step.apply()
    restore_rng()
    return state


# --------------------------------------------------------------------------------------------
# plugin
# --------------------------------------------------------------------------------------------


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
