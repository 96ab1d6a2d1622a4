"""Growth rules for Avalanche's dynamic classifier heads.

``IncrementalClassifier`` and ``MultiHeadClassifier`` replace their ``nn.Linear`` s and masks as
classes and tasks arrive, so they are traced as *leaf* modules (a module with a rule is a leaf;
traced through, an ``IncrementalClassifier``'s class mask would be frozen into the graph as a
constant). Their outputs are the classes (fixed); their *input* grows with the layer that feeds
them: every head's weight gains columns (Net2WiderNet: copies carry their share), and the
``in_features`` used for heads created later follows, so they keep adapting to new classes.

The heads' ``nn.Linear`` s are submodules, so the rules name their tensors by dotted paths
(``classifier.weight``). The rules are registered when this module is imported, that is on import
of :mod:`strategies`: import it before building a ``GrowableNetwork`` around such heads.
"""

from __future__ import annotations

from avalanche.models import IncrementalClassifier, MultiHeadClassifier
from torch import nn

from ..growth import GrowableNetwork, GrowthError
from ..growth.rules import (
    ModuleRule,
    ModuleSpec,
    ModuleUpdate,
    TensorGrowth,
    module_rule_for,
    register_module_rule,
)
from ..growth.transform import AxisStep

HEAD_TYPES: tuple[type[nn.Module], ...] = (IncrementalClassifier, MultiHeadClassifier)


class _InputOnlyRule(ModuleRule):
    """A module that reads units along its input's last dimension and outputs fixed classes."""

    def infer(self, ctx, name, module, node):  # type: ignore[override]
        src = node.args[0] if node.args else None
        layout, shape = ctx.layout(src), ctx.shape(src)
        if layout is not None and shape is not None and layout.dim != len(shape) - 1:
            ctx.spaces.block_layout(
                layout, f"{name!r} ({type(module).__name__}) reads a dimension that is not channels"
            )
        return ctx.fixed(
            node, f"{name!r} ({type(module).__name__}) outputs the classes, whose number is fixed"
        )

    def linears(self, module: nn.Module) -> dict[str, nn.Linear]:
        """Path (relative to ``module``) -> every ``nn.Linear`` reading the input."""
        raise NotImplementedError

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        if in_map is None:
            return None
        update = ModuleUpdate()
        for path in self.linears(module):
            update.tensors[f"{path}.weight"] = TensorGrowth([AxisStep(1, in_map, "in")])
            update.attrs[f"{path}.in_features"] = in_size
        return update


class IncrementalClassifierRule(_InputOnlyRule):
    """``IncrementalClassifier``: its ``classifier`` reads the input."""

    def linears(self, module):  # type: ignore[override]
        return {"classifier": module.classifier}


class MultiHeadClassifierRule(_InputOnlyRule):
    """``MultiHeadClassifier``: every task head reads the input; new heads use ``in_features``."""

    def linears(self, module):  # type: ignore[override]
        return {f"classifiers.{k}.classifier": h.classifier for k, h in module.classifiers.items()}

    def grow(self, module, in_map, out_map, in_size, out_size):  # type: ignore[override]
        update = super().grow(module, in_map, out_map, in_size, out_size)
        if update is not None:
            update.attrs["in_features"] = in_size
        return update


# --- checkpoints ---------------------------------------------------------------------------------
#: How a checkpoint rebuilds an ``IncrementalClassifier``: at its current size (its ``classifier``
#: and ``active_units`` are then loaded from the file).
INCREMENTAL_CLASSIFIER_SPEC = ModuleSpec(
    ("in_features", "initial_out_features", "masking", "mask_value", "auto_adapt"),
    read=lambda m: {
        "in_features": m.classifier.in_features,
        "initial_out_features": m.classifier.out_features,
        "masking": m.masking,
        "mask_value": m.mask_value,
        "auto_adapt": m._auto_adapt,
    },
)

#: A ``MultiHeadClassifier``: its task heads are its children in the file, the class counts and
#: the tasks it has seen are state, and it registers one ``active_units_T<task>`` buffer a task.
MULTIHEAD_CLASSIFIER_SPEC = ModuleSpec(
    ("in_features", "initial_out_features", "masking", "mask_value"),
    read=lambda m: {
        "in_features": m.in_features,
        "initial_out_features": m.starting_out_features,
        "masking": m.masking,
        "mask_value": m.mask_value,
    },
    state=("max_class_label", "known_train_tasks_labels"),
    dynamic_buffers=True,
)


# --- registration, on import of this module (and so of strategies) --------------------------------
register_module_rule(
    IncrementalClassifier, IncrementalClassifierRule(), spec=INCREMENTAL_CLASSIFIER_SPEC
)
register_module_rule(MultiHeadClassifier, MultiHeadClassifierRule(), spec=MULTIHEAD_CLASSIFIER_SPEC)


def head_rule(module: nn.Module) -> ModuleRule | None:
    """The registered rule of a head module (None when heads have no rule)."""
    rule = module_rule_for(module)
    return rule if isinstance(rule, _InputOnlyRule) else None


def check_heads(net: GrowableNetwork) -> list[str]:
    """Check how ``net``'s Avalanche heads were traced; returns warnings.

    Raises :class:`GrowthError` for a head traced *through* (its class mask would be a frozen
    constant of the graph, so it could not adapt to new classes).
    """
    called = {str(n.target) for n in net.graph.nodes if n.op == "call_module"}
    warnings: list[str] = []
    heads: list[str] = []
    for name, m in net.named_modules():
        if not isinstance(m, HEAD_TYPES) or any(name.startswith(h + ".") for h in heads):
            continue
        heads.append(name)
        kind = type(m).__name__
        if name not in called and any(c.startswith(name + ".") for c in called):
            raise GrowthError(
                f"{kind} {name!r} was traced through, so its class mask is frozen into the graph "
                f"and new classes stay masked. Import strategies before building the network, "
                f"or build it with GrowableNetwork(..., leaf_modules=[{kind}])"
            )
        if name in called and head_rule(m) is None:
            warnings.append(
                f"{kind} {name!r} is a leaf without a growth rule (none registered for its type): "
                f"the layer feeding it cannot grow"
            )
    return warnings
