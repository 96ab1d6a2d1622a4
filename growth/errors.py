"""Errors raised by the growth engine.

Every refusal is a :class:`GrowthError`; its message names the layer involved and what to do.
A refused operation leaves the network (and the optimizer passed with it) exactly as it was.
"""

from __future__ import annotations


class GrowthError(ValueError):
    """A growth operation was refused: bad arguments or a layer that cannot grow."""


class UnsupportedLayerError(GrowthError):
    """A layer type in the coupled group has no growth rule."""


class TraceError(GrowthError):
    """The model could not be traced into a layer graph with ``torch.fx``."""


class FunctionNotPreservedError(GrowthError):
    """Growth changed the network's outputs on the probe batch beyond the tolerance."""


REGISTER_HINT = (
    "register a rule for it with "
    "net2grow.growth.rules.register_module_rule(<LayerType>, <ModuleRule>()) "
    "(see growth/rules/_infra.py), or keep it out of the grown part of the network"
)
