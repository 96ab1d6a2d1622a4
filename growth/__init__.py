"""net2grow's growth engine: exact Net2Net widening and deepening of traced PyTorch models."""

from . import budget, protect
from .checkpoint import Checkpoint, load, load_checkpoint, save
from .errors import FunctionNotPreservedError, GrowthError, TraceError, UnsupportedLayerError
from .network import GrowableNetwork
from .record import GrowthRecord

__all__ = [
    "Checkpoint",
    "FunctionNotPreservedError",
    "GrowableNetwork",
    "GrowthError",
    "GrowthRecord",
    "TraceError",
    "UnsupportedLayerError",
    "budget",
    "load",
    "load_checkpoint",
    "protect",
    "save",
]
