"""Weight tying between an embedding and an output layer (a language model's ``lm_head``).

``lm_head.weight = wte.weight``: one ``(vocab, hidden)`` table is read by the ``nn.Embedding``
(its columns are output units: a copied unit needs its source's column) and by the
``nn.Linear`` head (its columns are input units: Net2WiderNet splits a source's column among its
copies). One tensor cannot hold both. When the head reads the output of a LayerNorm/RMSNorm that
nothing else reads (GPT-2's ``ln_f``, BERT's prediction-head LayerNorm), the split can move in
front of the head: the table keeps its copied columns and the normalisation's weight and bias of
each new position ``j`` are its source's times ``share[j]``. Unit ``j`` of ``norm(x)`` is then its
source's value times ``share[j]``, and the head's sum over the copies of a unit is its old term
times the copies' shares, which sum to one: the logits are unchanged. The normalisation's
statistics come from its input and do not move.

This module finds such ties (:func:`embedding_head_tie`, for the analysis) and rewrites the
growth plans (:func:`move_split_to_norm`, for the widen pass).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .errors import GrowthError
from .transform import AxisStep

if TYPE_CHECKING:
    from .analysis import ChannelAnalysis
    from .rules import ModuleUpdate, TensorGrowth

#: Modules that pass a tensor on unchanged in eval mode and per channel: allowed between the
#: normalisation and the head.
_PASS_MODULES = (nn.Dropout, nn.Identity)
#: Methods that neither mix channels nor change values.
_PASS_METHODS = ("contiguous", "clone", "to", "float", "double", "half", "bfloat16", "type_as")
#: Methods that move values without changing them: allowed where the units keep a dimension.
_SHAPE_METHODS = ("view", "reshape")


def embedding_head_tie(modules: dict[str, nn.Module], users: list[tuple[str, str]]) -> bool:
    """True when ``users`` (``(layer, tensor name)`` pairs sharing one tensor) are an
    ``nn.Embedding``'s weight and an ``nn.Linear``'s weight: hidden units on dim 1 of both."""
    if len(users) != 2 or {t for _, t in users} != {"weight"}:
        return False
    kinds = sorted(type(modules[n]).__name__ for n, _ in users)
    return kinds == ["Embedding", "Linear"] and all(
        type(modules[n]) in (nn.Embedding, nn.Linear) for n, _ in users
    )


def _same_except_role(a: TensorGrowth, b: TensorGrowth) -> bool:
    if len(a.steps) != 1 or len(b.steps) != 1:
        return False
    x, y = a.steps[0], b.steps[0]
    if x.dim != y.dim or {x.role, y.role} != {"out", "in"}:
        return False
    u, v = x.amap.source, y.amap.source
    return u.shape == v.shape and (u.device.type == "meta" or torch.equal(u, v))


def _value_readers(node: fx.Node) -> int:
    """How many users of ``node`` read its values (not only its shape: ``x.shape``, ``x.size``)."""
    return sum(
        1
        for u in node.users
        if not (u.op == "call_function" and u.target is getattr)
        and not (u.op == "call_method" and u.target in ("size", "dim", "numel"))
    )


def norm_feeding(root: nn.Module, layouts: dict[fx.Node, Any], head: fx.Node) -> str | None:
    """The LayerNorm/RMSNorm (with a weight) whose output reaches the ``head`` node's input
    through pass-through nodes only, each read by nothing else; None if there is none.
    ``layouts``: the analysis' layout of every node (None where the units are not followed)."""
    from .rules.residual_norm import norm_modules

    arg = head.args[0] if head.args else None
    while isinstance(arg, fx.Node) and _value_readers(arg) == 1:
        if arg.op == "call_module":
            module = root.get_submodule(str(arg.target))
            if isinstance(module, norm_modules()):
                has_weight = getattr(module, "weight", None) is not None
                return str(arg.target) if has_weight else None
            if not isinstance(module, _PASS_MODULES):
                return None
        elif arg.op == "call_method" and arg.target in _PASS_METHODS:
            pass
        elif (arg.op == "call_method" and arg.target in _SHAPE_METHODS) or (
            arg.op == "call_function" and arg.target is operator.getitem
        ):
            if layouts.get(arg) is None:
                return None  # units indexed or mixed by the new shape: not a pass-through
        else:
            return None
        arg = arg.args[0] if arg.args else None
    return None


def no_norm_reason(shown: str, head: str) -> str:
    """Why an embedding tied to ``head`` cannot grow its hidden units (no norm feeds it)."""
    return (
        f"{shown} (one tensor, tied weights): the embedding needs its columns copied and the "
        f"head {head!r} needs them split among the copies; the split can move onto a "
        f"LayerNorm/RMSNorm with a weight whose output only the head reads, and none feeds "
        f"{head!r}. Untie them (give the head its own copy of the weight: "
        f"head.weight = nn.Parameter(head.weight.detach().clone()))"
    )


def move_split_to_norm(
    root: nn.Module,
    analysis: ChannelAnalysis,
    plans: list[tuple[str, nn.Module, ModuleUpdate]],
    first: tuple[str, str, TensorGrowth],
    second: tuple[str, str, TensorGrowth],
) -> bool:
    """Resolve an embedding/head tie whose two growths differ only by role (see the module
    docstring): the tensor keeps the embedding's copied columns, the head's split moves to the
    weight and bias of the normalisation feeding it. Returns False when the two growths are not
    such a pair; raises ``GrowthError`` when they are but the split cannot move."""
    a, b = first[2], second[2]
    if not _same_except_role(a, b):
        return False
    head_layer = first[0] if a.steps[0].role == "in" else second[0]
    norm_name = norm_feeding(root, analysis.layouts, analysis.module_nodes[head_layer][0])
    if norm_name is None:  # the analysis blocks such ties: only a changed graph gets here
        shown = f"{first[0]}.{first[1]} is {second[0]}.{second[1]}"
        raise GrowthError(no_norm_reason(shown, head_layer))
    norm_plan = next((u for n, _, u in plans if n == norm_name), None)
    if norm_plan is None:
        return False
    for growth in norm_plan.tensors.values():
        growth.steps = [AxisStep(s.dim, s.amap, "in") if s.role == "channel" else s
                        for s in growth.steps]  # "in": copied and multiplied by the share
    return True
