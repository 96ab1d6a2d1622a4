"""net2grow: networks that grow while they learn.

Exact Net2Net widening and deepening of any traced PyTorch model (``net2grow.growth``),
Avalanche plugins that grow a model as a continual-learning stream arrives
(``net2grow.strategies``), and offline experiments (``net2grow.benchmarks``; ``python -m
net2grow.benchmarks`` or the ``net2grow`` command).

The everyday API is here::

    from net2grow import GrowableNetwork, GrowthPlugin, EveryExperience, save, load

Names from ``net2grow.strategies`` (which imports avalanche-lib) are loaded on first use, so
``from net2grow import GrowableNetwork`` stays as light as ``torch``.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

# Installed, the subpackages live inside this folder. In a source checkout they are the
# repository's top-level folders growth/, strategies/ and benchmarks/, beside this one.
_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "growth")):
    __path__.append(os.path.dirname(_here))

from .growth import (  # noqa: E402 (the subpackages are found through __path__ above)
    Checkpoint,
    FunctionNotPreservedError,
    GrowableNetwork,
    GrowthError,
    GrowthRecord,
    TraceError,
    UnsupportedLayerError,
    load,
    load_checkpoint,
    save,
)

try:
    __version__ = version("net2grow")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"

#: Names loaded on first use (net2grow.strategies imports avalanche-lib).
_LAZY = {
    "CohortLR": "growth.cohorts",
    "CohortLRPlugin": "strategies",
    "Expand": "strategies",
    "GrowthPlugin": "strategies",
    "Growing": "strategies",
    "MultiTaskGrowableNetwork": "strategies",
    "growth_metrics": "strategies",
    "EveryExperience": "strategies.policies",
    "Early": "strategies.policies",
    "NewClasses": "strategies.policies",
    "OnPlateau": "strategies.policies",
    "PlateauWidths": "strategies.policies",
    "RankWidths": "strategies.policies",
}

__all__ = [
    "Checkpoint",
    "CohortLR",
    "CohortLRPlugin",
    "Early",
    "EveryExperience",
    "Expand",
    "FunctionNotPreservedError",
    "GrowableNetwork",
    "Growing",
    "GrowthError",
    "GrowthPlugin",
    "GrowthRecord",
    "MultiTaskGrowableNetwork",
    "NewClasses",
    "OnPlateau",
    "PlateauWidths",
    "RankWidths",
    "TraceError",
    "UnsupportedLayerError",
    "__version__",
    "growth_metrics",
    "load",
    "load_checkpoint",
    "save",
]


def __getattr__(name: str) -> Any:
    if name in ("strategies", "benchmarks"):  # subpackages, imported on first use
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'net2grow' has no attribute {name!r}")
