"""Analytic FLOPs against torch.utils.flop_counter, and the train-step cost formulas."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import input_size
from torch.utils.flop_counter import FlopCounterMode

import maskprop
from maskprop.cost import (
    CostModel,
    InputSizeError,
    counting_flops,
    dense_step_flops,
    train_cost_saving,
    vrpge_step_flops,
)
from maskprop.sparse import full_mask, random_mask, use_mask


def counted_flops(model, mask, x, y):
    """FLOPs torch counts in a compact forward and in the backward that follows."""
    with FlopCounterMode(display=False) as forward_counter:
        with use_mask(model, mask, "compact"):
            loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as backward_counter:
        loss.backward()
    return forward_counter.get_total_flops(), backward_counter.get_total_flops()


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg11_bn", "wrn16_8", "resnet50", "mlp"])
@pytest.mark.parametrize("keep_ratio", [1.0, 0.5, 0.25])
def test_flop_counter_matches_analytic_count(name, keep_ratio, generator):
    model = maskprop.create_model(name)
    size = input_size(name)
    mask = random_mask(model.channel_groups(), keep_ratio, generator)
    batch = 2
    x, y = torch.randn(batch, *size), torch.tensor([0, 1])
    forward, backward = counted_flops(model, mask, x, y)
    cost = CostModel(model, size)
    assert forward == cost.flops(mask, batch_size=batch) == maskprop.flops(model, (batch, *size), mask)
    assert backward == cost.backward_flops(mask, batch_size=batch)


def test_conv_cost_scales_with_kept_in_times_kept_out():
    model = maskprop.create_model("vgg11_bn")
    groups = model.channel_groups()
    cost = CostModel(model, (3, 32, 32))
    dense = cost.by_layer()
    mask = full_mask(groups)
    mask["conv2"][64:] = False  # conv2 keeps half its outputs: conv2 halves, conv3 (reads conv2) halves
    mask["conv3"][: 3 * 256 // 4] = False  # conv3 keeps a quarter of its outputs: conv3 and conv4 shrink
    sparse = cost.by_layer(mask)
    # VGG-11 features: 0 conv1, 1 pool, 2 conv2, 3 pool, 4 conv3, 5 conv4.
    assert sparse["features.2.0"] * 2 == dense["features.2.0"]  # 64 of 128 outputs
    assert sparse["features.4.0"] * 8 == dense["features.4.0"]  # 64 of 128 inputs x 64 of 256 outputs
    assert sparse["features.5.0"] * 4 == dense["features.5.0"]  # 64 of 256 inputs
    assert sparse["features.0.0"] == dense["features.0.0"]
    # VGG-11 conv1 at 32x32: 2 * 3 * 64 * 9 * 32 * 32 FLOPs per image, by hand.
    assert dense["features.0.0"] == 2 * 3 * 64 * 9 * 32 * 32


def test_expected_ratio_is_about_keep_ratio_squared(generator):
    model = maskprop.create_model("vgg19_bn")
    mask = random_mask(model.channel_groups(), 0.5, generator)
    ratio = maskprop.flops(model, (3, 32, 32), mask) / maskprop.flops(model, (3, 32, 32))
    assert 0.24 < ratio < 0.27  # first conv's input (the image) is never pruned


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "resnet50"])
def test_channel_prices_are_the_flops_of_one_more_channel(name):
    """dF/dn_g at keep 0.5 against a central difference of the counted FLOPs (exact: F is at most quadratic in each
    group's count), and a residual stream's channel against a channel inside a block, by hand for ResNet-20."""
    model = maskprop.create_model(name)
    size = input_size(name)
    cost = CostModel(model, size)
    groups = model.channel_groups()
    half = {g: n // 2 for g, n in groups.items()}
    prices = cost.channel_prices(0.5)
    assert set(prices) == set(groups)
    for group in groups:
        more, fewer = dict(half, **{group: half[group] + 1}), dict(half, **{group: half[group] - 1})
        assert prices[group] == pytest.approx((cost.flops(more) - cost.flops(fewer)) / 2, rel=1e-12)
    if name == "resnet20":  # stage 1 at 32x32, 16 channels: a 3x3 conv is 2 * 9 * 1024 FLOPs per (in, out) pair
        pair, prices = 2 * 9 * 32 * 32, CostModel(model, (3, 32, 32)).channel_prices(0.5)
        assert prices["layer1.0.conv1"] == (8 + 8) * pair  # written by conv1, read by conv2: 8 partners each
        # The stream: written by the stem (3 image channels, never pruned) and by 3 blocks' conv2, read by their
        # conv1 (8 partners each), and by stage 2's first conv1 (3x3, stride 2: 16 partners on a quarter of the
        # positions) and 1x1 shortcut (16 partners, 256 positions).
        assert prices["layer1"] == pytest.approx((3 + 6 * 8 + 16 / 4) * pair + 2 * 16 * 256, rel=1e-12)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        cost.channel_prices(0.0)


def test_params_of_subnetwork(generator):
    model = maskprop.create_model("resnet20")
    cost = CostModel(model, (3, 32, 32))
    assert cost.params() == sum(p.numel() for p in model.parameters())
    mask = random_mask(model.channel_groups(), 0.5, generator)
    # Independent count: slice every parameter by hand.
    expected = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            kept_out = mask[m.out_group].sum() if m.out_group else m.out_channels
            kept_in = mask[m.in_group].sum() if m.in_group else m.in_channels
            expected += int(kept_out * kept_in * 9 if m.kernel_size == (3, 3) else kept_out * kept_in)
        elif isinstance(m, torch.nn.BatchNorm2d):
            expected += 2 * int(mask[m.group].sum())
        elif isinstance(m, torch.nn.Linear):
            expected += int(mask[m.in_group].sum()) * m.out_features + m.out_features
    assert cost.params(mask) == expected


def test_train_step_formulas():
    # Supplement C.1: dense 3 f_D; VR-PGE 4 f_S; saving 3 f_D / (4 f_S).
    assert dense_step_flops(10.0) == 30.0
    assert vrpge_step_flops(2.0, 2.0) == 8.0
    assert vrpge_step_flops(2.0, 1.0, weight_grad="both") == 9.0
    assert train_cost_saving(dense_step_flops(10.0), vrpge_step_flops(2.5, 2.5)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown weight_grad 'all'"):
        vrpge_step_flops(1.0, 1.0, weight_grad="all")


def test_vrpge_step_flops_back_propagates_the_first_mask():
    """weight_grad="first": forward and backward of m (3 f(m)), forward only of m' (f(m')); the two masks' costs
    differ, so the order matters."""
    assert vrpge_step_flops(2.0, 1.0) == 3 * 2.0 + 1.0
    assert vrpge_step_flops(1.0, 2.0) == 3 * 1.0 + 2.0
    assert vrpge_step_flops(1.0, 2.0, weight_grad="both") == 3 * 1.0 + 3 * 2.0


def _counted_plain(model, size):
    """Forward FLOPs torch counts for a batch of 2, and the parameters of ``model``. Only the forward: torch 2.14's
    counter counts a grouped convolution's input gradient as if it were not grouped (10x the forward, depthwise 3x3)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, *size))
    return counter.get_total_flops(), sum(p.numel() for p in model.parameters())


