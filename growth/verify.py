"""Checking that growth preserved the network's function on a probe batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import FunctionNotPreservedError, GrowthError
from .tracing import ShapeRecorder

if TYPE_CHECKING:
    from .network import GrowableNetwork

DEFAULT_TOLERANCE = 1e-5


def iter_tensors(out: Any) -> Iterator[Tensor]:
    """Every tensor in a model output (tensor, tuple/list, dict, or nests of them)."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from iter_tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from iter_tensors(o)


class eval_mode:
    """Context manager: every submodule in eval mode, modes restored on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


class exact_float32:
    """Context manager: CUDA convolutions and matmuls in true float32 (no TF32) while verifying.

    cuDNN convolutions use TF32 by default on Ampere and newer GPUs, which rounds inputs to
    10-bit mantissas: enough to move outputs by ~1e-3 and fail a 1e-5 comparison. The flags
    are restored on exit; on the CPU they have no effect.
    """

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def output_difference(before: Any, after: Any) -> tuple[float, float]:
    """``(max |after - before|, max |before|)`` over all output tensors, in float64."""
    err, scale = 0.0, 0.0
    for b, a in zip(iter_tensors(before), iter_tensors(after), strict=True):
        if b.shape != a.shape:
            return float("inf"), 1.0
        if b.numel():
            err = max(err, float((a.double() - b.double()).abs().max()))
            scale = max(scale, float(b.double().abs().max()))
    return err, scale


def allowed_error(scale: float, tolerance: float, noise: float, dtype: torch.dtype) -> float:
    """Largest acceptable output change: ``tolerance`` relative to the output scale (float32),
    widened for lower-precision dtypes and for deliberate symmetry-breaking noise."""
    # float32 and wider: ``tolerance``; half precision cannot even represent the split weights
    # exactly, so allow a few of its rounding steps (8 eps: 6% in bfloat16, 0.8% in float16).
    relative = tolerance
    if torch.finfo(dtype).bits < 32:
        relative = max(tolerance, 8.0 * torch.finfo(dtype).eps)
    relative += 10.0 * noise
    return relative * max(scale, 1e-12)


def reference_output(net: GrowableNetwork) -> Any:
    """The output of ``net`` on its probe batch (eval mode), to compare with after a growth."""
    with torch.no_grad(), eval_mode(net), exact_float32():
        return net(*net.probe)


def run_probe(net: GrowableNetwork) -> Any:
    """Forward ``net``'s probe batch in eval mode, recording every node's shape; the output."""
    with torch.no_grad(), eval_mode(net), exact_float32():
        return ShapeRecorder(net, graph=net.graph).run(*net.probe)


def check_preserved(net: GrowableNetwork, before: Any, noise: float, name: str) -> float | None:
    """Re-record ``net``'s shapes on the probe and compare its output with ``before`` (None: not
    verified); returns the largest difference, or raises if growing ``name`` changed it."""
    try:
        after = run_probe(net)
    except Exception as exc:
        raise GrowthError(
            f"the network no longer runs after growing {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if before is None:
        return None
    err, scale = output_difference(before, after)
    dtype = next(net.parameters()).dtype
    if not err <= allowed_error(scale, net.tolerance, noise, dtype):
        raise FunctionNotPreservedError(
            f"growing {name!r} changed the outputs on the probe batch by {err:.3g} "
            f"(output scale {scale:.3g}, tolerance {net.tolerance:g} relative); "
            f"the network was restored"
        )
    return err
