"""``deepen(name, kind="block")``: insert an identity copy of a pre-norm residual block.

A pre-norm transformer block computes ``x + f1(x)``, then ``+ f2(...)`` (attention, then FFN):
its output is its input plus branches, each ending with an output projection. A copy of the
block whose output projections are zero adds nothing to its input: it is the identity, in eval
and train mode (dropout and stochastic depth of a zero branch are zero), and it trains like the
block it copies. A post-norm block (``norm(x + f(x))``, ``nn.TransformerEncoderLayer(
norm_first=False)``) normalises its output, which no choice of its parameters undoes: refused.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from . import limits
from .changes import GrowthChanges
from .deepen import install_inserted
from .errors import GrowthError
from .rules import PassThroughRule, module_rule_for

if TYPE_CHECKING:
    from .network import GrowableNetwork

_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")
#: ops through which a zero tensor stays zero (between an output projection and the residual add)
_ZERO_KEEPING_METHODS = ("contiguous", "view", "reshape", "transpose", "permute", "to")


def _in_block(node: fx.Node, name: str) -> bool:
    prefix = name + "."
    if node.op in ("call_module", "get_attr") and str(node.target).startswith(prefix):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(path == name or str(path).startswith(prefix) for path, _ in stack.values())


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _ADDS


def _zero_target(net: nn.Module, node: fx.Node, name: str) -> tuple[str, str]:
    """(path inside the block, kind) of the layer whose zeroing makes ``node`` zero."""
    while True:
        if node.op == "call_module":
            module = net.get_submodule(str(node.target))
            rule = module_rule_for(module)
            rel = str(node.target)[len(name) + 1 :]
            if isinstance(module, nn.MultiheadAttention):
                return rel, "attention"
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return rel, "projection"
            if type(rule) is PassThroughRule and node.args:  # dropout, identity, stochastic depth
                node = node.args[0]
                continue
        elif node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if node.args[1] == 0 and src.op == "call_module":
                node = src
                continue
        elif node.op == "call_method" and node.target in _ZERO_KEEPING_METHODS:
            node = node.args[0]
            continue
        raise GrowthError(
            f"cannot insert an identity copy of block {name!r}: its residual branch ends with "
            f"{node.op} {node.target!r} (node {node.name!r}), not with an output projection "
            f"(Linear, Conv, MultiheadAttention, then dropout) that could be set to zero"
        )


def _branches(net: nn.Module, nodes: list[fx.Node], out: fx.Node, name: str) -> tuple[Any, list]:
    """The block's stream input and, for each residual branch, the layer to zero."""
    inside = set(nodes)
    targets = []
    s = out
    while True:
        if not _is_add(s):
            what = f"{s.op} {s.target!r}"
            if s.op == "call_module" and isinstance(
                net.get_submodule(str(s.target)), (nn.LayerNorm, *_rms())
            ):
                raise GrowthError(
                    f"cannot insert an identity copy of block {name!r}: it is a post-norm "
                    f"block (its output is {s.target!r}, a normalisation of x + f(x)), and no "
                    f"choice of parameters makes norm(x + 0) equal x. Use a pre-norm block "
                    f"(nn.TransformerEncoderLayer(..., norm_first=True): x + f(norm(x))), or "
                    f"kind='residual' after a layer inside it"
                )
            raise GrowthError(
                f"cannot insert an identity copy of block {name!r}: its output ({what}, node "
                f"{s.name!r}) is not x + branch; only residual blocks x + f(x) (pre-norm "
                f"transformer blocks) can be copied as an identity"
            )
        a, b = s.args[0], s.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            raise GrowthError(f"block {name!r}: node {s.name!r} adds a constant, not a branch")
        if a not in inside or (_is_add(a) and b in inside and not _is_add(b)):
            stream, branch = a, b
        else:
            stream, branch = b, a
        if branch not in inside:
            raise GrowthError(f"block {name!r}: node {s.name!r} adds two tensors from outside it")
        targets.append(_zero_target(net, branch, name))
        if stream not in inside:
            return stream, targets
        s = stream


def _rms() -> tuple[type, ...]:
    rms = getattr(nn, "RMSNorm", None)
    return (rms,) if rms is not None else ()


def _zero(block: nn.Module, rel: str, kind: str) -> None:
    layer = block.get_submodule(rel)
    if kind == "attention":
        layer = layer.out_proj
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


def _renamed_stack(meta: dict, name: str, new: str) -> dict:
    stack = meta.get("nn_module_stack")
    if not stack:
        return meta
    out = OrderedDict()
    for key, (path, cls) in stack.items():
        path = str(path)
        if path == name or path.startswith(name + "."):
            path = new + path[len(name) :]
            key = path
        out[key] = (path, cls)
    meta = dict(meta)
    meta["nn_module_stack"] = out
    return meta


def insert_block(
    net: GrowableNetwork,
    name: str,
    *,
    verify: bool,
    optimizer: torch.optim.Optimizer | None,
    limit: float,
) -> tuple[int, tuple[float | None, dict[str, Any], GrowthChanges]]:
    """Insert after block ``name`` an identity copy of it (see the module docstring).

    Returns the residual stream's width and the outcome ``(error, details, changes)``.
    """
    try:
        block = net.get_submodule(name)
    except AttributeError:
        raise GrowthError(f"deepen({name!r}, kind='block'): no module of that name") from None
    nodes = [n for n in net.graph.nodes if _in_block(n, name)]
    if not nodes:
        raise GrowthError(
            f"deepen({name!r}, kind='block'): module {name!r} is not called in forward (or "
            f"the graph has no record of its calls); pass the name of a transformer block"
        )
    inside = set(nodes)
    outs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outs) != 1:
        raise GrowthError(
            f"deepen({name!r}, kind='block'): the block must have one output used after it, "
            f"it has {len(outs)}"
        )
    out = outs[0]
    stream, targets = _branches(net, nodes, out, name)
    shape = stream.meta.get("shape")
    width = int(shape[-1]) if shape else 0
    size = sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    limits.check_growth_bytes(size, limit, f"deepen({name!r}, kind='block')")

    new_block = copy.deepcopy(block)
    for rel, kind in targets:
        _zero(new_block, rel, kind)
    grown = net._modules.get("grown")
    base = name.replace(".", "_")
    taken = set(grown._modules) if grown is not None else set()
    k = 1
    while f"{base}_block{k}" in taken:
        k += 1
    stem = f"{base}_block{k}"
    new_name = f"grown.{stem}"

    new_graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    new_graph.output(new_graph.graph_copy(net.graph, val_map))
    anchor = val_map[out]
    users = list(anchor.users)
    env: dict[fx.Node, fx.Node] = {}

    def arg_of(a: fx.Node) -> fx.Node:
        if a in env:
            return env[a]
        return anchor if a is stream else val_map[a]

    last = anchor
    for n in nodes:
        with new_graph.inserting_after(last):
            copy_node = new_graph.node_copy(n, arg_of)
        if n.op in ("call_module", "get_attr"):
            copy_node.target = new_name + str(n.target)[len(name) :]
        copy_node.meta = _renamed_stack(copy_node.meta, name, new_name)
        env[n] = copy_node
        last = copy_node
    for user in users:
        user.replace_input_with(anchor, env[out])

    new_block.train(block.training)
    err, changes = install_inserted(
        net, [(stem, new_block)], new_graph, optimizer=optimizer,
        like=next(block.parameters(), None), verify=verify, name=name,
    )
    details = {
        "kind": "block",
        "inserted": [new_name],
        "zeroed": [f"{new_name}.{rel}" for rel, _ in targets],
    }
    return width, (err, details, changes)
