"""``Expand``: DER-style expansion for class-incremental learning, on any traced model.

Dynamically Expandable Representation (Yan, Xie & He, CVPR 2021) adds a new feature extractor
at each experience, freezes the old ones, classifies over all features and trains with replay
and an auxiliary loss on the new features. Here the new extractor lives *inside* the same
network: before each experience but the first, every current unit is frozen
(``GrowableNetwork.protect``) and every hidden layer is widened with new units that, in the
default ``"independent"`` mode, read only new units (block-diagonal growth). The output layer
reads old and new features and stays trainable. So:

- :class:`NewUnits`: the growth policy (``growth=`` units per layer and experience);
- :class:`AuxiliaryLoss`: DER's auxiliary classifier, a plugin: a linear head over the new
  units' features only, predicting the current experience's classes plus one "old" class,
  trained with the strategy's loss and discarded at the end of the experience (never
  evaluated, never part of the model);
- :class:`BalancedHead`: DER's classifier stage, a plugin: after each experience, the
  classifier alone is retrained on the class-balanced replay buffer;
- :class:`Expand`: the ready strategy: a ``GrowthPlugin`` with protected growth, Avalanche's
  ``ReplayPlugin``, :class:`AuxiliaryLoss` and :class:`BalancedHead` installed; optionally
  new units copied from frozen ones (``inherit``, :mod:`strategies.expand_units`), weight
  aligning of the classifier (``align``) and a logit-adjusted loss (``adjust_logits``,
  :mod:`strategies.expand_loss`).

The old units of a trained network compute, in eval mode, bit for bit what they computed when
their experience ended, however long the new units train (``growth.protect``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..growth import GrowableNetwork, GrowthError
from ..growth import protect as protection
from ..growth.budget import growth_group
from .expand_loss import LogitAdjustedLoss, ResetPrior
from .expand_units import InheritUnits, WeightAlign
from .plugin import GrowthPlugin, require_growable
from .policies import GrowthPolicy, Widen, coupled_groups

__all__ = [
    "AuxiliaryLoss",
    "BalancedHead",
    "Expand",
    "NewUnits",
    "feature_columns",
    "feature_reader",
]


# --- the growth policy ---------------------------------------------------------------------------
class NewUnits(GrowthPolicy):
    """Before every experience but the first, widen every coupled group of hidden layers by
    ``units`` new units (one ``Widen`` per group, in graph order).

    Parameters
    ----------
    units : int or mapping of str to int, optional
        New units per layer and experience: one number for every layer, or numbers by layer
        name (layers not named do not grow). Default: each layer's width at the first
        experience (DER: every new feature extractor as wide as the first one).
    """

    def __init__(self, units: int | Mapping[str, int] | None = None) -> None:
        if units is not None and not _positive(units):
            if not (
                isinstance(units, Mapping)
                and all(isinstance(k, str) and _positive(v) for k, v in units.items())
            ):
                raise GrowthError(
                    f"growth must be a positive int (new units per layer and experience), a "
                    f"dict of layer names to positive ints, or a growth policy; got {units!r}"
                )
            units = dict(units)
        self.units: int | dict[str, int] | None = units
        self.first: dict[str, int] = {}  # widths at the first experience (units=None)

    def check(self, net: GrowableNetwork) -> None:
        """Raise ``GrowthError`` when ``units`` names layers that ``net`` does not have."""
        if isinstance(self.units, dict):
            unknown = [n for n in self.units if n not in net.layers]
            if unknown:
                raise GrowthError(
                    f"growth names {unknown}, which are not growable layers of the network; "
                    f"its layers: {', '.join(net.layers[:8])}"
                )

    def added(self, layer: str) -> int:
        """New units ``layer`` gets per experience (0: it does not grow)."""
        if isinstance(self.units, int):
            return self.units
        if isinstance(self.units, dict):
            return self.units.get(layer, 0)
        return self.first.get(layer, 0)

    def before_experience(self, strategy: Any, net: GrowableNetwork) -> list[Widen]:
        if not self.first:
            self.first = {n: net.width(n) for n in net.layers}
        if int(strategy.clock.train_exp_counter) == 0:
            return []
        actions = []
        for group in coupled_groups(net):
            add = max(self.added(n) for n in group)
            if add > 0:
                actions.append(Widen(group[0], width=net.width(group[0]) + add))
        return actions

    def state_dict(self) -> dict[str, Any]:
        return {"first": dict(self.first)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = {str(k): int(v) for k, v in state["first"].items()}


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# --- which features are new ----------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def feature_reader(net: GrowableNetwork) -> str:
    """The module that reads the network's final features: the last module (graph order) whose
    input holds units of growable layers (the output layer, or a head such as Avalanche's
    ``IncrementalClassifier``). ``GrowthError`` when there is none."""
    groups = {growth_group(net, n).id for n in net.layers}
    find = net.analysis.spaces.find
    reader = None
    for name, nodes in net.analysis.module_nodes.items():
        layout = net.analysis.input_layout(nodes[0])
        if name in net.layers or layout is None:
            continue
        if any(find(s.space) in groups for s in layout.segments):
            reader = name
    if reader is None:
        raise GrowthError(
            "no module of the network reads the units of its growable layers: give the "
            "auxiliary loss the name of the classifier (head=...)"
        )
    return reader


def feature_columns(net: GrowableNetwork, reader: str) -> tuple[int, Tensor, Tensor]:
    """``(dim, new, old)``: the input dim of module ``reader`` that holds features, and two
    bool masks along it: positions of units that are not frozen (``new``) and of frozen units
    (``old``). Positions of anything else (the network's input) are in neither."""
    analysis = net.analysis
    if reader not in analysis.module_nodes:
        raise GrowthError(f"head={reader!r} is not a module that the network calls")
    layout = analysis.input_layout(analysis.module_nodes[reader][0])
    if layout is None:
        raise GrowthError(f"the input of {reader!r} has no channel structure the engine knows")
    frozen: dict[int, Tensor] = {}
    for name in net.layers:
        group = growth_group(net, name)
        if group.expand != 1:
            continue  # a depthwise layer: its group's units are counted by its producer
        units = protection.frozen_units(net, name)
        frozen[group.id] = units if group.id not in frozen else frozen[group.id] | units
    new, old = [], []
    for seg in layout.segments:
        units = frozen.get(analysis.spaces.find(seg.space))
        if units is None or units.numel() != seg.units:
            new.append(torch.zeros(seg.size, dtype=torch.bool))
            old.append(torch.zeros(seg.size, dtype=torch.bool))
        else:
            new.append((~units).repeat_interleave(seg.expand))
            old.append(units.repeat_interleave(seg.expand))
    return layout.dim, torch.cat(new), torch.cat(old)


# --- DER's auxiliary loss ------------------------------------------------------------------------
class AuxiliaryLoss(SupervisedPlugin, supports_distributed=True):
    """DER's auxiliary loss: ``weight * cross_entropy(aux(new features), aux labels)``.

    At each experience in which the network has frozen units (``GrowableNetwork.protect``),
    a fresh ``nn.Linear`` reads the features of the units that are not frozen (the input of
    ``head``, the module that reads the final features: by default :func:`feature_reader`) and
    predicts ``len(classes) + 1`` labels: label ``i + 1`` for the ``i``-th class of the current
    experience, 0 ("old") for every other sample (replayed classes, or samples of other task
    labels). Its loss is added to ``strategy.loss`` (so gradients reach only the new units and
    the auxiliary head); the head is trained by its own optimizer, of the strategy optimizer's
    class and first param group's hyperparameters, stepped after the strategy's. Under
    ``torch.distributed`` its gradients are averaged over the ranks. It is discarded at the end
    of the experience: it never takes part in evaluation and is not part of the model.

    Nothing happens in an experience without frozen units (the first one) or without new ones.
    Growth in the middle of an experience starts a new auxiliary head.

    Parameters
    ----------
    weight : float
        Weight of the auxiliary loss (DER: 1).
    head : str, optional
        Name of the module whose input holds the features (default: :func:`feature_reader`).
    """

    def __init__(self, weight: float = 1.0, *, head: str | None = None) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise GrowthError(f"aux_weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.head = head
        self.aux: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.losses: list[float] = []  # auxiliary loss of each iteration of the experience
        self._hook: Any = None
        self._features: Tensor | None = None
        self._dim = 1
        self._columns: Tensor | None = None
        self._size = 0
        self._classes: Tensor | None = None
        self._task = 0

    # resume files: the head lives within one experience (a run is saved between them)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def _drop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self.aux = self.optimizer = self._features = self._columns = None

    def _setup(self, strategy: Any) -> None:
        self._drop()
        net = require_growable(_unwrap(strategy.model))
        if self.weight == 0 or not protection.is_protected(net):
            return
        reader = self.head if self.head is not None else feature_reader(net)
        dim, new, old = feature_columns(net, reader)
        if not bool(new.any()) or not bool(old.any()):
            return
        device = torch.device(strategy.device)
        classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        self._classes = torch.tensor(classes, dtype=torch.long, device=device)
        self._task = int(getattr(strategy.experience, "task_label", 0))
        self._dim, self._size = dim, int(new.numel())
        self._columns = new.nonzero().flatten().to(device)
        self.aux = nn.Linear(int(new.sum()), len(classes) + 1).to(device)
        group = {k: v for k, v in strategy.optimizer.param_groups[0].items() if k != "params"}
        self.optimizer = type(strategy.optimizer)(self.aux.parameters(), **group)
        self._hook = net.get_submodule(reader).register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and args and isinstance(args[0], Tensor):
            self._features = args[0]

    def aux_labels(self, y: Tensor, t: Tensor | None) -> Tensor:
        """Auxiliary labels of a minibatch: ``i + 1`` for the ``i``-th class of the current
        experience (task), 0 for anything else."""
        assert self._classes is not None
        match = y.unsqueeze(1) == self._classes.unsqueeze(0)
        if t is not None:
            match &= (t == self._task).unsqueeze(1)
        return torch.where(match.any(1), match.long().argmax(1) + 1, torch.zeros_like(y))

    # --- Avalanche callbacks -------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.losses = []
        self._setup(strategy)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._features = None
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        feats = self._features
        if self.aux is None or feats is None or self._columns is None:
            return
        if feats.shape[self._dim] != self._size:  # grown in the middle of the experience
            self._setup(strategy)
            return
        x = feats.index_select(self._dim, self._columns)
        x = x.movedim(self._dim, -1).reshape(x.shape[0], -1) if self._dim != 1 else x.flatten(1)
        target = self.aux_labels(strategy.mb_y, getattr(strategy, "mb_task_id", None))
        loss = F.cross_entropy(self.aux(x), target)
        self.losses.append(float(loss.detach()))
        strategy.loss = strategy.loss + self.weight * loss
        self._features = None

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.aux is None or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world < 2:
            return
        for p in self.aux.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.optimizer is not None and self.aux is not None:
            self.optimizer.step()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._drop()


# --- DER's balanced classifier stage ------------------------------------------------------------
class BalancedHead(SupervisedPlugin, supports_distributed=True):
    """DER's classifier learning stage: after each experience with frozen units, train only the
    module that reads the features (the classifier) for ``epochs`` epochs on the replay buffer
    (class-balanced: Avalanche's buffers keep as many samples of each experience), features
    computed in eval mode (fixed). This counters the bias of the classifier towards the classes
    of the last experience, which outnumber each old class in its training data.

    The classifier is called on the features alone (``head(features)``), so it must be the
    last module of the network (a linear layer, ``IncrementalClassifier``). Its own optimizer
    is of the strategy optimizer's class and first param group's hyperparameters. Under
    ``torch.distributed`` every rank trains on its own buffer and rank 0's classifier is then
    broadcast (the replicas stay equal).

    Parameters
    ----------
    replay : ReplayPlugin
        The plugin whose buffer is used (its ``after_training_exp`` must run first: list it
        earlier in the strategy's plugins).
    epochs : int
        Epochs over the buffer (0: nothing).
    head : str, optional
        The classifier (default: :func:`feature_reader`).
    temperature : float
        Temperature of the stage's softmax: the loss is ``cross_entropy(logits / T, y)``
        (DER's balanced finetuning uses one; 1: plain cross-entropy).
    """

    def __init__(
        self,
        replay: ReplayPlugin,
        epochs: int,
        *,
        head: str | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise GrowthError(f"balance_epochs must be an int >= 0, got {epochs!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0
        ):
            raise GrowthError(f"balance_temperature must be a number > 0, got {temperature!r}")
        self.replay = replay
        self.epochs = epochs
        self.head = head
        self.temperature = float(temperature)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        net = require_growable(_unwrap(strategy.model))
        buffer = getattr(self.replay.storage_policy, "buffer", None)
        if self.epochs == 0 or not protection.is_protected(net) or buffer is None:
            return
        if len(buffer) == 0:
            return
        from avalanche.models.utils import avalanche_forward
        from torch.utils.data import DataLoader

        reader = net.get_submodule(self.head if self.head is not None else feature_reader(net))
        params = [p for p in reader.parameters() if p.requires_grad]
        group = {k: v for k, v in strategy.optimizer.param_groups[0].items() if k != "params"}
        optimizer = type(strategy.optimizer)(params, **group)
        captured: list[Tensor] = []
        hook = reader.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        device = torch.device(strategy.device)
        was_training = net.training
        net.eval()
        try:
            loader = DataLoader(buffer, batch_size=strategy.train_mb_size, shuffle=True)
            for _ in range(self.epochs):
                for batch in loader:
                    x, y = batch[0].to(device), batch[1].to(device)
                    t = batch[2].to(device) if len(batch) > 2 else None
                    captured.clear()
                    with torch.no_grad():
                        avalanche_forward(net, x, t)
                    loss = F.cross_entropy(reader(captured[0]) / self.temperature, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            hook.remove()
            net.train(was_training)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)


# --- the strategy --------------------------------------------------------------------------------
class Expand(SupervisedTemplate):
    """DER-style class-incremental strategy: protected growth + replay + auxiliary loss.

    A ``SupervisedTemplate`` whose plugins are, in this order, a ``GrowthPlugin`` (``protect``
    mode, :class:`NewUnits` policy), ``InheritUnits`` (``inherit=True``), a ``ReplayPlugin``,
    :class:`AuxiliaryLoss`, :class:`BalancedHead`, ``WeightAlign`` (``align=True``), then the
    ``plugins`` given. Under ``torch.distributed`` give it the
    ``DistributedDataParallel`` wrapper of the network (``DistributedHelper.wrap_model(net)``).

    Before each experience but the first, every unit the network has is frozen and every hidden
    layer gets ``growth`` new units (``protect="independent"``: they read only new units, a new
    feature extractor inside the network; ``"lateral"``: they also read the old ones). The
    layer that reads the features (the output layer or head) is never frozen: it classifies
    over old and new features. Replay (Avalanche's ``ReplayPlugin``, ``mem_size`` samples) and
    DER's auxiliary loss (:class:`AuxiliaryLoss`) train it and the new units; after each
    experience, DER's classifier stage retrains the classifier alone on the class-balanced
    buffer (:class:`BalancedHead`).

    Any head works: a fixed ``nn.Linear`` over all classes, Avalanche's
    ``IncrementalClassifier`` (grows and masks its outputs as classes arrive) or, for
    task-incremental streams, a ``MultiHeadClassifier`` in a ``MultiTaskGrowableNetwork``
    (there use ``protect="lateral"``, ``mem_size=0``, ``aux_weight=0``: no old task's output
    ever changes).

    Parameters
    ----------
    model : GrowableNetwork or DistributedDataParallel
        The network, or its DDP wrapper (its units are checked to be freezable here:
        ``GrowthError`` otherwise, nothing changed).
    optimizer : torch.optim.Optimizer
        Optimizer over ``model``'s parameters (state carried across growth).
    criterion : callable, optional
        Loss (default ``nn.CrossEntropyLoss()``).
    growth : int, mapping of str to int, or GrowthPolicy, optional
        New units per hidden layer and experience (:class:`NewUnits`; default: each layer's
        first width, as DER), or any growth policy.
    protect : {"independent", "lateral"}
        How new units read old ones (see ``GrowthPlugin``).
    mem_size : int
        Replay buffer size in samples (0: no replay).
    aux_weight : float
        Weight of the auxiliary loss (0: none).
    balance_epochs : int
        Epochs of DER's classifier stage after each experience with frozen units: only the
        classifier trains, on the (class-balanced) replay buffer (:class:`BalancedHead`;
        0: none, and none without replay).
    balance_temperature : float
        Softmax temperature of the classifier stage (:class:`BalancedHead`; 1: none).
    align : bool
        Weight aligning after each experience with frozen units (after the classifier stage):
        the classifier rows of the new classes are rescaled to the old classes' mean norm
        (:class:`strategies.expand_units.WeightAlign`).
    adjust_logits : float
        ``tau`` of a logit-adjusted training loss (:class:`strategies.expand_loss.
        LogitAdjustedLoss`: ``cross_entropy(logits + tau * log(prior), y)``, the prior counted
        from the experience's training labels, replay included), so that the unadjusted logits
        fit class-balanced posteriors; 0: the plain ``criterion``. Not with a ``criterion``.
    inherit : bool
        New units start as noisy copies of frozen units of their layer (incoming weights from
        the input and, ``"lateral"``, from frozen units; bias), not freshly drawn
        (:class:`strategies.expand_units.InheritUnits`): they start alive on the data and at
        the trained units' scale. Outgoing weights stay zero (function unchanged).
    head : str, optional
        The module whose input holds the features (:func:`feature_reader` by default).
    max_params : int, optional
        Parameter budget of the growth (see ``GrowthPlugin``).
    growth_options : dict, optional
        Further ``GrowthPlugin`` keywords (``generator``, ``max_width``, ...). ``on_refusal``
        is "raise" by default here: a refused growth leaves no new extractor.
    **template_kwargs
        ``SupervisedTemplate`` keywords (``train_mb_size``, ``train_epochs``,
        ``eval_mb_size``, ``device``, ``plugins``, ``evaluator``, ...). ``plugins`` must not
        hold a ``GrowthPlugin``, nor a ``ReplayPlugin`` unless ``mem_size=0``.

    Attributes
    ----------
    growth : GrowthPlugin
    replay : ReplayPlugin or None
    aux : AuxiliaryLoss
    balance : BalancedHead or None
    align : WeightAlign or None
    inherit : InheritUnits or None
    """

    def __init__(
        self,
        model: GrowableNetwork,
        optimizer: torch.optim.Optimizer,
        criterion: nn.Module | Any = None,
        *,
        growth: int | Mapping[str, int] | GrowthPolicy | None = None,
        protect: str = "independent",
        mem_size: int = 200,
        aux_weight: float = 1.0,
        balance_epochs: int = 5,
        balance_temperature: float = 1.0,
        align: bool = False,
        adjust_logits: float = 0.0,
        inherit: bool = False,
        head: str | None = None,
        max_params: int | None = None,
        growth_options: dict[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> None:
        net = require_growable(_unwrap(model))
        if protect not in protection.MODES:
            raise GrowthError(
                f"Expand: protect must be one of {protection.MODES}, got {protect!r} (for "
                f"growth without protection use Growing)"
            )
        if isinstance(mem_size, bool) or not isinstance(mem_size, int) or mem_size < 0:
            raise GrowthError(f"mem_size must be an int >= 0, got {mem_size!r}")
        policy = growth if isinstance(growth, GrowthPolicy) else NewUnits(growth)
        if isinstance(policy, NewUnits):
            policy.check(net)
        extra: Sequence[Any] = list(template_kwargs.pop("plugins", None) or [])
        replays = [p for p in extra if isinstance(p, ReplayPlugin)]
        if replays and mem_size > 0:
            raise GrowthError(
                f"Expand(mem_size={mem_size}) installs its own ReplayPlugin and plugins= also "
                f"holds one: samples would be replayed twice. Pass mem_size=0 to use yours"
            )
        if any(isinstance(p, GrowthPlugin) for p in extra):
            raise GrowthError(
                "Expand installs its own GrowthPlugin (strategy.growth): give the growth to "
                "Expand(growth=...) and drop the GrowthPlugin from plugins="
            )
        aux = AuxiliaryLoss(aux_weight, head=head)
        if head is not None:
            feature_columns(net, head)  # GrowthError for a head that reads no features
        else:
            feature_reader(net)
        _check_protectable(net, protect)
        replay = ReplayPlugin(mem_size) if mem_size > 0 else None
        balance = (
            BalancedHead(replay, balance_epochs, head=head, temperature=balance_temperature)
            if replay is not None
            else None
        )
        aligner = WeightAlign(head=head) if align else None
        reset = None
        if adjust_logits != 0:
            if criterion is not None:
                raise GrowthError(
                    "Expand(adjust_logits=...) builds its own loss: drop criterion= or set "
                    "adjust_logits=0"
                )
            criterion = LogitAdjustedLoss(adjust_logits)
            reset = ResetPrior(criterion)
        inheritor = InheritUnits() if inherit else None
        options = {"on_refusal": "raise", **(growth_options or {})}
        self.growth = GrowthPlugin(policy, max_params=max_params, protect=protect, **options)
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            plugins=[
                p
                for p in (self.growth, reset, inheritor, replay, aux, balance, aligner)
                if p is not None
            ]
            + list(extra),
            **template_kwargs,
        )
        self.replay = replay
        self.aux = aux
        self.balance = balance
        self.align = aligner
        self.inherit = inheritor


def _check_protectable(net: GrowableNetwork, mode: str) -> None:
    """Refuse (``GrowthError``, nothing changed) a network whose units cannot be frozen: try
    the freeze and undo it."""
    if protection.is_protected(net):
        current = protection.mode(net)
        if current != mode:
            raise GrowthError(
                f"the network is already protected in {current!r} mode, not {mode!r}: build "
                f"Expand with protect={current!r}"
            )
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tx = protection.freeze(net, mode, activate=False)
    tx.rollback()
