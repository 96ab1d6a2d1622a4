"""Widening inside torchvision's reference architectures preserves their outputs.

Each model is built with ``num_classes=10``, its BatchNorm statistics randomised (fresh ones are
identities in eval mode and would hide statistics that do not follow their channels), traced,
and several inner layers are widened: residual groups with downsample projections (ResNet),
inverted residuals with depthwise convs (MobileNetV2), Fire modules' concatenated expand
branches (SqueezeNet), dense concatenation and transitions (DenseNet), a VGG classifier reading
7x7 upsampled positions through ``torch.flatten``, and ResNeXt-style grouped bottlenecks.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from _models import (
    assert_preserved,
    check_consistent,
    module_param_count,
    outputs,
    randomize_batchnorm,
)
from torchvision.models import DenseNet
from torchvision.models.resnet import Bottleneck, ResNet

from net2grow.growth import GrowableNetwork, GrowthError

pytestmark = pytest.mark.usefixtures("strict_float32")  # conftest.py: no TF32


# name: (factory, layers to widen with their coupled expectations: layer -> layers that must
# follow it to the same width)
MODELS = {
    "resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        {
            "conv1": ["layer1.0.conv2", "layer1.1.conv2"],  # stem joined with layer1's adds
            "layer1.0.conv1": [],
            "layer2.0.conv2": ["layer2.0.downsample.0", "layer2.1.conv2"],
            "layer3.1.conv1": [],
            "layer4.0.downsample.0": ["layer4.0.conv2", "layer4.1.conv2"],  # feeds fc
        },
    ),
    "mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        {
            "features.0.0": [],
            "features.1.conv.0.0": ["features.0.0"],  # depthwise: grows with its producer
            "features.2.conv.0.0": ["features.2.conv.1.0"],
            "features.3.conv.1.0": ["features.3.conv.0.0"],
            "features.5.conv.2": ["features.4.conv.2", "features.6.conv.2"],  # residual chain
            "features.18.0": [],
        },
    ),
    "squeezenet1_0": (
        lambda: torchvision.models.squeezenet1_0(num_classes=10),
        {
            "features.0": [],
            "features.3.squeeze": [],
            "features.3.expand1x1": [],  # one branch of Fire's cat grows on its own
            "features.4.expand3x3": [],
            "features.12.expand1x1": [],
        },
    ),
    "densenet": (
        lambda: DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                         num_classes=10),
        {
            "features.conv0": [],
            "features.denseblock1.denselayer1.conv1": [],
            "features.denseblock1.denselayer1.conv2": [],
            "features.transition1.conv": [],
            "features.denseblock2.denselayer2.conv2": [],
        },
    ),
    "vgg11_bn": (
        lambda: torchvision.models.vgg11_bn(num_classes=10),
        {
            "features.0": [],
            "features.8": [],
            "features.25": [],  # 1x1 map -> AdaptiveAvgPool2d(7) -> flatten -> classifier.0
            "classifier.0": [],
            "classifier.3": [],
        },
    ),
    "resnext_grouped": (
        lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=10),
        {
            "conv1": [],  # layer1.0 has a projection shortcut: the stem is not summed
            "layer1.0.conv1": [],  # feeds the grouped conv2: grows by whole groups
            "layer1.0.conv2": [],  # the grouped conv itself
            "layer2.0.conv3": ["layer2.0.downsample.0"],
            "layer4.0.conv2": [],
        },
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_reference_model(name: str, device: torch.device) -> None:
    factory, plan = MODELS[name]
    torch.manual_seed(0)
    model = randomize_batchnorm(factory(), seed=1).to(device)
    g = torch.Generator().manual_seed(2)
    probe = torch.randn(2, 3, 32, 32, generator=g).to(device)
    x = torch.randn(2, 3, 32, 32, generator=g).to(device)
    net = GrowableNetwork(model, probe)
    y0 = outputs(net, x)
    for layer, followers in plan.items():
        assert layer in net.layers, f"{layer} should be growable in {name}"
        old = net.width(layer)
        new = old + 8  # a multiple of the ResNeXt group count
        params = net.num_parameters()
        y = outputs(net, x)
        rec = net.widen(layer, new, generator=torch.Generator().manual_seed(len(layer)))
        assert_preserved(outputs(net, x), y)
        assert (rec.old_width, rec.new_width, rec.params_before) == (old, new, params)
        assert net.width(layer) == new
        for f in followers:
            assert net.width(f) == new, f"{f} should follow {layer} (residual add)"
        assert rec.params_after == net.num_parameters() == module_param_count(net)
    assert_preserved(outputs(net, x), y0)
    check_consistent(net)
    assert len(net.history) == len(plan)


def test_resnext_grouped_conv_refuses_partial_groups() -> None:
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=8, num_classes=10)
    net = GrowableNetwork(randomize_batchnorm(model), torch.randn(2, 3, 32, 32))
    with pytest.raises(GrowthError, match=r"'layer1.0.conv1' is coupled to a grouped "
                                          r"convolution: width must be a multiple of 4"):
        net.widen("layer1.0.conv1", 34)
    assert net.get_submodule("layer1.0.conv2").in_channels == 32


def test_grown_resnet_trains() -> None:
    """After growth the network is an ordinary trainable module: a few SGD steps lower the loss."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    net = GrowableNetwork(model, x)
    net.widen("layer2.0.conv1", factor=1.5)
    net.widen("layer1.0.conv2", 80)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