def test_grouped_convolutions_of_a_plain_model_are_counted_as_torch_counts_them():
    """A model of plain torch layers (never pruned) with grouped and depthwise convolutions: forward FLOPs against
    torch's flop counter and a hand count, parameters against the tensors' sizes; the last two convolutions have
    groups that divide neither the kernel area nor the positions (an early integer division would truncate)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(6, 9, 3, padding=1, groups=3), torch.nn.ReLU(),
        torch.nn.Conv2d(9, 9, 3, groups=9, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(9, 8, 3, padding=1, groups=1, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8, bias=False), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 1, groups=2), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5),
    )
    forward, params = _counted_plain(model, (6, 8, 8))
    cost = CostModel(model, (6, 8, 8))
    assert (cost.flops(batch_size=2), cost.params()) == (forward, params)
    # per example: 2 x 9 outputs x 2 inputs each x 9 x 64 positions, 2 x 9 x 1 x 9 x 36, 2 x 8 x 9 x 9 x 36,
    # 2 x 8 x 1 x 9 x 16, 2 x 6 x 4 x 16, 2 x 96 x 5
    assert cost.flops() == (2 * 9 * 2 * 9 * 64 + 2 * 9 * 9 * 36 + 2 * 8 * 9 * 9 * 36 + 2 * 8 * 9 * 16 + 2 * 6 * 4 * 16
                            + 2 * 96 * 5)


@pytest.mark.parametrize("size", [(32, 32), 32, (3, 32.0, 32), (3, 0, 32), "3,32,32"])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match=r"^input_size must be \(C, H, W\) or \(N, C, H, W\), positive integers; got "):
        maskprop.flops(maskprop.create_model("resnet20"), size)


def test_an_input_the_model_does_not_take_is_one_line():
    with pytest.raises(ValueError, match=r"^ResNet does not take an input of size \(1, 32, 32\) \(.*\); expected the "
                                         r"\(C, H, W\) it was built for$"):
        maskprop.flops(maskprop.create_model("resnet20"), (1, 32, 32))


def test_a_transformer_built_for_another_image_size_is_one_line():
    """A vision transformer asserts its input's size (``AssertionError``, not ``RuntimeError``)."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    with pytest.raises(ValueError, match=r"^VisionTransformer does not take an input of size \(3, 64, 64\) \(Input "
                                         r"height \(64\) doesn't match model \(32\)\.\); expected the"):
        maskprop.flops(vit, (3, 64, 64))


