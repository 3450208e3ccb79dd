"""Concatenated groups that layers write: a residual stream that is a concatenation (GhostNet's), written as a whole by
the layers whose outputs are added to it, and a depthwise conv reading and writing one.

The model is a tiny GhostNet of maskprop layers: a stem conv writes the stream ``stream`` = group ``g`` twice side by
side (a ghost module's output: a 1x1 conv into ``g`` and a depthwise conv of ``g`` beside it); a ghost module into
``h`` twice (``inner``), a depthwise conv on ``inner``, a ghost module back into ``stream``, added to the stream; then a
1x1 conv without BatchNorm (``mask_output``) writes ``wide`` = the image's channels (never pruned) and the stream,
added to ``torch.cat([image, stream])``; a classifier reads ``wide``.

Compact, static and narrow execution are checked against the masked reference in float64, and the reference against a
forward written here on the kept channels alone (``hand_forward``); the channel prices against differences of the
FLOPs (exact: the FLOPs are quadratic in each group's kept count, ``g`` being read and written twice by one conv).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_case_mask, nontrivial_batch_norms
from test_sparse import compact_step_equals_masked
from test_static import _assert_step_equals_masked
from torch import nn

import maskprop
from maskprop.cost import CostModel
from maskprop.sparse import (
    SparseBatchNorm2d,
    SparseConv2d,
    SparseLinear,
    channel_groups,
    concatenate_groups,
    concatenations,
    prepare_mask,
    random_mask,
    use_mask,
)
from maskprop.sparse.static import StaticExecutionState, StaticLayout
from maskprop.surgery import index_sets, materialize

pytestmark = pytest.mark.usefixtures("one_thread")

G, H, IMAGE = 5, 4, 3
SIZE = (IMAGE, 6, 6)
GROUPS = {"g": G, "h": H}


class Ghost(nn.Module):
    """``torch.cat([bn1(primary(x)), bn2(cheap(...))], 1)``: ``group``'s channels twice (ReLU after each unit, if
    ``act``)."""

    def __init__(self, in_channels: int, channels: int, reads: str, group: str, act: bool) -> None:
        super().__init__()
        self.primary = SparseConv2d(in_channels, channels, 1, in_group=reads, out_group=group)
        self.bn1 = SparseBatchNorm2d(channels, group=group)
        self.cheap = SparseConv2d(channels, channels, 3, padding=1, groups=channels, in_group=group, out_group=group)
        self.bn2 = SparseBatchNorm2d(channels, group=group)
        self.act = act

    def forward(self, x):
        a = self.bn1(self.primary(x))
        a = F.relu(a) if self.act else a
        b = self.bn2(self.cheap(a))
        return torch.cat([a, F.relu(b) if self.act else b], 1)


class GhostTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        stream = concatenate_groups(self, "stream", [("g", G), ("g", G)])
        inner = concatenate_groups(self, "inner", [("h", H), ("h", H)])
        wide = concatenate_groups(self, "wide", [(None, IMAGE), ("g", G), ("g", G)])
        self.stem = SparseConv2d(IMAGE, 2 * G, 3, padding=1, bias=True, out_group=stream)
        self.stem_bn = SparseBatchNorm2d(2 * G, group=stream)
        self.ghost1 = Ghost(2 * G, H, stream, "h", act=True)
        self.down = SparseConv2d(2 * H, 2 * H, 3, padding=1, groups=2 * H, in_group=inner, out_group=inner)
        self.down_bn = SparseBatchNorm2d(2 * H, group=inner)
        self.ghost2 = Ghost(2 * H, G, inner, "g", act=False)
        self.widen = SparseConv2d(2 * G, IMAGE + 2 * G, 1, bias=True, in_group=stream, out_group=wide,
                                  mask_output=True)
        self.fc = SparseLinear(IMAGE + 2 * G, 4, in_group=wide)

    def forward(self, x):
        s = F.relu(self.stem_bn(self.stem(x)))
        s = s + self.ghost2(self.down_bn(self.down(self.ghost1(s))))
        w = self.widen(s) + torch.cat([x, s], 1)
        return self.fc(F.relu(w).mean((2, 3)))


def model64(seed: int = 0) -> GhostTiny:
    torch.manual_seed(seed)
    return nontrivial_batch_norms(GhostTiny().double(), torch.Generator().manual_seed(seed))


def masks(generator: torch.Generator):
    """Edge masks, random masks, and one keeping every channel."""
    for _ in range(3):
        yield edge_case_mask(GROUPS, generator)
    for keep in (0.3, 0.7):
        yield random_mask(GROUPS, keep, generator)
    yield {g: torch.ones(n, dtype=torch.bool) for g, n in GROUPS.items()}


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(3)


def test_the_declarations_and_their_writers():
    model = GhostTiny()
    assert channel_groups(model) == GROUPS  # a concatenation has no channels of its own, written or not
    assert concatenations(model)["wide"] == ((None, IMAGE), ("g", G), ("g", G))
    assert model.stem.out_group == model.stem_bn.group == "stream" and model.down.out_group == "inner"


def test_a_writer_of_another_width_is_one_clear_error():
    model = GhostTiny()
    model.widen = SparseConv2d(2 * G, 2 * G, 1, in_group="stream", out_group="wide")
    with pytest.raises(ValueError, match=r"^layer 'widen' writes concatenated group 'wide' as 10 channels, but its "
                                         r"parts have 13$"):
        channel_groups(model)


def test_check_model_passes():
    for align in (1, 8):
        result = maskprop.check_model(GhostTiny(), SIZE, align=align)
        assert result.checks == ("dense", "compact", "static", "narrow", "flops")


@pytest.mark.parametrize("align", [1, 4])
def test_compact_step_equals_masked(align, generator):
    """Loss, every gradient and every BatchNorm statistic in float64, with the widths padded to ``align`` (stream
    slots past each part's kept channels: the stem's and widen's padded rows, the classifier's padded columns)."""
    model = model64()
    x, y = torch.randn(4, *SIZE, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for mask in masks(generator):
        state = prepare_mask(model, mask, align=align)
        compact_step_equals_masked(model, state, mask, x, y)


def hand_forward(model: GhostTiny, mask: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The subnetwork in eval mode, written on the kept channels alone: the stream keeps ``g``'s kept channels in each
    half, ``wide`` the image and both halves; every weight sliced by hand."""
    kept = {g: torch.nonzero(m).flatten() for g, m in mask.items()}
    stream = torch.cat([kept["g"], kept["g"] + G])
    inner = torch.cat([kept["h"], kept["h"] + H])
    wide = torch.cat([torch.arange(IMAGE), stream + IMAGE])

    def conv(layer, out, inp):  # inp None: a depthwise conv, a group of its own of each kept channel
        w = layer.weight[out] if inp is None else layer.weight[out][:, inp]
        return lambda t: F.conv2d(t, w, None if layer.bias is None else layer.bias[out], layer.stride, layer.padding,
                                  groups=len(out) if inp is None else 1)

    def bn(layer, rows):
        return lambda t: F.batch_norm(t, layer.running_mean[rows], layer.running_var[rows], layer.weight[rows],
                                      layer.bias[rows], False, 0.0, layer.eps)

    def ghost_run(module, t, reads, rows, act):
        a = bn(module.bn1, rows)(conv(module.primary, rows, reads)(t))
        a = F.relu(a) if act else a
        b = bn(module.bn2, rows)(conv(module.cheap, rows, None)(a))
        return torch.cat([a, F.relu(b) if act else b], 1)

    s = F.relu(bn(model.stem_bn, stream)(conv(model.stem, stream, torch.arange(IMAGE))(x)))
    t = ghost_run(model.ghost1, s, stream, kept["h"], act=True)
    t = bn(model.down_bn, inner)(conv(model.down, inner, None)(t))
    s = s + ghost_run(model.ghost2, t, inner, kept["g"], act=False)
    w = conv(model.widen, wide, stream)(s) + torch.cat([x, s], 1)
    return F.linear(F.relu(w).mean((2, 3)), model.fc.weight[:, wide], model.fc.bias)


