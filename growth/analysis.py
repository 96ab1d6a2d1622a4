"""The channel analysis pass: a layout for every tensor of the graph, and the coupled spaces.

It walks the traced graph once, in order. Every layer that creates units (``Linear``, ``Conv``)
opens a new space; every other node derives its output layout from its inputs through its rule.
Tensors joined elementwise (residual adds, gating) merge their spaces, so one unit mapping serves
all of them. A space reaching something without a rule, or the network's output, is *blocked*:
widening it is refused with the reason recorded here.

Layers that share a tensor (tied weights, ``self.out.weight = self.emb.weight``) are found after
the walk: layers of one type sharing the same tensor read and write the same units, like one layer
called twice, and their spaces are joined. An ``Embedding`` whose table a ``Linear`` head reads
(language models' weight tying) joins its output units with the head's input units
(``growth.tied`` grows that table exactly). Any other sharing (a layer's weight read directly in
``forward``, different layer types) would have to grow one tensor in two different ways, and
blocks the spaces of the layers involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn

from . import tied
from .errors import REGISTER_HINT, GrowthError, UnsupportedLayerError
from .layout import Block, Layout, Segment, SpaceTable


class JoinLog(SpaceTable):
    """A :class:`SpaceTable` that remembers every join (and the shared module that made it, if
    any) and the space each block was first attached to, so that a refusal can say *why* a
    layer is coupled to what blocks it (weight sharing, rather than the blocking thing itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.joins: list[tuple[int, int, str | None]] = []
        self.block_origin: dict[int, int] = {}  # id(Block) -> space it was attached to
        self.sharing: str | None = None  # the shared module (or tie) whose joins are being made
        self.ties: dict[str, str] = {}  # a tie's label in ``joins`` -> its description

    def union(self, a: int, b: int) -> int:
        self.joins.append((a, b, self.sharing))
        return super().union(a, b)

    def block(
        self, space: int, reason: str, error: type[GrowthError] = GrowthError, priority: int = 1
    ) -> None:
        super().block(space, reason, error, priority)
        self.block_origin[id(self.info(space).blocks[-1])] = space

    def connected(self, a: int, b: int, skip: frozenset[str]) -> bool:
        """Whether spaces ``a`` and ``b`` are joined without the joins of ``skip``'s modules."""
        parent = list(range(len(self._parent)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for x, y, shared in self.joins:
            if shared is None or shared not in skip:
                parent[find(x)] = find(y)
        return find(a) == find(b)


@dataclass
class ChannelAnalysis:
    """Result of the pass: layouts per node, spaces, and where each module is called."""

    layouts: dict[fx.Node, Layout | None]
    spaces: SpaceTable
    module_nodes: dict[str, list[fx.Node]] = field(default_factory=dict)
    #: parameters and buffers read by ``get_attr`` (positional embeddings, class tokens, a traced
    #: RMSNorm's weight): dotted name -> layout of the tensor (its units on its last dim)
    attr_layouts: dict[str, Layout] = field(default_factory=dict)
    #: channel counts written as numbers in the graph (``x.reshape(n, 768, -1)``): the node, the
    #: position of the number in its args (argument, item of a list argument or None) and the
    #: layout whose size it is; widening rewrites them
    literals: list[tuple[fx.Node, tuple[int, int | None], Layout]] = field(default_factory=list)
    #: head counts and head widths written as numbers (``x.view(b, t, 4, 16)``): the node, the
    #: position of the number, the space and "heads" or "head_dim"; head growth rewrites them
    head_literals: list[tuple[fx.Node, tuple[int, int | None], int, str]] = field(
        default_factory=list
    )

    def input_layout(self, node: fx.Node) -> Layout | None:
        first = node.args[0] if node.args else None
        return self.layouts.get(first) if isinstance(first, fx.Node) else None

    def blocked(self, space: int) -> tuple[str, type[GrowthError]] | None:
        """Why the units of ``space`` (a layer's own output space) cannot grow, or None.

        When the layer is coupled to what blocks it only because a module is called more than
        once (its calls must read the same units), the reason names that module.
        """
        block = self.spaces.first_block(space)
        if block is None:
            return None
        shared = self._sharing_cause(space, block)
        if not shared:
            return block.reason, block.error
        ties = self.spaces.ties if isinstance(self.spaces, JoinLog) else {}
        calls = [n for n in shared if n not in ties]
        tied = [ties[n] for n in shared if n in ties]
        causes = [
            f"layer {n!r} is called {len(self.module_nodes.get(n, ()))} times in forward"
            for n in calls
        ]
        their = "its" if len(shared) == 1 else "their"
        if calls and not tied:
            how = f"{their} weights are shared between the calls, so every call must read"
            fix = (
                "use a separate module for each call (e.g. a copy.deepcopy of the shared layer "
                "for the second call)"
            )
        else:
            how = f"{their} weights are shared, so every user of them must read"
            fix = "untie the weights (give each layer its own copy)"
            if calls:
                fix = f"use a separate module for each call and {fix}"
        return (
            f"{' and '.join(causes + tied)}: {how} the same units, and through that weight "
            f"sharing this layer's units are coupled to units that cannot grow "
            f"({block.reason}). To grow them, {fix}, or widen a layer that is not coupled to it",
            GrowthError,
        )

    def _sharing_cause(self, space: int, block: Block) -> list[str]:
        """The shared modules without whose joins ``space`` would not reach ``block``."""
        log = self.spaces
        if not isinstance(log, JoinLog):
            return []
        origin = log.block_origin.get(id(block))
        if origin is None:
            return []
        group = log.find(space)
        shared = list(
            dict.fromkeys(m for a, _, m in log.joins if m is not None and log.find(a) == group)
        )
        if not shared or log.connected(space, origin, frozenset(shared)):
            return []  # coupled without any weight sharing: the block's own reason is the cause
        needed = list(shared)
        for name in shared:  # keep a smallest set of shared modules that explains the coupling
            rest = [n for n in needed if n != name]
            if not log.connected(space, origin, frozenset(rest) ^ frozenset(shared)):
                continue
            needed = rest
        return needed


class AnalysisContext:
    """What a rule sees while the pass infers one node's layout."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.spaces = JoinLog()
        self.layouts: dict[fx.Node, Layout | None] = {}
        self._module_space: dict[str, int] = {}
        self._module_input: dict[str, Layout | None] = {}
        self.attr_layouts: dict[str, Layout] = {}
        self.literals: list[tuple[fx.Node, tuple[int, int | None], Layout]] = []
        self.head_literals: list[tuple[fx.Node, tuple[int, int | None], int, str]] = []
        #: layouts of the items of tuple-valued nodes (attention returns (output, weights))
        self.item_layouts: dict[fx.Node, dict[int, Layout | None]] = {}
        self.node: fx.Node | None = None

    # --- reading the graph -------------------------------------------------------------------
    def layout(self, arg: Any) -> Layout | None:
        return self.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def shape(self, arg: Any) -> tuple[int, ...] | None:
        return arg.meta.get("shape") if isinstance(arg, fx.Node) else None

    def arg(self, node: fx.Node, index: int, name: str, default: Any = None) -> Any:
        """A call argument given positionally or by keyword."""
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # --- making layouts ------------------------------------------------------------------------
    def fixed(self, node: fx.Node, reason: str, dim: int = 1) -> Layout | None:
        """A layout of units that can never grow (network input, output of an opaque op)."""
        shape = self.shape(node)
        if shape is None or len(shape) == 0:
            return None
        dim = min(dim, len(shape) - 1)
        space = self.spaces.new(shape[dim], reason)
        self.spaces.block(space, reason, UnsupportedLayerError)
        return Layout(dim, (Segment(space, shape[dim]),))

    def module_space(self, name: str, width: int) -> int:
        """The space of the units made by module ``name`` (one per module, however often called)."""
        if name not in self._module_space:
            self._module_space[name] = self.spaces.new(width, name)
        return self._module_space[name]

    def item_shape(self, node: fx.Node, index: int) -> tuple[int, ...] | None:
        """The shape of item ``index`` of tuple-valued ``node``, read from its ``getitem``."""
        for user in node.users:
            if user.op == "call_function" and user.args[1:2] == (index,):
                return self.shape(user)
        return None

    def attr_layout(self, node: fx.Node) -> Layout | None:
        """The layout of a floating-point parameter or buffer read by ``get_attr``: its units
        lie on its last dimension of size > 1 (a position embedding ``(1, T, D)`` on ``D``, a
        channels-first layer scale ``(C, 1, 1)`` on ``C``), one space per tensor however often
        it is read. The ops that use it check that dimension (a tensor used along another one
        is refused there)."""
        target = str(node.target)
        value = _fetch(self.root, target)
        if not isinstance(value, Tensor) or value.dim() == 0 or not value.is_floating_point():
            return None
        if target not in self.attr_layouts:
            dims = [d for d in range(value.dim()) if value.shape[d] > 1] or [value.dim() - 1]
            dim, width = dims[-1], int(value.shape[dims[-1]])
            space = self.spaces.new(width, target)
            self.attr_layouts[target] = Layout(dim, (Segment(space, width),))
        return self.attr_layouts[target]

    def passthrough(self, node: fx.Node) -> Layout | None:
        """Output layout equal to the first input's (same rank) or re-aligned to the output rank."""
        src = node.args[0] if node.args else None
        layout = self.layout(src)
        if layout is None:
            return self.fixed(node, f"output of {describe(node)}")
        in_shape, out_shape = self.shape(src), self.shape(node)
        if in_shape is None or out_shape is None:
            return None
        dim = layout.dim + len(out_shape) - len(in_shape)
        if dim < 0 or out_shape[dim] != in_shape[layout.dim]:
            return self.opaque(node, "changes the channel dimension")
        return layout.with_dim(dim)

    def refuse_channels(self, node: fx.Node, why: str) -> Layout | None:
        """An op that has a rule but mixes the units of its channels (softmax over channels):
        the layout passes through, and its spaces are blocked with ``why``."""
        layout = self.layout(node.args[0] if node.args else None)
        if layout is None:
            return self.fixed(node, f"output of {describe(node)}")
        self.spaces.block_layout(
            layout,
            f"{describe(node)} {why}: replicated units would change its result. Grow the "
            f"layers whose outputs do not reach it",
            UnsupportedLayerError,
        )
        return layout

    def opaque(self, node: fx.Node, why: str = "has no growth rule") -> Layout | None:
        """Block every input space of ``node``; its output units are fixed, on the channel dim
        of its first input of the same shape (channels-last stays channels-last), else dim 1."""
        reason = f"{describe(node)} {why}; {REGISTER_HINT}"
        dim, shape = 1, self.shape(node)
        for arg in node.all_input_nodes:
            self.spaces.block_layout(self.layout(arg), reason, UnsupportedLayerError)
        for arg in node.all_input_nodes:
            lay = self.layout(arg)
            same = shape is not None and self.shape(arg) == shape
            if lay is not None and lay.inner is None and same:
                dim = lay.dim
                break
        return self.fixed(node, f"output of {describe(node)}", dim)

    def join(self, layouts: list[Layout], node: fx.Node) -> Layout | None:
        """Merge layouts that must carry the same units (elementwise ops, shared layers)."""
        first = layouts[0]
        for other in layouts[1:]:
            same = other.dim == first.dim and len(other.segments) == len(first.segments)
            same = same and other.inner == first.inner
            same = same and all(  # blocks of fused layers join only block for block
                (a.units, a.expand, a.parts, a.part) == (b.units, b.expand, b.parts, b.part)
                for a, b in zip(first.segments, other.segments)
            )
            if not same:
                reason = f"{describe(node)} joins tensors whose channels are built differently"
                for lay in layouts:
                    self.spaces.block_layout(lay, reason)
                return first
        for other in layouts[1:]:
            for a, b in zip(first.segments, other.segments):
                self.spaces.union(a.space, b.space)
        return first

    def shared_input(self, name: str, layout: Layout | None, node: fx.Node) -> None:
        """A module with weights called more than once reads the same units at every call."""
        if name in self._module_input:
            prev = self._module_input[name]
            if prev is not None and layout is not None:
                self.spaces.sharing = name
                try:
                    self.join([prev, layout], node)
                finally:
                    self.spaces.sharing = None
        else:
            self._module_input[name] = layout


def describe(node: fx.Node) -> str:
    """Human-readable name of a node for error messages."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    if node.op == "call_function":
        name = getattr(
            node.target, "__qualname__", getattr(node.target, "__name__", str(node.target))
        )
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod else ''}{name} (node {node.name!r})"
    if node.op == "call_method":
        return f"method .{node.target}() (node {node.name!r})"
    return f"{node.op} {node.target!r}"


def _block_output(ctx: AnalysisContext, node: fx.Node) -> None:
    from .errors import GrowthError

    for arg in node.all_input_nodes:
        lay = ctx.layout(arg)
        if lay is None:
            continue
        reason = "it is (or feeds) the network's output, whose width is fixed"
        ctx.spaces.block_layout(lay, reason, GrowthError, priority=0)


def analyse(root: nn.Module, graph: fx.Graph) -> ChannelAnalysis:
    """Run the pass over ``graph`` (shapes in ``node.meta``, from ``tracing.ShapeRecorder``)."""
    from .rules import function_rule_for, module_rule_for

    ctx = AnalysisContext(root)
    module_nodes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            layout = ctx.fixed(node, "the network's input, whose width is fixed")
        elif node.op == "get_attr":
            layout = ctx.attr_layout(node)  # None for constants: checked by the ops using them
        elif node.op == "output":
            _block_output(ctx, node)
            continue
        elif node.op == "call_module":
            name = str(node.target)
            module = root.get_submodule(name)
            module_nodes.setdefault(name, []).append(node)
            rule = module_rule_for(module)
            if rule is None:
                layout = ctx.opaque(
                    node, f"is a {type(module).__name__}, a layer type with no growth rule"
                )
            elif _reads_heads(ctx, node) and type(module) is not nn.Identity:
                layout = ctx.opaque(node, HEADS_REASON)  # nn.Identity: timm's default q_norm
            else:
                if any(True for _ in module.parameters(recurse=False)) or any(
                    True for _ in module.buffers(recurse=False)
                ):
                    ctx.shared_input(name, ctx.layout(node.args[0] if node.args else None), node)
                layout = rule.infer(ctx, name, module, node)
        else:  # call_function, call_method
            rule = function_rule_for(node)
            if rule is None:
                layout = ctx.opaque(node)
            elif _reads_heads(ctx, node) and not getattr(rule, "heads_aware", False):
                layout = ctx.opaque(node, HEADS_REASON)
            else:
                layout = rule.infer(ctx, node)
        shape = node.meta.get("shape")
        if node in ctx.item_layouts:  # a tuple: the rule gave its items' layouts (item 0 here)
            shape = ctx.item_shape(node, 0)
        if layout is not None and (shape is None or layout.size != _channel_size(layout, shape)):
            ctx.spaces.block_layout(layout, f"{describe(node)}: channel bookkeeping mismatch")
            layout = ctx.fixed(node, f"output of {describe(node)}")
        ctx.layouts[node] = layout
    _shared_tensors(ctx, root, graph, module_nodes)
    return ChannelAnalysis(
        ctx.layouts, ctx.spaces, module_nodes, ctx.attr_layouts, ctx.literals, ctx.head_literals
    )


HEADS_REASON = (
    "reads a tensor split into attention heads, and has no rule for heads (net2grow follows "
    "heads through view/unflatten, transpose/permute, contiguous and scaled_dot_product_"
    "attention, back to the channels by flatten/view)"
)


def _reads_heads(ctx: AnalysisContext, node: fx.Node) -> bool:
    """Whether an input of ``node`` carries channels split into attention heads."""
    return any(
        (lay := ctx.layout(a)) is not None and lay.inner is not None for a in node.all_input_nodes
    )


def _channel_size(layout: Layout, shape: tuple[int, ...]) -> int:
    """The number of channel positions of a tensor of ``shape`` with ``layout``."""
    if layout.inner is None:
        return shape[layout.dim]
    return shape[layout.dim] * shape[layout.inner]


def _fetch(root: nn.Module, target: str) -> Any:
    from .tracing import fetch_path

    try:
        return fetch_path(root, target)
    except AttributeError:
        return None


def _tie_embedding_head(
    ctx: AnalysisContext,
    root: nn.Module,
    module_nodes: dict[str, list[fx.Node]],
    names: list[str],
    modules: list[nn.Module],
    shown: str,
    sides: Any,
    block: Any,
) -> None:
    """Join an embedding's output units with the input units of the ``Linear`` head sharing its
    table (``growth.tied`` grows them exactly); the head's outputs are the table's rows, which
    do not grow."""
    emb, head = (names[0], names[1]) if isinstance(modules[0], nn.Embedding) else names[::-1]
    out_side, in_side = sides(emb)[1], sides(head)[0]
    if out_side is None or in_side is None:
        block(names, f"{shown} (tied weights) between layers of unknown channels")
        return
    if tied.norm_feeding(root, ctx.layouts, module_nodes[head][0]) is None:
        block(names, tied.no_norm_reason(shown, head))
        return
    label = f"tie:{shown}"
    log = ctx.spaces
    log.ties[label] = f"{shown} (tied weights)"
    log.sharing = label
    if [(g.units, g.expand, g.parts) for g in out_side.segments] != [
        (g.units, g.expand, g.parts) for g in in_side.segments
    ] or out_side.inner != in_side.inner:
        block(names, f"{shown} (tied weights) between channels built differently")
        return
    try:  # the table's dim 1: the embedding's output units are the head's input units
        for a, b in zip(out_side.segments, in_side.segments):
            log.union(a.space, b.space)
    finally:
        log.sharing = None
    ctx.spaces.block_layout(
        sides(head)[1],
        f"the rows of {shown} (tied weights) are the embedding's tokens: the head's outputs "
        f"cannot grow",
        GrowthError,
    )


def _shared_tensors(
    ctx: AnalysisContext, root: nn.Module, graph: fx.Graph, module_nodes: dict[str, list[fx.Node]]
) -> None:
    """Couple or block the layers that share a parameter or buffer (see the module docstring)."""
    from .rules import module_rule_for

    owners: dict[int, list[tuple[str, str]]] = {}
    for name in module_nodes:
        module = root.get_submodule(name)
        tensors = [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
        for tname, t in tensors:
            if t.dim() == 0:
                continue  # a scalar has no channels to grow
            if (name, tname) not in owners.setdefault(id(t), []):
                owners[id(t)].append((name, tname))

    def sides(name: str) -> list[Layout | None]:
        node = module_nodes[name][0]
        first = node.args[0] if node.args else None
        return [ctx.layout(first), ctx.layouts.get(node)]

    def block(names: list[str], reason: str) -> None:
        for n in names:
            for lay in sides(n):
                ctx.spaces.block_layout(lay, reason, GrowthError)

    for users in owners.values():
        names = list(dict.fromkeys(n for n, _ in users))
        if len(names) < 2:
            continue  # one layer's own tensors: its rule grows them
        shown = " is ".join(f"{n}.{t}" for n, t in users)
        modules = [root.get_submodule(n) for n in names]
        same = (
            len(users) == len(names)
            and len({t for _, t in users}) == 1
            and len({type(m) for m in modules}) == 1
            and module_rule_for(modules[0]) is not None
        )
        if not same and tied.embedding_head_tie(dict(zip(names, modules)), users):
            _tie_embedding_head(ctx, root, module_nodes, names, modules, shown, sides, block)
            continue
        if not same:
            block(
                names,
                f"{shown} (one tensor, tied weights): growing these layers would have to grow "
                f"that tensor in a different way for each of them. Untie them (give each layer "
                f"its own copy, e.g. layer.weight = nn.Parameter(layer.weight.detach().clone())) "
                f"or grow layers that are not coupled to them",
            )
            continue
        label = f"tie:{shown}"
        log = ctx.spaces
        log.ties[label] = f"{shown} (tied weights)"
        log.sharing = label
        try:
            for i in (0, 1):  # inputs joined with inputs, outputs with outputs
                layouts = [sides(n)[i] for n in names]
                if all(lay is not None for lay in layouts):
                    ctx.join(layouts, module_nodes[names[0]][0])  # type: ignore[arg-type]
                else:
                    block(names, f"{shown} (tied weights) between layers of unknown channels")
        finally:
            log.sharing = None

    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        value = _fetch(root, str(node.target))
        users = owners.get(id(value)) if value is not None else None
        if not users:
            continue
        names = list(dict.fromkeys(n for n, _ in users))
        owner = ", ".join(f"{n}.{t}" for n, t in users)
        reason = (
            f"{owner} is also read directly in forward (self.{node.target}, node "
            f"{node.name!r}), and that use could not follow its growth. Grow layers that are "
            f"not coupled to it, or give that use its own tensor"
        )
        block(names, reason)
        ctx.spaces.block_layout(ctx.attr_layouts.get(str(node.target)), reason, GrowthError)
