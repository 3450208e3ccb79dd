"""VGG with BatchNorm for CIFAR, built from channel-sparse conv-BN-ReLU units.

Very Deep Convolutional Networks for Large-Scale Image Recognition (Simonyan and Zisserman, 2015), in the CIFAR form
used by the VR-PGE paper: the conv stack of configurations A/B/D/E, global average pooling (the 32x32 input is 1x1
after five pools) and a single linear classifier. Every conv unit is its own group ``conv1`` ... ``convN``.
``width`` scales every conv's channels (0.25: VGG-19's 64-512 become 16-128, for studies on small machines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..sparse import ChannelSparseModel, SparseBatchNorm2d, SparseLinear
from ._registry import register_model
from .layers import ConvBNAct, NormLayer, init_weights

# Number = conv output channels, "M" = 2x2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(ChannelSparseModel):
    """A channel-sparse VGG.

    Args:
        config: list of conv widths and ``"M"`` (max-pool).
        num_classes: classifier outputs.
        norm_layer: called as ``norm_layer(num_features, group=name)``.
        act_layer: activation class.
        in_chans: input image channels.
        width: multiplies every conv width (rounded, at least 1).
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int = 10,
        norm_layer: NormLayer | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        in_chans: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
            raise ValueError(f"width must be a positive number, got {width!r}")
        norm_layer = norm_layer or SparseBatchNorm2d
        layers: list[nn.Module] = []
        in_planes, in_group, n = in_chans, None, 0
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            n += 1
            group = f"conv{n}"
            planes = max(1, round(int(v) * width))
            layers.append(ConvBNAct(in_planes, planes, 3, in_group=in_group, out_group=group,
                                    norm_layer=norm_layer, act_layer=act_layer))
            in_planes, in_group = planes, group
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = SparseLinear(in_planes, num_classes, in_group=in_group)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


@register_model
def vgg11_bn(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-11 (configuration A) with BatchNorm, CIFAR form."""
    return VGG(CONFIGS["A"], num_classes=num_classes, **kwargs)


@register_model
def vgg13_bn(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-13 (configuration B) with BatchNorm, CIFAR form."""
    return VGG(CONFIGS["B"], num_classes=num_classes, **kwargs)


@register_model
def vgg16_bn(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-16 (configuration D) with BatchNorm, CIFAR form."""
    return VGG(CONFIGS["D"], num_classes=num_classes, **kwargs)


@register_model
def vgg19_bn(num_classes: int = 10, **kwargs) -> VGG:
    """VGG-19 (configuration E) with BatchNorm, CIFAR form (the VR-PGE paper's VGG-19)."""
    return VGG(CONFIGS["E"], num_classes=num_classes, **kwargs)
