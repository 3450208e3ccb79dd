"""timm's MaxViT and CoAtNet attention (``timm.models.maxxvit.AttentionCl`` on channels-last tokens, ``Attention2d`` on
maps) with its heads' features as a channel group (``SparseAttentionCl``, ``SparseAttention2d``).

Each check against an independent computation: timm's own module (with every feature kept, and with the dropped
features zeroed in its weights and bias: what dropping them means), timm's model, the masked reference in float64
(outputs and gradients), check_model's checks, and an exported narrow model loaded again. Every parameter is perturbed
first: timm initialises the linear biases to zero, which would hide them."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from conftest import compact_equals_masked, converted_keeps_whole, dropout_draws_alike

import maskprop
from maskprop.sparse import SparseAttention2d, SparseAttentionCl

maxxvit = pytest.importorskip("timm.models.maxxvit")
pos_embed_rel = pytest.importorskip("timm.layers.pos_embed_rel")
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: on a shared 2-core machine a second thread waits

SIZE = (3, 32, 32)  # stem: 16 x 16; stages of 8 x 8 and 4 x 4 maps, windows (and grids) of 2 x 2 tokens
WIDTHS, HEAD_DIM = (16, 32), 8  # 2 and 4 heads of 8 features
ATTENTION = "stages.{}.blocks.0.attn_{}.attn"
# (rel_pos_type, head_first): timm's own models (a bias table, or the MLP of RelPosMlp) and the TensorFlow ports'
# layout of qkv's outputs with their bias table
FORMS = [("bias", True), ("mlp", True), ("bias_tf", False)]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _maxvit(num_classes: int = 5, rel_pos_type: str = "bias", head_first: bool = True, blocks: str = "MM",
            nchw: bool = False) -> torch.nn.Module:
    """timm's MaxViT at small sizes (two stages of one block each; ``blocks="CT"``: a CoAtNet, an MBConv stage and a
    transformer stage; ``nchw``: MaxViT's attention on maps), its parameters moved off the zeros timm starts biases
    at."""
    torch.manual_seed(0)
    cfg = maxxvit.MaxxVitCfg(
        embed_dim=WIDTHS, depths=(1, 1), block_type=tuple(blocks), stem_width=(8, 16),
        conv_cfg=maxxvit.MaxxVitConvCfg(expand_output=False, act_layer="silu", attn_ratio=0.25),
        transformer_cfg=maxxvit.MaxxVitTransformerCfg(dim_head=HEAD_DIM, head_first=head_first, window_size=(2, 2),
                                                      rel_pos_type=rel_pos_type, rel_pos_dim=16, expand_first=False,
                                                      use_nchw_attn=nchw))
    return _perturbed(maxxvit.MaxxVit(cfg, img_size=SIZE[1:], num_classes=num_classes))


def _mask(model, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _names() -> list[str]:
    return [ATTENTION.format(s, kind) for s in range(2) for kind in ("block", "grid")]


@pytest.mark.parametrize(("rel_pos_type", "head_first"), FORMS)
def test_timms_maxvit_attention_becomes_maskprops_computing_the_same(rel_pos_type, head_first):
    """The converted model computes what timm's did (eval mode; in training the position MLP's dropout draws), holding
    the same parameter tensors under the same state-dict keys; each attention's heads' features are a group of
    dim_head channels, written by qkv once per head slice and read by proj once per head; timm's attribute names read
    as its own do."""
    plain = _maxvit(rel_pos_type=rel_pos_type, head_first=head_first).double()
    parameters = dict(plain.named_parameters())
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    same = maskprop.make_prunable(plain, SIZE)  # in place: the very tensors
    assert all(same.get_parameter(name) is tensor for name, tensor in parameters.items())
    plain = _maxvit(rel_pos_type=rel_pos_type, head_first=head_first).double()
    assert [type(converted.get_submodule(n)) for n in _names()] == [SparseAttentionCl] * 4
    groups = maskprop.channel_groups(converted)
    assert {g: n for g, n in groups.items() if g.endswith(".attn")} == dict.fromkeys(_names(), HEAD_DIM)
    name = ATTENTION.format(1, "grid")
    concatenated = maskprop.sparse.concatenations(converted)
    assert concatenated[f"{name}.qkv"] == ((name, HEAD_DIM),) * (3 * 4)
    assert concatenated[f"{name}.proj:input"] == ((name, HEAD_DIM),) * 4
    attn, theirs = converted.get_submodule(name), plain.get_submodule(name)
    assert (attn.num_heads, attn.dim_head, attn.head_first) == (4, HEAD_DIM, head_first)
    assert attn.scale == theirs.scale == HEAD_DIM ** -0.5
    assert type(attn.rel_pos) is type(theirs.rel_pos)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)
        if rel_pos_type != "mlp":
            torch.testing.assert_close(converted.train()(x), plain.train()(x), rtol=1e-12, atol=1e-12)


def _zeroed(module: torch.nn.Module, dropped: torch.Tensor) -> torch.nn.Module:
    """A copy of timm's attention with the dropped features' rows of ``qkv`` (weight and bias) and columns of
    ``proj`` set to zero: what dropping them means (``qkv``'s outputs are slices of dim_head in either layout)."""
    module = copy.deepcopy(module)
    rows, columns = dropped.repeat(3 * module.num_heads), dropped.repeat(module.num_heads)
    with torch.no_grad():
        module.qkv.weight[rows] = 0
        module.qkv.bias[rows] = 0
        module.proj.weight[:, columns] = 0
    return module


@pytest.mark.parametrize(("rel_pos_type", "head_first"), FORMS)
def test_a_maxvit_subnetwork_is_timms_attention_with_the_dropped_features_zeroed(rel_pos_type, head_first):
    """Compact execution of an attention computes qkv on the kept features alone and equals timm's module with the
    dropped features zeroed (with every feature kept: timm's module as it is; timm's fused and unfused paths); the
    whole model's compact and masked execution agree, gradients included (a dropped feature's rows learn nothing,
    the relative position module learns)."""
    plain = _maxvit(rel_pos_type=rel_pos_type, head_first=head_first).double().eval()
    model = maskprop.make_prunable(copy.deepcopy(plain), SIZE).eval()  # eval: the position MLP's dropout
    mask = _mask(model, seed=3)
    name = ATTENTION.format(1, "block")
    attn, theirs = model.get_submodule(name), plain.get_submodule(name)
    kept = mask[name]
    assert 0 < int(kept.sum()) < HEAD_DIM
    x = torch.randn(8, 2, 2, WIDTHS[1], dtype=torch.float64)  # 8 windows of 2 x 2 tokens
    widths = []
    hook = attn.qkv.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    with torch.no_grad():
        with maskprop.use_mask(model, mask):
            compact = attn(x)
        with maskprop.use_mask(model, maskprop.full_mask(maskprop.channel_groups(model))):
            whole = attn(x)
        for fused in (True, False):
            theirs.fused_attn = fused
            torch.testing.assert_close(compact, _zeroed(theirs, ~kept)(x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(whole, theirs(x), rtol=1e-12, atol=1e-12)
    hook.remove()
    assert widths[0] == 3 * attn.num_heads * int(kept.sum())
    grads = compact_equals_masked(model, mask, _images())
    qkv_grad = grads[f"{name}.qkv.weight"].reshape(3 * attn.num_heads, HEAD_DIM, WIDTHS[1])
    assert qkv_grad[:, ~kept].abs().max() == 0 < qkv_grad[:, kept].abs().max()
    assert all(grad.abs().max() > 0 for key, grad in grads.items() if key.startswith(f"{name}.rel_pos."))


def test_the_position_mlps_dropout_draws_alike_in_compact_and_masked_execution():
    """RelPosMlp drops its hidden units in training (timm's 0.125): whole inside the attention, it draws the same in
    both modes from the same seed."""
    model = maskprop.make_prunable(_maxvit(rel_pos_type="mlp").double(), SIZE).train()
    dropout_draws_alike(model, _mask(model, seed=5), _images())


@pytest.mark.parametrize(("rel_pos_type", "head_first"), [FORMS[1], FORMS[2]])
def test_check_model_takes_timms_maxvit(rel_pos_type, head_first):
    maskprop.check_model(maskprop.make_prunable(_maxvit(rel_pos_type=rel_pos_type, head_first=head_first), SIZE),
                         SIZE)


def test_check_model_takes_timms_test_maxvit():
    """timm's own smallest MaxViT (``test_maxvit``, random weights) at 64 x 64: every attention converted."""
    torch.manual_seed(0)
    model = maskprop.make_prunable(_perturbed(maxxvit.test_maxvit(num_classes=5, img_size=64)), (3, 64, 64))
    assert sum(type(m) is SparseAttentionCl for m in model.modules()) == 8
    maskprop.check_model(model, (3, 64, 64))


class _Wider(torch.nn.Module):
    """A conv stem, then timm's attention widening its tokens (``dim_out`` > ``dim``, ``expand_first``: the heads
    at the output's width), then a classifier."""

    def __init__(self, rel_pos: bool = True) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        rel_pos_cls = partial(pos_embed_rel.RelPosBias, window_size=(4, 4)) if rel_pos else None
        self.attn = maxxvit.AttentionCl(8, 16, dim_head=4, expand_first=True, rel_pos_cls=rel_pos_cls)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


def test_an_attention_wider_at_its_output_is_converted():
    """``dim_out`` wider than the tokens: 4 heads of the output's width, proj 16 -> 16, reading 8 features; the
    converted model computes what timm's did and passes check_model."""
    torch.manual_seed(0)
    plain = _perturbed(_Wider()).double()
    model = maskprop.make_prunable(copy.deepcopy(plain), (3, 8, 8))
    assert type(model.attn) is SparseAttentionCl and model.attn.num_heads == 4
    assert maskprop.channel_groups(model)["attn"] == 4
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(model, (3, 8, 8))


def test_without_rel_pos_the_shared_bias_is_added_as_timm_adds_it():
    torch.manual_seed(0)
    plain = _perturbed(_Wider(rel_pos=False)).double()
    model = maskprop.make_prunable(copy.deepcopy(plain), (3, 8, 8))
    assert model.attn.rel_pos is None
    x, shared = torch.randn(3, 16, 8, dtype=torch.float64), torch.randn(1, 4, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.attn(x, shared_rel_pos=shared), plain.attn(x, shared_rel_pos=shared),
                                   rtol=1e-12, atol=1e-12)


class AttentionClTwice(maxxvit.AttentionCl):
    def forward(self, x, shared_rel_pos=None):
        return super().forward(x) + super().forward(x)


def test_timms_attention_of_another_class_keeps_its_heads_whole():
    """A subclass of timm's attention may compute something else: it is traced through (its qkv viewed by heads,
    which reads its channels), its heads whole, and the model still computes what it did."""
    plain = _maxvit().double()
    name = ATTENTION.format(0, "block")
    old = plain.get_submodule(name)
    twice = AttentionClTwice(WIDTHS[0], dim_head=HEAD_DIM, rel_pos_cls=partial(pos_embed_rel.RelPosBias,
                                                                              window_size=(2, 2))).double()
    twice.load_state_dict(old.state_dict())
    plain.get_submodule(name.rpartition(".")[0]).attn = twice
    converted_keeps_whole(plain, name, AttentionClTwice, ATTENTION.format(0, "grid"), _images())


def test_exclude_takes_timms_qkv():
    """``exclude`` names qkv: that attention's heads stay whole."""
    name = ATTENTION.format(0, "block")
    model = maskprop.make_prunable(_maxvit(), SIZE, exclude=[f"{name}.qkv"])
    assert type(model.get_submodule(name)) is maxxvit.AttentionCl
    assert name not in maskprop.channel_groups(model)
    assert ATTENTION.format(0, "grid") in maskprop.channel_groups(model)


@pytest.fixture
def registered_maxvit():
    """A small timm MaxViT (position MLP) made prunable, registered (an export rebuilds it by name), removed after."""
    from maskprop.models import _registry

    def timm_maxvit_for_tests(num_classes: int = 5, prune_residual: bool = True) -> torch.nn.Module:
        return maskprop.make_prunable(_maxvit(num_classes, rel_pos_type="mlp"), SIZE, prune_residual=prune_residual)

    maskprop.register_model(timm_maxvit_for_tests)
    yield "timm_maxvit_for_tests"
    _registry._MODELS.pop("timm_maxvit_for_tests", None)


def test_an_exported_narrow_maxvit_loads_and_computes_what_compact_execution_did(registered_maxvit, tmp_path):
    """The exported subnetwork, loaded again by name, runs each attention at the kept head width with the full
    model's scale and whole position MLP, and computes what compact execution did."""
    spec = maskprop.ModelSpec.resolve(registered_maxvit, {}, num_classes=5, input_size=SIZE)
    model = spec.build().eval()
    mask = _mask(model, seed=4)
    maskprop.save_exported(model, mask, tmp_path / "maxvit", spec=spec, formats="safetensors")
    narrow = maskprop.load_exported(tmp_path / "maxvit")
    name = ATTENTION.format(1, "grid")
    attn, full = narrow.get_submodule(name), model.get_submodule(name)
    kept = int(mask[name].sum())
    assert type(attn) is SparseAttentionCl and attn.group is None
    assert type(attn.qkv) is torch.nn.Linear and attn.qkv.out_features == 3 * 4 * kept
    assert attn.proj.in_features == 4 * kept and attn.scale == full.scale == HEAD_DIM ** -0.5
    assert attn.rel_pos.mlp.fc1.out_features == 16
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow.eval()(x), expected, rtol=1e-5, atol=1e-5)


COAT_ATTENTION = "stages.1.blocks.0.attn"  # 16 -> 32 channels at stride 2: 2 heads of 8 (expand_first=False)


@pytest.mark.parametrize("rel_pos_type", ["bias", "mlp"])
def test_timms_coatnet_attention_becomes_maskprops_computing_the_same(rel_pos_type):
    """CoAtNet's transformer block attends among every position of a map (``Attention2d``, 1x1 convolutions): the
    converted model computes what timm's did, with the same tensors under the same keys; the heads' features are a
    group, qkv writing it once per head slice, proj reading it once per head."""
    plain = _maxvit(rel_pos_type=rel_pos_type, blocks="CT").double().eval()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE).eval()
    assert list(converted.state_dict()) == list(plain.state_dict())
    attn, theirs = converted.get_submodule(COAT_ATTENTION), plain.get_submodule(COAT_ATTENTION)
    assert type(attn) is SparseAttention2d and (attn.num_heads, attn.dim_head) == (2, HEAD_DIM)
    assert type(attn.qkv) is maskprop.sparse.SparseConv2d and attn.proj.out_channels == WIDTHS[1]
    assert maskprop.channel_groups(converted)[COAT_ATTENTION] == HEAD_DIM
    concatenated = maskprop.sparse.concatenations(converted)
    assert concatenated[f"{COAT_ATTENTION}.qkv"] == ((COAT_ATTENTION, HEAD_DIM),) * 6
    assert concatenated[f"{COAT_ATTENTION}.proj:input"] == ((COAT_ATTENTION, HEAD_DIM),) * 2
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)
    mask = _mask(converted, seed=3)
    kept = mask[COAT_ATTENTION]
    assert 0 < int(kept.sum()) < HEAD_DIM
    maps = torch.randn(2, WIDTHS[0], 4, 4, dtype=torch.float64)
    with torch.no_grad():
        with maskprop.use_mask(converted, mask):
            compact = attn(maps)
        for fused in (True, False):
            theirs.fused_attn = fused
            torch.testing.assert_close(compact, _zeroed(theirs, ~kept)(maps), rtol=1e-12, atol=1e-12)
    grads = compact_equals_masked(converted, mask, x)
    qkv_grad = grads[f"{COAT_ATTENTION}.qkv.weight"].reshape(6, HEAD_DIM, WIDTHS[0])
    assert qkv_grad[:, ~kept].abs().max() == 0 < qkv_grad[:, kept].abs().max()
    assert all(grad.abs().max() > 0 for key, grad in grads.items() if key.startswith(f"{COAT_ATTENTION}.rel_pos."))


