"""Grouped convolutions (ResNeXt's, RegNet's) pruned feature by feature across their groups: make_prunable's rule,
SparseConv2d's grouped form, and every way maskprop runs them (check_model: dense, compact, static, narrow, FLOPs
against torch's counter, float64)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams

import maskprop
from maskprop.sparse import SparseConv2d, channel_groups, concatenate_groups, concatenations, random_mask, use_mask

SIZE = (3, 16, 16)


class Bottleneck(nn.Module):
    """ResNeXt's block (1x1, grouped 3x3, 1x1, a residual add), with RegNet-Y's squeeze-and-excitation gate on the
    grouped conv's output where ``se``."""

    def __init__(self, channels: int, width: int, groups: int, se: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.reduce = nn.Conv2d(width, 4, 1) if se else None
        self.expand = nn.Conv2d(4, width, 1) if se else None
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        if self.reduce is not None:
            y = y * torch.sigmoid(self.expand(F.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return F.relu(x + self.bn3(self.conv3(y)))


class GroupedNet(nn.Module):
    """Grouped convolutions in the forms a network has them: in a ResNeXt block, gated, two in a row (the second
    reading the first's groups), one widening its groups with a bias and no BatchNorm after it, and one reading a
    concatenation of two convolutions' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block1 = Bottleneck(16, 24, groups=4)
        self.block2 = Bottleneck(16, 24, groups=3, se=True)
        self.left, self.right = nn.Conv2d(16, 12, 1), nn.Conv2d(16, 12, 3, padding=1)
        self.pair = nn.Conv2d(24, 24, 3, padding=1, groups=2, bias=False)
        self.chain = nn.Conv2d(24, 32, 3, stride=2, padding=1, groups=2)  # 12 -> 16 features a group, a bias
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        y = torch.cat([self.left(x), F.relu(self.right(x))], 1)
        y = self.chain(F.relu(self.pair(y)))
        return self.fc(F.relu(y).mean((2, 3)))


def test_a_grouped_convolution_prunes_the_features_of_its_groups_and_passes_every_check():
    model = maskprop.make_prunable(GroupedNet(), SIZE)
    groups = channel_groups(model)
    assert groups == {"stem": 16, "block1.conv2:in": 6, "block1.conv2:out": 6, "block2.conv2:in": 8,
                      "block2.conv2:out": 8, "block2.reduce": 4, "left": 12, "pair:out": 12, "chain:out": 16}
    conv2 = model.block1.conv2
    assert type(conv2) is SparseConv2d and conv2.groups == 4 and conv2.weight_in_group == "block1.conv2:in"
    assert (conv2.in_group, conv2.out_group) == ("block1.conv1", "block1.conv2")
    parts = concatenations(model)
    assert parts["block1.conv1"] == (("block1.conv2:in", 6),) * 4
    assert parts["block1.conv2"] == (("block1.conv2:out", 6),) * 4
    assert model.block1.bn2.group == "block1.conv2" and model.block2.expand.out_group == "block2"  # the gate too
    assert parts["block2"] == (("block2.conv2:out", 8),) * 3
    # The two convs concatenated and the features each half of `pair` reads are one group (feature j of each half);
    # `chain` reads the features `pair` writes.
    assert model.left.out_group == model.right.out_group == model.pair.weight_in_group == "left"
    assert parts["pair:input"] == (("left", 12),) * 2 and model.pair.in_group == "pair:input"
    assert (model.chain.in_group, model.chain.weight_in_group) == ("pair", "pair:out")
    assert parts["pair"] == (("pair:out", 12),) * 2 and model.chain.mask_output
    maskprop.check_model(model, SIZE)


def test_a_subnetwork_of_a_grouped_convolution_is_one_convolution_of_as_many_groups():
    """Compact execution runs ``F.conv2d(x, W[out_kept][:, features_kept], groups=g)`` on the kept features of each
    group; against the convolution of each group computed alone on its kept inputs (float64)."""
    torch.manual_seed(0)
    model = maskprop.make_prunable(GroupedNet(), SIZE).double()
    mask = random_mask(channel_groups(model), 0.5, torch.Generator().manual_seed(1))
    conv = model.block1.conv2
    x = torch.randn(2, 24, 8, 8, dtype=torch.double)
    kept_in, kept_out = mask["block1.conv2:in"].nonzero().squeeze(1), mask["block1.conv2:out"].nonzero().squeeze(1)
    by_hand = []
    for g in range(4):  # each group alone: its kept inputs, its kept outputs' rows of its weight
        weight = conv.weight[6 * g:6 * (g + 1)][kept_out][:, kept_in]
        by_hand.append(F.conv2d(x[:, 6 * g + kept_in], weight, padding=1))
    compact_input = torch.cat([x[:, 6 * g + kept_in] for g in range(4)], 1)
    with use_mask(model, mask):
        out = conv(compact_input)
    assert out.shape[1] == 4 * len(kept_out)
    torch.testing.assert_close(out, torch.cat(by_hand, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", [
    pytest.param(lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                                          groups=4, width_per_group=8, num_classes=5),
                 marks=pytest.mark.slow, id="resnext"),  # a minute: its streams are ResNet-50's (256-2048 channels)
    pytest.param(lambda: torchvision.models.RegNet(BlockParams.from_init_params(
        depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), num_classes=5), id="regnet_y"),
])
def test_torchvisions_resnext_and_regnet_prune_their_grouped_convolutions(build):
    torch.manual_seed(0)
    model = maskprop.make_prunable(build(), (3, 32, 32))
    grouped = [m for m in model.modules() if isinstance(m, SparseConv2d) and m.groups > 1 and not m.depthwise]
    assert grouped and all(m.in_group is not None and m.out_group is not None for m in grouped)
    maskprop.check_model(model, (3, 32, 32))


def test_a_grouped_convolution_with_groups_of_other_widths_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^a grouped convolution \(groups=2, 8 -> 8 channels, in_group='a', "
                                         r"out_group=None, weight_in_group=None\) cannot be channel-pruned so"):
        SparseConv2d(8, 8, 3, groups=2, in_group="a")
    with pytest.raises(ValueError, match="^a grouped convolution"):
        SparseConv2d(8, 8, 3, groups=8, in_group="a", out_group="b")  # depthwise: one group
    model = nn.Sequential(SparseConv2d(3, 8, 1, out_group="a"),
                          SparseConv2d(8, 8, 3, groups=2, in_group="a", weight_in_group="a"))
    with pytest.raises(ValueError, match=r"^layer '1' is a convolution of 2 groups, but its in_group 'a' is no "
                                         r"concatenated group; expected a concatenated group of 2 parts \('a', 4\)"):
        channel_groups(model)
    model = nn.Sequential(SparseConv2d(3, 8, 1, out_group="ab"), SparseConv2d(3, 4, 1, out_group="b"),
                          SparseConv2d(8, 8, 3, groups=2, in_group="ab", weight_in_group="a"))
    concatenate_groups(model, "ab", [("a", 4), ("b", 4)])
    with pytest.raises(ValueError, match=r"^layer '2' is a convolution of 2 groups, but its in_group 'ab' is "):
        channel_groups(model)


def test_a_timm_regnet_exports_its_narrow_grouped_convolutions(tmp_path):
    """The exported narrow model runs each grouped conv as ``g`` groups of the kept features (reloaded by name, it
    computes what compact execution did). timm's ``adapt_model_from_string`` would narrow it as a depthwise conv: the
    'timm' format's refusal is tested in test_prunable.py (RegNetX)."""
    spec = maskprop.ModelSpec.resolve("timm:regnety_002", {}, num_classes=5, input_size=(3, 32, 32))
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = random_mask(channel_groups(model), 0.5, torch.Generator().manual_seed(3))
    info = maskprop.save_exported(model, mask, tmp_path / "regnet", spec=spec, formats="safetensors")
    assert info["flops"] == maskprop.CostModel(model, (3, 32, 32)).flops(mask)
    narrow = maskprop.load_exported(tmp_path / "regnet")
    conv = narrow.s1.b1.conv2.conv
    kept_in, kept_out = int(mask["s1.b1.conv2.conv:in"].sum()), int(mask["s1.b1.conv2.conv:out"].sum())
    assert type(conv) is nn.Conv2d and conv.weight.shape[:2] == (conv.groups * kept_out, kept_in) and conv.groups > 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def test_the_summary_counts_the_features_of_a_grouped_convolutions_groups(caplog):
    """Each group of a grouped conv's features counts its width (in_channels / g, out_channels / g), not the
    conv's."""
    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        maskprop.make_prunable(GroupedNet(), SIZE)
    assert "has 9 channel groups (88 channels, " in caplog.text  # 16 + 6 + 6 + 8 + 8 + 4 + 12 + 12 + 16


class _Shared(nn.Module):
    """One grouped conv called on two feature maps, each call's output normalised by a BatchNorm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.bp = nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.q, self.bq = nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1, groups=4, bias=False)
        self.b1, self.b2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.b1(self.conv(F.relu(self.bp(self.p(x))))))
        b = F.relu(self.b2(self.conv(F.relu(self.bq(self.q(x))))))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


def test_a_grouped_convolution_called_twice_reads_and_writes_one_group_in_both_calls():
    model = maskprop.make_prunable(_Shared(), SIZE)
    assert channel_groups(model) == {"conv:in": 4, "conv:out": 2}
    assert model.p.out_group == model.q.out_group == model.conv.in_group
    assert model.b1.group == model.b2.group == model.conv.out_group == "conv"
    maskprop.check_model(model, SIZE)


class _Reads(nn.Module):
    """A grouped conv reading a map after ``how``: a sigmoid (not zero where channels are dropped), a channel shuffle
    (a tensor maskprop does not follow) or a concatenation of the image with itself."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem, self.bn = nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.conv = nn.Conv2d(6 if how == "image" else 16, 8, 3, padding=1, groups=2, bias=False)
        self.bn2, self.fc = nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.stem(x))
        if self.how == "sigmoid":
            y = torch.sigmoid(y)
        elif self.how == "shuffle":
            n, c, h, w = y.shape
            y = F.relu(y).view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        else:
            y = torch.cat([x, 2 * x], 1)
        return self.fc(F.relu(self.bn2(self.conv(y))).mean((2, 3)))


@pytest.mark.parametrize("how", ["sigmoid", "shuffle", "image"])
def test_a_grouped_convolution_keeps_its_inputs_whole_where_a_subnetwork_could_not_compute_them(how):
    model = maskprop.make_prunable(_Reads(how), SIZE)
    groups = channel_groups(model)
    assert groups["conv:out"] == 4 and "conv:in" not in groups
    assert model.conv.in_group is None and model.conv.weight_in_group is None
    if how != "image":
        maskprop.check_model(model, SIZE)


def test_a_grouped_convolutions_parts_are_checked_each_and_on_both_sides():
    model = nn.Sequential(SparseConv2d(3, 4, 1, out_group="a"), SparseConv2d(3, 4, 1, out_group="b"),
                          SparseConv2d(8, 8, 3, groups=2, in_group="ba", weight_in_group="a"))
    concatenate_groups(model, "ba", [("b", 4), ("a", 4)])  # the first part another group
    with pytest.raises(ValueError, match=r"^layer '2' is a convolution of 2 groups, but its in_group 'ba' is "):
        channel_groups(model)
    model = nn.Sequential(SparseConv2d(3, 4, 1, out_group="a"), SparseConv2d(3, 4, 1, out_group="b"),
                          SparseConv2d(8, 8, 3, groups=2, out_group="ab"))
    concatenate_groups(model, "ab", [("a", 4), ("b", 4)])
    with pytest.raises(ValueError, match=r"^layer '2' is a convolution of 2 groups, but its out_group 'ab' is "):
        channel_groups(model)
    model = nn.Sequential(SparseConv2d(8, 8, 3, groups=2, out_group="c"))  # no concatenated group
    with pytest.raises(ValueError, match=r"^layer '0' is a convolution of 2 groups, but its out_group 'c' is no "):
        channel_groups(model)
