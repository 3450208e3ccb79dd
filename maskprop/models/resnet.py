"""ResNets with channel-sparse units: the CIFAR family (basic blocks, 3 stages) and the ImageNet family.

Deep Residual Learning for Image Recognition (He et al., 2016). Every conv-BN unit writes a channel group. The
residual stream of a stage (its stem or projection output and all its block outputs) is ONE group, because those
channels meet in the residual adds; each block's inner convs have groups of their own. With
``prune_residual=False`` the streams are never pruned and only the blocks' inner widths are learned.

Shortcuts that change the width are 1x1 projections (option B), so a stage's stream is a group the projection
writes, never a zero-padded copy of the previous stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..sparse import ChannelSparseModel, SparseBatchNorm2d, SparseConv2d, SparseLinear
from ._registry import register_model
from .layers import NormLayer, conv1x1, conv3x3, init_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN units and a residual add; the inner unit's channels form the group ``{name}.conv1``."""

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = SparseBatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        *,
        name: str,
        in_group: str | None,
        out_group: str | None,
    ) -> None:
        super().__init__()
        inner = f"{name}.conv1"
        self.conv1 = conv3x3(inplanes, planes, stride, in_group, inner)
        self.bn1 = norm_layer(planes, group=inner)
        self.act1 = act_layer(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, inner, out_group)
        self.bn2 = norm_layer(planes, group=out_group)
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.act2(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 conv-BN units (stride on the 3x3, as torchvision's ResNet v1.5); two inner groups."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: NormLayer = SparseBatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        *,
        name: str,
        in_group: str | None,
        out_group: str | None,
    ) -> None:
        super().__init__()
        inner1, inner2 = f"{name}.conv1", f"{name}.conv2"
        self.conv1 = conv1x1(inplanes, planes, 1, in_group, inner1)
        self.bn1 = norm_layer(planes, group=inner1)
        self.act1 = act_layer(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride, inner1, inner2)
        self.bn2 = norm_layer(planes, group=inner2)
        self.act2 = act_layer(inplace=True)
        self.conv3 = conv1x1(planes, planes * self.expansion, 1, inner2, out_group)
        self.bn3 = norm_layer(planes * self.expansion, group=out_group)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.act3(out)


class ResNet(ChannelSparseModel):
    """A channel-sparse ResNet.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks per stage.
        widths: planes of each stage (a stage's stream has ``planes * block.expansion`` channels).
        num_classes: classifier outputs (never pruned).
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7 conv stride 2 and a 3x3 max-pool).
        zero_init_residual: zero the last BN of each block so that blocks start as identities (Goyal et al., 2017,
            "Accurate, Large Minibatch SGD", section 5.1).
        prune_residual: whether the residual-stream groups are prunable; if ``False`` they are always full.
        norm_layer: called as ``norm_layer(num_features, group=name)``; default :class:`SparseBatchNorm2d`.
        act_layer: activation class, called as ``act_layer(inplace=True)``.
        in_chans: input image channels.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 1000,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
        prune_residual: bool = True,
        norm_layer: NormLayer | None = None,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown ResNet stem {stem!r}; expected 'cifar' or 'imagenet'")
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} must have the same length")
        self._norm_layer = norm_layer or SparseBatchNorm2d
        self._act_layer = act_layer
        self.prune_residual = prune_residual
        self.inplanes = widths[0]

        # The stem's output joins stage 1's stream when stage 1 needs no projection (it is added to block outputs).
        stem_joins_stream = widths[0] == widths[0] * block.expansion
        stem_group = ("layer1" if prune_residual else None) if stem_joins_stream else "stem"
        if stem == "cifar":
            self.conv1 = conv3x3(in_chans, widths[0], 1, None, stem_group)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = SparseConv2d(in_chans, widths[0], 7, stride=2, padding=3, out_group=stem_group)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = self._norm_layer(widths[0], group=stem_group)
        self.act1 = act_layer(inplace=True)

        group = stem_group
        stages = []
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stages.append(self._make_layer(block, planes, blocks, stride, name=f"layer{i + 1}", in_group=group))
            group = f"layer{i + 1}" if prune_residual else None
        self.stage_names = [f"layer{i + 1}" for i in range(len(stages))]  # modules layer1..layerN, as torchvision
        for name, stage in zip(self.stage_names, stages):
            self.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = SparseLinear(widths[-1] * block.expansion, num_classes, in_group=group)

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int, *, name: str,
        in_group: str | None,
    ) -> nn.Sequential:
        out_group = name if self.prune_residual else None
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride, in_group, out_group),
                self._norm_layer(planes * block.expansion, group=out_group),
            )
        layers = []
        for i in range(blocks):
            layers.append(
                block(
                    self.inplanes, planes, stride if i == 0 else 1, downsample if i == 0 else None,
                    self._norm_layer, self._act_layer, name=f"{name}.{i}",
                    in_group=in_group if i == 0 else out_group, out_group=out_group,
                )
            )
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x)).flatten(1)
        return self.fc(x)


def _cifar_resnet(depth: int, num_classes: int, width: float, **kwargs) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise ValueError(f"width must be a positive number, got {width!r}")
    n = (depth - 2) // 6
    widths = [max(1, round(planes * width)) for planes in (16, 32, 64)]  # rounded, at least 1 (as VGG's)
    return ResNet(BasicBlock, [n, n, n], widths, num_classes=num_classes, stem="cifar", **kwargs)


@register_model
def resnet20(num_classes: int = 10, width: float = 1, **kwargs) -> ResNet:
    """ResNet-20 for CIFAR (16-32-64 channels; ``width`` multiplies them)."""
    return _cifar_resnet(20, num_classes, width, **kwargs)


@register_model
def resnet32(num_classes: int = 10, width: float = 2, **kwargs) -> ResNet:
    """ResNet-32 for CIFAR with the VR-PGE paper's DOUBLED widths 32-64-128 by default (supplement B).

    Pass ``width=1`` for He et al.'s original 16-32-64.
    """
    return _cifar_resnet(32, num_classes, width, **kwargs)


@register_model
def resnet56(num_classes: int = 10, width: float = 1, **kwargs) -> ResNet:
    """ResNet-56 for CIFAR (16-32-64 channels; ``width`` multiplies them)."""
    return _cifar_resnet(56, num_classes, width, **kwargs)


@register_model
def resnet18(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18 for ImageNet."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes=num_classes, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-34 for ImageNet."""
    return ResNet(BasicBlock, [3, 4, 6, 3], [64, 128, 256, 512], num_classes=num_classes, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 for ImageNet (bottleneck blocks, stride on the 3x3 conv)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes=num_classes, **kwargs)
