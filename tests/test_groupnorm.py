"""GroupNorm over a group's channels (``SparseGroupNorm``): pruned by the features of its groups, feature ``j`` of
every GroupNorm group kept or dropped together, statistics over the kept channels alone.

Each check against an independent computation: the GroupNorm written out in float64 without ``F.group_norm``,
``nn.GroupNorm(G, G * k)`` on the kept channels gathered by hand (and its autograd), the masked reference, the narrow
model ``materialize`` builds, ``check_model``. The machinery it shares with ``SparseLayerNorm``
(``SparseChannelNorm``: the area-1 gather, the static layout, surgery) is exercised through GroupNorm models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import compact_equals_masked
from test_layernorm import (
    HIDDEN,
    KEPT,
    SIZE,
    _keeping,
    _Wrapped,
    gathered_norm_tensors_are_aligned,
    modes_match_by_hand,
    packed_norms_equal_masked,
    padded_channels_stay_out,
    static_step_equals_masked,
)
from torch import nn

import maskprop
from maskprop.sparse import (
    GroupNormAct,
    SparseChannelNorm,
    SparseConv2d,
    SparseGroupNorm,
    SparseGroupNormAct,
    concatenate_groups,
)
from maskprop.sparse.groupnorm import kept_group_norm

timm = pytest.importorskip("timm")

EPS = 1e-5
G = 3  # the hand-written network's GroupNorm groups, each of HIDDEN features


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Small models: one torch thread (conftest's ``one_thread``)."""


