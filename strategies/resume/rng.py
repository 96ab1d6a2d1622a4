"""The random number generators' states: torch (CPU and CUDA), numpy's global ``RandomState``
and Python's ``random``."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...growth import GrowthError

__all__ = ["prepare_rng", "rng_state"]


def rng_state() -> dict[str, Any]:
    """The generators' states as resume-file data (CUDA's only once CUDA is initialised)."""
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


def prepare_rng(state: dict[str, Any]) -> Callable[[], None]:
    """Check :func:`rng_state`'s output; the returned function restores it (CUDA's with a
    warning when this process has another number of CUDA devices)."""
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
