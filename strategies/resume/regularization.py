"""State of the regularisation plugins: ``EWCPlugin``'s saved parameters and importances,
``LwFPlugin``'s teacher (the model copied after the last experience) and class table."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from ...growth import GrowthError
from .codec import decode_state, encode_state
from .modules import (
    check_state_dict,
    detached_copy,
    load_module_state,
    module_state,
    tensor_layout,
)
from .steps import RestoreStep

__all__ = ["ewc_state", "lwf_state", "prepare_ewc", "prepare_lwf"]


def _param_data_state(table: Any) -> list[Any]:
    """``{experience: {name: ParamData}}`` (EWC) as plain data."""
    return [
        [
            int(exp),
            [
                {
                    "name": str(name),
                    "key": str(name),
                    "shape": [int(s) for s in pd.shape],
                    "data": pd.data.detach().clone(),
                    "device": str(pd.device),
                }
                for name, pd in params.items()
            ],
        ]
        for exp, params in table.items()
    ]


def _rebuild_param_data(saved: Any) -> defaultdict:
    """Inverse of :func:`_param_data_state` (on the CPU where CUDA is gone)."""
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


def ewc_state(plugin: Any) -> dict[str, Any]:
    """An ``EWCPlugin``'s saved parameters and importances."""
    return {
        "saved_params": _param_data_state(plugin.saved_params),
        "importances": _param_data_state(plugin.importances),
    }


def prepare_ewc(plugin: Any, state: dict[str, Any]) -> RestoreStep:
    """Rebuild :func:`ewc_state`'s output; applied, the step installs it in ``plugin``."""
    saved = _rebuild_param_data(state["saved_params"])
    importances = _rebuild_param_data(state["importances"])

    def apply_ewc() -> None:
        plugin.saved_params = saved
        plugin.importances = importances

    return RestoreStep(apply_ewc)


def lwf_state(lwf: Any, model: nn.Module, where: str) -> dict[str, Any]:
    """An ``LwFPlugin``'s ``lwf`` state: experience count, classes by task and teacher, which
    must still have ``model``'s architecture (save before the model grows)."""
    prev = lwf.prev_model
    teacher = None
    if prev is not None:
        ours, theirs = tensor_layout(model.state_dict()), tensor_layout(prev.state_dict())
        if ours != theirs or type(prev) is not type(model):
            raise GrowthError(
                f"cannot save {where}: the LwF teacher (the model copied after the last "
                f"experience) no longer has the model's architecture; save at the experience "
                f"boundary, before the model grows"
            )
        teacher = module_state(prev)
    return {
        "expcount": int(lwf.expcount),
        "prev_classes_by_task": encode_state(dict(lwf.prev_classes_by_task), where),
        "teacher": teacher,
    }


def prepare_lwf(lwf: Any, state: dict[str, Any], model: nn.Module, where: str) -> RestoreStep:
    """Rebuild :func:`lwf_state`'s output, the teacher as a copy of ``model`` (the model being
    restored) loaded with the saved tensors; applied, the step installs it in ``lwf``."""
    classes = defaultdict(set, decode_state(state["prev_classes_by_task"]))
    saved_teacher = state["teacher"]
    teacher = None
    if saved_teacher is not None:
        teacher = detached_copy(model)
        check_state_dict(teacher, saved_teacher["state"], f"{where} teacher")
        load_module_state(teacher, saved_teacher)

    def apply_lwf() -> None:
        lwf.expcount = int(state["expcount"])
        lwf.prev_classes_by_task = classes
        lwf.prev_model = teacher

    return RestoreStep(apply_lwf)