def _closed_form(x: torch.Tensor, keep: torch.Tensor, groups: int, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """GroupNorm of ``x`` over the channels ``keep`` says, in float64 and written out: each group's kept channels'
    values at every position, their mean and biased variance, then the weight and bias; zero at the others."""
    x, out = x.double(), torch.zeros(x.shape, dtype=torch.float64)
    width = x.shape[1] // groups
    for g in range(groups):
        kept = [c for c in range(g * width, (g + 1) * width) if keep[c]]
        values = x[:, kept]
        mean = values.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        var = ((values - mean) ** 2).mean(dim=tuple(range(1, x.dim())), keepdim=True)
        y = (values - mean) / (var + eps).sqrt()
        shape = (-1,) + (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.double()[kept].view(shape)
        if bias is not None:
            y = y + bias.double()[kept].view(shape)
        out[:, kept] = y
    return out


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every GroupNorm's weight and bias drawn away from 1 and 0, so that a wrong or missing entry shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm) and module.affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) - 0.5)
    return model


# --- the kept-channel GroupNorm against independent float64 computations ----------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_kept_group_norm_is_the_narrow_groupnorm_of_the_kept_channels(affine):
    """``kept_group_norm`` with features 0 and 2 of every group of 4 kept: ``nn.GroupNorm(3, 6)`` on the kept
    channels and the closed form; whatever the dropped channels hold (large values) they change nothing, the outputs
    there are exactly zero and no gradient reaches them."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, generator=generator)
    keep = torch.tensor([1, 0, 1, 0] * 3, dtype=torch.float64)
    kept = keep.bool()
    x[:, ~kept] = 1e3
    x.requires_grad_(True)
    weight = torch.rand(12, dtype=torch.float64, generator=generator) + 0.5 if affine else None
    bias = torch.randn(12, dtype=torch.float64, generator=generator) if affine else None
    y = kept_group_norm(x, keep, 3, weight, bias, EPS)
    narrow = nn.GroupNorm(3, 6, eps=EPS, affine=affine).double()
    if affine:
        narrow.load_state_dict({"weight": weight[kept], "bias": bias[kept]})
    torch.testing.assert_close(y[:, kept], narrow(x.detach()[:, kept]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, _closed_form(x.detach(), kept, 3, weight, bias, EPS), rtol=1e-12, atol=1e-12)
    assert y[:, ~kept].abs().max() == 0
    y.square().sum().backward()
    assert x.grad[:, ~kept].abs().max() == 0 and x.grad[:, kept].abs().min() > 0


def test_each_group_takes_its_own_kept_count():
    """Groups keeping different counts (which no subnetwork of a converted model does, but the formula allows): each
    group's statistics over its own kept channels, as the closed form; on a vector ``(N, C)`` and a volume too."""
    generator = torch.Generator().manual_seed(5)
    keep = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float64)
    for shape in ((4, 12), (2, 12, 3, 2, 2)):
        x = torch.randn(shape, dtype=torch.float64, generator=generator)
        weight, bias = torch.rand(12, dtype=torch.float64) + 0.5, torch.randn(12, dtype=torch.float64)
        torch.testing.assert_close(kept_group_norm(x, keep, 2, weight, bias, EPS),
                                   _closed_form(x, keep.bool(), 2, weight, bias, EPS), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_takes_float32_statistics_as_group_norm_does(autocast):
    """In bfloat16 the statistics are float32 ones: the result is the float64 closed form to bfloat16's rounding of
    the output (a bfloat16 sum of values near 100 is off by far more), in bfloat16 (under the CPU's autocast too, as
    ``F.group_norm``'s)."""
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 12, 4, 4, generator=generator) * 4 + 100).bfloat16()
    keep = (torch.arange(12) % 4 != 1).bfloat16()
    kept = keep.bool()
    weight = (torch.rand(12, generator=generator) + 0.5).bfloat16()
    bias = torch.randn(12, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = kept_group_norm(x, keep, 3, weight, bias, EPS)
        expected = F.group_norm(x[:, kept], 3, weight[kept], bias[kept], EPS)
    assert y.dtype == expected.dtype == torch.bfloat16
    truth = _closed_form(x, kept, 3, weight, bias, EPS)[:, kept]
    assert ((y[:, kept].double() - truth).abs() <= truth.abs() * 2.0 ** -8 + 1e-6).all()
    assert y[:, ~kept].abs().max() == 0


# --- a subnetwork's GroupNorm: compact, masked, padded, static and narrow -----------------------------------------


class Maps(nn.Module):
    """A one-row map ``(N, 3, 1, L)`` of an input ``(N, 3, L)``: ``conv1`` writes ``G`` copies of the ``hidden`` group
    (the concatenated group ``maps``), ``norm`` is a GroupNorm of ``G`` groups on them, ``conv2`` reads them. ``conv1``
    leaves its output to the GroupNorm (``mask_output`` false), as ``make_prunable`` has it."""

    def __init__(self, affine: bool = True, act: bool = False) -> None:
        super().__init__()
        self.conv1 = SparseConv2d(3, G * HIDDEN, (1, 3), padding=(0, 1), bias=True, out_group="maps")
        fused = {"act": nn.GELU()} if act else {}
        self.norm = (SparseGroupNormAct if act else SparseGroupNorm)(G, G * HIDDEN, eps=EPS, affine=affine,
                                                                      group="maps", **fused)
        self.conv2 = SparseConv2d(G * HIDDEN, 4, (1, 3), padding=(0, 1), bias=True, in_group="maps")
        concatenate_groups(self, "maps", [("hidden", HIDDEN)] * G)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.norm(self.conv1(x.unsqueeze(2)))).squeeze(2)


def _maps(affine: bool = True, act: bool = False) -> Maps:
    torch.manual_seed(0)
    return _perturbed(Maps(affine, act).double())


def _channels(kept: list[int]) -> torch.Tensor:
    """The channels of ``maps`` that keeping the features ``kept`` of ``hidden`` keeps: feature j of every group."""
    return (torch.arange(G)[:, None] * HIDDEN + torch.tensor(kept)).flatten()


