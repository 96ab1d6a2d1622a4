"""Plugins that tune :class:`strategies.Expand` after its growth and after each experience.

- :class:`InheritUnits`: new units start from trained ones. Right after a protected growth,
  each new unit's incoming weights from the network's input and (``"lateral"`` mode) from
  frozen units, and its bias, are copied from a frozen unit of the same layer chosen at
  random (without repetition while there are enough), plus a little noise. A freshly drawn
  unit of a layer that reads raw pixels starts with a pre-activation near zero on every
  input: the first, full-size Adam steps (one learning rate per weight, whatever the gradient)
  can push it below zero for every input, after which a ReLU unit never learns again. On
  split Fashion-MNIST (task-incremental, 12 new units per layer) a whole experience's new
  first-layer units died that way and the task was learnt by the frozen features alone. A
  copy of a trained unit starts where trained units are: alive on the data, at their scale.
  Its outgoing weights stay zero (the growth's), so the network's function is unchanged.
- :class:`WeightAlign`: weight aligning (Zhao et al., CVPR 2020, "Maintaining Discrimination
  and Fairness in Class Incremental Learning"): after each experience with frozen units, the
  classifier's rows of the experience's classes are rescaled so that their mean norm equals
  that of the rows of the classes seen before, which removes the classifier's bias towards
  the newest classes.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..growth import GrowableNetwork, GrowthError
from ..growth import protect as protection
from .plugin import require_growable

__all__ = ["InheritUnits", "WeightAlign", "classifier_linear"]


def _net(model: nn.Module) -> GrowableNetwork:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return require_growable(inner)


# --- new units copied from trained ones --------------------------------------------------------
class InheritUnits(SupervisedPlugin, supports_distributed=True):
    """After each protected growth, new units start as noisy copies of frozen units.

    For every growable layer with both frozen and new units and a weight whose axis 1 holds
    its input channels (``nn.Linear``, ``nn.Conv*`` without groups): each new unit's weights
    on the input columns it may read that are not new units (the network's input; in
    ``"lateral"`` mode also frozen units) become those of a frozen unit of the layer chosen at
    random, plus Gaussian noise of ``noise`` times their standard deviation; its bias (if any)
    is copied too. Weights on new units' columns keep their values, and so do all outgoing
    weights (zero after a protected growth): the network's function does not change. Other
    layers are left as grown. Must run right after the ``GrowthPlugin`` (``Expand`` installs
    it there).

    Parameters
    ----------
    noise : float
        Noise added to the copies, relative to the standard deviation of the copied weights
        (>= 0; 0: exact copies).
    seed : int
        Seed of the choice of sources and of the noise (the same on every rank under DDP,
        so that replicas stay equal).
    """

    def __init__(self, noise: float = 0.1, *, seed: int = 0) -> None:
        super().__init__()
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise GrowthError(f"inherit noise must be a number >= 0, got {noise!r}")
        self.noise = float(noise)
        self.seed = int(seed)
        self._seen: dict[str, int] = {}  # width of each layer at the last inheritance
        self.copied: dict[str, list[int]] = {}  # layer -> source unit of each new unit (last)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": dict(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen = {str(k): int(v) for k, v in state.get("seen", {}).items()}

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        net = _net(strategy.model)
        if not protection.is_protected(net):
            return
        self.inherit(net, generator_seed=self.seed + int(strategy.clock.train_exp_counter))

    @torch.no_grad()
    def inherit(self, net: GrowableNetwork, *, generator_seed: int = 0) -> dict[str, list[int]]:
        """Copy frozen units into the new units of every layer grown since the last call;
        return ``{layer: [source unit of each new unit]}``."""
        from .expand import feature_columns

        generator = torch.Generator().manual_seed(generator_seed)
        lateral = protection.mode(net) == "lateral"
        self.copied = {}
        for name in net.layers:
            width = int(net.width(name))
            if self._seen.get(name) == width:
                continue
            self._seen[name] = width
            frozen = protection.frozen_units(net, name).cpu()
            module = net.get_submodule(name)
            weight = getattr(module, "weight", None)
            if (
                not isinstance(weight, Tensor)
                or weight.dim() < 2
                or weight.shape[0] != frozen.numel()
                or getattr(module, "groups", 1) != 1
                or bool(frozen.all())
                or not bool(frozen.any())
            ):
                continue
            try:
                _, new_cols, old_cols = feature_columns(net, name)
            except GrowthError:
                continue
            if new_cols.numel() != weight.shape[1]:
                continue
            readable = ~new_cols if lateral else ~(new_cols | old_cols)
            cols = readable.nonzero().flatten().to(weight.device)
            sources = frozen.nonzero().flatten()
            targets = (~frozen).nonzero().flatten()
            order = torch.cat(
                [
                    torch.randperm(sources.numel(), generator=generator)
                    for _ in range(-(-targets.numel() // sources.numel()))
                ]
            )
            picks = sources[order[: targets.numel()]]
            if cols.numel() == 0:
                continue  # reads only new units ("independent"): nothing of a source fits
            self.copied[name] = [int(p) for p in picks]
            src = weight[picks.to(weight.device)].index_select(1, cols)
            scale = src.float().std() if src.numel() > 1 else torch.tensor(0.0)
            rnd = torch.randn(src.shape, generator=generator).to(weight.device, src.dtype)
            src = src + self.noise * scale.to(src.dtype) * rnd
            rows = weight[targets.to(weight.device)]
            rows.index_copy_(1, cols, src)
            weight[targets.to(weight.device)] = rows
            bias = getattr(module, "bias", None)
            if isinstance(bias, Tensor) and bias.shape == (frozen.numel(),):
                bias[targets.to(bias.device)] = bias[picks.to(bias.device)]
        return self.copied


# --- weight aligning --------------------------------------------------------------------------
def classifier_linear(module: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` whose rows are the classes: ``module`` itself or the ``classifier``
    of an Avalanche ``IncrementalClassifier`` (None for anything else, say a multi-head)."""
    if isinstance(module, nn.Linear):
        return module
    inner = getattr(module, "classifier", None)
    return inner if isinstance(inner, nn.Linear) else None


