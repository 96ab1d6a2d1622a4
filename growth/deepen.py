"""The deepen pass (Net2DeeperNet): insert an identity layer, or a zero residual block.

The new layer goes after ``name`` *and* its chain of per-channel successors (BatchNorm,
activation, dropout), i.e. where the next layer would read. ``kind="identity"``:
``act(U x)`` with ``U = I`` equals ``x`` when ``x`` is already the output of an activation that is
idempotent on its outputs (ReLU after ReLU, none after none). ``kind="residual"``:
``x + layer2(act(layer1(x)))`` with ``layer2 = 0`` is exact for any activation. Both are exact in
eval *and* train mode: the inserted layers hold no batch statistics.

BatchNorm: no BatchNorm is inserted, not even after ``Conv -> BatchNorm``. Net2DeeperNet's
"undo the normalisation" BatchNorm (``weight = sqrt(var + eps)``, ``bias = mean`` of its input's
statistics) is the identity only in eval mode: in train mode it normalises each batch with that
batch's own statistics, which no fixed parameters undo, so a train-mode forward would change.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn

from . import limits
from .changes import GrowthChanges
from .errors import REGISTER_HINT, GrowthError, UnsupportedLayerError
from .optim import add_params, remove_params
from .rules import (
    ActivationFunction,
    ActivationRule,
    PassThroughRule,
    function_rule_for,
    module_rule_for,
    module_spec_for,
)
from .rules.functions import Elementwise, Unary
from .rules.norm import ChannelwiseRule
from .verify import check_preserved, reference_output

if TYPE_CHECKING:
    from .network import GrowableNetwork

KINDS = ("identity", "residual", "block")  # "block": growth.block


@dataclass
class Chain:
    """``name``'s node and its per-channel successors, with what they contain."""

    nodes: list[fx.Node]
    activation: nn.Module | None  # a fresh module equal to the chain's last activation
    activation_is_last: bool  # nothing but dropout after it
    norm: nn.Module | None  # the chain's BatchNorm, if any (deepen inserts none after it)


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
        rule = function_rule_for(node)
        if isinstance(rule, Elementwise):  # x * 0.5, x.clamp(0, 6): one tensor operand
            return len(node.all_input_nodes) == 1
        return isinstance(rule, Unary)
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


def output_item(name: str, node: fx.Node) -> fx.Node:
    """The node carrying layer ``name``'s output: ``node`` itself, or for a layer returning a
    tuple read by index (``nn.MultiheadAttention``: output, weights) the read of item 0."""
    users = list(node.users)
    if not users or not all(
        u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
        for u in users
    ):
        return node
    first = [u for u in users if u.args[1] == 0]
    if len(first) != 1:
        raise GrowthError(
            f"cannot deepen {name!r}: its output is a tuple whose item 0 is read "
            f"{len(first)} times; read it once (out = layer(x)[0]) to deepen after it"
        )
    return first[0]


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
    ok = _idempotent(new_act) and chain.activation is not None and chain.activation_is_last
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


def insert_after(graph: fx.Graph, anchor: fx.Node, targets: list[str], residual: bool) -> fx.Graph:
    """A copy of ``graph`` with ``call_module`` nodes for ``targets`` after ``anchor`` (and
    ``anchor + g`` when ``residual``); every former user of ``anchor`` reads the new output."""
    new_graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    new_graph.output(new_graph.graph_copy(graph, val_map))
    anchor = val_map[anchor]
    users = list(anchor.users)
    node = anchor
    for t in targets:
        with new_graph.inserting_after(node):
            node = new_graph.call_module(t, (node,))
    if residual:
        with new_graph.inserting_after(node):
            node = new_graph.call_function(operator.add, (anchor, node))
    for user in users:
        user.replace_input_with(anchor, node)
    return new_graph