def _by_hand(model: Maps, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The narrow network written out: ``conv1``'s kept rows, ``nn.GroupNorm(G, G * k)`` holding the kept entries of
    the weight and bias (then the activation), ``conv2``'s kept columns."""
    index = _channels(kept)
    maps = F.conv2d(x.unsqueeze(2), model.conv1.weight[index], model.conv1.bias[index], padding=(0, 1))
    norm = nn.GroupNorm(G, G * len(kept), eps=EPS, affine=model.norm.affine).double()
    params = {"weight": model.norm.weight[index], "bias": model.norm.bias[index]} if model.norm.affine else {}
    normed = torch.func.functional_call(norm, params, (maps,))  # their gradients reach the full tensors
    normed = model.norm.act(normed) if isinstance(model.norm, SparseGroupNormAct) else normed
    return F.conv2d(normed, model.conv2.weight[:, index], model.conv2.bias, padding=(0, 1)).squeeze(2)


@pytest.mark.parametrize("kept", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("affine,act", [(True, False), (False, False), (True, True)], ids=["affine", "plain", "act"])
def test_a_subnetworks_groupnorm_is_group_norm_of_its_kept_channels(kept, affine, act):
    """Compact and masked execution both compute ``nn.GroupNorm(G, G * k)`` on the kept channels (each group's
    statistics over its kept features, the kept entries of the weight and bias), and their gradients of the input and
    every parameter are that computation's; a dropped channel's weight and bias entries get none."""
    model = _maps(affine, act)
    mask = _keeping(kept)
    x = torch.randn(3, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dropped = torch.ones(G * HIDDEN, dtype=torch.bool)
    dropped[_channels(kept)] = False
    for _ in modes_match_by_hand(model, mask, x, target, lambda reference, t: _by_hand(reference, t, kept)):
        if affine:
            assert model.norm.weight.grad[dropped].abs().sum() == model.norm.bias.grad[dropped].abs().sum() == 0


def test_no_mask_is_nn_groupnorm_itself():
    """Without a mask (and with one keeping every channel), the layer is ``nn.GroupNorm`` exactly, with its state-dict
    keys."""
    model = _maps()
    plain = nn.GroupNorm(G, G * HIDDEN, eps=EPS).double()
    plain.load_state_dict(model.norm.state_dict())
    x = torch.randn(2, G * HIDDEN, 2, 5, dtype=torch.float64)
    assert torch.equal(model.norm(x), plain(x))
    with maskprop.use_mask(model, _keeping(KEPT["all"]), "masked"):
        assert torch.equal(model.norm(x), plain(x))
    assert list(model.norm.state_dict()) == ["weight", "bias"]
    assert isinstance(model.norm, SparseChannelNorm) and isinstance(model.norm, nn.GroupNorm)


@pytest.mark.parametrize("align", [2, 4])
def test_padded_channels_stay_out_of_each_groups_statistics(align):
    """Padding channels (the same features of every group) are in no group's mean or variance and their outputs are
    zero, whatever ``conv1`` wrote there (:func:`test_layernorm.padded_channels_stay_out`)."""
    padded_channels_stay_out(_maps(), align)


def test_the_static_step_normalises_its_kept_channels_alone():
    """A GroupNorm's static step: :func:`test_layernorm.static_step_equals_masked`."""
    static_step_equals_masked(_maps())


@pytest.mark.parametrize("act", [False, True], ids=["groupnorm", "act"])
def test_the_narrow_model_holds_a_groupnorm_of_as_many_groups_on_the_kept_channels(act):
    """``materialize`` gives ``nn.GroupNorm(G, G * k)`` (``GroupNormAct`` with its activation for
    ``SparseGroupNormAct``) holding the kept entries (``index_sets``: feature j of every group): it computes the masked
    reference, and the cost model counts its kept parameters."""
    model = _maps(act=act)
    mask = _keeping(KEPT["odd"])
    narrow = maskprop.materialize(model, mask)
    assert type(narrow.norm) is (GroupNormAct if act else nn.GroupNorm)
    assert (narrow.norm.num_groups, narrow.norm.num_channels, narrow.norm.eps) == (G, G * 5, EPS)
    assert not act or type(narrow.norm.act) is nn.GELU
    index = _channels(KEPT["odd"])
    assert torch.equal(narrow.norm.weight, model.norm.weight[index])
    assert torch.equal(narrow.norm.bias, model.norm.bias[index])
    sets = maskprop.surgery.index_sets(model, mask)  # what the finetune phase moves weights and optimizer state by
    assert sets["norm.bias"][0].tolist() == index.tolist() and sets["norm.bias"][1] is None
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-12, atol=1e-12)
    cost = maskprop.CostModel(_Wrapped(model), (1, 3, 6))
    assert cost.params(mask) == sum(p.numel() for p in narrow.parameters())
    assert cost.params() - cost.params(mask) == G * (HIDDEN - 5) * (2 + 3 * 3 + 1 + 4 * 3)  # norm, conv1, conv2


def test_refusals_are_one_line():
    """An input of another width than the subnetwork computes, and a GroupNorm of ``G`` groups whose group is not
    ``G`` copies of one group: each one line naming the layer."""
    model = _maps()
    with maskprop.use_mask(model, _keeping(KEPT["odd"])), \
            pytest.raises(ValueError, match=r"'norm' \(SparseGroupNorm.* 27 channels in dimension 1.*15") as err:
        model.norm(torch.randn(2, G * HIDDEN, 1, 6, dtype=torch.float64))
    assert "\n" not in str(err.value)
    model.norm.group = "hidden"
    with pytest.raises(ValueError, match=r"'norm' is a GroupNorm of 3 groups, but its group 'hidden' is no "
                                         r"concatenated group") as err:
        maskprop.channel_groups(model)
    assert "\n" not in str(err.value)


# --- make_prunable: torch's and timm's GroupNorms -----------------------------------------------------------------


class GroupNet(nn.Module):
    """GroupNorms in the forms networks have them: torch's on a stem, timm's ``GroupNormAct`` (fused ReLU) in a block,
    timm's ``GroupNorm`` on the block's output added to the stem's stream, timm's ``GroupNorm1`` (one group) before
    the head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.GroupNorm(4, 16)
        self.conv1, self.gn1 = nn.Conv2d(16, 24, 3, padding=1), timm.layers.GroupNormAct(24, num_groups=3)
        self.conv2, self.gn2 = nn.Conv2d(24, 16, 1, bias=False), timm.layers.GroupNorm(16, num_groups=4)
        self.conv3, self.gn3 = nn.Conv2d(16, 12, 3, stride=2, padding=1), timm.layers.GroupNorm1(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.stem(x)))
        x = F.relu(x + self.gn2(self.conv2(self.gn1(self.conv1(x)))))
        return self.fc(F.relu(self.gn3(self.conv3(x))).mean((2, 3)))


def _group_net() -> tuple[nn.Module, nn.Module]:
    """A :class:`GroupNet` in float64 (its norms drawn away from 1 and 0) and the same made prunable."""
    torch.manual_seed(0)
    plain = _perturbed(GroupNet()).double()
    return plain, maskprop.make_prunable(copy.deepcopy(plain), SIZE)


def _odd_mask(groups: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each group keeps an odd number of its features (3 of 4, 5 of 8, 7 of 12), at random."""
    generator = torch.Generator().manual_seed(3)
    mask = {}
    for name, size in groups.items():
        m = torch.zeros(size, dtype=torch.bool)
        m[torch.randperm(size, generator=generator)[:max(1, (size // 2) | 1)]] = True
        mask[name] = m
    return mask


def test_torch_and_timm_groupnorms_convert_and_their_subnetworks_check():
    """Each GroupNorm becomes a ``SparseGroupNorm`` (timm's ``GroupNormAct`` a ``SparseGroupNormAct`` with its ReLU)
    of a concatenated group of its ``G`` copies of one features group (``GroupNorm1``: the group itself); the residual
    stream's two GroupNorms share their features; the model computes what it did, with the same state-dict keys; the
    conv before each GroupNorm leaves its output to it; compact equals masked at odd widths; check_model passes."""
    plain, model = _group_net()
    assert list(model.state_dict()) == list(plain.state_dict())
    assert maskprop.channel_groups(model) == {"gn:features": 4, "gn1:features": 8, "conv3": 12}
    parts = maskprop.sparse.concatenations(model)
    assert parts == {"stem": (("gn:features", 4),) * 4, "conv1": (("gn1:features", 8),) * 3}
    assert [(type(m), m.group, m.num_groups) for m in (model.gn, model.gn1, model.gn2, model.gn3)] == [
        (SparseGroupNorm, "stem", 4), (SparseGroupNormAct, "conv1", 3), (SparseGroupNorm, "stem", 4),
        (SparseGroupNorm, "conv3", 1)]
    assert type(model.gn1.act) is nn.ReLU
    assert model.conv2.out_group == "stem" and not any(m.mask_output for m in (model.stem, model.conv1, model.conv2))
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    mask = _odd_mask(maskprop.channel_groups(model))
    grads = compact_equals_masked(model, mask, x)
    dropped = ~maskprop.sparse.groups.concatenated_masks(mask, parts)["conv1"]
    assert grads["gn1.weight"][dropped].abs().max() == 0 and grads["gn1.weight"][~dropped].abs().min() > 0
    maskprop.check_model(model, SIZE)


def test_the_narrow_model_of_a_converted_network_keeps_timms_activation():
    """``materialize`` of the converted network: ``GroupNormAct`` (ReLU) and ``nn.GroupNorm`` of the kept widths, the
    cost model's parameter count, and the subnetwork's outputs on inputs (eval)."""
    _, model = _group_net()
    mask = _odd_mask(maskprop.channel_groups(model))
    narrow = maskprop.materialize(model, mask).eval()
    assert type(narrow.gn1) is GroupNormAct and type(narrow.gn1.act) is nn.ReLU
    assert (narrow.gn1.num_groups, narrow.gn1.num_channels) == (3, 15)
    assert (type(narrow.gn), narrow.gn.num_groups, narrow.gn.num_channels) == (nn.GroupNorm, 4, 12)
    assert (narrow.gn3.num_groups, narrow.gn3.num_channels) == (1, 7)
    assert sum(p.numel() for p in narrow.parameters()) == maskprop.CostModel(model, SIZE).params(mask)
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    with torch.no_grad(), maskprop.use_mask(model.eval(), mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("align", [1, 4])
def test_packed_gathers_of_groupnorms_equal_the_masked_reference(path, align):
    """Off the CPU each GroupNorm takes its weight and bias from the gather of all layers' weights (G copies of its
    features' index set); compact equals masked in float64, the loss and every gradient, at odd kept widths and padded
    to ``align``."""
    _, model = _group_net()
    mask = _odd_mask(maskprop.channel_groups(model))
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms, _ = packed_norms_equal_masked(model, mask, images, SparseGroupNorm, path, align, bias=True)
    assert norms


def test_gathered_groupnorm_parameters_start_at_aligned_addresses(monkeypatch):
    """A GroupNorm's weight and bias gathered aligned (``gn1``'s, 3 groups of 7 features: 21 entries, the one pruned
    GroupNorm of that helper's mask): :func:`test_layernorm.gathered_norm_tensors_are_aligned`."""
    _, model = _group_net()
    gathered_norm_tensors_are_aligned(model.float(), SparseGroupNorm, "eager", torch.float32, 2, monkeypatch)


class _OneGroupAct(nn.Module):
    """timm's ``GroupNorm1Act`` (one group, then GELU) on a conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 6, 3, padding=1), timm.layers.GroupNorm1Act(6, act_layer=nn.GELU)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gn(self.conv(x)).mean((2, 3)))


def test_timms_groupnorm1act_is_a_layernorm_over_the_kept_channels_and_positions():
    """``GroupNorm1Act`` becomes a ``SparseGroupNormAct`` of one group on the conv's own group (no concatenation),
    its GELU kept; its narrow layer is ``GroupNormAct(1, k)``; check_model passes."""
    model = maskprop.make_prunable(_OneGroupAct(), SIZE)
    assert maskprop.channel_groups(model) == {"conv": 6} and maskprop.sparse.concatenations(model) == {}
    assert type(model.gn) is SparseGroupNormAct and (model.gn.group, model.gn.num_groups) == ("conv", 1)
    assert type(model.gn.act) is nn.GELU
    narrow = maskprop.materialize(model, {"conv": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)})
    assert type(narrow.gn) is GroupNormAct and (narrow.gn.num_groups, narrow.gn.num_channels) == (1, 3)
    maskprop.check_model(model, SIZE)


class _OnePerGroup(nn.Module):
    """A GroupNorm of one channel per group (``a``) beside one of two (``b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.gn_a = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(8, 8)
        self.conv_b, self.gn_b = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_b(self.conv_b(F.relu(self.gn_a(self.conv_a(x))))))
        return self.fc(x.mean((2, 3)))


def test_a_groupnorm_of_one_channel_per_group_keeps_its_channels_whole(caplog):
    """``GroupNorm(8, 8)`` has no feature to drop: its channels stay whole, for that reason, and it stays torch's;
    the other GroupNorm's features prune, and check_model passes."""
    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        model = maskprop.make_prunable(_OnePerGroup(), SIZE)
    assert maskprop.channel_groups(model) == {"gn_b:features": 2}
    assert type(model.gn_a) is nn.GroupNorm and type(model.conv_a) is nn.Conv2d and model.conv_b.in_group is None
    assert "'conv_a' (8 channels): normalised by 'gn_a', a GroupNorm of one channel per group (8 groups of 8 " \
           "channels): no feature to drop" in caplog.text
    maskprop.check_model(model, SIZE)


class _TwoSplits(nn.Module):
    """One channel space normalised by GroupNorms of 4 and of 2 groups (a residual stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.gn_a = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv_b, self.gn_b = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(2, 16)
        self.conv_c, self.gn_c = nn.Conv2d(16, 8, 1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_a(self.conv_a(x)))
        x = F.relu(x + self.gn_b(self.conv_b(x)))
        return self.fc(F.relu(self.gn_c(self.conv_c(x))).mean((2, 3)))


def test_two_groupnorms_of_other_group_counts_on_one_space_leave_it_whole(caplog):
    """A subnetwork cannot keep both splits of the stream (equal counts in 4 groups and in 2 would need the same
    features of 8 copies; maskprop keeps one split per space): it stays whole, with both splits named, and its
    GroupNorms stay torch's; ``gn_c``'s own features prune, and check_model passes."""
    torch.manual_seed(0)
    plain = _perturbed(_TwoSplits()).double()
    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        model = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert maskprop.channel_groups(model) == {"gn_c:features": 4}
    assert type(model.gn_a) is type(model.gn_b) is nn.GroupNorm and type(model.gn_c) is SparseGroupNorm
    assert "channels split two ways that a subnetwork cannot both keep: 4 groups of 4 channels normalised by 'gn_a', " \
           "and 2 groups of 8 channels normalised by 'gn_b'" in caplog.text
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(model, SIZE)


# --- timm's ResNet-50 with GroupNorm ----------------------------------------------------------------------------------


def test_timms_resnet50_gn_converts_every_groupnorm():
    """``resnet50_gn``: each of its 53 GroupNorms (32 groups) becomes a ``SparseGroupNorm`` of a concatenated group of
    32 copies of its features (2 of a 64-channel map, 64 of the 2048-channel stream); only the classifier's outputs
    stay whole."""
    model = maskprop.make_prunable(timm.create_model("resnet50_gn", num_classes=10), (3, 32, 32))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 53 and all(type(m) is SparseGroupNorm and m.group is not None for m in norms)
    groups = maskprop.channel_groups(model)
    assert len(groups) == 37 and groups["bn1:features"] == 2 and groups["layer4"] == 64
    assert maskprop.sparse.concatenations(model)["layer4:1"] == (("layer4", 64),) * 32


@pytest.mark.slow  # 10 s on one thread: its streams are ResNet-50's (256 to 2048 channels)
def test_timms_resnet50_gn_passes_check_model():
    model = maskprop.make_prunable(timm.create_model("resnet50_gn", num_classes=10), (3, 32, 32))
    maskprop.check_model(model, (3, 32, 32))


class _Standardised(nn.Module):
    """BiT's layers: timm's weight-standardised ``StdConv2d`` before a ``GroupNormAct``, then a plain conv and
    GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gn = timm.layers.StdConv2d(3, 8, 3), timm.layers.GroupNormAct(8, num_groups=2)
        self.conv2, self.gn2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.gn2(self.conv2(self.gn(self.conv(x))))).mean((2, 3)))


def test_a_weight_standardised_convolution_keeps_what_it_reads_and_writes_whole(caplog):
    """timm's ``StdConv2d`` (BiT's: each filter standardised over all its inputs) is not converted: the channels it
    writes stay whole, said so in one line, and the GroupNorm on them stays timm's; the plain conv's GroupNorm features
    prune and check_model passes. BiT itself has no channel left to prune, and says why in one line."""
    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        model = maskprop.make_prunable(_Standardised(), SIZE)
    assert maskprop.channel_groups(model) == {"gn2:features": 4}
    assert type(model.conv) is timm.layers.StdConv2d and type(model.gn) is timm.layers.GroupNormAct
    assert "'conv' (8 channels): written by StdConv2d, a weight-standardised convolution that maskprop does not " \
           "convert" in caplog.text
    maskprop.check_model(model, SIZE)
    with pytest.raises(ValueError, match=r"no channel of ResNetV2 can be pruned: 'stages.3.blocks.0.downsample.conv' "
                                         r"\(2048 channels\): written by StdConv2d, a weight-standardised") as err:
        maskprop.make_prunable(timm.create_model("resnetv2_50x1_bit", num_classes=10), (3, 32, 32))
    assert "\n" not in str(err.value)
