"""Attention heads' features as a channel group: timm's ``Attention`` made prunable (``SparseAttention``).

Each check against an independent computation: timm's own module, attention written out by hand on the kept
features, torch's FLOP counter, central differences of the FLOPs."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import attention_by_hand, compact_equals_masked, dropout_draws_alike

import maskprop
from maskprop.cost import CostModel, counting_flops
from maskprop.sparse import SparseAttention

timm = pytest.importorskip("timm")

SIZE = (3, 16, 16)  # 16 tokens of 4 x 4 patches and a class token
HEADS, HEAD_DIM, WIDTH = 3, 8, 24


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=5,
                   qkv_bias=True) | kwargs
    return timm.models.vision_transformer.VisionTransformer(**options)


@pytest.fixture
def vit64():
    model = maskprop.make_prunable(_vit(), SIZE).double()
    return model


def _mask(model, generator_seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(generator_seed))


def test_timms_attention_becomes_maskprops_computing_the_same():
    """The converted model computes what timm's did (train and eval mode), with the same parameters under the same
    names, and each block's heads' features are a group of head_dim channels."""
    plain = _vit(attn_drop_rate=0.0).double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    assert [type(b.attn) for b in converted.blocks] == [SparseAttention] * 2
    groups = maskprop.channel_groups(converted)
    assert {g: n for g, n in groups.items() if g.endswith("attn")} == {"blocks.0.attn": HEAD_DIM,
                                                                      "blocks.1.attn": HEAD_DIM}
    attn = converted.blocks[0].attn
    assert (attn.qkv.out_group, attn.proj.in_group, attn.group) == ("blocks.0.attn.qkv", "blocks.0.attn.proj:input",
                                                                   "blocks.0.attn")
    assert maskprop.sparse.concatenations(converted)["blocks.0.attn.qkv"] == (("blocks.0.attn", HEAD_DIM),) * 9
    assert maskprop.sparse.concatenations(converted)["blocks.0.attn.proj:input"] == (("blocks.0.attn", HEAD_DIM),) * 3
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


def test_a_subnetwork_runs_attention_on_its_kept_features_only(vit64):
    """Compact execution computes attention on the kept head features alone (the projections run narrow), equal to
    attention written out by hand on them and to masked execution, gradients included."""
    mask = _mask(vit64)
    attn = vit64.blocks[0].attn
    kept = mask["blocks.0.attn"].nonzero().flatten()
    x = torch.randn(2, 17, WIDTH, dtype=torch.float64, requires_grad=True)
    widths = []
    hook = attn.qkv.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    with maskprop.use_mask(vit64, mask):
        compact = attn(x)
    hook.remove()
    assert widths == [3 * HEADS * len(kept)] and 0 < len(kept) < HEAD_DIM
    torch.testing.assert_close(compact, attention_by_hand(attn, x, kept)[0], rtol=1e-12, atol=1e-12)
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    qkv_grad = compact_equals_masked(vit64, mask, images)["blocks.0.attn.qkv.weight"].reshape(3, HEADS, HEAD_DIM, WIDTH)
    assert qkv_grad[:, :, ~mask["blocks.0.attn"]].abs().max() == 0  # a dropped feature's rows learn nothing


def test_the_cost_model_counts_attentions_products_by_its_kept_features(vit64):
    """Both products cost ``2 x 2 x heads x tokens^2`` FLOPs per kept feature; forward and backward against torch's
    counter on a compact step; prices against central differences."""
    cost = CostModel(vit64, SIZE)
    tokens = 17
    for seed, keep in ((0, 0.5), (1, 0.25), (2, 1.0)):
        mask = _mask(vit64, seed, keep)
        kept = int(mask["blocks.1.attn"].sum())
        assert cost.by_layer(mask)["blocks.1.attn:products"] == 4 * HEADS * tokens ** 2 * kept
        images = torch.randn(2, *SIZE, dtype=torch.float64)
        with counting_flops() as counter, maskprop.use_mask(vit64, mask):
            loss = vit64(images).sum()
            forward = counter.get_total_flops()
            loss.backward()
        assert forward == cost.flops(mask, batch_size=2)
        assert counter.get_total_flops() - forward == cost.backward_flops(mask, batch_size=2)
    assert cost.other_flops == 0  # every product torch counts is in a layer the masks narrow
    half = {g: n // 2 for g, n in cost.groups.items()}
    prices = cost.channel_prices(0.5)
    for group in half:
        more, fewer = dict(half, **{group: half[group] + 1}), dict(half, **{group: half[group] - 1})
        assert prices[group] == pytest.approx((cost.flops(more) - cost.flops(fewer)) / 2, rel=1e-12)


def test_check_model_and_export_take_a_vit_with_pruned_heads(vit64, tmp_path):
    """check_model's every check (compact, static with capacities, narrow, FLOPs) passes; the exported narrow model
    runs attention at the kept head width with the full width's scale, in every file format."""
    maskprop.check_model(vit64, SIZE)
    spec = maskprop.ModelSpec.resolve("timm:vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": WIDTH,
                                                                    "depth": 2, "num_heads": HEADS},
                                      num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = _mask(model)
    formats = "safetensors,pt2,onnx" if importlib.util.find_spec("onnxscript") else "safetensors,pt2"
    info = maskprop.save_exported(model, mask, tmp_path / "vit", spec=spec, formats=formats)
    assert info["flops"] == CostModel(model, SIZE).flops(mask)
    narrow = maskprop.load_exported(tmp_path / "vit")
    attn = narrow.blocks[0].attn
    kept = int(mask["blocks.0.attn"].sum())
    assert isinstance(attn, SparseAttention) and attn.group is None and attn.scale == HEAD_DIM ** -0.5
    assert attn.qkv.out_features == 3 * HEADS * kept and type(attn.qkv) is torch.nn.Linear
    x = torch.randn(2, *SIZE)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


