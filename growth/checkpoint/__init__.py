"""Checkpoints: save a ``GrowableNetwork`` and rebuild it where its model class is unknown.

A checkpoint stores no pickled Python objects, only plain data and tensors that
``torch.load(weights_only=True)`` accepts (:mod:`.describe` writes them, :mod:`.fileformat`
frames them with a header and a SHA-256, :mod:`.rebuild` reads them back).

Trust model: a checkpoint file is untrusted input; the checksum only detects accidents. Loading
builds layers of the types registered in :mod:`growth.rules` (with a checkpoint spec), installs
the stored tensors and compiles the stored graph, whose every call is checked against the
allow-lists in :mod:`.allowlist`: functions with a growth rule, pure tensor methods, a few tensor
attributes, plain names. A file can therefore make loading fail with a :class:`GrowthError`, or
describe a network that computes nonsense, but it cannot run code of its choosing, reach a Python
object, attribute or module outside those lists, or make loading allocate an intermediate tensor
over :data:`~.rebuild.MAX_PROBE_ELEMENTS` elements (each call of the first run is tried on
``meta`` before it runs for real).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from ..errors import GrowthError
from ..network import GrowableNetwork
from .allowlist import network_type
from .codec import decode
from .describe import describe
from .fileformat import FORMAT_VERSION, PathLike, read_payload, write_payload
from .rebuild import build_graph, build_history, build_tree, dry_run

__all__ = ["FORMAT_VERSION", "Checkpoint", "load", "load_checkpoint", "save"]


def save(
    net: GrowableNetwork,
    path: PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save ``net`` (and optionally ``optimizer``'s state) to ``path``, atomically.

    Parameters
    ----------
    net : GrowableNetwork
        The network. Every module the graph calls must be of a layer type registered with a
        checkpoint spec, every function one with a growth rule, every method a pure tensor
        method; otherwise a ``GrowthError`` names the offender and no file is written.
    path : str or os.PathLike
        Destination. An existing file is replaced only once the new one is complete.
    optimizer : torch.optim.Optimizer, optional
        Its ``state_dict()`` and the names of the parameters of each param group are stored;
        ``load(path, optimizer=True)`` rebuilds it in the same parameter order.
    extra : dict, optional
        Plain data saved beside the network (str keys; numbers, strings, tensors, lists, dicts):
        a training loop's own state. :attr:`Checkpoint.extra` gives it back.

    Raises
    ------
    GrowthError
        A module type, function or value that the checkpoint cannot store.
    """
    write_payload(describe(net, optimizer, extra), path)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes
    ----------
    network : GrowableNetwork
        The rebuilt network, in the training/eval mode it was saved in.
    optimizer_state : dict or None
        ``optimizer.state_dict()`` as saved (None when no optimizer was saved).
    optimizer_class : str or None
        Class name of the saved optimizer (``"Adam"``).
    optimizer_param_names : list of list of str, or None
        Names of the parameters of each param group, in the optimizer's order.
    extra : dict or None
        The ``extra`` plain data given to :func:`save`.
    """

    network: GrowableNetwork
    optimizer_state: dict[str, Any] | None = None
    optimizer_class: str | None = None
    optimizer_param_names: list[list[str]] | None = None
    extra: dict[str, Any] | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """Param groups over ``network``'s parameters, ordered and configured as saved."""
        if self.optimizer_state is None or self.optimizer_param_names is None:
            raise GrowthError("this checkpoint holds no optimizer state")
        params = dict(self.network.named_parameters())
        groups = []
        for names, saved in zip(self.optimizer_param_names, self.optimizer_state["param_groups"]):
            group = {k: v for k, v in saved.items() if k != "params"}
            group["params"] = [params[n] for n in names]
            groups.append(group)
        return groups

    def make_optimizer(
        self, optimizer_class: type[torch.optim.Optimizer] | None = None, **defaults: Any
    ) -> torch.optim.Optimizer:
        """A new optimizer over ``network`` with the saved state (moments, step counts, lr).

        ``optimizer_class`` defaults to the saved class looked up in ``torch.optim``; pass it for
        other optimizers. ``defaults`` go to its constructor.
        """
        if self.optimizer_state is None:
            raise GrowthError("this checkpoint holds no optimizer state")
        if optimizer_class is None:
            name = str(self.optimizer_class)
            optimizer_class = None if name.startswith("_") else vars(torch.optim).get(name)
            if not (
                isinstance(optimizer_class, type)
                and issubclass(optimizer_class, torch.optim.Optimizer)
            ):
                raise GrowthError(
                    f"the saved optimizer {self.optimizer_class!r} is not in torch.optim: pass "
                    f"its class to make_optimizer"
                )
        elif optimizer_class.__name__ != self.optimizer_class:
            raise GrowthError(
                f"the checkpoint holds {self.optimizer_class} state, not "
                f"{optimizer_class.__name__} state"
            )
        optimizer = optimizer_class(self.param_groups(), **defaults)
        try:
            optimizer.load_state_dict(self.optimizer_state)
        except Exception as exc:
            raise GrowthError(f"the checkpoint's optimizer state does not load: {exc}") from exc
        return optimizer


