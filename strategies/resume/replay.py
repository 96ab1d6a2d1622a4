"""``ReplayPlugin`` storage policies (reservoir, experience- and class-balanced buffers): their
samples as tensors with their reservoir weights, rebuilt as Avalanche datasets."""

from __future__ import annotations

from typing import Any

import torch

from ...growth import GrowthError
from .codec import decode_state, encode_state
from .objects import set_attributes
from .steps import RestoreStep

__all__ = ["prepare_storage", "storage_state"]


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
    return {
        "x": torch.stack(xs) if xs else None,
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
    """The Avalanche dataset of :func:`_dataset_samples`'s output."""
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )

    y = samples["y"].tolist()
    y_items: list[Any] = [torch.tensor(v) for v in y] if samples["y_kind"] == "tensor" else y
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


def storage_state(policy: Any, where: str) -> dict[str, Any]:
    """A ``ReplayPlugin``'s storage policy as resume-file data: its attributes and its
    reservoir buffer (or one per group of a balanced buffer)."""
    from avalanche.training.storage_policy import (
        BalancedExemplarsBuffer,
        ReservoirSamplingBuffer,
    )

    attrs = {k: v for k, v in vars(policy).items() if k not in ("_buffer", "buffer_groups")}
    if type(policy) is ReservoirSamplingBuffer:
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


def prepare_storage(policy: Any, state: dict[str, Any], where: str) -> RestoreStep:
    """Rebuild :func:`storage_state`'s output for ``policy``; applied, the step installs it."""
    attrs = decode_state(state["attrs"])
    if state["type"] == "reservoir":
        rebuilt = _rebuild_reservoir(state["buffer"])

        def apply_reservoir() -> None:
            set_attributes(policy, attrs)
            policy.buffer = rebuilt.buffer
            policy._buffer_weights = rebuilt._buffer_weights

        return RestoreStep(apply_reservoir)
    if state["type"] == "balanced":
        groups = {decode_state(k): _rebuild_reservoir(g) for k, g in state["groups"]}

        def apply_groups() -> None:
            set_attributes(policy, attrs)
            policy.buffer_groups = groups

        return RestoreStep(apply_groups)
    raise GrowthError(f"malformed resume file: bad replay buffer of {where}")
