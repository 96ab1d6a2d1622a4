"""The rule registry: how each layer type and each functional op takes part in growth.

Adding support for a new layer type is one rule::

    from net2grow.growth.rules import ModuleRule, register_module_rule
    register_module_rule(MyLayer, MyLayerRule())

Module rules are looked up by exact type first, then along the type's MRO. Function rules are
keyed by the function object (``call_function``) or the method name (``call_method``).
"""

from __future__ import annotations

import importlib
import operator
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._infra import (
    FunctionRule,
    ModuleRule,
    ModuleSpec,
    ModuleUpdate,
    PassThroughRule,
    TensorGrowth,
)
from .activation import ActivationFunction, ActivationRule
from .attention import MHA_SPEC, MultiheadAttentionRule
from .conv import ConvRule, is_depthwise
from .elementwise import FlattenRule, SoftmaxRule, SpatialRule, UnflattenRule
from .functions import (
    Cat,
    Elementwise,
    Flatten,
    NonTensor,
    Permute,
    Reduce,
    Reshape,
    Softmax,
    Spatial,
    Squeeze,
    Unary,
)
from .fused_heads import HeadsIndex, Unbind
from .heads import HeadShape, ScaledDotProductAttention, Split, Unflatten
from .indexing import Expand
from .linear import EmbeddingRule, LinearRule
from .norm import ChannelwiseRule, GroupNormRule, LayerNormRule, PReLURule
from .optional import ChannelsFirstLayerNormRule, Conv1DRule
from .residual_norm import norm_modules
from .swin import (
    PATCH_MERGING_SPEC,
    SWIN_ATTENTION_SPEC,
    PatchMergingRule,
    ShiftedWindowAttentionRule,
)

__all__ = [
    "ActivationFunction",
    "ActivationRule",
    "ChannelwiseRule",
    "FunctionRule",
    "ModuleRule",
    "ModuleSpec",
    "ModuleUpdate",
    "PassThroughRule",
    "TensorGrowth",
    "function_rule_for",
    "is_depthwise",
    "known_function",
    "module_rule_for",
    "module_spec_for",
    "register_function_rule",
    "register_method_rule",
    "register_module_rule",
]

_MODULE_RULES: dict[type, ModuleRule] = {}
_MODULE_SPECS: dict[type, ModuleSpec] = {}
_FUNCTION_RULES: dict[Callable, FunctionRule] = {}
_METHOD_RULES: dict[str, FunctionRule] = {}


def register_module_rule(
    module_type: type, rule: ModuleRule, *, spec: ModuleSpec | None = None
) -> None:
    """Make ``module_type`` (and subclasses without a rule of their own) growable by ``rule``.

    With ``spec``, checkpoints can also store and rebuild layers of exactly this type
    (:class:`ModuleSpec`: the constructor arguments read from the layer).
    """
    _MODULE_RULES[module_type] = rule
    if spec is not None:
        _MODULE_SPECS[module_type] = spec
    else:
        _MODULE_SPECS.pop(module_type, None)


def register_function_rule(fn: Callable, rule: FunctionRule) -> None:
    _FUNCTION_RULES[fn] = rule


def register_method_rule(name: str, rule: FunctionRule) -> None:
    _METHOD_RULES[name] = rule


def module_rule_for(module: nn.Module) -> ModuleRule | None:
    _register_optional()
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _MODULE_RULES[cls]
        if cls is nn.Module:
            break
    return None


def module_spec_for(module_type: type) -> ModuleSpec | None:
    """How checkpoints rebuild layers of exactly ``module_type`` (None: they cannot)."""
    _register_optional()
    return _MODULE_SPECS.get(module_type)


def checkpointable_types() -> dict[str, type]:
    """Every layer type a checkpoint can rebuild, by class name."""
    _register_optional()
    return {t.__name__: t for t in _MODULE_SPECS}


def function_rule_for(node: fx.Node) -> FunctionRule | None:
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target))
    return _FUNCTION_RULES.get(node.target)


def known_function(fn: Callable) -> bool:
    """True for functions with a rule (checkpoints rebuild only these)."""
    return fn in _FUNCTION_RULES