class WeightAlign(SupervisedPlugin, supports_distributed=True):
    """Weight aligning (WA, Zhao et al. 2020) of the classifier after each experience with
    frozen units: the weight rows of the experience's classes are multiplied by
    ``mean ||w_old|| / mean ||w_new||`` over the rows of the classes seen before (``gamma``).
    Biases are left as trained (WA's classifier has none to align). Nothing happens in the
    first experience, for a classifier that is not a ``Linear`` over the classes, or when no
    class seen before is in it. Runs after the classifier stage when both are installed.

    Parameters
    ----------
    head : str, optional
        The classifier (default: ``strategies.expand.feature_reader``).

    Attributes
    ----------
    gammas : list of float
        The factor applied after each aligned experience.
    """

    def __init__(self, *, head: str | None = None) -> None:
        super().__init__()
        self.head = head
        self.gammas: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"gammas": list(self.gammas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gammas = [float(g) for g in state.get("gammas", [])]

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        from .expand import feature_reader

        net = _net(strategy.model)
        if not protection.is_protected(net):
            return
        exp = strategy.experience
        new = sorted(int(c) for c in exp.classes_in_this_experience)
        old = sorted(int(c) for c in getattr(exp, "previous_classes", []) if int(c) not in new)
        reader = net.get_submodule(self.head if self.head is not None else feature_reader(net))
        linear = classifier_linear(reader)
        if linear is None or not old or not new:
            return
        if max(old + new) >= linear.weight.shape[0]:
            return
        gamma = align(linear.weight, old, new)
        self.gammas.append(gamma)


@torch.no_grad()
def align(weight: Tensor, old: list[int], new: list[int]) -> float:
    """Rescale rows ``new`` of ``weight`` in place to the mean row norm of rows ``old``;
    return the factor."""
    norms = weight.flatten(1).norm(dim=1)
    mean_new = norms[new].mean()
    if float(mean_new) == 0.0:
        return 1.0
    gamma = norms[old].mean() / mean_new
    weight[new] *= gamma
    return float(gamma)