def deepen(
    net: GrowableNetwork,
    name: str,
    *,
    kind: str,
    activation: nn.Module | None,
    verify: bool,
    optimizer: torch.optim.Optimizer | None,
    limit: float,
) -> tuple[float | None, dict[str, Any], GrowthChanges]:
    """Insert a new layer of ``kind`` after layer ``name`` of ``net`` (and its chain).

    The arguments have been checked (``GrowableNetwork.deepen``). Returns the largest output
    change on the probe batch (None when not verified), the record's details and the changes,
    which the caller records. A refusal raises :class:`GrowthError` with ``net`` and
    ``optimizer`` as they were.
    """
    module, rule = net._layer_rule(name)
    nodes = net.analysis.module_nodes[name]
    if len(nodes) != 1:
        raise GrowthError(
            f"{name!r} is called {len(nodes)} times in forward; deepen a layer called once"
        )
    width = int(rule.width(module))
    chain = find_chain(net, output_item(name, nodes[0]))
    new_act = activation if activation is not None else chain.activation
    if kind == "identity":
        check_identity_exact(name, chain, new_act)
    try:
        needed = deepen_bytes(rule, module, width, kind, new_act)
    except GrowthError as exc:
        raise type(exc)(f"cannot deepen {name!r}: {exc}") from exc
    limits.check_growth_bytes(needed, limit, f"deepen({name!r}) at width {width}")
    try:
        layer = new_layer(rule, module, width, kind)
    except GrowthError as exc:
        raise type(exc)(f"cannot deepen {name!r}: {exc}") from exc
    if layer is None:
        raise UnsupportedLayerError(
            f"{name!r} ({type(module).__name__}) has no identity rule, so nothing can be "
            f"inserted after it; {REGISTER_HINT} (with square_like/set_identity)"
        )
    grown = net._modules.get("grown")
    stem = _free_stem(grown, name.replace(".", "_"), kind)
    if kind == "identity":
        rule.set_identity(layer)
        new_modules = [(stem, layer)]
        if new_act is not None:
            new_modules.append((f"{stem}_act", copy.deepcopy(new_act)))
        targets = [f"grown.{n}" for n, _ in new_modules]
    else:
        block = nn.Module()
        block.layer1 = layer
        block.act = copy.deepcopy(new_act) if new_act is not None else nn.ReLU()
        block.layer2 = new_layer(rule, module, width, kind)
        with torch.no_grad():
            for p in block.layer2.parameters():
                p.zero_()
        new_modules = [(stem, block)]
        targets = [f"grown.{stem}.{c}" for c in ("layer1", "act", "layer2")]
    for _, m in new_modules:
        m.train(module.training)  # new layers follow the mode of the layer they extend
    new_graph = insert_after(net.graph, chain.nodes[-1], targets, residual=kind == "residual")

    err, changes = install_inserted(
        net, new_modules, new_graph, optimizer=optimizer, like=next(module.parameters(), None),
        verify=verify, name=name,
    )
    details = {
        "kind": kind,
        "inserted": [f"grown.{n}" for n, _ in new_modules],
        "activation": type(new_act).__name__ if new_act is not None else None,
    }
    return err, details, changes


def install_inserted(
    net: GrowableNetwork,
    new_modules: list[tuple[str, nn.Module]],
    new_graph: fx.Graph,
    *,
    optimizer: torch.optim.Optimizer | None,
    like: Tensor | None,
    verify: bool,
    name: str,
) -> tuple[float | None, GrowthChanges]:
    """Install ``new_modules`` under ``net.grown`` and ``new_graph`` (which calls them) in one
    transaction: their parameters join ``optimizer`` in ``like``'s param group, and a change of
    the function (measured when ``verify``) undoes it all. Returns the change on the probe batch
    and the :class:`GrowthChanges` (new parameters only) of an insertion after layer ``name``."""
    before = reference_output(net) if verify else None
    old_graph = net.graph
    with net._atomic() as tx:
        grown = net._modules.get("grown")
        if grown is None:
            grown = nn.Module()
            grown.train(net.training)
            tx.set_attr(net, "grown", grown)
        for n, m in new_modules:
            tx.set_attr(grown, n, m)
        new_params = [p for _, m in new_modules for p in m.parameters()]
        if optimizer is not None:
            add_params(optimizer, new_params, like)
            tx.on_rollback(lambda: remove_params(optimizer, new_params))
        tx.on_rollback(lambda: setattr(net, "_graph", old_graph))
        net._graph = new_graph
        net._recompile()
        err = check_preserved(net, before, 0.0, name)
    names = {id(p): n for n, p in net.named_parameters()}
    return err, GrowthChanges("identity", {}, [names[id(p)] for p in new_params])


def new_layer(rule: Any, module: nn.Module, width: int, kind: str) -> nn.Module | None:
    """A fresh ``width -> width`` layer to insert after ``module``: one that can compute the
    identity (``kind="identity"``), or one for a residual branch that starts at zero."""
    if kind == "residual":
        return rule.residual_like(module, width)
    return rule.square_like(module, width)


def _free_stem(grown: nn.Module | None, base: str, kind: str) -> str:
    """The name of the next module inserted after layer ``base`` (its dots replaced)."""
    taken = set(grown._modules) if grown is not None else set()
    k = 1
    while f"{base}_deep{k}" in taken or f"{base}_res{k}" in taken:
        k += 1
    return f"{base}_deep{k}" if kind == "identity" else f"{base}_res{k}"


def _tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are ``meta`` tensors (no data copied)."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad)
            if isinstance(t, nn.Parameter)
            else meta
        )
    return copy.deepcopy(module, memo)


def deepen_bytes(
    rule: Any,
    module: nn.Module,
    width: int,
    kind: str,
    activation: nn.Module | None,
) -> int:
    """Bytes of the layers ``deepen`` would insert after ``module``, computed without building
    them: the rule builds its layer from a ``meta`` copy of ``module`` (a bound when it cannot)."""
    try:
        layer = new_layer(rule, meta_copy(module), width, kind)
        one = 0 if layer is None else _tensor_bytes(layer)
    except GrowthError:
        raise
    except Exception:  # a rule that cannot build on meta tensors: width x width per kernel tap
        w = getattr(module, "weight", None)
        if isinstance(w, Tensor):
            one = (width * width * math.prod(w.shape[2:]) + width) * w.element_size()
        else:
            one = _tensor_bytes(module)
    total = one * (2 if kind == "residual" else 1)
    if activation is not None:
        total += _tensor_bytes(activation)
    return total