def test_a_mask_that_does_not_fit_is_one_line_and_batch_sizes_are_checked():
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    cost = CostModel(model, (3, 32, 32))
    good = maskprop.random_mask(groups, 0.5, torch.Generator().manual_seed(0))
    short = {**good, "layer1": torch.ones(5, dtype=torch.bool)}
    for mask, message in (({"conv1": torch.ones(16, dtype=torch.bool)}, "mask has unknown group(s) 'conv1'"),
                          ({g: m for g, m in good.items() if g != "layer1"}, "mask is missing group(s) 'layer1'"),
                          (short, "mask for group 'layer1' is (5,) torch.bool; expected a bool tensor of shape (16,)")):
        for count in (cost.flops, cost.params, lambda m: maskprop.flops(model, (3, 32, 32), m)):
            with pytest.raises(ValueError, match=re.escape(message)):
                count(mask)
    assert cost.flops({g: int(m.sum()) for g, m in good.items()}) == cost.flops(good)  # widths as ints: as before
    for batch in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {batch}"):
            cost.flops(good, batch_size=batch)


class _Depthwise(torch.nn.Module):
    """A 1x1 conv into group ``g``, a depthwise 3x3 conv on ``g`` (stride 2, with bias), a 1x1 conv out of it."""

    def __init__(self):
        super().__init__()
        from maskprop.sparse import SparseConv2d, SparseLinear

        self.expand = SparseConv2d(3, 12, 1, out_group="g")
        self.depthwise = SparseConv2d(12, 12, 3, stride=2, padding=1, groups=12, bias=True, in_group="g",
                                      out_group="g", mask_output=True)
        self.project = SparseConv2d(12, 6, 1, in_group="g", out_group="h", mask_output=True)
        self.fc = SparseLinear(6, 3, in_group="h")

    def forward(self, x):
        return self.fc(self.project(self.depthwise(self.expand(x).relu())).mean((2, 3)))


def test_a_depthwise_conv_costs_its_kept_channels_once(generator):
    """Forward FLOPs against torch's counter, parameters against the narrow model's, prices against a central
    difference, and the layers by hand (the depthwise conv: 2 x 9 x 8x8 positions per kept channel). The backward is
    counted by hand: torch's counter (2.14) counts a grouped conv's backward as ``groups + 1`` forwards, not 2."""
    model = _Depthwise()
    cost = CostModel(model, (3, 16, 16))
    for keep in (1.0, 0.5, 0.25):
        mask = random_mask({"g": 12, "h": 6}, keep, generator)
        g, h = int(mask["g"].sum()), int(mask["h"].sum())
        x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
        forward, _ = counted_flops(model, mask, x, y)
        layers = {"expand": 2 * 3 * g * 256, "depthwise": 2 * 9 * 64 * g, "project": 2 * g * h * 64, "fc": 2 * h * 3}
        assert cost.by_layer(mask) == layers and forward == cost.flops(mask, batch_size=2) == 2 * sum(layers.values())
        # weight and input gradients each cost a forward; the expansion reads the image and takes no input gradient
        assert cost.backward_flops(mask, batch_size=2) == 2 * (2 * sum(layers.values()) - layers["expand"])
        assert cost.params(mask) == sum(p.numel() for p in maskprop.materialize(model, mask).parameters())
    half = {"g": 6, "h": 3}
    prices = cost.channel_prices(0.5)
    for group in half:
        more, fewer = dict(half, **{group: half[group] + 1}), dict(half, **{group: half[group] - 1})
        assert prices[group] == pytest.approx((cost.flops(more) - cost.flops(fewer)) / 2, rel=1e-12)


class _DepthwiseStem(_Depthwise):
    """``_Depthwise`` after a depthwise 3x3 conv on the image, whose channels are never pruned."""

    def __init__(self):
        super().__init__()
        from maskprop.sparse import SparseConv2d

        self.stem = SparseConv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x):
        return super().forward(self.stem(x))


