"""Attention whose query and value biases live outside ``qkv`` (timm's BEiT attention) and the Swin Transformer v2's
cosine window attention (timm's and torchvision's), with their heads' features as a channel group.

Each check against an independent computation: timm's or torchvision's own module (with every feature kept, and with
the dropped features zeroed in its weights and biases: what dropping them means), the masked reference in float64
(outputs and gradients), and check_model's checks. Every parameter is perturbed first: timm initialises the biases,
the relative position table and a Swin v2 block's post-norms to zero, which would hide them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compact_equals_masked, dropout_draws_alike

import maskprop
from maskprop.sparse import (
    SparseAttention,
    SparseBeitAttention,
    SparseShiftedWindowAttentionV2,
    SparseWindowAttentionV2,
)

timm = pytest.importorskip("timm")
beit = pytest.importorskip("timm.models.beit")
swinv2 = pytest.importorskip("timm.models.swin_transformer_v2")
tv_swin = pytest.importorskip("torchvision.models.swin_transformer")
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: on a shared 2-core machine a second thread waits

SIZE = (3, 16, 16)
WIDTH, HEADS = 24, 3  # BEiT: 16 tokens of 4 x 4 patches and a class token, 3 heads of 8 features
BEIT = dict(img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=5, init_values=0.1,
            use_abs_pos_emb=False, use_rel_pos_bias=True)
SWIN = dict(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5,
            drop_path_rate=0.0)  # 8 x 8 tokens: four windows of 4 x 4 in the first stage (shifted), one in the second


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _beit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturbed(beit.Beit(**(BEIT | kwargs)).double())


def _swinv2(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturbed(swinv2.SwinTransformerV2(**(SWIN | kwargs)).double())


def _tv_swinv2(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                   num_classes=5, stochastic_depth_prob=0.0, block=tv_swin.SwinTransformerBlockV2,
                   downsample_layer=tv_swin.PatchMergingV2) | kwargs
    return _perturbed(tv_swin.SwinTransformer(**options).double())


def _mask(model, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))


def _images(seed: int = 1, size: tuple[int, ...] = SIZE) -> torch.Tensor:
    return torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _same_model(plain: torch.nn.Module, size: tuple[int, ...] = SIZE) -> torch.nn.Module:
    """``plain`` converted, in place, holding the same parameter tensors under the same names."""
    parameters = dict(plain.named_parameters())
    converted = maskprop.make_prunable(plain, size)
    assert dict(converted.named_parameters()).keys() == parameters.keys()
    assert all(converted.get_parameter(name) is tensor for name, tensor in parameters.items())
    return converted


def _zeroed(module: torch.nn.Module, dropped: torch.Tensor, heads: int) -> torch.nn.Module:
    """A copy of a library's attention module with the dropped features' rows of ``qkv`` (and their entries of its
    biases) and columns of ``proj`` set to zero: what dropping them means."""
    module = copy.deepcopy(module)
    rows, columns = dropped.repeat(3 * heads), dropped.repeat(heads)  # qkv's outputs (3, heads, head_dim)
    with torch.no_grad():
        module.qkv.weight[rows] = 0
        if module.qkv.bias is not None:
            module.qkv.bias[rows] = 0
        for name in ("q_bias", "v_bias"):
            if getattr(module, name, None) is not None:
                getattr(module, name)[columns] = 0
        module.proj.weight[:, columns] = 0
    return module


def _assert_same_in_both_modes(converted, plain, x) -> None:
    """The converted model computes what the library's own does, in training and in eval mode (dropout off)."""
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


# --- timm's BEiT attention -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
                                    dict(use_shared_rel_pos_bias=True),
                                    dict(use_rel_pos_bias=False, use_abs_pos_emb=True, qkv_bias=False)],
                         ids=["bias_per_block", "shared_bias", "both_biases", "no_qkv_bias"])
@pytest.mark.parametrize("fused", [False, True], ids=["timm_math", "timm_fused"])

def test_timms_beit_attention_becomes_maskprops_computing_the_same(config, fused):
    """BEiT's attention (q_bias and v_bias outside qkv, a relative position bias per block, one all blocks share,
    both added, or neither) converted: the same state dict and parameters, each block's heads' features a group, the
    same outputs as timm's through either of its attention paths in train and eval mode."""
    plain = _beit(**config)
    for module in plain.modules():
        if isinstance(module, beit.Attention):
            module.fused_attn = fused
    keys = list(plain.state_dict())
    converted = _same_model(copy.deepcopy(plain))
    assert list(converted.state_dict()) == keys
    attention = [block.attn for block in converted.blocks]
    assert [type(a) for a in attention] == [SparseBeitAttention] * 2
    assert {g: n for g, n in maskprop.channel_groups(converted).items() if g.endswith("attn")} == {
        "blocks.0.attn": 8, "blocks.1.attn": 8}
    if "qkv_bias" not in config:
        assert attention[0].k_bias.shape == (WIDTH,) and attention[0].k_bias.abs().max() == 0
        assert attention[0].head_feature_tensors == ("q_bias", "v_bias")
    x = _images()
    _assert_same_in_both_modes(converted, plain, x)