def _optimizer_of(data: dict[str, Any], net: GrowableNetwork) -> dict[str, Any] | None:
    """The stored optimizer entry, checked against the rebuilt network."""
    opt = data.get("optimizer")
    if opt is None:
        return None
    problem = None
    if not isinstance(opt, dict) or not isinstance(opt.get("class"), str):
        problem = "it is not a dict with a class name"
    else:
        state, names = opt.get("state_dict"), opt.get("param_names")
        params = dict(net.named_parameters())
        if not (isinstance(state, dict) and isinstance(state.get("state"), dict)):
            problem = "its state_dict has no 'state' dict"
        elif not (
            isinstance(state.get("param_groups"), list)
            and all(
                isinstance(g, dict) and isinstance(g.get("params"), list)
                for g in state["param_groups"]
            )
        ):
            problem = "its param_groups are not a list of dicts with 'params'"
        elif not (
            isinstance(names, list)
            and len(names) == len(state["param_groups"])
            and all(
                isinstance(g, list)
                and len(g) == len(s["params"])
                and all(isinstance(n, str) and n in params for n in g)
                for g, s in zip(names, state["param_groups"])
            )
        ):
            problem = "its parameter names do not match the network's parameters"
    if problem is not None:
        raise GrowthError(f"malformed checkpoint: the saved optimizer is unusable: {problem}")
    return opt


def load_checkpoint(path: PathLike, map_location: Any = None) -> Checkpoint:
    """Read a file written by :func:`save`: the network and, if saved, the optimizer state.

    Parameters
    ----------
    path : str or os.PathLike
    map_location
        As for ``torch.load`` (for example ``"cpu"`` or ``torch.device("cuda:0")``).

    Returns
    -------
    Checkpoint
        ``.network`` is the rebuilt :class:`GrowableNetwork`; ``.make_optimizer()`` resumes
        the saved optimizer; ``.extra`` is the saved user data.

    Raises
    ------
    GrowthError
        The file is not a net2grow checkpoint, is truncated or corrupt (checksum), or names a
        layer type, function, method or attribute outside the allow-lists.
    """
    data = read_payload(path, map_location)
    try:
        root = build_tree(data)
        graph = build_graph(data, root)
        history = build_history(data)
        probe = data.get("probe")
        if not (isinstance(probe, list) and 0 < len(probe) <= 64):
            raise GrowthError("malformed checkpoint: no probe batch")
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in probe):
            raise GrowthError("malformed checkpoint: the probe batch holds non-tensors")
        dry_run(root, graph, probe)
        tolerance = data.get("tolerance")
        if not isinstance(tolerance, float):
            raise GrowthError("malformed checkpoint: no tolerance")
        cls = network_type(data.get("network_class"))
        state = data.get("network_state") or {}
        if not isinstance(state, dict) or any(k not in cls.checkpoint_state for k in state):
            raise GrowthError(f"malformed checkpoint: network state {state!r} of {cls.__name__}")
        net = cls.from_graph(root, graph, probe, tolerance=tolerance, history=history)
        for key, value in state.items():
            setattr(net, key, decode(value))
        model_class = data.get("model_class")
        if not isinstance(model_class, str):
            raise GrowthError("malformed checkpoint: no model class name")
        net.model_class = model_class[:200]
        net.training = bool(data["modules"][0].get("training", False))
        opt = _optimizer_of(data, net)
        extra = data.get("extra")
        if extra is not None and not isinstance(extra, dict):
            raise GrowthError("malformed checkpoint: extra is not a dict")
    except GrowthError as exc:
        raise GrowthError(f"{path}: {exc}") from exc
    except Exception as exc:
        raise GrowthError(
            f"{path}: malformed net2grow checkpoint: {type(exc).__name__}: {exc}"
        ) from exc
    if opt is None:
        return Checkpoint(net, extra=extra)
    return Checkpoint(
        net, opt["state_dict"], opt["class"], [list(g) for g in opt["param_names"]], extra
    )


@overload
def load(
    path: PathLike, map_location: Any = None, *, optimizer: Literal[False] = False
) -> GrowableNetwork: ...


@overload
def load(
    path: PathLike,
    map_location: Any = None,
    *,
    optimizer: Literal[True] | type[torch.optim.Optimizer],
) -> tuple[GrowableNetwork, torch.optim.Optimizer]: ...


def load(
    path: PathLike,
    map_location: Any = None,
    *,
    optimizer: bool | type[torch.optim.Optimizer] = False,
) -> GrowableNetwork | tuple[GrowableNetwork, torch.optim.Optimizer]:
    """Rebuild the :class:`GrowableNetwork` saved at ``path`` (see :func:`load_checkpoint`).

    Works in a process that never imported the model's class. With ``optimizer=True`` (or an
    optimizer class, for optimizers outside ``torch.optim``) returns ``(network, optimizer)``,
    the optimizer over the network's parameters with the saved state, as ``save(net, path,
    optimizer=opt)`` took it.
    """
    if not (
        isinstance(optimizer, bool)
        or (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer))
    ):
        raise GrowthError(
            f"optimizer must be True, False or a torch.optim.Optimizer class, got {optimizer!r}"
        )
    checkpoint = load_checkpoint(path, map_location)
    if optimizer is False:
        return checkpoint.network
    opt_class = None if optimizer is True else optimizer
    return checkpoint.network, checkpoint.make_optimizer(opt_class)
