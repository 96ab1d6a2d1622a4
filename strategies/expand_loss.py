"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021) for :class:`strategies.Expand`.

In class-incremental training with replay, the classes of the current experience fill most of
every minibatch and each old class a small part of the replayed half. A loss fitted to those
frequencies learns the imbalance, in the classifier and in the new features. The
logit-adjusted loss ``cross_entropy(logits + tau * log(prior), y)`` makes the *unadjusted*
logits fit the class-balanced posterior instead; evaluation uses the unadjusted logits. The
prior is the frequency of each class among the training labels of the current experience so
far (counted minibatch by minibatch: no pass over the data beforehand, and the mix that replay
draws is what is counted).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor, nn

from ..growth import GrowthError

__all__ = ["LogitAdjustedLoss", "ResetPrior"]

#: Floor of the prior of a class not seen in the experience yet (its logit is pushed down).
MIN_PRIOR = 1e-4


class LogitAdjustedLoss(nn.Module):
    """``cross_entropy(logits + tau * log(prior), y)`` with the prior counted from the labels
    seen since the last :meth:`reset`, the current minibatch included.

    Parameters
    ----------
    tau : float
        Strength of the adjustment (> 0; 1: Menon et al.'s default).
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise GrowthError(f"adjust_logits must be a number > 0, got {tau!r}")
        self.tau = float(tau)
        self.counts: Tensor | None = None

    def reset(self) -> None:
        """Forget the counted labels (a new experience starts)."""
        self.counts = None

    def prior(self, n_classes: int, device: torch.device) -> Tensor:
        """Class frequencies counted so far, floored at :data:`MIN_PRIOR`."""
        counts = torch.zeros(n_classes, device=device)
        if self.counts is not None:
            k = min(n_classes, self.counts.numel())
            counts[:k] = self.counts[:k].to(device)
        total = float(counts.sum())
        freq = counts / total if total > 0 else torch.full_like(counts, 1.0 / n_classes)
        return freq.clamp_min(MIN_PRIOR)

    def forward(self, logits: Tensor, y: Tensor) -> Tensor:
        n = logits.shape[1]
        seen = torch.bincount(y.detach().flatten(), minlength=n).to(torch.float32)
        if self.counts is None or self.counts.numel() < seen.numel():
            old = self.counts
            self.counts = seen.cpu()
            if old is not None:
                self.counts[: old.numel()] += old
        else:
            self.counts[: seen.numel()] += seen.cpu()
        adjust = self.tau * self.prior(n, logits.device).log()
        return F.cross_entropy(logits + adjust.to(logits.dtype), y)


class ResetPrior(SupervisedPlugin, supports_distributed=True):
    """Resets a :class:`LogitAdjustedLoss`'s counts at the start of each experience."""

    def __init__(self, loss: LogitAdjustedLoss) -> None:
        super().__init__()
        self.loss = loss

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.loss.reset()
