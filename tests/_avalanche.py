"""Streams and models shared by the Avalanche strategy tests (a plain module, not a test file).

Imported as ``from _avalanche import ...``: pytest puts ``tests/`` on ``sys.path`` (default
"prepend" import mode, rootdir conftest without ``__init__.py``), as for ``_models``.
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.models import MultiHeadClassifier
from avalanche.training.supervised import EWC, LwF, Naive, Replay, SynapticIntelligence
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from net2grow.growth import GrowableNetwork
from net2grow.strategies import MultiTaskGrowableNetwork

# Strategies the growth tests run in, by parametrisation id: (class, its own keyword arguments).
STRATEGIES = {
    "naive": (Naive, {}),
    "replay": (Replay, {"mem_size": 200}),
    "lwf": (LwF, {"alpha": 1.0, "temperature": 2.0}),
    "ewc-separate": (EWC, {"ewc_lambda": 1.0}),
    "ewc-online": (EWC, {"ewc_lambda": 1.0, "mode": "online", "decay_factor": 0.9}),
    "si": (SynapticIntelligence, {"si_lambda": 1.0}),
}


def digits_stream(n_experiences: int = 5, *, task_labels: bool = False, seed: int = 0):
    """Split digits (two classes per experience), standardised features, fixed class order.

    Class-incremental by default; with ``task_labels`` it is task-incremental: task i holds
    digits 2i and 2i+1 as classes 0 and 1.
    """
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))

    def subset(idx: torch.Tensor) -> TensorDataset:
        ds = TensorDataset(x[idx], y[idx])
        ds.targets = y[idx].tolist()
        return ds

    return nc_benchmark(
        subset(perm[:1400]), subset(perm[1400:]), n_experiences=n_experiences,
        task_labels=task_labels, seed=seed, fixed_class_order=list(range(10)),
        class_ids_from_zero_in_each_exp=task_labels,
    )


def mlp_net(hidden: int = 32) -> GrowableNetwork:
    """64 -> hidden -> hidden -> 10 ReLU MLP (seeded), traced on a zero batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 10))
    return GrowableNetwork(model, torch.zeros(4, 64))


class MHModel(nn.Module):
    """Two hidden ReLU layers feeding an Avalanche ``MultiHeadClassifier``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                      nn.ReLU())
        self.head = MultiHeadClassifier(hidden, initial_out_features=2)

    def forward(self, x, task_labels):
        return self.head(self.features(x), task_labels)


def mh_net(hidden: int = 32, **kwargs: Any) -> MultiTaskGrowableNetwork:
    """A seeded ``MHModel`` in a ``MultiTaskGrowableNetwork``; ``kwargs`` go to the network."""
    torch.manual_seed(0)
    example = (torch.randn(8, 64), torch.zeros(8, dtype=torch.long))
    return MultiTaskGrowableNetwork(MHModel(hidden), example, **kwargs)
