"""The model families of the continual-learning comparison, at any hidden width.

``mlp``: flatten, two hidden ReLU layers of ``hidden`` units, a linear head.
``cnn``: two 3x3 convolutions of ``hidden`` channels, the first with stride 2 (ReLU, 2x2
max-pooling after each), global average pooling, a linear head (on 28x28 images the second
convolution runs at 7x7: a few MFLOPs per image at 64 channels, so that CPU runs stay
minutes); a flat square input (scikit-learn's 8x8 digits) is unflattened to one channel first.

Both come in a task-aware form (one Avalanche ``MultiHeadClassifier`` head per task) for
task-incremental streams. Every hidden layer is growable by ``GrowableNetwork``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..growth import GrowableNetwork

FAMILIES = ("mlp", "cnn")


def mlp(input_shape: Sequence[int], hidden: int, n_out: int) -> nn.Sequential:
    """Flatten, two hidden ReLU layers of ``hidden`` units, linear head."""
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_out),
    )


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(channels, height, width)`` of an input: as given, or a flat square as one channel."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        side = math.isqrt(shape[0])
        return (1, side, side)
    raise ValueError(f"the cnn family needs (C, H, W) or flat square inputs, got {shape}")


def cnn(input_shape: Sequence[int], hidden: int, n_out: int) -> nn.Sequential:
    """Two 3x3 conv layers of ``hidden`` channels (the first strided; ReLU, max-pool), global
    average pool, head."""
    channels, height, width = image_shape(input_shape)
    layers: list[nn.Module] = []
    if len(input_shape) == 1:
        layers.append(nn.Unflatten(1, (channels, height, width)))
    layers += [
        nn.Conv2d(channels, hidden, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(hidden, hidden, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, n_out),
    ]
    return nn.Sequential(*layers)


_BUILDERS = {"mlp": mlp, "cnn": cnn}


def single_head(family: str, input_shape: Sequence[int], hidden: int, n_out: int) -> nn.Sequential:
    """The ``family`` model with one output layer of ``n_out`` units."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}")
    return _BUILDERS[family](input_shape, hidden, n_out)


class MultiHeadNet(nn.Module):
    """A family's trunk (everything but its output layer) with one head per task."""

    def __init__(self, family: str, input_shape: Sequence[int], hidden: int) -> None:
        from avalanche.models import MultiHeadClassifier

        super().__init__()
        self.features = single_head(family, input_shape, hidden, hidden)[:-1]
        self.classifier = MultiHeadClassifier(hidden, initial_out_features=2)

    def forward(self, x: torch.Tensor, task_labels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x), task_labels)


def make_model(
    family: str, input_shape: Sequence[int], hidden: int, n_out: int, *, task_aware: bool
) -> nn.Module:
    """A model of ``family`` at width ``hidden``: task-aware (one head per task) or not."""
    if task_aware:
        from .. import strategies  # noqa: F401  (registers the Avalanche head rules before tracing)

        return MultiHeadNet(family, input_shape, hidden)
    return single_head(family, input_shape, hidden, n_out)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def hidden_widths(model: nn.Module) -> list[int]:
    """Widths of the hidden layers of a model of this benchmark (PNN: summed over columns)."""
    from avalanche.models import PNN

    if isinstance(model, GrowableNetwork):
        return [int(model.width(name)) for name in model.layers]
    if isinstance(model, PNN):
        return [sum(int(c.itoh.out_features) for c in layer.columns) for layer in model.layers]
    trunk = model.features if isinstance(model, MultiHeadNet) else model[:-1]
    return [
        int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        for m in trunk.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]


def replay_samples(strategy: object) -> int:
    """Samples held in the replay buffers of ``strategy``'s plugins (0 without replay)."""
    total = 0
    for plugin in getattr(strategy, "plugins", []):
        policy = getattr(plugin, "storage_policy", None)
        buffer = getattr(policy, "buffer", None)
        if buffer is not None:
            total += len(buffer)
    return total


def memory_bytes(model: nn.Module, samples: int, input_shape: Sequence[int]) -> int:
    """MEMO-style memory: parameters as float32 plus stored samples as uint8 images."""
    return 4 * count_params(model) + samples * math.prod(input_shape)
