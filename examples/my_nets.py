"""Networks of your own for maskprop: a small ResNet, a small MobileNet, a small VGG with a flattened head, a small
DenseNet and a small GhostNet, registered so that a run can build them by name.

Train one with ``model.module: examples.my_nets`` and ``model.name: small_resnet`` (or another), from the
repository root, e.g. ``maskprop train recipes/quickstart.yaml model.module=examples.my_nets
model.name=small_resnet``, or from Python after ``import examples.my_nets``. README, "Your own network", states the
rules this file follows:

* every conv, BatchNorm and linear layer on channels that may be pruned is one of ``maskprop.sparse``'s and names the
  group it writes (``out_group``, a BatchNorm's ``group``) and the group it reads (``in_group``);
* channels that meet in a residual add are one group (here each stage's stream, ``stage1`` and ``stage2``);
* a depthwise conv (``groups`` = its channels) reads and writes one group (``small_mobilenet``'s blocks);
* a linear layer on a flattened feature map names the features per channel (``in_positions``: ``small_vgg``'s head);
* a layer reading a concatenation of groups (``torch.cat(..., 1)``) reads a concatenated group declared with
  ``maskprop.sparse.concatenate_groups`` (``small_densenet``'s BatchNorm and 1x1 convs); a layer whose output is
  added to such a concatenation writes it (``small_ghostnet``'s stem and shortcut convs);
* between those layers, only operations that act on each channel alone (activations, pooling, the add).

``maskprop.check_model(model, (3, 32, 32))`` runs it every way maskprop does and says where the wiring is wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import maskprop
from maskprop.models.layers import ConvBNAct, init_weights
from maskprop.sparse import ChannelSparseModel, SparseBatchNorm2d, SparseConv2d, SparseLinear, concatenate_groups


class Block(nn.Module):
    """conv-BN-ReLU into the block's own group, then conv-BN back into the stream's group, added to the stream."""

    def __init__(self, channels: int, inner: int, *, name: str, stream: str | None) -> None:
        super().__init__()
        self.unit = ConvBNAct(channels, inner, 3, in_group=stream, out_group=name)
        self.conv = SparseConv2d(inner, channels, 3, padding=1, bias=False, in_group=name, out_group=stream)
        self.bn = SparseBatchNorm2d(channels, group=stream)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(self.unit(x))))


class SmallResNet(ChannelSparseModel):
    """Two stages of ``blocks`` residual blocks; a strided 1x1 projection (conv-BN) starts the second stage's stream.

    Args:
        num_classes: Classifier outputs.
        width: Channels of the first stage (the second has twice as many).
        blocks: Residual blocks per stage.
        prune_residual: False keeps both streams whole (their layers name no group) and prunes inside the blocks only.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2, prune_residual: bool = True) -> None:
        super().__init__()
        s1, s2 = ("stage1", "stage2") if prune_residual else (None, None)
        self.stem = ConvBNAct(3, width, 3, out_group=s1)
        self.stage1 = nn.Sequential(*[Block(width, width, name=f"stage1.{i}", stream=s1) for i in range(blocks)])
        self.project = nn.Sequential(
            SparseConv2d(width, 2 * width, 1, stride=2, bias=False, in_group=s1, out_group=s2),
            SparseBatchNorm2d(2 * width, group=s2),
        )
        self.stage2 = nn.Sequential(*[Block(2 * width, 2 * width, name=f"stage2.{i}", stream=s2)
                                      for i in range(blocks)])
        self.fc = SparseLinear(2 * width, num_classes, in_group=s2)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage1(self.stem(x))
        x = self.stage2(self.project(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1x1 expansion into the block's group, a depthwise 3x3 conv on that same group (each
    channel alone: ``groups`` = channels, ``in_group`` = ``out_group``), a 1x1 projection back into the stream's group,
    and the residual add."""

    def __init__(self, channels: int, expanded: int, *, name: str, stream: str | None) -> None:
        super().__init__()
        self.expand = ConvBNAct(channels, expanded, 1, in_group=stream, out_group=name, act_layer=nn.ReLU6)
        self.depthwise = nn.Sequential(
            SparseConv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False, in_group=name, out_group=name),
            SparseBatchNorm2d(expanded, group=name),
            nn.ReLU6(inplace=True),
        )
        self.project = nn.Sequential(
            SparseConv2d(expanded, channels, 1, bias=False, in_group=name, out_group=stream),
            SparseBatchNorm2d(channels, group=stream),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class SmallMobileNet(ChannelSparseModel):
    """A stem, ``blocks`` inverted residual blocks (expansion ``expansion``) on one stream, pooling, a classifier.

    Args:
        num_classes: Classifier outputs.
        width: Channels of the stream.
        blocks: Inverted residual blocks.
        expansion: Channels inside a block per stream channel.
        prune_residual: False keeps the stream whole.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2, expansion: int = 4,
                 prune_residual: bool = True) -> None:
        super().__init__()
        stream = "stream" if prune_residual else None
        self.stem = ConvBNAct(3, width, 3, stride=2, out_group=stream, act_layer=nn.ReLU6)
        self.blocks = nn.Sequential(*[InvertedResidual(width, expansion * width, name=f"block{i}", stream=stream)
                                      for i in range(blocks)])
        self.fc = SparseLinear(width, num_classes, in_group=stream)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class SmallVGG(ChannelSparseModel):
    """Conv units and max-pools down to a 4x4 map, flattened into a hidden linear layer and a classifier, as the
    original VGG heads are: the hidden layer reads ``in_positions = 4 x 4`` features per channel of the last conv's
    group, and its own outputs are a group too (pruned, masked after it: ``mask_output``, no BatchNorm follows).

    Args:
        num_classes: Classifier outputs.
        width: Channels of the first conv unit (the others have 2x and 4x as many).
        hidden: Outputs of the hidden linear layer.
        image_size: Side of the input images (a multiple of 8: three pools to a map of ``image_size / 8``).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 64, image_size: int = 32) -> None:
        super().__init__()
        side = image_size // 8
        self.features = nn.Sequential(
            ConvBNAct(3, width, 3, out_group="conv1"), nn.MaxPool2d(2),
            ConvBNAct(width, 2 * width, 3, in_group="conv1", out_group="conv2"), nn.MaxPool2d(2),
            ConvBNAct(2 * width, 4 * width, 3, in_group="conv2", out_group="conv3"), nn.MaxPool2d(2),
        )
        self.hidden = SparseLinear(4 * width * side * side, hidden, in_group="conv3", out_group="hidden",
                                   mask_output=True, in_positions=side * side)
        self.fc = SparseLinear(hidden, num_classes, in_group="hidden")
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.hidden(self.features(x).flatten(1))))


class DenseLayer(nn.Module):
    """DenseNet's layer: BatchNorm-ReLU-1x1 conv on the concatenation of everything before it (a concatenated group),
    BatchNorm-ReLU-3x3 conv into its own growth channels (a group). Every reader of those is a BatchNorm of a
    concatenation, which masks them in the reference, so ``mask_output`` is optional here; it keeps the conv's output
    exact for any other reader (what ``make_prunable`` does)."""

    def __init__(self, reads: str, channels: int, inner: int, growth: int, *, name: str) -> None:
        super().__init__()
        self.norm = SparseBatchNorm2d(channels, group=reads)
        self.conv1 = SparseConv2d(channels, inner, 1, bias=False, in_group=reads, out_group=f"{name}.inner")
        self.unit = nn.Sequential(SparseBatchNorm2d(inner, group=f"{name}.inner"), nn.ReLU())
        self.conv2 = SparseConv2d(inner, growth, 3, padding=1, bias=False, in_group=f"{name}.inner", out_group=name,
                                  mask_output=True)

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.conv2(self.unit(self.conv1(F.relu(self.norm(torch.cat(features, 1))))))


class SmallDenseNet(ChannelSparseModel):
    """A stem and ``layers`` dense layers, each reading the stem's and every earlier layer's channels side by side;
    a BatchNorm and the classifier read all of them. Every part is a group of its own, so each layer's growth channels
    are pruned for every later reader at once.

    Args:
        num_classes: Classifier outputs.
        width: Channels of the stem.
        growth: Channels each dense layer adds.
        layers: Dense layers.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, growth: int = 12, layers: int = 4) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, width, 3, stride=2, out_group="stem")
        parts = [("stem", width)]
        self.layers = nn.ModuleList()
        for i in range(layers):
            reads = concatenate_groups(self, f"layer{i}.input", parts)  # the stem's, then each earlier layer's
            self.layers.append(DenseLayer(reads, sum(n for _, n in parts), 4 * growth, growth, name=f"layer{i}"))
            parts = [*parts, (f"layer{i}", growth)]
        channels = sum(n for _, n in parts)
        reads = concatenate_groups(self, "head.input", parts)
        self.norm = SparseBatchNorm2d(channels, group=reads)
        self.fc = SparseLinear(channels, num_classes, in_group=reads)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        x = F.relu(self.norm(torch.cat(features, 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class GhostModule(nn.Module):
    """GhostNet's module: a 1x1 conv-BN into ``group``'s channels, and beside them their "ghosts", a depthwise 3x3
    conv-BN of those same channels: ``torch.cat([primary, ghosts], 1)``, group ``group`` twice side by side (the
    depthwise conv reads and writes ``group``: ghost ``j`` is made from channel ``j`` alone, so the two halves keep the
    same channels). The caller declares that concatenation (``concatenate_groups(model, name, [(group, channels)] *
    2)``) and names it where a layer reads or writes it."""

    def __init__(self, in_channels: int, channels: int, *, reads: str | None, group: str, act: bool = True) -> None:
        super().__init__()
        self.primary = ConvBNAct(in_channels, channels, 1, in_group=reads, out_group=group,
                                 act_layer=nn.ReLU if act else nn.Identity)
        self.cheap = nn.Sequential(
            SparseConv2d(channels, channels, 3, padding=1, groups=channels, bias=False, in_group=group,
                         out_group=group),
            SparseBatchNorm2d(channels, group=group),
            nn.ReLU() if act else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], 1)


class GhostBlock(nn.Module):
    """GhostNet's bottleneck: a ghost module into the block's channels (with ReLU), one back into the stream's
    (without), added to the stream. With ``stride=2``, a depthwise conv-BN between them on the inner concatenation,
    and a shortcut (depthwise conv-BN, 1x1 conv-BN) that *writes* the next stream's concatenated group ``out``: a
    residual stream that is a concatenation is written whole by the layers that write it, and its channels are its
    parts'."""

    def __init__(self, in_channels: int, inner: int, out_channels: int, *, name: str, reads: str, out: str,
                 part: str, stride: int = 1) -> None:
        super().__init__()
        self.ghost1 = GhostModule(in_channels, inner // 2, reads=reads, group=f"{name}.inner")
        inner_group = f"{name}.ghost1"
        self.down = None if stride == 1 else nn.Sequential(
            SparseConv2d(inner, inner, 3, stride=2, padding=1, groups=inner, bias=False, in_group=inner_group,
                         out_group=inner_group),
            SparseBatchNorm2d(inner, group=inner_group),
        )
        self.ghost2 = GhostModule(inner, out_channels // 2, reads=inner_group, group=part, act=False)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            SparseConv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False,
                         in_group=reads, out_group=reads),
            SparseBatchNorm2d(in_channels, group=reads),
            SparseConv2d(in_channels, out_channels, 1, bias=False, in_group=reads, out_group=out),
            SparseBatchNorm2d(out_channels, group=out),
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.ghost1(x)
        if self.down is not None:
            y = self.down(y)
        return self.ghost2(y) + self.shortcut(x)


class SmallGhostNet(ChannelSparseModel):
    """A stem, two stages of ghost bottlenecks (the second strided) and a classifier. Each stage's residual stream is a
    concatenated group, ``stage{i}`` = its part group ``stage{i}.part`` twice (the output of every block's second ghost
    module), written as a whole by the stem (stage 0) and by the strided block's shortcut conv (stage 1): their rows
    follow the concatenation's kept channels.

    Args:
        num_classes: Classifier outputs.
        width: Channels of the first stage's stream (the second has twice as many; even).
        blocks: Ghost bottlenecks per stage.
        expansion: Channels inside a block per stream channel.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, blocks: int = 2, expansion: int = 2) -> None:
        super().__init__()
        streams = []
        for i, channels in enumerate((width, 2 * width)):
            streams.append((concatenate_groups(self, f"stage{i}", [(f"stage{i}.part", channels // 2)] * 2), channels))
        self.stem = ConvBNAct(3, width, 3, stride=2, out_group=streams[0][0])
        layers = []
        for i, (stream, channels) in enumerate(streams):
            for j in range(blocks):
                name = f"stage{i}.{j}"
                inner = expansion * channels
                concatenate_groups(self, f"{name}.ghost1", [(f"{name}.inner", inner // 2)] * 2)
                first = i > 0 and j == 0  # the strided block starts the stream of its stage
                reads, in_channels = streams[i - 1] if first else (stream, channels)
                layers.append(GhostBlock(in_channels, inner, channels, name=name, reads=reads, out=stream,
                                         part=f"stage{i}.part", stride=2 if first else 1))
        self.blocks = nn.Sequential(*layers)
        self.fc = SparseLinear(2 * width, num_classes, in_group=streams[1][0])
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


@maskprop.register_model
def small_resnet(num_classes: int = 10, **kwargs) -> SmallResNet:
    """The example network: ``maskprop.create_model("small_resnet", width=32)`` once this module is imported."""
    return SmallResNet(num_classes=num_classes, **kwargs)


@maskprop.register_model
def small_mobilenet(num_classes: int = 10, **kwargs) -> SmallMobileNet:
    """The example with depthwise convolutions: ``maskprop.create_model("small_mobilenet")`` once imported."""
    return SmallMobileNet(num_classes=num_classes, **kwargs)


@maskprop.register_model
def small_vgg(num_classes: int = 10, **kwargs) -> SmallVGG:
    """The example with a flattened feature map: ``maskprop.create_model("small_vgg")`` once imported."""
    return SmallVGG(num_classes=num_classes, **kwargs)


@maskprop.register_model
def small_densenet(num_classes: int = 10, **kwargs) -> SmallDenseNet:
    """The example with concatenated groups: ``maskprop.create_model("small_densenet")`` once imported."""
    return SmallDenseNet(num_classes=num_classes, **kwargs)


@maskprop.register_model
def small_ghostnet(num_classes: int = 10, **kwargs) -> SmallGhostNet:
    """The example with concatenated groups that layers write: ``maskprop.create_model("small_ghostnet")`` once
    imported."""
    return SmallGhostNet(num_classes=num_classes, **kwargs)


if __name__ == "__main__":  # python examples/my_nets.py: each network checked, and how a run trains one
    for net in ("small_resnet", "small_mobilenet", "small_vgg", "small_densenet", "small_ghostnet"):
        print(f"{net}: {maskprop.check_model(maskprop.create_model(net, num_classes=10), (3, 32, 32))}")
    print("train one: maskprop train recipes/quickstart.yaml model.module=examples.my_nets model.name=small_resnet")