@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
def test_depthwise_prices_are_linear_at_every_keep_ratio_and_name_groups_only(keep):
    """By hand: g's channel costs the expansion's 2 x 3 x 16x16, the depthwise conv's 2 x 9 x 8x8 (whatever the kept
    ratio: it is linear in g) and the projection's 2 x (keep x 6) x 8x8; h's the projection's 2 x (keep x 12) x 8x8
    and the classifier's 2 x 3. The stem's depthwise conv, never pruned, prices no group."""
    prices = CostModel(_DepthwiseStem(), (3, 16, 16)).channel_prices(keep)
    assert set(prices) == {"g", "h"}
    assert prices["g"] == pytest.approx(2 * 3 * 256 + 2 * 9 * 64 + 2 * keep * 6 * 64, rel=1e-12)
    assert prices["h"] == pytest.approx(2 * keep * 12 * 64 + 2 * 3, rel=1e-12)


def test_a_linear_layer_on_a_flattened_map_costs_its_kept_channels_times_their_positions(generator):
    """FLOPs and parameters by hand and against torch's counter and the narrow model: ``2 n_in (H W) n_out``."""
    from maskprop.sparse import SparseConv2d, SparseLinear

    model = torch.nn.Sequential(SparseConv2d(3, 6, 3, padding=1, out_group="g", mask_output=True),
                                torch.nn.Flatten(), SparseLinear(6 * 16, 5, in_group="g", in_positions=16))
    cost = CostModel(model, (3, 4, 4))
    for keep in (1.0, 0.5):
        mask = random_mask({"g": 6}, keep, generator)
        g = int(mask["g"].sum())
        assert cost.by_layer(mask) == {"0": 2 * 3 * 9 * 16 * g, "2": 2 * g * 16 * 5}
        forward, backward = counted_flops(model, mask, torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
        assert forward == cost.flops(mask, batch_size=2) and backward == cost.backward_flops(mask, batch_size=2)
        assert cost.params(mask) == sum(p.numel() for p in maskprop.materialize(model, mask).parameters())
    assert cost.channel_prices(0.5)["g"] == pytest.approx(2 * 3 * 9 * 16 + 2 * 16 * 5)


def test_attention_is_counted_by_the_operations_torchs_counter_knows():
    """The CPU's fused attention kernel and ``nn.MultiheadAttention``'s inference fast path count 0 FLOPs in
    ``FlopCounterMode`` (torch 2.14); ``counting_flops`` runs them as their math kernels: ``2 L^2 d`` per product, and
    the projections as linear layers."""
    from maskprop.cost import counting_flops

    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 4)  # batch, heads, tokens, head width
    with counting_flops() as counted:
        F.scaled_dot_product_attention(q, q, q)
    assert counted.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 5 * 4)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), counting_flops() as counted:
        attention(x, x, x, need_weights=False)
    projections = 2 * 2 * 5 * (3 * 8 * 8 + 8 * 8)
    assert counted.get_total_flops() == projections + 2 * (2 * 2 * 5 * 5 * 8)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_counting_flops_gives_back_the_fast_path_setting_it_found_also_when_the_forward_raises():
    """``counting_flops`` turns ``nn.MultiheadAttention``'s fast path off while it counts, then back to what it was:
    off stays off; on is on again after a model that does not take its input (the cost model's error)."""
    found = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with counting_flops():
            assert not torch.backends.mha.get_fastpath_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(True)
        with pytest.raises(InputSizeError):
            CostModel(torch.nn.Conv2d(3, 4, 5), (3, 2, 2))  # a 5 x 5 kernel on a 2 x 2 image
        assert torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(found)


def test_a_layer_run_on_maps_stacked_as_examples_costs_each_of_them():
    """A conv (or linear layer) called on two maps of one example stacked along the batch (a siamese branch, a
    multi-crop head) costs twice its one-map FLOPs per example, as torch's counter counts it."""

    class Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 5)

        def forward(self, x):
            y = self.conv(torch.cat([x, x.flip(3)], 0)).mean((2, 3))
            return self.fc(y).view(2, -1, 5).sum(0)

    forward, _ = _counted_plain(Stacked(), (3, 8, 8))
    cost = CostModel(Stacked(), (3, 8, 8))
    assert cost.flops(batch_size=2) == forward
    assert cost.by_layer() == {"conv": 2 * (2 * 3 * 4 * 9 * 64), "fc": 2 * (2 * 4 * 5)}
