"""Building blocks shared by the model files."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..sparse import SparseBatchNorm2d, SparseConv2d

NormLayer = Callable[..., nn.Module]  # called as norm_layer(num_features, group=name)


def conv3x3(
    in_planes: int, out_planes: int, stride: int = 1, in_group: str | None = None, out_group: str | None = None
) -> SparseConv2d:
    """3x3 convolution with padding, no bias (a BatchNorm follows)."""
    return SparseConv2d(in_planes, out_planes, 3, stride=stride, padding=1, in_group=in_group, out_group=out_group)


def conv1x1(
    in_planes: int, out_planes: int, stride: int = 1, in_group: str | None = None, out_group: str | None = None
) -> SparseConv2d:
    """1x1 convolution, no bias (a BatchNorm follows)."""
    return SparseConv2d(in_planes, out_planes, 1, stride=stride, in_group=in_group, out_group=out_group)


class ConvBNAct(nn.Sequential):
    """conv -> BatchNorm -> activation: one prunable unit whose output channels form the group ``out_group``."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        in_group: str | None = None,
        out_group: str | None = None,
        norm_layer: NormLayer = SparseBatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            SparseConv2d(
                in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2,
                in_group=in_group, out_group=out_group,
            ),
            norm_layer(out_planes, group=out_group),
            act_layer(inplace=True),
        )


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation for convs, unit BatchNorm, and PyTorch's default for linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
