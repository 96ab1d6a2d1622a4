"""The deepen pass (Net2DeeperNet): insert an identity layer, or a zero residual block.

The new layer goes after ``name`` *and* its chain of per-channel successors (BatchNorm,
activation, dropout), i.e. where the next layer would read. ``kind="identity"``:
``act(U x)`` with ``U = I`` equals ``x`` when ``x`` is already the output of an activation that is
idempotent on its outputs (ReLU after ReLU, none after none). ``kind="residual"``:
``x + layer2(act(layer1(x)))`` with ``layer2 = 0`` is exact for any activation.

BatchNorm: when ``name`` is followed by BatchNorm, the identity layer gets its own BatchNorm,
initialised from statistics of its input measured on the probe batch, with ``weight = sqrt(var +
eps)`` and ``bias = mean``: in eval mode it undoes its own normalisation exactly. In train mode it
normalises with batch statistics, so the block is the identity only as far as a batch's statistics
match the stored ones; they are updated as training goes on, like any BatchNorm.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from .errors import GrowthError
from .rules import (
    ActivationFunction,
    ActivationRule,
    PassThroughRule,
    function_rule_for,
    module_rule_for,
    module_spec_for,
)
from .rules.functions import Unary
from .rules.norm import ChannelwiseRule

KINDS = ("identity", "residual")

@dataclass
class Chain:
    """``name``'s node and its per-channel successors, with what they contain."""

    nodes: list[fx.Node]
    activation: nn.Module | None  # a fresh module equal to the chain's last activation
    activation_is_last: bool  # nothing but dropout after it
    norm: nn.Module | None  # the chain's BatchNorm, if any


def _activation_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    """A fresh module computing ``node``'s activation, or None if ``node`` is no activation."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        return copy.deepcopy(m) if isinstance(module_rule_for(m), ActivationRule) else None
    rule = function_rule_for(node)
    return rule.module(node) if isinstance(rule, ActivationFunction) else None


def _is_pass_through(root: nn.Module, node: fx.Node) -> bool:
    """A module that passes values on unchanged in eval mode (dropout, identity)."""
    if node.op != "call_module":
        return False
    rule = module_rule_for(root.get_submodule(str(node.target)))
    return isinstance(rule, PassThroughRule) and not isinstance(rule, ActivationRule)


def _is_channelwise(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        rule = module_rule_for(root.get_submodule(str(node.target)))
        return isinstance(rule, (PassThroughRule, ChannelwiseRule))
    if node.op in ("call_function", "call_method"):
        return isinstance(function_rule_for(node), Unary)
    return False


def find_chain(root: nn.Module, start: fx.Node) -> Chain:
    """Follow ``start``'s single-user per-channel successors."""
    nodes = [start]
    activation, act_last, norm = None, False, None
    node = start
    while len(node.users) == 1:
        nxt = next(iter(node.users))
        if nxt.args[:1] != (node,) or not _is_channelwise(root, nxt):
            break
        nodes.append(nxt)
        node = nxt
        act = _activation_of(root, nxt)
        if act is not None:
            activation, act_last = act, True
            continue
        is_dropout = _is_pass_through(root, nxt)
        if nxt.op == "call_module" and isinstance(
            root.get_submodule(str(nxt.target)), nn.modules.batchnorm._BatchNorm
        ):
            norm = root.get_submodule(str(nxt.target))
        if not is_dropout:
            act_last = False
    return Chain(nodes, activation, act_last, norm)


def _same_activation(a: nn.Module, b: nn.Module) -> bool:
    """Same type and the same constructor arguments (``inplace`` aside)."""
    if type(a) is not type(b):
        return False
    spec = module_spec_for(type(a))
    args = [n for n in (spec.args if spec else ()) if n != "inplace"]
    return all(getattr(a, n) == getattr(b, n) for n in args)


def _idempotent(module: nn.Module) -> bool:
    rule = module_rule_for(module)
    return isinstance(rule, ActivationRule) and rule.idempotent


def check_identity_exact(name: str, chain: Chain, new_act: nn.Module | None) -> None:
    """Refuse an identity insertion that cannot be exact, saying why."""
    if new_act is None or isinstance(new_act, nn.Identity):
        return
    ok = (
        _idempotent(new_act)
        and chain.activation is not None
        and chain.activation_is_last
    )
    if ok:
        ok = _same_activation(new_act, chain.activation) or (
            isinstance(new_act, nn.ReLU) and isinstance(chain.activation, (nn.ReLU6,))
        )
    if not ok:
        have = type(chain.activation).__name__ if chain.activation is not None else "no activation"
        raise GrowthError(
            f"cannot deepen {name!r} with an identity layer followed by "
            f"{type(new_act).__name__}: the values it receives come from {have}, and "
            f"{type(new_act).__name__}(x) != x for them (an identity insertion is exact only "
            f"for an activation idempotent on its inputs, such as ReLU after ReLU). Use "
            f"kind='residual' (exact for every activation) or activation=nn.Identity()"
        )


def identity_norm(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> nn.Module:
    """A BatchNorm like ``norm`` over ``mean.numel()`` channels that undoes its own normalisation
    in eval mode, with running statistics ``mean``/``var``."""
    new = type(norm)(
        mean.numel(),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=True,
        track_running_stats=True,
        device=mean.device,
        dtype=mean.dtype,
    )
    with torch.no_grad():
        new.running_mean.copy_(mean)
        new.running_var.copy_(var)
        new.weight.copy_(torch.sqrt(var + norm.eps))
        new.bias.copy_(mean)
    return new


def channel_stats(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``x`` along every dim but ``dim``."""
    dims = [d for d in range(x.dim()) if d != dim]
    return x.mean(dims), x.var(dims, unbiased=False)


def insert_after(graph: fx.Graph, anchor: fx.Node, targets: list[str], residual: bool) -> fx.Node:
    """Insert ``call_module`` nodes for ``targets`` after ``anchor`` (and ``anchor + g`` when
    ``residual``); every former user of ``anchor`` now reads the new output."""
    users = list(anchor.users)
    with graph.inserting_after(anchor):
        node = anchor
        new_nodes = []
        for t in targets:
            with graph.inserting_after(node):
                node = graph.call_module(t, (node,))
            new_nodes.append(node)
        if residual:
            with graph.inserting_after(node):
                node = graph.call_function(operator.add, (anchor, node))
            new_nodes.append(node)
    for user in users:
        user.replace_input_with(anchor, node)
    return node
