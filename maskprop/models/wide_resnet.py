"""Wide residual networks for CIFAR, with channel-sparse units.

Wide Residual Networks (Zagoruyko and Komodakis, 2016): pre-activation blocks BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3,
depth 6n+4, widths 16k-32k-64k. A stage's residual stream (the outputs of its blocks' second convs and of its 1x1
shortcut) is one group ``layerN``; each block's first conv writes ``layerN.i.conv1``. Pre-activation puts a
BatchNorm on the stream itself (the next block's ``bn1``, the final ``bn``): those are grouped with the stream, so
dropped stream channels stay zero after them. The stem conv writes ``stem``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..sparse import ChannelSparseModel, SparseBatchNorm2d, SparseConv2d, SparseLinear
from ._registry import register_model
from .layers import NormLayer, conv3x3, init_weights


class WideBasic(nn.Module):
    """Pre-activation wide block; the shortcut is a 1x1 conv of the pre-activated input when the shape changes."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int,
        drop_rate: float = 0.0,
        norm_layer: NormLayer = SparseBatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        *,
        name: str,
        in_group: str | None,
        out_group: str | None,
    ) -> None:
        super().__init__()
        inner = f"{name}.conv1"
        self.bn1 = norm_layer(in_planes, group=in_group)
        self.act1 = act_layer(inplace=True)
        self.conv1 = conv3x3(in_planes, planes, stride, in_group, inner)
        self.bn2 = norm_layer(planes, group=inner)
        self.act2 = act_layer(inplace=True)
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        # No BatchNorm follows these two convs inside the block: they mask their own output in masked mode.
        self.conv2 = SparseConv2d(planes, planes, 3, padding=1, in_group=inner, out_group=out_group, mask_output=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = SparseConv2d(
                in_planes, planes, 1, stride=stride, in_group=in_group, out_group=out_group, mask_output=True
            )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.dropout(self.act2(self.bn2(self.conv1(pre))))
        return self.conv2(out) + identity


class WideResNet(ChannelSparseModel):
    """A channel-sparse wide ResNet.

    Args:
        depth: 6n+4.
        widen_factor: k, the width multiplier.
        num_classes: classifier outputs.
        drop_rate: dropout between the two convs of each block.
        prune_residual: whether the residual-stream groups are prunable.
        norm_layer: called as ``norm_layer(num_features, group=name)``.
        act_layer: activation class.
        in_chans: input image channels.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        prune_residual: bool = True,
        norm_layer: NormLayer | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        norm_layer = norm_layer or SparseBatchNorm2d
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_chans, widths[0], 1, None, "stem")
        in_planes, group = widths[0], "stem"
        self.stage_names = []
        for i, planes in enumerate(widths[1:]):
            name = f"layer{i + 1}"
            out_group = name if prune_residual else None
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1, drop_rate,
                                        norm_layer, act_layer, name=f"{name}.{j}", in_group=group, out_group=out_group))
                in_planes, group = planes, out_group
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.bn = norm_layer(in_planes, group=group)
        self.act = act_layer(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = SparseLinear(in_planes, num_classes, in_group=group)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(self.act(self.bn(x))).flatten(1)
        return self.fc(x)


@register_model
def wrn16_8(num_classes: int = 10, drop_rate: float = 0.0, **kwargs) -> WideResNet:
    """WRN-16-8 for CIFAR."""
    return WideResNet(16, 8, num_classes=num_classes, drop_rate=drop_rate, **kwargs)


@register_model
def wrn28_10(num_classes: int = 10, drop_rate: float = 0.0, **kwargs) -> WideResNet:
    """WRN-28-10 for CIFAR (``drop_rate=0.3`` is the paper's dropout setting)."""
    return WideResNet(28, 10, num_classes=num_classes, drop_rate=drop_rate, **kwargs)