class _OwnRMSNorm(torch.nn.RMSNorm):
    """A subclass of torch's RMSNorm: it may compute something else, so maskprop does not convert it."""


def test_attention_in_another_form_keeps_its_heads_whole():
    """Query-key normalisation by a norm maskprop does not convert (a subclass of ``nn.RMSNorm``) and timm's other
    classes named ``Attention`` (LeViT's, whose attention biases and head widths are its own) are traced through as
    before: their heads stay whole, the model computes what it did. (BEiT's converts: tests/test_biased_attention.py;
    LayerNorm's and RMSNorm's, timm's RmsNorm too: tests/test_layernorm.py, tests/test_rmsnorm.py.)"""
    normed = maskprop.make_prunable(_vit(qk_norm=True, norm_layer=_OwnRMSNorm), SIZE)
    assert not any(isinstance(m, SparseAttention) for m in normed.modules())
    assert not any(g.endswith("attn") for g in maskprop.channel_groups(normed))
    torch.manual_seed(0)
    levit = timm.models.levit.Levit(img_size=32, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1),
                                    num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = levit(x)
    maskprop.make_prunable(levit, (3, 32, 32))
    assert not any(isinstance(m, SparseAttention) for m in levit.modules())
    with torch.no_grad():
        torch.testing.assert_close(levit(x), before, rtol=0, atol=0)


def test_exclude_names_qkv_to_keep_a_blocks_heads_whole():
    model = maskprop.make_prunable(_vit(), SIZE, exclude=["blocks.0.attn.qkv"])
    groups = maskprop.channel_groups(model)
    assert "blocks.0.attn" not in groups and "blocks.1.attn" in groups
    assert type(model.blocks[0].attn).__name__ == "Attention" and isinstance(model.blocks[1].attn, SparseAttention)
    maskprop.check_model(model, SIZE)


def test_sparse_attention_refuses_projections_of_other_widths():
    qkv, proj = torch.nn.Linear(24, 70), torch.nn.Linear(24, 24)
    with pytest.raises(ValueError, match="qkv writes 70 and proj reads 24 features; expected 72 and 24 for 3 heads"):
        SparseAttention(qkv, proj, 3, 8)


def test_dropout_on_the_attention_weights_draws_alike_in_both_modes(vit64):
    """The fused kernel's dropout draws one number per attention weight, (heads, tokens, tokens) whatever the head
    width: compact and masked steps with the same seed drop the same weights."""
    for block in vit64.blocks:
        block.attn.attn_drop.p = 0.3
    dropout_draws_alike(vit64, _mask(vit64, 3), torch.randn(2, *SIZE, dtype=torch.float64))