@pytest.mark.parametrize(("blocks", "nchw", "rel_pos_type", "head_first"),
                         [("CT", False, "mlp", True), ("MM", True, "bias_tf", False)])
def test_check_model_takes_timms_attention_on_maps(blocks, nchw, rel_pos_type, head_first):
    """A CoAtNet, and a MaxViT attending on maps (``use_nchw_attn``: ``PartitionAttention2d``) in the TensorFlow
    ports' layout of qkv's outputs."""
    model = maskprop.make_prunable(_maxvit(rel_pos_type=rel_pos_type, head_first=head_first, blocks=blocks,
                                           nchw=nchw), SIZE)
    assert sum(type(m) is SparseAttention2d for m in model.modules()) == (1 if blocks == "CT" else 4)
    maskprop.check_model(model, SIZE)


def test_an_exported_narrow_coatnet_loads_and_computes_what_compact_execution_did(tmp_path):
    """materialize gives narrow 1x1 convolutions, the heads at the kept width with the full model's scale."""
    model = maskprop.make_prunable(_maxvit(blocks="CT"), SIZE).eval()
    mask = _mask(model, seed=4)
    narrow = maskprop.materialize(model, mask)
    attn = narrow.get_submodule(COAT_ATTENTION)
    kept = int(mask[COAT_ATTENTION].sum())
    assert type(attn) is SparseAttention2d and type(attn.qkv) is torch.nn.Conv2d
    assert attn.qkv.out_channels == 3 * 2 * kept and attn.head_width == kept and attn.scale == HEAD_DIM ** -0.5
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)