#: Constructor arguments shared by several layer families (read from attributes of the same name).
_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats", "bias")
_INPLACE = ("inplace",)
_DROPOUT = ("p", "inplace")
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_EMBEDDING = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
_EMBEDDING += ("scale_grad_by_freq", "sparse")
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)
_PADS += (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)
_PADS += (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
_BIAS_DEFAULT = {"bias": True}  # a keyword older torch versions lack: stored only when False

#: The built-in layer types: (types, rule, constructor arguments a checkpoint stores, arguments
#: stored only when they differ from the given default).
_BUILTIN_LAYERS: list[tuple[tuple[type[nn.Module], ...], ModuleRule, tuple[str, ...], dict]] = [
    ((nn.Linear,), LinearRule(), ("in_features", "out_features", "bias"), {}),
    (
        (nn.Embedding,),
        EmbeddingRule(),
        _EMBEDDING,
        {},
    ),
    (
        (nn.Conv1d, nn.Conv2d, nn.Conv3d),
        ConvRule(),
        (*_CONV, "groups", "bias", "padding_mode"),
        {},
    ),
    (
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
        ChannelwiseRule(),
        _NORM,
        _BIAS_DEFAULT,
    ),
    (
        (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
        ChannelwiseRule(),
        _NORM,
        _BIAS_DEFAULT,
    ),
    ((nn.PReLU,), PReLURule(), ("num_parameters",), {}),
    (
        (nn.LayerNorm,),
        LayerNormRule(),
        ("normalized_shape", "eps", "elementwise_affine", "bias"),
        {},
    ),
    (
        norm_modules()[1:],  # nn.RMSNorm (torch >= 2.4)
        LayerNormRule(),
        ("normalized_shape", "eps", "elementwise_affine"),
        {},
    ),
    (
        (nn.GroupNorm,),
        GroupNormRule(),
        ("num_groups", "num_channels", "eps", "affine", "bias"),
        _BIAS_DEFAULT,
    ),
    # activations, dropout and identity: act on each channel alike
    ((nn.ReLU, nn.ReLU6), ActivationRule(idempotent=True), _INPLACE, {}),
    ((nn.Hardtanh,), ActivationRule(idempotent=True), ("min_val", "max_val", "inplace"), {}),
    ((nn.SiLU, nn.SELU, nn.Hardswish, nn.Hardsigmoid, nn.Mish), ActivationRule(), _INPLACE, {}),
    ((nn.LeakyReLU,), ActivationRule(), ("negative_slope", "inplace"), {}),
    ((nn.GELU,), ActivationRule(), ("approximate",), {}),
    ((nn.ELU, nn.CELU), ActivationRule(), ("alpha", "inplace"), {}),
    ((nn.Softplus,), ActivationRule(), ("beta", "threshold"), {}),
    ((nn.Threshold,), ActivationRule(), ("threshold", "value", "inplace"), {}),
    (
        (nn.Tanh, nn.Sigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid),
        ActivationRule(),
        (),
        {},
    ),
    ((nn.Identity,), PassThroughRule(), (), {}),
    (
        (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
        PassThroughRule(),
        _DROPOUT,
        {},
    ),
    # pooling, resizing and padding: act on spatial positions only
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), SpatialRule(), _MAX_POOL, {}),
    ((nn.AvgPool1d,), SpatialRule(), _AVG_POOL, {}),
    ((nn.AvgPool2d, nn.AvgPool3d), SpatialRule(), (*_AVG_POOL, "divisor_override"), {}),
    (
        (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
        SpatialRule(),
        ("output_size",),
        {},
    ),
    (
        (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
        SpatialRule(),
        ("output_size", "return_indices"),
        {},
    ),
    (
        (nn.LPPool1d, nn.LPPool2d),
        SpatialRule(),
        ("norm_type", "kernel_size", "stride", "ceil_mode"),
        {},
    ),
    (
        (nn.Upsample,),
        SpatialRule(),
        ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"),
        {},
    ),
    (
        (nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
        SpatialRule(),
        ("size", "scale_factor"),
        {},
    ),
    (
        _PADS,
        SpatialRule(),
        ("padding",),
        {},
    ),
    (
        (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
        SpatialRule(),
        ("padding", "value"),
        {},
    ),
    ((nn.Flatten,), FlattenRule(), ("start_dim", "end_dim"), {}),
    ((nn.Unflatten,), UnflattenRule(), ("dim", "unflattened_size"), {}),
    ((nn.Softmax, nn.LogSoftmax), SoftmaxRule(), ("dim",), {}),
]


_RELU, _SIGMOID, _TANH = (ActivationFunction(t) for t in (nn.ReLU, nn.Sigmoid, nn.Tanh))
_UNARY, _ELEMENTWISE, _SPATIAL = Unary(), Elementwise(), Spatial()
_RESHAPE, _REDUCE, _PERMUTE = Reshape(), Reduce(), Permute()
_SQUEEZE, _SOFTMAX, _NON_TENSOR = Squeeze(), Softmax(), NonTensor()

# fmt: off
#: The built-in functions: (functions, rule).
_BUILTIN_FUNCTIONS: list[tuple[tuple[Callable, ...], FunctionRule]] = [
    ((F.relu, F.relu_, torch.relu, torch.relu_), _RELU),
    ((F.relu6,), ActivationFunction(nn.ReLU6)),
    ((F.gelu,), ActivationFunction(nn.GELU, ("approximate",))),
    ((F.silu,), ActivationFunction(nn.SiLU)),
    ((F.elu,), ActivationFunction(nn.ELU, ("alpha",))),
    ((F.selu,), ActivationFunction(nn.SELU)),
    ((F.leaky_relu,), ActivationFunction(nn.LeakyReLU, ("negative_slope",))),
    ((F.hardswish,), ActivationFunction(nn.Hardswish)),
    ((F.mish,), ActivationFunction(nn.Mish)),
    ((F.softplus,), ActivationFunction(nn.Softplus, ("beta", "threshold"))),
    ((torch.sigmoid, F.sigmoid), _SIGMOID),
    ((torch.tanh, F.tanh), _TANH),
    ((F.hardtanh,), ActivationFunction(nn.Hardtanh, ("min_val", "max_val"))),
    (
        (
            F.celu, F.hardsigmoid, F.softsign, F.logsigmoid, F.tanhshrink,
            F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
            torch.abs, torch.exp, torch.neg, operator.neg, torch.square, torch.sqrt,
        ),
        _UNARY,
    ),
    (
        # every tensor operand carries channels (a scalar operand is simply not a node)
        (
            operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
            operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
            torch.maximum, torch.minimum, torch.where, torch.clamp, torch.pow, operator.pow,
        ),
        _ELEMENTWISE,
    ),
    (
        (
            F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
            F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
            F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
        ),
        _SPATIAL,
    ),
    ((torch.cat, torch.concat, torch.concatenate), Cat()),
    ((torch.flatten,), Flatten()),
    ((torch.reshape,), _RESHAPE),
    ((torch.mean, torch.sum, torch.amax), _REDUCE),
    ((torch.permute, torch.transpose, torch.movedim), _PERMUTE),
    ((torch.squeeze, torch.unsqueeze), _SQUEEZE),
    ((F.softmax, F.log_softmax, torch.softmax, torch.log_softmax), _SOFTMAX),
    ((getattr,), HeadShape()),  # a Python value; on attention heads, checked
    ((torch.arange,), _NON_TENSOR),  # positions: a tensor without channels
    ((operator.getitem,), HeadsIndex()),  # rules.indexing.Index, and q/k/v of fused heads
    ((torch.rsqrt,), _UNARY),
    ((F.scaled_dot_product_attention,), ScaledDotProductAttention()),
    ((torch.unflatten,), Unflatten()),
    ((torch.split, torch.chunk), Split()),
    ((torch.unbind,), Unbind()),
]

#: The built-in tensor methods: (names, rule).
_BUILTIN_METHODS: list[tuple[tuple[str, ...], FunctionRule]] = [
    (("relu", "relu_"), _RELU),
    (("sigmoid", "sigmoid_"), _SIGMOID),
    (("tanh", "tanh_"), _TANH),
    (
        (
            "exp", "abs", "neg", "sqrt", "rsqrt", "square", "contiguous", "clone", "detach",
            "float",
            "double", "half", "bfloat16", "to", "type_as",
        ),
        _UNARY,
    ),
    (
        # in-place ones too: ``x.mul_(gate)`` joins ``gate``'s channels like ``x * gate``
        (
            "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
            "clamp", "clamp_", "clamp_min", "clamp_max", "pow",
        ),
        _ELEMENTWISE,
    ),
    (("flatten",), Flatten()),
    (("view", "reshape"), _RESHAPE),
    (("mean", "sum", "amax"), _REDUCE),
    (("permute", "transpose", "movedim"), _PERMUTE),
    (("squeeze", "unsqueeze"), _SQUEEZE),
    (("softmax", "log_softmax"), _SOFTMAX),
    (("size", "dim", "numel"), _NON_TENSOR),
    (("expand",), Expand()),
    (("unflatten",), Unflatten()),
    (("split", "chunk"), Split()),
    (("unbind",), Unbind()),
]
# fmt: on


#: Layer types of optional packages: (package, module, class name, rule, constructor arguments
#: or the layer's ModuleSpec).
#: ``torchvision.ops.StochasticDepth`` drops whole samples' residual branches at random in train
#: mode (the same factor for every channel of a sample) and is the identity in eval mode: it acts
#: on each channel alike, and as a leaf module it keeps following the network's train/eval mode.
#: (Its function, ``torchvision.ops.stochastic_depth(x, p, mode, self.training)``, becomes this
#: module when traced: ``tracing.trace_both_modes``.)
_SWIN, _SWIN_MODULE = ShiftedWindowAttentionRule(), "torchvision.models.swin_transformer"
_MERGING = PatchMergingRule()
_OPTIONAL_LAYERS: list[tuple[str, str, str, ModuleRule, tuple[str, ...] | ModuleSpec]] = [
    ("torchvision", "torchvision.ops", "StochasticDepth", PassThroughRule(), ("p", "mode")),
    # ConvNeXt's LayerNorm2d: an nn.LayerNorm subclass normalising dim 1 (rules/optional.py)
    (
        "torchvision",
        "torchvision.models.convnext",
        "LayerNorm2d",
        ChannelsFirstLayerNormRule(),
        ("normalized_shape", "eps", "elementwise_affine", "bias"),
    ),
    # Swin's window attention: a leaf layer growing by whole heads (rules/swin.py)
    ("torchvision", _SWIN_MODULE, "ShiftedWindowAttention", _SWIN, SWIN_ATTENTION_SPEC),
    ("torchvision", _SWIN_MODULE, "ShiftedWindowAttentionV2", _SWIN, SWIN_ATTENTION_SPEC),
    ("torchvision", _SWIN_MODULE, "PatchMerging", _MERGING, PATCH_MERGING_SPEC),
    ("torchvision", _SWIN_MODULE, "PatchMergingV2", _MERGING, PATCH_MERGING_SPEC),
    # Hugging Face's Conv1D (GPT-2): a Linear layer with its weight transposed
    ("transformers", "transformers.pytorch_utils", "Conv1D", Conv1DRule(), ("nf", "nx")),
]
_OPTIONAL_PENDING = {pkg for pkg, *_ in _OPTIONAL_LAYERS}


def _register_optional() -> None:
    """Register the rules of :data:`_OPTIONAL_LAYERS` for every package that has been imported
    (a model using its layers has imported it; nothing is imported here). A rule registered by
    the user for the same type is kept. To load a checkpoint holding such layers in a fresh
    process, import the package first."""
    if not _OPTIONAL_PENDING:
        return
    for pkg in [p for p in _OPTIONAL_PENDING if p in sys.modules]:
        _OPTIONAL_PENDING.discard(pkg)
        for owner, module_name, attr, rule, args in _OPTIONAL_LAYERS:
            if owner != pkg:
                continue
            try:
                cls = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                continue
            if cls not in _MODULE_RULES:
                spec = args if isinstance(args, ModuleSpec) else ModuleSpec(args)
                register_module_rule(cls, rule, spec=spec)


def _register_builtins() -> None:
    for types, rule, args, omit in _BUILTIN_LAYERS:
        for t in types:
            register_module_rule(t, rule, spec=ModuleSpec(args, omit_if_default=dict(omit)))
    register_module_rule(nn.MultiheadAttention, MultiheadAttentionRule(), spec=MHA_SPEC)

    for functions, rule in _BUILTIN_FUNCTIONS:
        for fn in functions:
            register_function_rule(fn, rule)
    for names, rule in _BUILTIN_METHODS:
        for name in names:
            register_method_rule(name, rule)


_register_builtins()