def test_a_beit_subnetwork_is_timms_attention_with_the_dropped_features_zeroed():
    """Compact execution of a block's attention equals timm's own module with the dropped features' rows of qkv,
    entries of q_bias and v_bias and columns of proj zeroed (the relative position bias whole); the model's compact
    and masked execution agree, gradients included, and a dropped feature's biases learn nothing."""
    model = maskprop.make_prunable(_beit(), SIZE)
    plain = _beit().blocks[1].attn
    mask = _mask(model)
    kept, name = mask["blocks.1.attn"], "blocks.1.attn"
    assert 0 < int(kept.sum()) < 8
    x = torch.randn(2, 17, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        with maskprop.use_mask(model, mask):
            compact = model.blocks[1].attn(x)
        torch.testing.assert_close(compact, _zeroed(plain, ~kept, HEADS)(x), rtol=1e-12, atol=1e-12)
    grads = compact_equals_masked(model, mask, _images())
    columns = (~kept).repeat(HEADS)
    assert grads[f"{name}.q_bias"][columns].abs().max() == 0 and grads[f"{name}.v_bias"][columns].abs().max() == 0
    assert grads[f"{name}.q_bias"][~columns].abs().max() > 0 and grads[f"{name}.v_bias"][~columns].abs().max() > 0
    assert grads[f"{name}.relative_position_bias_table"].abs().max() > 0


@pytest.mark.parametrize("build", [_beit, _swinv2, _tv_swinv2], ids=["beit", "timm_swinv2", "torchvision_swinv2"])
def test_padded_features_add_no_bias(build):
    """With ``align``, a head computes dropped features as padding: their weights are zeroed, and so is the bias the
    module adds to them, so that compact execution still equals masked execution (a padded query feature would change
    a cosine attention's norms, a padded value feature proj's input)."""
    model = maskprop.make_prunable(build(), SIZE)
    mask = _mask(model, seed=2)
    x = _images()
    outputs = []
    for mode, align in (("compact", 3), ("masked", 1)):
        with maskprop.use_mask(model, mask, mode, align=align) as running:
            outputs.append(running(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)


def test_check_model_and_export_take_a_beit_with_pruned_heads(tmp_path):
    """check_model's every check passes; timm's beit_base_patch16_224 at a small size exports its subnetwork and
    loads it again by name, its q_bias and v_bias of the kept features (k_bias zeros of their size), computing what
    compact execution did."""
    maskprop.check_model(maskprop.make_prunable(_beit(), SIZE), SIZE)
    kwargs = {k: v for k, v in BEIT.items() if k not in ("num_classes", "use_abs_pos_emb", "use_rel_pos_bias",
                                                          "init_values")}
    spec = maskprop.ModelSpec.resolve("timm:beit_base_patch16_224", kwargs, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    model = _perturbed(spec.build()).eval()
    mask = _mask(model, seed=3)
    maskprop.save_exported(model, mask, tmp_path / "beit", spec=spec, formats="safetensors")
    narrow = maskprop.load_exported(tmp_path / "beit")
    attn, kept = narrow.blocks[1].attn, int(mask["blocks.1.attn"].sum())
    assert type(attn) is SparseBeitAttention and attn.group is None and attn.scale == 8 ** -0.5
    assert attn.q_bias.shape == attn.v_bias.shape == attn.k_bias.shape == (HEADS * kept,)
    assert attn.qkv.out_features == 3 * HEADS * kept and type(attn.qkv) is torch.nn.Linear
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def test_the_dropouts_carry_over_and_draw_alike_in_both_modes():
    """BEiT's dropout on the attention weights carries over; in training, compact and masked steps with the same
    seed drop the same weights (the MLP's and the residual stream's dropouts, which draw per kept channel in compact
    execution, turned off)."""
    model = maskprop.make_prunable(_beit(attn_drop_rate=0.3), SIZE).train()
    assert all(block.attn.attn_drop.p == 0.3 for block in model.blocks)
    dropout_draws_alike(model, _mask(model, seed=4), _images())


def test_swinv2s_attention_dropout_carries_over_and_draws_alike_in_both_modes():
    """timm's Swin v2 window attention drops its cosine attention's weights (in the fused kernel), alike in compact
    and masked steps of the same seed."""
    model = maskprop.make_prunable(_swinv2(attn_drop_rate=0.3), SIZE).train()
    assert all(block.attn.attn_drop.p == 0.3 for stage in model.layers for block in stage.blocks)
    dropout_draws_alike(model, _mask(model, seed=4), _images())


@pytest.mark.parametrize("build", [_beit, _swinv2, _tv_swinv2], ids=["beit", "timm_swinv2", "torchvision_swinv2"])
def test_heads_kept_whole_add_their_whole_bias_in_compact_mode(build):
    """A block whose heads keep every feature while the rest of the model is pruned (compact execution without an
    index for its group) adds all of its biases, as masked execution does."""
    model = maskprop.make_prunable(build(), SIZE)
    mask = _mask(model, seed=3)
    for name in [g for g in mask if g.endswith("attn")][:2]:
        mask[name] = torch.ones_like(mask[name])
    compact_equals_masked(model, mask, _images())


class BeitAttentionTwice(beit.Attention):
    """A subclass of timm's module computing something else: traced through, never converted."""

    def forward(self, x, shared_rel_pos_bias=None):
        return 2 * super().forward(x, shared_rel_pos_bias)


def _nonzero_key_bias(model):
    model.blocks[0].attn.k_bias.fill_(0.5)


def _subclass(model):
    old = model.blocks[0].attn
    new = BeitAttentionTwice(WIDTH, HEADS, qkv_bias=True, window_size=old.window_size).double()
    new.load_state_dict(old.state_dict())
    model.blocks[0].attn = new


@pytest.mark.parametrize("change", [_subclass, _nonzero_key_bias], ids=["subclass", "nonzero_k_bias"])
def test_beit_attention_in_another_form_keeps_its_heads_whole(change):
    """A subclass of timm's BEiT attention, or one whose k_bias is not zero (its constructor zeroes it; a module that
    adds another key bias computes something else): left as it is, its heads whole, the model computing what it
    did; the other block converts."""
    model = _beit().eval()
    change(model)
    x = _images()
    with torch.no_grad():
        before = model(x)
    maskprop.make_prunable(model, SIZE)
    assert not isinstance(model.blocks[0].attn, SparseAttention)
    assert isinstance(model.blocks[1].attn, SparseBeitAttention)
    assert "blocks.0.attn" not in maskprop.channel_groups(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)


def test_beits_set_window_size_keeps_the_grid_and_refuses_another():
    model = maskprop.make_prunable(_beit(), SIZE)
    attn = model.blocks[0].attn
    attn.set_window_size((4, 4))
    with pytest.raises(ValueError, match=r"^window_size \(8, 8\): a BEiT attention made prunable keeps the grid "
                                         r"\(4, 4\)"):
        attn.set_window_size(8)


def test_sparse_beit_attention_refuses_biases_of_another_width():
    qkv, proj = torch.nn.Linear(WIDTH, 3 * WIDTH, bias=False), torch.nn.Linear(WIDTH, WIDTH)
    bias = torch.nn.Parameter(torch.zeros(WIDTH))
    SparseBeitAttention(qkv, proj, HEADS, 8, q_bias=bias, v_bias=bias)
    with pytest.raises(ValueError, match=r"q_bias and v_bias have shapes \(24,\) and None; expected both None or both "
                                         r"\(24,\)"):
        SparseBeitAttention(qkv, proj, HEADS, 8, q_bias=bias, v_bias=None)
    with pytest.raises(ValueError, match=r"^qkv has a bias of its own"):
        SparseBeitAttention(torch.nn.Linear(WIDTH, 3 * WIDTH), proj, HEADS, 8, q_bias=bias, v_bias=bias)


# --- Swin Transformer v2: timm's WindowAttention and torchvision's ShiftedWindowAttentionV2 ----------------------


def test_timms_swinv2_window_attention_becomes_maskprops_computing_the_same():
    """timm's Swin v2 converted: the same state dict (its order too) and parameters, each block's heads' features a
    group, the same outputs in train and eval mode, cosine attention (a head's logit scale past its clamp too),
    continuous position bias and shifted windows' mask included."""
    plain = _swinv2()
    with torch.no_grad():  # one head's scale past the clamp at 100
        plain.layers[0].blocks[1].attn.logit_scale[0] = 5.0
    converted = _same_model(copy.deepcopy(plain))
    assert list(converted.state_dict()) == list(plain.state_dict())
    attention = [block.attn for stage in converted.layers for block in stage.blocks]
    assert [type(a) for a in attention] == [SparseWindowAttentionV2] * 4
    assert {g: n for g, n in maskprop.channel_groups(converted).items() if g.endswith("attn")} == {
        "layers.0.blocks.0.attn": 8, "layers.0.blocks.1.attn": 8, "layers.1.blocks.0.attn": 8,
        "layers.1.blocks.1.attn": 8}
    assert plain.layers[0].blocks[1].attn_mask is not None
    x = _images()
    _assert_same_in_both_modes(converted, plain, x)


def test_a_swinv2_subnetwork_is_timms_attention_with_the_dropped_features_zeroed():
    """Compact execution of a shifted block's cosine attention (each head's query and key normalised over its kept
    features) equals timm's own module with the dropped features zeroed (normalised over all its features, the
    dropped ones zero); compact and masked execution agree, gradients included."""
    model = maskprop.make_prunable(_swinv2(), SIZE)
    plain = _swinv2().layers[0].blocks[1].attn
    mask = _mask(model, seed=5)
    block, name = model.layers[0].blocks[1], "layers.0.blocks.1.attn"
    kept = mask[name]
    assert 0 < int(kept.sum()) < 8
    x = torch.randn(2 * block.attn_mask.shape[0], 16, 16, dtype=torch.float64)
    with torch.no_grad():
        with maskprop.use_mask(model, mask):
            compact = block.attn(x, mask=block.attn_mask)
        expected = _zeroed(plain, ~kept, 2)(x, mask=block.attn_mask)
    torch.testing.assert_close(compact, expected, rtol=1e-12, atol=1e-12)
    grads = compact_equals_masked(model, mask, _images())
    assert grads[f"{name}.q_bias"][(~kept).repeat(2)].abs().max() == 0
    assert grads[f"{name}.logit_scale"].abs().min() > 0 and grads[f"{name}.cpb_mlp.0.weight"].abs().max() > 0


def test_check_model_takes_timms_swinv2():
    maskprop.check_model(maskprop.make_prunable(_swinv2(), SIZE), SIZE)


def test_timms_swinv2_exports_and_loads_by_name(tmp_path):
    """timm's swinv2 at a small size exports its subnetwork and loads it again by name (its coordinates table and
    index, which no state dict holds, built by the model's constructor), computing what compact execution did."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in SWIN.items() if k != "num_classes"}
    spec = maskprop.ModelSpec.resolve("timm:swinv2_tiny_window8_256", kwargs, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    model = _perturbed(spec.build()).eval()
    mask = _mask(model, seed=6)
    maskprop.save_exported(model, mask, tmp_path / "swinv2", spec=spec, formats="safetensors")
    narrow = maskprop.load_exported(tmp_path / "swinv2")
    attn = narrow.layers[0].blocks[1].attn
    kept = int(mask["layers.0.blocks.1.attn"].sum())
    assert type(attn) is SparseWindowAttentionV2 and attn.q_bias.shape == (2 * kept,)
    assert attn.qkv.out_features == 6 * kept
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", [16, 20], ids=["whole_windows", "padded"])
def test_torchvisions_swinv2_attention_becomes_maskprops_computing_the_same(side):
    """torchvision's Swin v2 converted: the same state dict (the saved coordinates table and index too) and
    parameters, the same outputs in train and eval mode, on maps of whole windows and on maps padded to them."""
    plain = _tv_swinv2()
    with torch.no_grad():  # one head's scale past the clamp at 100
        plain.features[1][1].attn.logit_scale[0] = 5.0
    converted = _same_model(copy.deepcopy(plain), (3, side, side))
    assert list(converted.state_dict()) == list(plain.state_dict())
    attention = [block.attn for stage in (converted.features[1], converted.features[3]) for block in stage]
    assert [type(a) for a in attention] == [SparseShiftedWindowAttentionV2] * 4
    assert {g: n for g, n in maskprop.channel_groups(converted).items() if g.endswith("attn")} == {
        "features.1.0.attn": 8, "features.1.1.attn": 8, "features.3.0.attn": 8, "features.3.1.attn": 8}
    x = _images(size=(3, side, side))
    _assert_same_in_both_modes(converted, plain, x)


def test_a_torchvision_swinv2_subnetwork_is_torchvisions_attention_with_the_dropped_features_zeroed():
    """Compact execution of a shifted block's attention equals torchvision's own module with the dropped features
    zeroed (its qkv bias's key part, which torchvision ignores, left out in both); compact and masked execution
    agree, gradients included, and the key part of qkv's bias gets none."""
    model = maskprop.make_prunable(_tv_swinv2(), SIZE)
    plain = _tv_swinv2().features[1][1].attn
    mask = _mask(model, seed=7)
    name = "features.1.1.attn"
    kept = mask[name]
    assert 0 < int(kept.sum()) < 8
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64)
    with torch.no_grad():
        with maskprop.use_mask(model, mask):
            compact = model.features[1][1].attn(x)
        torch.testing.assert_close(compact, _zeroed(plain, ~kept, 2)(x), rtol=1e-12, atol=1e-12)
    grads = compact_equals_masked(model, mask, _images())
    assert grads[f"{name}.qkv.bias"][16:32].abs().max() == 0 and grads[f"{name}.qkv.bias"][:16].abs().max() > 0


def test_check_model_takes_torchvisions_swinv2():
    maskprop.check_model(maskprop.make_prunable(_tv_swinv2(), (3, 20, 20)), (3, 20, 20))


class WindowAttentionV2Twice(swinv2.WindowAttention):
    """A subclass of timm's module computing something else: traced through, never converted."""

    def forward(self, x, mask=None):
        return 2 * super().forward(x, mask)


class ShiftedWindowAttentionV2Twice(tv_swin.ShiftedWindowAttentionV2):
    """A subclass of torchvision's module computing something else: traced through, never converted."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_swinv2_attention_of_another_class_keeps_its_heads_whole(library):
    """A subclass of either library's v2 attention stays as it is: no heads' group for its block, the same outputs;
    the other blocks convert."""
    if library == "timm":
        model, path = _swinv2().eval(), "layers.0.blocks.0.attn"
        old = model.layers[0].blocks[0].attn
        new = WindowAttentionV2Twice(16, (4, 4), 2).double()
    else:
        model, path = _tv_swinv2().eval(), "features.1.0.attn"
        old = model.features[1][0].attn
        new = ShiftedWindowAttentionV2Twice(16, old.window_size, old.shift_size, 2).double()
    new.load_state_dict(old.state_dict())
    model.get_submodule(path.rpartition(".")[0]).attn = new.eval()
    x = _images()
    with torch.no_grad():
        before = model(x)
    maskprop.make_prunable(model, SIZE)
    assert sum(isinstance(m, SparseAttention) for m in model.modules()) == 3
    assert path not in maskprop.channel_groups(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align", [1, 3])
@pytest.mark.parametrize("build", [_beit, _swinv2], ids=["beit", "timm_swinv2"])
def test_narrow_training_gathers_and_writes_back_q_bias_and_v_bias(build, align):
    """The finetune phase's narrow model (``NarrowSubnetwork``) holds an attention's q_bias and v_bias of the kept
    features (and zero padding with ``align``), gathers their momentum and writes both back: steps of it equal compact
    steps of the full model on every kept entry."""
    from maskprop.train.narrow import NarrowSubnetwork
    from maskprop.train.optim import weight_optimizer
    from maskprop.train.steps import StepContext, subnet_step

    model = maskprop.make_prunable(build(), SIZE).train()
    mask = _mask(model, seed=1)
    ctx = StepContext(torch.nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, SIZE))
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(2, *SIZE, dtype=torch.float64, generator=generator),
                torch.randint(0, 5, (2,), generator=generator)) for _ in range(3)]
    optimizer = weight_optimizer(model.parameters(), 0.05, 0.9, 5e-4)
    subnet_step(model, optimizer, batches[0], mask, ctx)  # momentum to gather
    model2 = copy.deepcopy(model)
    optimizer2 = weight_optimizer(model2.parameters(), 0.05, 0.9, 5e-4)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for batch in batches[1:]:
        subnet_step(model, optimizer, batch, mask, ctx)
    narrow = NarrowSubnetwork(model2, mask, optimizer2, align=align)
    for batch in batches[1:]:
        narrow.step(batch, ctx)
    narrow.write_back()
    names = [n for n, _ in model.named_parameters() if n.endswith(("q_bias", "v_bias"))]
    assert names
    for name in names:
        group = name.rsplit(".", 1)[0]
        kept = mask[group].repeat(len(model.get_parameter(name)) // len(mask[group]))
        for a, b in ((model.get_parameter(name), model2.get_parameter(name)),
                     (optimizer.state[model.get_parameter(name)]["momentum_buffer"],
                      optimizer2.state[model2.get_parameter(name)]["momentum_buffer"])):
            torch.testing.assert_close(b[kept], a[kept], rtol=1e-10, atol=1e-12)