class Attention(timm.layers.Attention):
    """A class of timm's name, defined elsewhere, computing something else: not converted."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x)


@pytest.mark.parametrize("make", [lambda: Attention(WIDTH, HEADS, qkv_bias=True),
                                  lambda: timm.layers.Attention(WIDTH, HEADS, qkv_bias=True, gated=True)],
                         ids=["same name elsewhere", "gated"])
def test_only_timms_plain_attention_is_converted(make):
    plain = _vit().double().eval()
    for block in plain.blocks:
        block.attn = make().double()
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    expected = plain(x)
    converted = maskprop.make_prunable(plain, SIZE)
    assert not any(isinstance(m, SparseAttention) for m in converted.modules())
    torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)


def test_a_model_in_eval_mode_converts_to_eval_mode_with_no_dropout_drawn():
    plain = _vit(attn_drop_rate=0.5).double().eval()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert not any(m.training for m in converted.modules())
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keywords", [{"is_causal": True}, {"attn_mask": "random"}], ids=["causal", "mask"])
def test_sparse_attention_takes_timms_mask_arguments(vit64, keywords):
    if keywords.get("attn_mask") == "random":
        keywords = {"attn_mask": (torch.rand(17, 17, generator=torch.Generator().manual_seed(0)) > 0.5)
                    | torch.eye(17, dtype=torch.bool)}
    ours = vit64.blocks[0].attn
    theirs = timm.layers.Attention(WIDTH, HEADS, qkv_bias=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 17, WIDTH, dtype=torch.float64)
    torch.testing.assert_close(ours(x, **keywords), theirs(x, **keywords), rtol=1e-12, atol=1e-12)


def test_make_prunables_summary_counts_each_heads_features_once(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        maskprop.make_prunable(_vit(), SIZE)
    assert "has 4 channel groups (208 channels, 4 concatenations of them) in 10 converted layers" in caplog.text


def test_the_cost_model_of_a_narrow_vit_counts_its_kept_head_width(vit64):
    """The narrow model keeps the full width's head_dim and scale but runs, and is priced at, the kept head width;
    made prunable again, it checks."""
    mask = _mask(vit64)
    narrow = maskprop.materialize(vit64, mask).eval()
    kept = int(mask["blocks.0.attn"].sum())
    attn = narrow.blocks[0].attn
    assert (attn.head_width, attn.head_dim, attn.scale) == (kept, HEAD_DIM, HEAD_DIM ** -0.5)
    x = torch.zeros(1, *SIZE, dtype=torch.float64)
    assert CostModel(narrow, SIZE).flops() == maskprop.cost.counted_flops(narrow, x) == CostModel(vit64, SIZE).flops(
        mask)
    maskprop.check_model(maskprop.make_prunable(narrow, SIZE), SIZE)


def test_attention_modules_sharing_a_projection_or_held_twice_convert_or_stay_whole_exactly():
    """A projection shared by two attention modules is listed under one path: those modules are traced through,
    their heads whole; one attention module held under two names is converted under both."""
    shared = _vit().double()
    shared.blocks[1].attn.qkv = shared.blocks[0].attn.qkv
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    expected = shared(x)
    maskprop.make_prunable(shared, SIZE)
    assert isinstance(shared.blocks[0].attn, SparseAttention) is False and "blocks.0.attn" not in \
        maskprop.channel_groups(shared)
    torch.testing.assert_close(shared(x), expected, rtol=1e-12, atol=1e-12)
    maskprop.check_model(shared, SIZE)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(16, WIDTH)
            self.norm = torch.nn.LayerNorm(WIDTH)
            self.a1 = timm.layers.Attention(WIDTH, HEADS)
            self.a2 = self.a1
            self.head = torch.nn.Linear(WIDTH, 3)

        def forward(self, x):
            x = self.norm(self.embed(x.flatten(2)[..., :16]))  # 3 tokens of 16 features
            return self.head((x + self.a1(x) + self.a2(self.norm(x))).mean(1))

    twice = Twice().double()
    maskprop.make_prunable(twice, SIZE)
    assert isinstance(twice.a1, SparseAttention) and twice.a2 is twice.a1
    maskprop.check_model(twice, SIZE)


def test_attention_reading_a_pruned_space_reads_it_as_a_linear_layer_does():
    """Tokens written by a linear layer and read by attention directly (no LayerNorm on them): the tokens' features
    are a group that qkv reads, proj writes (its output added to them) and the head reads; exact against the masked
    reference."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(16, WIDTH)
            self.attn = timm.layers.Attention(WIDTH, HEADS, qkv_bias=True)
            self.head = torch.nn.Linear(WIDTH, 3)

        def forward(self, x):
            tokens = self.embed(x.flatten(2)[..., :16])  # 3 tokens of 16 features
            return self.head(tokens + self.attn(tokens)).mean(1)

    net = maskprop.make_prunable(Net().double(), SIZE)
    assert net.attn.qkv.in_group == net.attn.proj.out_group == net.embed.out_group == net.head.in_group == "embed"
    assert net.attn.proj.mask_output and set(maskprop.channel_groups(net)) == {"embed", "attn"}
    maskprop.check_model(net, SIZE)


def test_attention_on_channels_in_dimension_1_leaves_them_whole():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.attn, self.head = timm.layers.Attention(16, 2), torch.nn.Linear(16, 5)

        def forward(self, x):
            return self.head(self.attn(self.b(self.c(x)).relu().mean(3)).mean(1))

    with pytest.raises(ValueError, match=r"'c' \(8 channels\): attention on channels in dimension 1"):
        maskprop.make_prunable(Net(), SIZE)
