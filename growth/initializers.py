"""Function-preserving inits of new units chosen for how they will train: ``"gradmax"``, ``"vt"``.

Both start from ``init="zero"``'s values (new units: random incoming, zero outgoing weights)
and change the new units' weights before anything is installed; the widening is then verified
on the probe batch like any other (always, even with ``verify=False``).

- ``"gradmax"`` (after GradMax, Evci et al., ICLR 2022): new units get **zero incoming weights**
  and outgoing weights along the top left singular vectors of ``M = sum_n g_n x_n^T``, where
  ``x_n`` is the widened layer's input and ``g_n`` the loss gradient at the consumer layer's
  output, on a batch the caller gives: the directions along which the new units' incoming
  weights receive the largest gradient. With ReLU, a unit with zero incoming weights and zero
  bias would never receive a gradient (PyTorch's ``relu'(0) = 0``), so each new unit gets a
  small positive bias ``b0`` (:data:`GRADMAX_BIAS`): its output is the constant ``act(b0)``
  for every input, and the consumer's bias absorbs ``W_new @ act(b0)``, which keeps the
  function exact (up to rounding) while ``act'(b0) = 1`` lets the gradient through. Needs a
  ``Linear`` layer with a bias, read through elementwise activations by one ``Linear`` with a
  bias, no BatchNorm on the units and no active dropout in the network (dropout would make the
  constant output random in train mode); anything else is refused.
- ``"vt"`` (the function-preserving pairing of Variance Transfer, Yuan et al., NeurIPS 2023):
  new units come in pairs with the same incoming weights ``V`` and opposite outgoing weights
  ``Z`` and ``-Z``, so their contributions cancel exactly while both receive gradients (of
  opposite sign: they learn apart at once). ``Z`` is drawn at the consumer's existing weight
  scale times ``sqrt(old / new)`` (the variance a column has at the new fan-in); an odd last
  unit keeps a zero outgoing weight. Needs a layer read by ``Linear`` or ``Conv`` consumers,
  no BatchNorm on the units (any activation works).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GrowthError
from .generators import DeviceGenerators
from .verify import eval_mode

#: Inits of this module; each is built on the base init ``"zero"``.
CUSTOM_INITS = ("gradmax", "vt")

#: Bias given to gradmax's new units (relative to nothing: an absolute pre-activation).
GRADMAX_BIAS = 1e-3


def base_init(init: str) -> str:
    """The engine init a (possibly custom) ``init`` starts from."""
    return "zero" if init in CUSTOM_INITS else init


@dataclass
class Prepared:
    """What :func:`adjust` needs, gathered before anything changes."""

    init: str
    producer: str  # module whose output rows are the new units
    consumers: list[str]  # modules reading them
    new: Tensor  # long: positions of the new units
    directions: Tensor | None = None  # gradmax: [consumer_out, k] outgoing columns
    constant: float = 0.0  # gradmax: act(b0), the new units' output


def _structure(
    plans: Sequence[tuple[str, nn.Module, Any]], init: str, name: str
) -> tuple[str, list[str], Tensor]:
    """(producer, consumers, new positions) of a simple widening, else a refusal."""
    producers, consumers = [], []
    for mname, module, update in plans:
        roles = {s.role for g in update.tensors.values() for s in g.steps}
        if "channel" in roles:
            raise GrowthError(
                f"init={init!r} cannot widen {name!r}: {mname!r} ({type(module).__name__}) "
                f"keeps per-unit state (BatchNorm or a per-channel layer) that a constant or "
                f"paired unit would change; use init='net2net' or init='zero'"
            )
        if "out" in roles:
            producers.append(mname)
        if "in" in roles:
            consumers.append((mname, module, update))
    if len(producers) != 1:
        raise GrowthError(
            f"init={init!r} cannot widen {name!r}: its units are produced by {len(producers)} "
            f"layers ({producers}), a coupled group; use init='net2net' or init='zero'"
        )
    if not consumers:
        raise GrowthError(f"init={init!r} cannot widen {name!r}: no layer reads its units")
    out_step = next(
        s
        for mname, _, u in plans
        if mname == producers[0]
        for g in u.tensors.values()
        for s in g.steps
        if s.role == "out"
    )
    original = out_step.amap.original
    for mname, module, update in consumers:
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise GrowthError(
                f"init={init!r} cannot widen {name!r}: it is read by {mname!r} "
                f"({type(module).__name__}); supported readers are Linear and Conv layers; "
                f"use init='net2net' or init='zero'"
            )
        steps = update.tensors["weight"].steps
        if len(steps) != 1 or steps[0].groups != 1 or steps[0].amap.new_size != original.numel():
            raise GrowthError(
                f"init={init!r} cannot widen {name!r}: {mname!r} reads its units through a "
                f"reshape, concatenation or grouped convolution; use init='net2net' or "
                f"init='zero'"
            )
    new = torch.nonzero(~original).flatten()
    return producers[0], [c[0] for c in consumers], new


def prepare(
    net: nn.Module,
    name: str,
    init: str,
    plans: Sequence[tuple[str, nn.Module, Any]],
    *,
    batch: Any = None,
    loss_fn: Callable[..., Tensor] | None = None,
) -> Prepared:
    """Check that ``init`` can widen ``name`` exactly and gather its statistics (nothing
    changes). Raises :class:`GrowthError` naming the problem and the fix."""
    producer, consumers, new = _structure(plans, init, name)
    prepared = Prepared(init, producer, consumers, new)
    if init == "gradmax":
        _prepare_gradmax(net, name, prepared, batch, loss_fn)
    elif batch is not None or loss_fn is not None:
        raise GrowthError(f"batch= and loss_fn= are for init='gradmax', not init={init!r}")
    return prepared


def _prepare_gradmax(
    net: nn.Module, name: str, prep: Prepared, batch: Any, loss_fn: Callable | None
) -> None:
    fix = "widen(name, width, init='gradmax', batch=(inputs, targets), loss_fn=...)"
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise GrowthError(f"init='gradmax' needs a batch of training data: {fix}")
    inputs, targets = batch
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise GrowthError(f"init='gradmax': batch[0] must be a tensor or tuple of tensors; {fix}")
    if loss_fn is None:
        loss_fn = F.cross_entropy
    if not callable(loss_fn):
        raise GrowthError(f"loss_fn must be callable (loss_fn(outputs, targets)), got {loss_fn!r}")
    producer = net.get_submodule(prep.producer)
    if not isinstance(producer, nn.Linear) or producer.bias is None:
        raise GrowthError(
            f"init='gradmax' widens Linear layers with a bias (the new units' bias keeps them "
            f"learning); {prep.producer!r} is a {type(producer).__name__} "
            f"{'with' if getattr(producer, 'bias', None) is not None else 'without'} bias; "
            f"use init='vt' or init='zero'"
        )
    if len(prep.consumers) != 1:
        raise GrowthError(
            f"init='gradmax' needs one layer reading {name!r}, found {prep.consumers}; use "
            f"init='vt' or init='zero'"
        )
    consumer = net.get_submodule(prep.consumers[0])
    if not isinstance(consumer, nn.Linear) or consumer.bias is None:
        raise GrowthError(
            f"init='gradmax' needs a Linear reader with a bias (it absorbs the new units' "
            f"constant output); {prep.consumers[0]!r} is {type(consumer).__name__}; use "
            f"init='vt' or init='zero'"
        )
    dropouts = [
        n for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p
    ]
    if dropouts:
        raise GrowthError(
            f"init='gradmax' is not exact in train mode with dropout ({dropouts[:3]}): the new "
            f"units' constant output would be dropped at random; use init='vt' or 'zero'"
        )
    prep.constant = _constant_output(net, inputs, producer, consumer, prep, name)
    stats = _gradient_statistics(net, inputs, targets, loss_fn, producer, consumer)
    prep.directions = stats


def _constant_output(
    net: nn.Module,
    inputs: tuple[Tensor, ...],
    producer: nn.Module,
    consumer: nn.Module,
    prep: Prepared,
    name: str,
) -> float:
    """``act(b0)``: what the consumer reads from a unit whose pre-activation is ``b0``."""
    seen: list[Tensor] = []
    h1 = producer.register_forward_hook(lambda m, a, out: torch.full_like(out, GRADMAX_BIAS))
    h2 = consumer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad(), eval_mode(net):
            net(*[t[:2] for t in inputs])
    finally:
        h1.remove()
        h2.remove()
    if not seen or not torch.all(seen[0] == seen[0].flatten()[0]):
        raise GrowthError(
            f"init='gradmax' cannot widen {name!r}: {prep.consumers[0]!r} does not read its "
            f"units through elementwise activations only; use init='vt' or init='zero'"
        )
    value = float(seen[0].flatten()[0])
    if value == 0.0:
        raise GrowthError(
            f"init='gradmax' cannot widen {name!r}: its activation maps the bias {GRADMAX_BIAS} "
            f"to 0, so new units would never learn; use init='vt' or init='zero'"
        )
    return value


def _gradient_statistics(
    net: nn.Module,
    inputs: tuple[Tensor, ...],
    targets: Any,
    loss_fn: Callable[..., Tensor],
    producer: nn.Linear,
    consumer: nn.Linear,
) -> Tensor:
    """``M = sum_n g_n x_n^T`` ([consumer_out, producer_in]), nothing accumulated in ``.grad``."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    h1 = producer.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()))
    h2 = consumer.register_forward_hook(lambda m, a, out: ys.append(out))
    try:
        with torch.enable_grad(), eval_mode(net):
            loss = loss_fn(net(*inputs), targets)
            if not (isinstance(loss, Tensor) and loss.dim() == 0):
                raise GrowthError("loss_fn(outputs, targets) must return a scalar tensor")
            (g,) = torch.autograd.grad(loss, ys[0])
    finally:
        h1.remove()
        h2.remove()
    x = xs[0].reshape(-1, producer.in_features).to(torch.float64)
    g = g.reshape(-1, consumer.out_features).to(torch.float64)
    return g.T @ x