def test_the_masked_reference_is_the_subnetwork_written_by_hand(generator):
    model = model64().eval()
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    for mask in masks(generator):
        expected = hand_forward(model, mask, x)
        for mode in ("masked", "compact"):
            with torch.no_grad(), use_mask(model, mask, mode=mode):
                torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12, msg=mode)
        narrow = materialize(model, mask)
        with torch.no_grad():
            torch.testing.assert_close(narrow(x), expected, rtol=1e-10, atol=1e-12)


def test_the_narrow_models_writers_have_the_concatenations_kept_widths(generator):
    model = model64()
    mask = edge_case_mask(GROUPS, generator)
    g, h = (int(mask[k].sum()) for k in ("g", "h"))
    narrow = materialize(model, mask)
    assert (narrow.stem.out_channels, narrow.down.out_channels, narrow.widen.out_channels) == (2 * g, 2 * h,
                                                                                              IMAGE + 2 * g)
    assert narrow.down.groups == 2 * h and narrow.fc.in_features == IMAGE + 2 * g
    assert not concatenations(narrow)
    sets = index_sets(model, mask)
    stream = torch.cat([torch.nonzero(mask["g"]).flatten() + offset for offset in (0, G)])
    assert torch.equal(sets["stem.weight"][0], stream) and torch.equal(sets["stem_bn.running_mean"][0], stream)
    assert torch.equal(sets["widen.weight"][0], torch.cat([torch.arange(IMAGE), IMAGE + stream]))
    assert torch.equal(sets["widen.weight"][1], stream) and torch.equal(sets["fc.weight"][1], sets["widen.bias"][0])


