"""Swin Transformer's window attention with its heads' features as a channel group: timm's ``WindowAttention`` made
prunable (``SparseWindowAttention``).

Each check against an independent computation: timm's own module (both of its attention paths), attention written out
by hand on the kept features with timm's relative position bias and shifted-window mask, the masked reference, and
check_model's float64 checks against torch's FLOP counter."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import attention_by_hand, compact_equals_masked, dropout_draws_alike

import maskprop
from maskprop.cost import CostModel
from maskprop.sparse import SparseAttention, SparseWindowAttention

timm = pytest.importorskip("timm")
swin = pytest.importorskip("timm.models.swin_transformer")

SIZE = (3, 16, 16)  # 8 x 8 tokens of 2 x 2 patches: four windows of 4 x 4 in the first stage, one in the second
WIDTH, WINDOW = 16, 4
HEADS = (2, 4)
KWARGS = dict(img_size=16, patch_size=2, window_size=WINDOW, embed_dim=WIDTH, depths=(2, 2), num_heads=HEADS,
              drop_path_rate=0.0)  # no stochastic depth: a training forward draws nothing


def _swin(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return swin.SwinTransformer(**(KWARGS | {"num_classes": 5} | kwargs))


@pytest.fixture
def swin64():
    return maskprop.make_prunable(_swin(), SIZE).double()


def _mask(model, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused", [False, True], ids=["timm_math", "timm_fused"])
def test_timms_window_attention_becomes_maskprops_computing_the_same(fused):
    """The converted model computes what timm's did through either of timm's attention paths, in train and eval
    mode, with the same parameters and buffers under the same names; each block's heads' features are a group of
    head_dim channels, written by qkv once per head slice and read by proj once per head."""
    plain = _swin().double()
    for module in plain.modules():
        if isinstance(module, swin.WindowAttention):
            module.fused_attn = fused
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    assert dict(converted.named_buffers()).keys() == dict(plain.named_buffers()).keys()
    blocks = [block for stage in converted.layers for block in stage.blocks]
    assert [type(block.attn) for block in blocks] == [SparseWindowAttention] * 4
    attn = blocks[1].attn
    assert (attn.dim, tuple(attn.window_size), attn.window_area) == (WIDTH, (WINDOW, WINDOW), WINDOW * WINDOW)
    torch.testing.assert_close(attn.relative_position_bias_table,
                               plain.layers[0].blocks[1].attn.relative_position_bias_table, rtol=0, atol=0)
    groups = maskprop.channel_groups(converted)
    assert {g: n for g, n in groups.items() if g.endswith("attn")} == {
        "layers.0.blocks.0.attn": WIDTH // HEADS[0], "layers.0.blocks.1.attn": WIDTH // HEADS[0],
        "layers.1.blocks.0.attn": 2 * WIDTH // HEADS[1], "layers.1.blocks.1.attn": 2 * WIDTH // HEADS[1]}
    concatenated = maskprop.sparse.concatenations(converted)
    assert concatenated["layers.0.blocks.1.attn.qkv"] == (("layers.0.blocks.1.attn", 8),) * (3 * HEADS[0])
    assert concatenated["layers.0.blocks.1.attn.proj:input"] == (("layers.0.blocks.1.attn", 8),) * HEADS[0]
    assert plain.layers[0].blocks[1].attn_mask is not None  # the shifted block runs with the windows' mask
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


def test_a_subnetwork_runs_window_attention_on_its_kept_features_with_the_whole_bias(swin64):
    """Compact execution of a shifted block's attention equals attention written out by hand on the kept features,
    with timm's relative position bias of every head and the windows' mask added, and equals masked execution,
    gradients included (a dropped feature's rows learn nothing; the bias table learns in both modes alike)."""
    plain = _swin().double()
    mask = _mask(swin64)
    block, name = swin64.layers[0].blocks[1], "layers.0.blocks.1.attn"
    attn = block.attn
    kept = mask[name].nonzero().flatten()
    assert 0 < len(kept) < attn.head_dim
    windows, tokens = block.attn_mask.shape[0], WINDOW * WINDOW
    x = torch.randn(2 * windows, tokens, WIDTH, dtype=torch.float64)
    bias = plain.layers[0].blocks[1].attn._get_rel_pos_bias()  # timm's own: (1, heads, tokens, tokens)
    added = bias + block.attn_mask.repeat(2, 1, 1)[:, None]  # window w of each image reads mask w
    widths = []
    hook = attn.qkv.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    with maskprop.use_mask(swin64, mask):
        compact = attn(x, mask=block.attn_mask)
    hook.remove()
    assert widths == [3 * HEADS[0] * len(kept)]
    torch.testing.assert_close(compact, attention_by_hand(attn, x, kept, added)[0], rtol=1e-12, atol=1e-12)
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = compact_equals_masked(swin64, mask, images)
    qkv_grad = grads[f"{name}.qkv.weight"].reshape(3, HEADS[0], attn.head_dim, WIDTH)
    assert qkv_grad[:, :, ~mask[name]].abs().max() == 0
    assert grads[f"{name}.relative_position_bias_table"].abs().max() > 0


def test_check_model_and_export_take_a_swin_with_pruned_heads(swin64, tmp_path):
    """check_model's every check (compact, static with capacities, narrow, FLOPs against torch's counter) passes; the
    exported narrow model runs window attention at the kept head width with the full width's scale and the whole
    bias (the ONNX file checked by the export; the .pt2 by the run's test below), and computes what compact execution
    did."""
    maskprop.check_model(swin64, SIZE)
    spec = maskprop.ModelSpec.resolve("timm:swin_tiny_patch4_window7_224", KWARGS, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = _mask(model, seed=2)
    formats = "safetensors,onnx" if importlib.util.find_spec("onnxscript") else "safetensors"  # .pt2: the run's test
    info = maskprop.save_exported(model, mask, tmp_path / "swin", spec=spec, formats=formats)
    assert info["flops"] == CostModel(model, SIZE).flops(mask) < CostModel(model, SIZE).flops()
    torch.manual_seed(3)
    draws = torch.rand(4)
    torch.manual_seed(3)
    narrow = maskprop.load_exported(tmp_path / "swin")  # its buffers built from a full model, initialised aside
    assert torch.equal(torch.rand(4), draws)  # and torch's generator left as it was
    attn = narrow.layers[0].blocks[1].attn
    kept = int(mask["layers.0.blocks.1.attn"].sum())
    assert isinstance(attn, SparseWindowAttention) and attn.group is None and attn.scale == 8 ** -0.5
    assert attn.qkv.out_features == 3 * HEADS[0] * kept and type(attn.qkv) is torch.nn.Linear
    assert attn.relative_position_bias_table.shape == model.layers[0].blocks[1].attn.relative_position_bias_table.shape
    x = torch.randn(2, *SIZE)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


class WindowAttentionWithGate(swin.WindowAttention):
    """A subclass of timm's module, which may compute something else: traced through, never converted."""


def test_window_attention_in_another_form_keeps_its_heads_whole():
    """A subclass of timm's class (which may compute something else) is traced through: no SparseWindowAttention
    and no heads' group for its block, the same outputs; the other blocks convert."""
    model = _swin().eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = model(x)
    old = model.layers[0].blocks[0].attn
    sub = WindowAttentionWithGate(WIDTH, HEADS[0], window_size=WINDOW)
    sub.load_state_dict(old.state_dict())
    model.layers[0].blocks[0].attn = sub.eval()
    maskprop.make_prunable(model, SIZE)
    assert not isinstance(model.layers[0].blocks[0].attn, SparseAttention)
    assert isinstance(model.layers[0].blocks[1].attn, SparseWindowAttention)
    assert "layers.0.blocks.0.attn" not in maskprop.channel_groups(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def _without_attention_dropout(model):
    attn = model.layers[0].blocks[0].attn
    attn.fused_attn, attn.attn_drop = False, torch.nn.Identity()  # timm's math path runs without it


def _sharing_qkv(model):
    model.layers[0].blocks[1].attn.qkv = model.layers[0].blocks[0].attn.qkv


@pytest.mark.parametrize("change", [_without_attention_dropout, _sharing_qkv], ids=["no_attn_drop", "shared_qkv"])
def test_window_attention_in_a_form_maskprops_does_not_compute_is_traced_through(change):
    """timm's WindowAttention without a Dropout on its weights (which SparseWindowAttention reads), or whose qkv
    another block's attention runs too: left as it is, its heads whole, the model computing what it did, compact and
    masked execution alike."""
    model = _swin().double().eval()
    change(model)
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    maskprop.make_prunable(model, SIZE)
    assert not isinstance(model.layers[0].blocks[0].attn, SparseAttention)
    assert "layers.0.blocks.0.attn" not in maskprop.channel_groups(model)
    assert isinstance(model.layers[1].blocks[0].attn, SparseWindowAttention)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    compact_equals_masked(model, _mask(model, seed=6), x)


def test_timms_head_dim_other_than_the_width_over_the_heads():
    """timm's head_dim argument (12 features a head where the width over the heads is 8 and 4): the converted model
    computes what timm's did, at head_dim's scale, with groups of head_dim channels."""
    plain = _swin(head_dim=12).double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    attention = [block.attn for stage in converted.layers for block in stage.blocks]
    assert [(type(a), a.head_dim, a.scale) for a in attention] == [(SparseWindowAttention, 12, 12 ** -0.5)] * 4
    assert {g: n for g, n in maskprop.channel_groups(converted).items() if g.endswith("attn")} == {
        f"layers.{i}.blocks.{j}.attn": 12 for i in range(2) for j in range(2)}
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)
    compact_equals_masked(converted, _mask(converted, seed=7), x)


def test_sparse_window_attention_refuses_a_bias_of_other_heads_or_windows():
    qkv, proj = torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.Linear(WIDTH, WIDTH)
    table = torch.nn.Parameter(torch.zeros(49, 2))
    index = torch.zeros(16, 16, dtype=torch.long)
    SparseWindowAttention(qkv, proj, 2, 8, relative_position_bias_table=table, relative_position_index=index,
                          window_size=(4, 4))
    with pytest.raises(ValueError, match=r"expected \(rows, 4\) and \(16, 16\) for 4 heads and windows of \(4, 4\)"):
        SparseWindowAttention(qkv, proj, 4, 4, relative_position_bias_table=table, relative_position_index=index,
                              window_size=(4, 4))
    with pytest.raises(ValueError, match=r"relative_position_index \(16, 16\); expected \(rows, 2\) and \(9, 9\)"):
        SparseWindowAttention(qkv, proj, 2, 8, relative_position_bias_table=table, relative_position_index=index,
                              window_size=(3, 3))


def test_a_run_of_a_swin_exports_from_its_directory_and_its_result_with_the_buffers_no_state_dict_holds(tmp_path):
    """A run of timm's Swin (whose relative position index and shifted-window mask are non-persistent buffers, built
    on the meta device without values) exports from its run directory and from ``fit``'s result, and each narrow
    model loads and computes what the run's model does under its subnetwork."""
    from conftest import TINY_RUN, with_overrides

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in KWARGS.items()}
    config = with_overrides(TINY_RUN, **{"model.name": "timm:swin_tiny_patch4_window7_224", "model.kwargs": kwargs})
    result = maskprop.fit(config, out=tmp_path / "run", threads=1)
    assert result.mask is not None and "layers.0.blocks.1.attn" in result.mask
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(result.model.eval(), result.mask, "compact"):
        expected = result.model(x)
    maskprop.export_run(tmp_path / "run", tmp_path / "from_dir", formats=("safetensors", "pt2"))
    result.export(tmp_path / "from_result", formats=("safetensors",))
    for export in ("from_dir", "from_result"):
        narrow = maskprop.load_exported(tmp_path / export)
        assert narrow.layers[0].blocks[1].attn_mask.device.type == "cpu"
        with torch.no_grad():
            torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def test_the_buffers_no_state_dict_holds_come_from_a_model_of_the_spec():
    """build_unsaved_buffers gives a model built on meta, its state dict assigned, the non-persistent buffers (every
    block's relative position index, the shifted blocks' mask): the given model's own tensors, else those of a model
    it builds aside (torch's generator left as it was); one of another shape (a buffer of the narrow width) and a
    persistent one (the state dict's to hold) stay on meta."""
    spec = maskprop.ModelSpec.resolve("timm:swin_tiny_patch4_window7_224", KWARGS, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    source = spec.build()

    def loaded():
        model = spec.build("meta")
        model.load_state_dict(source.state_dict(), assign=True)
        return model

    unsaved = sorted(name for name, tensor in loaded().named_buffers() if tensor.is_meta)
    assert "layers.0.blocks.1.attn_mask" in unsaved and "layers.1.blocks.0.attn.relative_position_index" in unsaved
    model = loaded()
    spec.build_unsaved_buffers(model, source)
    assert all(model.get_buffer(name) is source.get_buffer(name) for name in unsaved)
    model = loaded()
    torch.manual_seed(1)
    draws = torch.rand(3)
    torch.manual_seed(1)
    spec.build_unsaved_buffers(model)
    assert torch.equal(torch.rand(3), draws)
    for name in unsaved:
        assert model.get_buffer(name) is not source.get_buffer(name)
        torch.testing.assert_close(model.get_buffer(name), source.get_buffer(name), rtol=0, atol=0)
    model = loaded()
    attn = model.layers[0].blocks[0].attn
    attn._buffers["relative_position_index"] = torch.empty(3, 3, dtype=torch.long, device="meta")
    source.layers[0].blocks[0].register_buffer("count", torch.ones(2))
    model.layers[0].blocks[0].register_buffer("count", torch.empty(2, device="meta"))
    spec.build_unsaved_buffers(model, source)
    assert attn.relative_position_index.is_meta and model.layers[0].blocks[0].count.is_meta
    assert not model.layers[0].blocks[1].attn.relative_position_index.is_meta


def test_buffers_built_aside_take_the_models_floating_point_type(tmp_path, monkeypatch):
    """A model whose state dict is float64 gets its unsaved floating-point buffers (the shifted windows' mask) in
    float64, as ``model.double()`` would have made them (the index stays int64), and its forward runs; a narrow model
    whose unsaved buffers cannot be built is refused with a line that says so, not one blaming the weights file."""
    spec = maskprop.ModelSpec.resolve("timm:swin_tiny_patch4_window7_224", KWARGS, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    source = spec.build().double().eval()
    model = spec.build("meta")
    model.load_state_dict(source.state_dict(), assign=True)
    spec.build_unsaved_buffers(model)
    assert model.layers[0].blocks[1].attn_mask.dtype == torch.float64
    assert model.layers[0].blocks[1].attn.relative_position_index.dtype == torch.int64
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)
    mask = _mask(source.float(), seed=5)
    maskprop.save_exported(source, mask, tmp_path / "swin", spec=spec, formats="safetensors")
    monkeypatch.setattr(maskprop.ModelSpec, "build_unsaved_buffers", lambda self, model, source=None: None)
    with pytest.raises(ValueError, match=r"plan.json.*: the narrow model's buffers layers\.0\.blocks\.0\.attn\."
                                         r"relative_position_index, .* are in no state dict"):
        maskprop.load_exported(tmp_path / "swin")


# --- torchvision's ShiftedWindowAttention ----------------------------------------------------------------------------

tv_swin = pytest.importorskip("torchvision.models.swin_transformer")


def _tv_swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return tv_swin.SwinTransformer(patch_size=[2, 2], embed_dim=WIDTH, depths=[2, 2], num_heads=list(HEADS),
                                   window_size=[WINDOW, WINDOW], num_classes=5, stochastic_depth_prob=0.0).double()


@pytest.mark.parametrize("side", [16, 20], ids=["whole_windows", "padded"])
def test_torchvisions_shifted_window_attention_becomes_maskprops_computing_the_same(side):
    """torchvision's Swin (v1) converted computes what it did, in train and eval mode, maps of whole windows and maps
    padded to them (20 x 20 images: 10 x 10 tokens in windows of 4), with the same state-dict keys (the saved index
    too); each block's heads' features are a group."""
    plain = _tv_swin()
    converted = maskprop.make_prunable(copy.deepcopy(plain), (3, side, side))
    assert list(converted.state_dict()) == list(plain.state_dict())
    attention = [block.attn for stage in (converted.features[1], converted.features[3]) for block in stage]
    assert [type(a) for a in attention] == [maskprop.sparse.SparseShiftedWindowAttention] * 4
    assert (attention[0].shift_size, attention[1].shift_size) == ([0, 0], [2, 2])
    assert {g: n for g, n in maskprop.channel_groups(converted).items() if g.endswith("attn")} == {
        "features.1.0.attn": 8, "features.1.1.attn": 8, "features.3.0.attn": 8, "features.3.1.attn": 8}
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shift", [[2, -2], [-1, -1], [3, -1], [1, 0]])
def test_torchvisions_shift_test_is_kept_for_shifts_that_cancel_or_are_negative(shift):
    """torchvision shifts (and masks) only where the shifts left sum to more than 0: [2, -2] and [-1, -1] attend in
    the windows as they are, [3, -1] and [1, 0] roll the map; the converted model follows it exactly."""
    plain = _tv_swin()
    for module in plain.modules():
        if type(module) is tv_swin.ShiftedWindowAttention and any(module.shift_size):
            module.shift_size = list(shift)
    converted = maskprop.make_prunable(copy.deepcopy(plain), (3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain.eval()(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("size", "window"), [((3, 20, 12), [4, 4]), ((3, 16, 16), [4, 2]), ((3, 12, 20), [2, 4])],
                         ids=["padded_rows", "window_4x2", "window_2x4_padded_columns"])
def test_torchvisions_attention_on_maps_and_windows_that_are_not_square(size, window):
    """Maps padded along one side only, windows of two sides: the converted model computes what torchvision's did,
    and its compact execution what its masked one does."""
    torch.manual_seed(0)
    plain = tv_swin.SwinTransformer(patch_size=[2, 2], embed_dim=WIDTH, depths=[2, 2], num_heads=list(HEADS),
                                    window_size=window, num_classes=5, stochastic_depth_prob=0.0).double().eval()
    converted = maskprop.make_prunable(copy.deepcopy(plain), size).eval()
    x = torch.randn(2, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)
    compact_equals_masked(converted, _mask(converted, seed=5), x)


class ShiftedWindowAttentionTwice(tv_swin.ShiftedWindowAttention):
    """A subclass of torchvision's module computing something else: traced through, never converted."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_torchvisions_attention_of_another_class_keeps_its_heads_whole():
    """A subclass of ShiftedWindowAttention stays as it is: no heads' group, the same outputs. (v2's attention, a
    subclass too, is converted to its own class: tests/test_biased_attention.py.)"""
    plain = _tv_swin().eval()
    old = plain.features[1][0].attn
    sub = ShiftedWindowAttentionTwice(WIDTH, old.window_size, old.shift_size, old.num_heads).double()
    sub.load_state_dict(old.state_dict())
    plain.features[1][0].attn = sub.eval()
    x = torch.randn(2, *SIZE, dtype=torch.float64)
    with torch.no_grad():
        before = plain(x)
    maskprop.make_prunable(plain, SIZE)
    assert sum(isinstance(m, SparseAttention) for m in plain.modules()) == 3
    assert "features.1.0.attn" not in maskprop.channel_groups(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before, rtol=1e-12, atol=1e-12)


def test_torchvisions_mask_between_regions_is_minus_100_not_minus_infinity():
    """With scores of hundreds (qkv scaled up), a token of another region still gets its weight exp(score - 100):
    the converted model adds torchvision's -100 where the shifted windows put regions side by side."""
    plain = _tv_swin()
    with torch.no_grad():
        for module in plain.modules():
            if type(module) is tv_swin.ShiftedWindowAttention:
                module.qkv.weight.mul_(100.0)
    converted = maskprop.make_prunable(copy.deepcopy(plain), (3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain.eval()(x), rtol=1e-9, atol=1e-9)


def _with_dropouts(library: str) -> torch.nn.Module:
    if library == "timm":
        return _swin(attn_drop_rate=0.3, proj_drop_rate=0.2).double()
    torch.manual_seed(0)
    return tv_swin.SwinTransformer(patch_size=[2, 2], embed_dim=WIDTH, depths=[2, 2], num_heads=list(HEADS),
                                   window_size=[WINDOW, WINDOW], num_classes=5, stochastic_depth_prob=0.0,
                                   attention_dropout=0.3, dropout=0.2).double()


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_the_dropouts_carry_over_and_draw_alike_in_both_modes(library):
    """The converted attention keeps the original's dropout on the attention weights and after proj; in training,
    compact and masked steps with the same seed drop the same attention weights (one draw per weight, whatever the
    head width), and another seed drops others. (Dropout on a pruned space, the MLP's hidden units or the residual
    stream after proj, draws per kept channel in compact execution: turned off for the comparison.)"""
    model = maskprop.make_prunable(_with_dropouts(library), SIZE).train()
    attention = [m for m in model.modules() if isinstance(m, SparseWindowAttention)]
    assert len(attention) == 4
    assert all((a.attn_drop.p, a.proj_drop.p) == (0.3, 0.2) for a in attention)
    if library == "torchvision":
        assert all((a.attention_dropout, a.dropout) == (0.3, 0.2) for a in attention)
    weights = {id(a.attn_drop) for a in attention}
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and id(module) not in weights:
            module.p = 0.0
    dropout_draws_alike(model, _mask(model, seed=3), torch.randn(2, *SIZE, dtype=torch.float64))


@pytest.mark.parametrize("side", [8, 10], ids=["whole_windows", "padded"])
def test_a_torchvision_swin_subnetwork_is_torchvisions_attention_with_the_dropped_features_zeroed(side):
    """Compact execution of a shifted block's attention equals torchvision's own function run with the dropped
    features' rows of qkv and columns of proj set to zero (what dropping them means), at the full width's scale; and
    the whole model's compact and masked execution agree, gradients included."""
    model = maskprop.make_prunable(_tv_swin(), (3, 2 * side, 2 * side))
    mask = _mask(model, seed=3)
    attn, name = model.features[1][1].attn, "features.1.1.attn"
    kept = mask[name]
    assert 0 < int(kept.sum()) < attn.head_dim
    x = torch.randn(2, side, side, WIDTH, dtype=torch.float64)
    with maskprop.use_mask(model, mask), torch.no_grad():
        compact = attn(x)
    rows = kept.repeat(3 * HEADS[0])  # qkv's outputs: (3, heads, head_dim)
    columns = kept.repeat(HEADS[0])  # proj's inputs: (heads, head_dim)
    with torch.no_grad():
        expected = tv_swin.shifted_window_attention(
            x, attn.qkv.weight * rows[:, None], attn.proj.weight * columns, attn._relative_position_bias(),
            attn.window_size, attn.num_heads, attn.shift_size, qkv_bias=attn.qkv.bias * rows,
            proj_bias=attn.proj.bias, training=False)
    torch.testing.assert_close(compact, expected, rtol=1e-12, atol=1e-12)
    images = torch.randn(2, 3, 2 * side, 2 * side, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = compact_equals_masked(model, mask, images)
    assert grads[f"{name}.qkv.weight"].reshape(3, HEADS[0], attn.head_dim, WIDTH)[:, :, ~kept].abs().max() == 0


def test_check_model_takes_torchvisions_swin():
    small = maskprop.make_prunable(_tv_swin(), (3, 20, 20))
    maskprop.check_model(small, (3, 20, 20))


@pytest.mark.slow  # 14 s: swin_t is traced five times (built, checked against its spec, exported, loaded)
def test_torchvisions_swin_t_exports_and_loads_by_name(tmp_path):
    """torchvision's swin_t exports its subnetwork and loads it again by name (its saved relative position index
    included), computing what compact execution did."""
    spec = maskprop.ModelSpec.resolve("torchvision:swin_t", {}, num_classes=5, input_size=(3, 32, 32))
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = _mask(model, seed=4)
    maskprop.save_exported(model, mask, tmp_path / "swin_t", spec=spec, formats="safetensors")
    narrow = maskprop.load_exported(tmp_path / "swin_t")
    attn = narrow.features[1][1].attn
    assert type(attn) is maskprop.sparse.SparseShiftedWindowAttention and attn.group is None
    assert attn.qkv.out_features == 3 * 3 * int(mask["features.1.1.attn"].sum())  # swin_t: 3 heads in stage 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def test_timms_set_input_size_keeps_the_window_and_refuses_another():
    """timm's ``set_input_size`` on a converted Swin: a new image size with the same window recomputes the shifted
    windows' mask and runs as timm's own model at that size does; another window is refused in one line."""
    plain, converted = _swin().eval(), maskprop.make_prunable(_swin(), SIZE).eval()
    for model in (plain, converted):
        model.set_input_size(img_size=(24, 24), window_size=WINDOW)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^window_size \(2, 2\): a window attention made prunable keeps its window "
                                         r"\(4, 4\)"):
        converted.set_input_size(img_size=(24, 24), window_size=2)