def adjust(
    prep: Prepared, planned: list[Any], *, generators: DeviceGenerators
) -> list[tuple[nn.Module, str, Tensor]]:
    """Change the planned values of the new units (in place) as ``prep.init`` says; returns
    the tensors that change without growing, as ``(module, name, new value)``."""
    by_name = {pm.name: pm for pm in planned}
    prod = by_name[prep.producer]
    new = prep.new.to(prod.values["weight"].device)
    if prep.init == "gradmax":
        return _adjust_gradmax(prep, prod, by_name[prep.consumers[0]], new, generators)
    _adjust_vt(prep, prod, [by_name[c] for c in prep.consumers], new, generators)
    return []


def _directions(m: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` unit columns: M's left singular vectors by decreasing singular value, then the
    same negated, then random unit vectors (when ``k`` exceeds twice M's rank)."""
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    rank = int((s > s.max() * 1e-6).sum()) if s.numel() and float(s.max()) > 0 else 0
    top = u[:, :rank]
    cols = [top, -top]
    have = 2 * rank
    if have < k:
        rnd = torch.randn(m.shape[0], k - have, generator=generator, dtype=m.dtype)
        cols.append(rnd / rnd.norm(dim=0, keepdim=True).clamp_min(1e-12))
    return torch.cat(cols, dim=1)[:, :k]


def _adjust_gradmax(
    prep: Prepared, prod: Any, cons: Any, new: Tensor, generators: DeviceGenerators
) -> list[tuple[nn.Module, str, Tensor]]:
    w, b = prod.values["weight"], prod.values["bias"]
    w[new] = 0
    b[new] = GRADMAX_BIAS
    cw = cons.values["weight"]
    cb = cons.module.bias.detach().clone()
    old = torch.ones(cw.shape[1], dtype=torch.bool, device=cw.device)
    old[new.to(cw.device)] = False
    scale = cw[:, old].norm(dim=0).mean() if bool(old.any()) else torch.tensor(1.0)
    assert prep.directions is not None
    cols = _directions(prep.directions, new.numel(), generators.on(torch.device("cpu")))
    cols = (cols * float(scale)).to(cw.device, cw.dtype)
    idx = new.to(cw.device)
    cw[:, idx] = cols
    cb -= (cols * prep.constant).sum(dim=1)
    return [(cons.module, "bias", cb)]


def _adjust_vt(
    prep: Prepared, prod: Any, consumers: list[Any], new: Tensor, generators: DeviceGenerators
) -> None:
    pairs = new.numel() // 2
    first, second = new[:pairs], new[pairs : 2 * pairs]
    for value in prod.values.values():  # incoming weights and bias: the pair shares them
        value[second] = value[first]
    width = next(iter(consumers)).values["weight"].shape[1]
    old_width = width - new.numel()
    for cons in consumers:
        cw = cons.values["weight"]
        old = torch.ones(cw.shape[1], dtype=torch.bool, device=cw.device)
        old[new.to(cw.device)] = False
        scale = cw[:, old].float().std() if int(old.sum()) * cw[:, :1].numel() > 1 else 1.0
        scale = float(scale) * math.sqrt(old_width / width)
        shape = (cw.shape[0], pairs, *cw.shape[2:])
        z = torch.randn(shape, generator=generators.on(cw.device), device=cw.device)
        z = (z * scale).to(cw.dtype)
        cw[:, first.to(cw.device)] = z
        cw[:, second.to(cw.device)] = -z