def test_channel_prices_are_the_central_differences_of_the_flops():
    """dF/dn at keep 0.5 against central differences of the FLOPs at real-valued counts: exact, as each layer's FLOPs
    are a polynomial of degree at most 2 in the counts (``widen`` reads and writes ``g``'s channels, twice each)."""
    cost = CostModel(GhostTiny(), SIZE)
    point = {"g": G / 2, "h": H / 2}
    prices = cost.channel_prices(0.5)
    assert set(prices) == set(GROUPS)  # the parts, never a concatenation

    def flops(counts):  # the layers' FLOPs at real-valued counts: each layer is a polynomial of degree <= 2 in them
        return sum(layer.flops(maskprop.sparse.groups.concatenated_counts(counts, cost.concatenated))
                   for layer in cost.layers)

    for group in GROUPS:
        step = 0.5
        up, down = dict(point, **{group: point[group] + step}), dict(point, **{group: point[group] - step})
        assert prices[group] == pytest.approx((flops(up) - flops(down)) / (2 * step), rel=1e-12), group
    # By hand for g: the stem (3 image channels, 3x3, 36 positions) writes 2 n_g; ghost1's primary reads 2 n_g
    # (writes n_h = 2); ghost2's primary writes n_g (reads 2 n_h = 4) and its cheap depthwise conv n_g (9 per
    # channel); widen reads 2 n_g and writes 3 + 2 n_g; the classifier reads 3 + 2 n_g.
    n = G / 2
    assert prices["g"] == pytest.approx(2 * (2 * 3 * 9 * 36) + 2 * (2 * 2 * 36) + 2 * 4 * 36 + 2 * 9 * 36
                                        + 2 * 36 * (2 * (3 + 2 * n) + 2 * (2 * n)) + 2 * 2 * 4)


@pytest.mark.parametrize("concatenate", [False, True], ids=["layer_by_layer", "concatenated_gathers"])
def test_a_static_step_over_masks_in_one_set_of_buffers(concatenate, generator):
    """The static engine: each concatenation's slots (written and read) rewritten from its parts' slots by each mask
    update, ``g`` padded or cut to its capacity of 3, ``h`` to 2; the mask actually used is the reference's."""
    model = model64()
    state = StaticExecutionState(StaticLayout(model, {"g": 3, "h": 2}, concatenate=concatenate))
    x, y = torch.randn(4, *SIZE, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for mask in masks(generator):
        used = _assert_step_equals_masked(model, state, mask, None, x, y)
        assert {g: int(m.sum()) for g, m in used.items()} == {g: min(int(m.sum()), c) for (g, m), c in
                                                             zip(mask.items(), (3, 2))}
        g = state.index("g")
        assert torch.equal(state.index("wide"), torch.cat([torch.arange(IMAGE), IMAGE + g, IMAGE + G + g]))
