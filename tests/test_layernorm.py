"""LayerNorm over a group's channels (``SparseLayerNorm``): a subnetwork normalises its kept channels alone.

Each check against an independent computation: ``F.layer_norm`` of the kept channels gathered by hand (and its
autograd), timm's own modules, the masked reference, the narrow model ``materialize`` builds."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import compact_equals_masked, load_tool
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import maskprop
from maskprop.sparse import SparseLastDimNorm, SparseLayerNorm, SparseLinear, SparseRMSNorm
from maskprop.sparse.execution import ExecutionState
from maskprop.sparse.layernorm import kept_layer_norm
from maskprop.sparse.static import StaticExecutionState, StaticLayout, mask_capacities, use_static

HIDDEN = 9
EPS = 1e-5


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every LayerNorm's weight and bias drawn away from 1 and 0, so that a wrong or missing entry shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype) + 0.5)
    return model


class Tokens(nn.Module):
    """``fc1`` writes the hidden group, ``norm`` normalises it over the last dimension, ``fc2`` reads it."""

    def __init__(self, affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = SparseLinear(6, HIDDEN, out_group="hidden", mask_output=True)
        self.norm = SparseLayerNorm(HIDDEN, eps=EPS, elementwise_affine=affine, bias=bias, group="hidden")
        self.fc2 = SparseLinear(HIDDEN, 4, in_group="hidden")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


def _tokens(affine: bool = True, bias: bool = True) -> Tokens:
    torch.manual_seed(0)
    return _perturbed(Tokens(affine, bias).double())


def _keeping(kept: list[int]) -> dict[str, torch.Tensor]:
    mask = torch.zeros(HIDDEN, dtype=torch.bool)
    mask[kept] = True
    return {"hidden": mask}


def _by_hand(model: Tokens, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The narrow network written out: ``fc1``'s kept rows, ``F.layer_norm`` over the kept channels with their weight
    and bias entries, ``fc2``'s kept columns."""
    index = torch.tensor(kept)
    hidden = x @ model.fc1.weight[index].T + model.fc1.bias[index]
    norm = model.norm
    weight = None if norm.weight is None else norm.weight[index]
    bias = None if norm.bias is None else norm.bias[index]
    normed = F.layer_norm(hidden, (len(kept),), weight, bias, EPS)
    return normed @ model.fc2.weight[:, index].T + model.fc2.bias


KEPT = {"one": [4], "odd": [0, 2, 3, 7, 8], "even": [1, 5], "all": list(range(HIDDEN))}


def subnetworks_compute_the_narrow_network(model: nn.Module, by_hand, kept: list[int]) -> None:
    """Compact and masked execution of ``model`` (:func:`_tokens`' form) keeping ``kept`` of its ``hidden`` group give
    ``by_hand(model, x, kept)`` (the narrow network written out) and its gradients of the input and every parameter;
    a dropped channel's entries of the norm's weight and bias get none."""
    mask = _keeping(kept)
    x = torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in modes_match_by_hand(model, mask, x, target, lambda reference, t: by_hand(reference, t, kept)):
        dropped = ~mask["hidden"]
        for p in (model.norm.weight, model.norm.bias):
            if p is not None:
                assert p.grad[dropped].abs().sum() == 0


def modes_match_by_hand(model: nn.Module, mask: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                        by_hand) -> Iterator[str]:
    """Compact and masked execution of ``model`` under ``mask`` give ``by_hand(reference, x)`` (on a copy of the
    model: the narrow network written out) and its gradients of ``(output * target).sum()`` with respect to the input
    and every parameter. Yields each mode after its checks, the model holding that mode's gradients."""
    reference = copy.deepcopy(model)
    x_ref = x.clone().requires_grad_(True)
    expected = by_hand(reference, x_ref)
    (expected * target).sum().backward()
    for mode in ("compact", "masked"):
        model.zero_grad()
        x_mode = x.clone().requires_grad_(True)
        with maskprop.use_mask(model, mask, mode):
            y = model(x_mode)
        torch.testing.assert_close(y, expected.detach(), rtol=1e-12, atol=1e-12, msg=mode)
        (y * target).sum().backward()
        torch.testing.assert_close(x_mode.grad, x_ref.grad, rtol=1e-10, atol=1e-12, msg=mode)
        for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=f"{mode}: {name}")
        yield mode


@pytest.mark.parametrize("kept", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_a_subnetworks_layernorm_is_layer_norm_of_its_kept_channels(kept, affine, bias):
    """Compact and masked execution both compute ``F.layer_norm`` of the kept channels alone (their mean and
    variance, the kept entries of the weight and bias), and their gradients of the input, the weights and the biases
    are that computation's; a dropped channel's LayerNorm entries get none."""
    subnetworks_compute_the_narrow_network(_tokens(affine, bias), _by_hand, kept)


def test_the_masked_layernorm_reads_no_dropped_input_and_writes_zeros_there():
    """``kept_layer_norm`` against ``F.layer_norm`` of the kept channels: whatever the dropped channels hold (large
    values, not zeros), they change nothing, outputs there are exactly zero, and no gradient reaches them."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 10, dtype=torch.float64, generator=generator)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float64)
    kept = keep.bool()
    x[..., ~kept] = 1e3
    x.requires_grad_(True)
    weight, bias = torch.rand(10, dtype=torch.float64, generator=generator) + 0.5, torch.randn(10, dtype=torch.float64)
    y = kept_layer_norm(x, keep, weight, bias, EPS)
    expected = F.layer_norm(x.detach()[..., kept], (int(kept.sum()),), weight[kept], bias[kept], EPS)
    torch.testing.assert_close(y[..., kept], expected, rtol=1e-12, atol=1e-12)
    assert y[..., ~kept].abs().max() == 0
    y.square().sum().backward()
    assert x.grad[..., ~kept].abs().max() == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_takes_float32_statistics_as_layer_norm_does(autocast):
    """In bfloat16 the statistics are float32 ones: the result is ``F.layer_norm``'s of the kept channels to bfloat16's
    rounding, in its dtype (bfloat16, under the CPU's autocast too)."""
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 5, 12, generator=generator) * 4 + 100).bfloat16()  # a large mean: bfloat16 sums would drift
    keep = (torch.arange(12) % 3 != 0).bfloat16()
    kept = keep.bool()
    weight, bias = torch.rand(12, generator=generator).bfloat16() + 0.5, torch.randn(12, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = kept_layer_norm(x, keep, weight, bias, EPS)
        expected = F.layer_norm(x[..., kept], (int(kept.sum()),), weight[kept], bias[kept], EPS)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y[..., kept].float(), expected.float(), rtol=2e-2, atol=2e-2)
    assert y[..., ~kept].abs().max() == 0


def test_no_mask_is_nn_layernorm_itself():
    """Without a mask (and with one keeping every channel), the layer is ``nn.LayerNorm`` exactly."""
    model = _tokens()
    plain = nn.LayerNorm(HIDDEN, eps=EPS).double()
    plain.load_state_dict(model.norm.state_dict())
    x = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    assert torch.equal(model.norm(x), plain(x))
    assert list(model.norm.state_dict()) == ["weight", "bias"]


def padded_channels_stay_out(model: nn.Module, align: int) -> None:
    """``model`` (:func:`_tokens`' form: a norm over a 9-channel group ``hidden``, or over ``num_groups`` copies of it
    side by side, a GroupNorm's) at widths padded to ``align`` (kept 5 or 1, computed 6 or 8 or 4): the loss and
    every gradient are the masked reference's, so the padding channels are in no statistic and their outputs are
    zero."""
    images = torch.randn(2, 3, 6, dtype=torch.float64)
    for kept in (KEPT["odd"], KEPT["one"]):
        mask = _keeping(kept)
        widths = []
        hook = model.norm.register_forward_hook(
            lambda m, i, o: widths.append(i[0].shape[m.channel_dim] // getattr(m, "num_groups", 1)))
        grads = {}
        for mode, a in (("compact", align), ("masked", 1)):
            model.zero_grad()
            with maskprop.use_mask(model, mask, mode, align=a):
                y = model(images)
            y.square().sum().backward()
            grads[mode] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        hook.remove()
        assert widths[0] == maskprop.sparse.aligned_width(len(kept), HIDDEN, align) > len(kept)
        torch.testing.assert_close(grads["compact"][0], grads["masked"][0], rtol=1e-12, atol=1e-12)
        for name, grad in grads["compact"][1].items():
            torch.testing.assert_close(grad, grads["masked"][1][name], rtol=1e-10, atol=1e-12, msg=name)


def static_step_equals_masked(model: nn.Module) -> None:
    """The static-shape step of ``model`` (:func:`_tokens`' form) at a capacity above the kept count (padding that is
    a dropped channel of the group, as a GPU run computes it) equals the masked reference, loss and gradients."""
    images = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = _keeping(KEPT["odd"])
    state = StaticExecutionState.create(model, {"hidden": 8}, align=1)
    state.update(mask)
    results = [_loss_and_grads(model, context, images)
               for context in (lambda: use_static(state), lambda: maskprop.use_mask(model, mask, "masked"))]
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("align", [2, 4])
def test_padded_channels_stay_out_of_the_statistics(align):
    """Padding channels are not in a LayerNorm's mean or variance (:func:`padded_channels_stay_out`)."""
    padded_channels_stay_out(_tokens(), align)


def test_the_static_step_normalises_its_kept_channels_alone():
    """A LayerNorm's static step: :func:`static_step_equals_masked`."""
    static_step_equals_masked(_tokens())


def test_the_narrow_model_holds_a_layernorm_of_the_kept_width():
    """``materialize`` gives an ``nn.LayerNorm`` of the kept channels holding their entries (``index_sets``: the kept
    rows of its weight and bias): it computes the masked reference, and the cost model counts its parameters."""
    model = _tokens()
    mask = _keeping(KEPT["odd"])
    narrow = maskprop.materialize(model, mask)
    assert type(narrow.norm) is nn.LayerNorm and tuple(narrow.norm.normalized_shape) == (5,)
    assert torch.equal(narrow.norm.weight, model.norm.weight[mask["hidden"]])
    sets = maskprop.surgery.index_sets(model, mask)  # what the finetune phase moves weights and optimizer state by
    assert sets["norm.bias"][0].tolist() == KEPT["odd"] and sets["norm.bias"][1] is None
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with maskprop.use_mask(model, mask, "masked"):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-12, atol=1e-12)
    params = sum(p.numel() for p in narrow.parameters())
    assert maskprop.CostModel(_Wrapped(model), (1, 6, 6)).params(mask) == params


class _Wrapped(nn.Module):
    """A model of three dimensions (:class:`Tokens`, or test_groupnorm's one-row maps) on an image's first channel (the
    cost model takes an image size)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, 0])


def test_refusals_are_one_line():
    """A LayerNorm over more than one dimension, an input of another width than the subnetwork computes, and a group
    no layer writes: each one line naming the layer or the group."""
    with pytest.raises(ValueError, match=r"cannot be channel-pruned") as err:
        SparseLayerNorm((3, 4), group="g")
    assert "\n" not in str(err.value)
    model = _tokens()
    with maskprop.use_mask(model, _keeping(KEPT["odd"])), pytest.raises(ValueError, match=r"'norm'.*5") as err:
        model.norm(torch.randn(2, 3, HIDDEN, dtype=torch.float64))
    assert "\n" not in str(err.value)
    model.norm.group = "elsewhere"
    with pytest.raises(ValueError, match=r"'norm' reads group 'elsewhere' that no layer writes") as err:
        maskprop.channel_groups(model)
    assert "\n" not in str(err.value)


# --- make_prunable on timm's networks ---------------------------------------------------------------------------------

timm = pytest.importorskip("timm")

SIZE = (3, 16, 16)
HEADS, HEAD_DIM, WIDTH = 3, 8, 24


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, embed_dim=WIDTH, depth=2, num_heads=HEADS, num_classes=5,
                   qkv_bias=True, qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True) | kwargs
    return _perturbed(timm.models.vision_transformer.VisionTransformer(**options))


def test_timms_normalised_attention_and_mlp_convert_computing_the_same():
    """A ViT with query-key normalisation, the attention's output normalised (``scale_attn_norm``, BEiT-3's) and the
    MLP's hidden units normalised (``scale_mlp_norm``): the same state-dict keys and outputs, its heads' features and
    MLP hidden units groups, each LayerNorm of the group it normalises."""
    plain = _vit().double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    attn, mlp = converted.blocks[0].attn, converted.blocks[0].mlp
    assert isinstance(attn, maskprop.sparse.SparseAttention)
    assert [(type(m), m.group) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)] == [
        (SparseLayerNorm, "blocks.0.attn"), (SparseLayerNorm, "blocks.0.attn"),
        (SparseLayerNorm, "blocks.0.attn.proj:input"), (SparseLayerNorm, "blocks.0.mlp.fc1")]
    assert maskprop.channel_groups(converted) == {"blocks.0.attn": HEAD_DIM, "blocks.0.mlp.fc1": 4 * WIDTH,
                                                  "blocks.1.attn": HEAD_DIM, "blocks.1.mlp.fc1": 4 * WIDTH}
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


def attention_by_hand(attn: nn.Module, x: torch.Tensor, kept: torch.Tensor, normalise) -> torch.Tensor:
    """timm's attention ``attn`` (``HEADS`` heads of ``HEAD_DIM`` features) on tokens ``x`` written out on the kept
    features ``kept`` of every head: ``normalise(t, norm, index)`` (the norm's function on the entries ``index`` of
    its parameters) on each head's kept query and key features, and on all heads' kept outputs before ``proj``."""
    batch, tokens, _ = x.shape
    qkv = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(batch, tokens, 3, HEADS, HEAD_DIM)[..., kept]
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q, k = normalise(q, attn.q_norm, kept), normalise(k, attn.k_norm, kept)
    heads = (torch.softmax(q @ k.transpose(-2, -1) / HEAD_DIM ** 0.5, dim=-1) @ v).transpose(1, 2).flatten(2)
    features = (torch.arange(HEADS)[:, None] * HEAD_DIM + kept).flatten()
    return normalise(heads, attn.norm, features) @ attn.proj.weight[:, features].T + attn.proj.bias


def compact_attention_is_by_hand(model: nn.Module, normalise) -> tuple[dict, dict]:
    """The first block's attention of ``model`` (:func:`_vit` made prunable, float64) under a random half mask equals
    :func:`attention_by_hand` with ``normalise``; the whole model's compact step equals its masked one, gradients
    included. Returns the mask and the gradients."""
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    attn = model.blocks[0].attn
    kept = mask["blocks.0.attn"].nonzero().flatten()
    assert 0 < len(kept) < HEAD_DIM
    x = torch.randn(2, 17, WIDTH, dtype=torch.float64)
    with maskprop.use_mask(model, mask):
        compact = attn(x)
    torch.testing.assert_close(compact, attention_by_hand(attn, x, kept, normalise), rtol=1e-12, atol=1e-12)
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return mask, compact_equals_masked(model, mask, images)


def test_a_subnetworks_attention_normalises_each_heads_kept_features():
    """Compact attention equals attention written out by hand on the kept head features with ``F.layer_norm`` of
    each head's kept query and key features, and of all heads' kept outputs before ``proj``; compact equals masked,
    gradients included."""
    model = maskprop.make_prunable(_vit(), SIZE).double()
    mask, grads = compact_attention_is_by_hand(
        model, lambda t, m, i: F.layer_norm(t, (len(i),), m.weight[i], m.bias[i], m.eps))
    assert grads["blocks.0.attn.q_norm.weight"][~mask["blocks.0.attn"]].abs().max() == 0
    assert grads["blocks.0.mlp.norm.bias"][~mask["blocks.0.mlp.fc1"]].abs().max() == 0


def test_check_model_and_export_take_a_vit_with_normalised_heads_and_mlp(tmp_path):
    """check_model's every check passes (compact, static, narrow, FLOPs); the exported narrow model normalises the kept
    features with ``nn.LayerNorm`` of their width and computes the subnetwork, in every file format."""
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": WIDTH, "depth": 2, "num_heads": HEADS, "qk_norm": True,
              "scale_attn_norm": True, "scale_mlp_norm": True}
    spec = maskprop.ModelSpec.resolve("timm:vit_tiny_patch16_224", kwargs, num_classes=5, input_size=SIZE)
    torch.manual_seed(0)
    model = _perturbed(spec.build()).eval()
    maskprop.check_model(model, SIZE)
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    formats = "safetensors,pt2,onnx" if importlib.util.find_spec("onnxscript") else "safetensors,pt2"
    info = maskprop.save_exported(model, mask, tmp_path / "vit", spec=spec, formats=formats)
    narrow = maskprop.load_exported(tmp_path / "vit")
    kept = int(mask["blocks.0.attn"].sum())
    attn = narrow.blocks[0].attn
    assert type(attn.q_norm) is nn.LayerNorm and tuple(attn.q_norm.normalized_shape) == (kept,)
    assert tuple(attn.norm.normalized_shape) == (HEADS * kept,)
    assert tuple(narrow.blocks[1].mlp.norm.normalized_shape) == (int(mask["blocks.1.mlp.fc1"].sum()),)
    assert info["params"] == sum(p.numel() for p in narrow.parameters())
    x = torch.randn(2, *SIZE)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def _eva(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(img_size=28, patch_size=14, embed_dim=WIDTH, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                   swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2)) | kwargs
    return _perturbed(timm.models.eva.Eva(**options))


def test_eva02s_normalised_swiglu_has_its_hidden_units_pruned():
    """EVA-02's MLP (``SwiGLU``: two linear layers whose outputs multiply, normalised before ``fc2``,
    ``scale_mlp=True``) has its hidden units pruned; its rotary attention (``EvaAttention``) keeps its heads whole.
    The model computes what it did, and check_model passes."""
    plain = _eva().double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), (3, 28, 28))
    assert list(converted.state_dict()) == list(plain.state_dict())
    assert maskprop.channel_groups(converted) == {"blocks.0.mlp": 2 * WIDTH, "blocks.1.mlp": 2 * WIDTH}
    assert converted.blocks[0].mlp.norm.group == "blocks.0.mlp"
    assert not any(isinstance(m, maskprop.sparse.SparseAttention) for m in converted.modules())
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(converted.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(converted, (3, 28, 28))


def test_eva02s_packed_glu_mlp_has_its_hidden_units_pruned():
    """Without ``scale_mlp`` EVA-02 (Tiny, Small) runs ``GluMlp``: one ``fc1`` whose output ``chunk`` halves, one half
    gating the other. ``fc1`` writes a concatenation of the hidden group twice (unit ``j`` of either half is one
    channel), so a subnetwork keeps as many of each half and its chunk splits at the kept count; ``fc2`` reads the
    group. The model computes what it did, and check_model passes."""
    plain = _eva(scale_mlp=False).double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), (3, 28, 28))
    assert list(converted.state_dict()) == list(plain.state_dict())
    assert maskprop.channel_groups(converted) == {"blocks.0.mlp": 2 * WIDTH, "blocks.1.mlp": 2 * WIDTH}
    assert maskprop.sparse.concatenations(converted)["blocks.0.mlp.fc1"] == (("blocks.0.mlp", 2 * WIDTH),) * 2
    mlp = converted.blocks[0].mlp
    assert (mlp.fc1.out_group, mlp.fc2.in_group) == ("blocks.0.mlp.fc1", "blocks.0.mlp")
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(converted.eval()(x), plain.eval()(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(converted, (3, 28, 28))


class GluTokens(nn.Module):
    """timm's ``GluMlp`` (normalised before ``fc2``) on a map's patches as tokens, pooled into a classifier."""

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.mlp = timm.layers.GluMlp(8, 12, act_layer=nn.SiLU, norm_layer=nn.LayerNorm if norm else None)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def test_a_normalised_glu_mlp_prunes_its_hidden_units_by_hand():
    """A subnetwork of a normalised ``GluMlp`` is the narrow one written out: ``fc1``'s rows of the kept units of
    each half, the first half times ``SiLU`` of the second, ``F.layer_norm`` over the kept units, ``fc2``'s kept
    columns."""
    torch.manual_seed(0)
    model = _perturbed(GluTokens()).double()
    maskprop.make_prunable(model, (3, 8, 8))
    assert maskprop.channel_groups(model)["mlp"] == 6 and model.mlp.norm.group == "mlp"
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    mask["mlp.fc2"][:] = True
    kept = mask["mlp"].nonzero().flatten()
    tokens = torch.randn(2, 16, 8, dtype=torch.float64)
    mlp = model.mlp
    with maskprop.use_mask(model, mask):
        compact = mlp(tokens)
    rows = torch.cat([kept, kept + 6])
    hidden = tokens @ mlp.fc1.weight[rows].T + mlp.fc1.bias[rows]
    gated = hidden[..., :len(kept)] * F.silu(hidden[..., len(kept):])  # timm's gate_last=True
    normed = F.layer_norm(gated, (len(kept),), mlp.norm.weight[kept], mlp.norm.bias[kept], mlp.norm.eps)
    torch.testing.assert_close(compact, normed @ mlp.fc2.weight[:, kept].T + mlp.fc2.bias, rtol=1e-12, atol=1e-12)
    compact_equals_masked(model, mask, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    maskprop.check_model(model, (3, 8, 8))


class ChunkApart(nn.Module):
    """``fc1``'s output chunked in two halves that two layers read apart: they could keep other counts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.fc1 = nn.Linear(8, 12)
        self.fa, self.fb = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(self.embed(x).flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        return (self.fa(a) + self.fb(torch.relu(b))).mean(1)


def test_a_chunks_halves_read_apart_stay_whole():
    """Halves that do not end as one group stay whole (a subnetwork could keep other counts of them, and the chunk
    would split at the wrong place), said in the one line of a model with nothing else to prune."""
    with pytest.raises(ValueError, match=r"'fc1:chunk0' \(6 channels\): a part of a chunk along the last dimension "
                                         r"whose parts are not one channel space") as err:
        maskprop.make_prunable(ChunkApart(), (3, 8, 8))
    assert "\n" not in str(err.value)


class VectorHead(nn.Module):
    """A pooled feature vector ``(N, C)`` through a hidden layer normalised by LayerNorm, and a LayerNorm over a
    feature map's width (not its channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.width_norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.width_norm(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.norm(self.fc1(y))))


def test_layernorm_of_a_vector_prunes_and_of_a_maps_width_stays_whole():
    """A LayerNorm of a vector's channels becomes the hidden group's; one over a feature map's last dimension (its
    width, not its channels) stays ``nn.LayerNorm`` and leaves the channels it reads whole."""
    torch.manual_seed(0)
    model = _perturbed(VectorHead()).double()
    plain = copy.deepcopy(model)
    maskprop.make_prunable(model, (3, 6, 6))
    assert maskprop.channel_groups(model) == {"fc1": 12}
    assert type(model.width_norm) is nn.LayerNorm and model.norm.group == "fc1"
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(model, (3, 6, 6))


def test_a_sparse_backward_conversion_leaves_no_layernorm_naming_a_group():
    """``maskprop.sbp.convert`` trains every channel: a converted ViT's LayerNorms (and its attention) name no group
    any more, so the model has none and runs."""
    from maskprop.sbp.convert import convert

    model = maskprop.make_prunable(_vit(depth=1), SIZE)
    assert maskprop.channel_groups(model)
    convert(model, ratio=0.5)
    assert maskprop.channel_groups(model) == {}
    assert [m.group for m in model.modules() if isinstance(m, SparseLayerNorm)] == [None] * 4
    assert model(torch.randn(2, *SIZE)).shape == (2, 5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_the_layernorm_benchmark_times_both_vits_on_the_same_groups(capsys, norm):
    """``tools/bench_layernorm.py``: a row per keep ratio with both models' dense and compact steps and their ratios
    (the two ViTs have the same groups, the tool asserts it); ``--norm rmsnorm`` builds the normed one with RMSNorms,
    whose pruned ones are maskprop's."""
    tool = load_tool("bench_layernorm")
    tool.main(["--image-size", "32", "--batch-size", "2", "--keep-ratios", "0.5", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--norm", norm])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.50 |")]
    assert len(rows) == 1 and rows[0].count("x (") == 4
    pruned = {type(m) for m in tool._model(32, True, norm).modules() if isinstance(m, SparseLastDimNorm) and m.group}
    assert pruned == {SparseLayerNorm if norm == "layernorm" else SparseRMSNorm}


# --- the gathers off the CPU: LayerNorm parameters in the packed weight gather ----------------------------------------

ALIGNMENT = 16  # bytes: what vectorised GPU kernels load at once


def _packed_state(model: nn.Module, mask: dict[str, torch.Tensor], path: str, align: int):
    """The state of ``mask`` on the path off the CPU (``concatenate``: every weight of one kernel area gathered with
    one ``index_select`` from their concatenation), eager (``prepare_mask``'s state) or static (capacities: the kept
    counts rounded up to ``align``); and its context."""
    if path == "eager":
        state = ExecutionState(mask, model, "compact", align=align, concatenate=True)
        assert state.concatenate
        return state, lambda: maskprop.use_mask(model, state)
    layout = StaticLayout(model, mask_capacities(mask, align), align=align, concatenate=True)
    state = StaticExecutionState(layout)
    state.update(mask)
    assert all(torch.equal(used, mask[g]) for g, used in state.mask_used_by_group().items())  # no overflow
    return state, lambda: use_static(state)


def _loss_and_grads(model: nn.Module, context, images: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    with context():
        loss = model(images).square().sum()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _odd_mask(groups: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each group keeps an odd number of channels (3, 5 or 7 of a head's 8 features, 61 or 13 of 96 MLP units)."""
    mask = {}
    for i, (name, size) in enumerate(groups.items()):
        kept = (3, 5, 7)[i % 3] if size <= 8 else (61, 13)[i % 2]
        m = torch.zeros(size, dtype=torch.bool)
        m[torch.randperm(size, generator=generator)[:kept]] = True
        mask[name] = m
    return mask


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("align", [1, 4])
def test_packed_gathers_of_a_normalised_vit_equal_the_masked_reference(path, align):
    """Off the CPU a ViT's LayerNorms (each head's query and key features, all heads' outputs before ``proj``: a
    concatenated group, the MLP's hidden units) take their weight and bias from the gather of all layers' weights;
    compact equals masked in float64, the loss and every gradient, with widths padded to ``align``."""
    model = maskprop.make_prunable(_vit(), SIZE).double()
    mask = _odd_mask(maskprop.channel_groups(model), torch.Generator().manual_seed(3))  # align=4 pads every group
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms, grads = packed_norms_equal_masked(model, mask, images, SparseLayerNorm, path, align, bias=True)
    assert len(norms) == 8 and all(m.group is not None for m in norms)
    dropped = ~mask["blocks.1.mlp.fc1"]  # a dropped channel's weight and bias get no gradient
    assert grads["blocks.1.mlp.norm.weight"][dropped].abs().max() == 0


def packed_norms_equal_masked(model: nn.Module, mask: dict[str, torch.Tensor], images: torch.Tensor, norm: type,
                              path: str, align: int, bias: bool) -> tuple[list[nn.Module], dict[str, torch.Tensor]]:
    """A step of ``model`` on the path off the CPU (:func:`_packed_state`): each of its ``norm`` layers takes its
    weight (and ``bias``, else none) from the one gather of all layers' weights, none of them its own parameter, one
    entry per computed channel; the loss and every gradient equal the masked reference's in float64. Returns the norms
    and the compact step's gradients."""
    state, context = _packed_state(model, mask, path, align)
    norms = [m for m in model.modules() if isinstance(m, norm)]
    with context():
        pairs = [state.weight_and_bias(m) for m in norms]
    for m, (w, b) in zip(norms, pairs):
        assert w is not m.weight and w.shape == (state.index(m.group).numel(),)
        assert (b is not m.bias and b.shape == w.shape) if bias else b is None
    compact = _loss_and_grads(model, context, images)
    masked = _loss_and_grads(model, lambda: maskprop.use_mask(model, mask, "masked"), images)
    assert compact[0] == pytest.approx(masked[0], rel=1e-12)
    assert compact[1].keys() == masked[1].keys()
    for name, grad in compact[1].items():
        torch.testing.assert_close(grad, masked[1][name], rtol=1e-10, atol=1e-12, msg=name)
    return norms, compact[1]


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("path", ["eager", "static"])
def test_packed_gathers_take_layernorms_without_bias_or_affine_parameters(affine, bias, path):
    """A LayerNorm without a bias gathers its weight alone, one without affine parameters nothing; both still equal
    the masked reference off the CPU, at a padded width."""
    model = _tokens(affine, bias)
    images = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = _keeping(KEPT["odd"])
    state, context = _packed_state(model, mask, path, 4)
    with context():
        weight, got_bias = state.weight_and_bias(model.norm)
    assert (weight is None) == (not affine) and (got_bias is None) == (not bias)
    compact = _loss_and_grads(model, context, images)
    masked = _loss_and_grads(model, lambda: maskprop.use_mask(model, mask, "masked"), images)
    assert compact[0] == pytest.approx(masked[0], rel=1e-12)
    for name, grad in compact[1].items():
        torch.testing.assert_close(grad, masked[1][name], rtol=1e-10, atol=1e-12, msg=name)


def gathered_norm_tensors_are_aligned(model: nn.Module, norm: type, path: str, dtype: torch.dtype,
                                      count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of ``model`` (made prunable, in ``dtype``) with odd kept widths (odd capacities on the static path):
    each of the ``count`` weights and biases of its ``norm`` layers, cut from the one gathered buffer of the area-1
    table, starts at a 16-byte boundary and is contiguous, as vectorised GPU kernels need; the step still computes the
    masked reference within ``dtype``'s rounding."""
    mask = _odd_mask(maskprop.channel_groups(model), torch.Generator().manual_seed(0))
    state, context = _packed_state(model, mask, path, 1)
    given = []
    own = state.weight_and_bias

    def recording(layer):
        pair = own(layer)
        if isinstance(layer, norm):
            given.extend(t for t in pair if t is not None)
        return pair

    monkeypatch.setattr(state, "weight_and_bias", recording)
    images = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(1)).to(dtype)
    with context():
        out = model(images)
    out.float().square().sum().backward()
    assert len(given) == count and any(t.numel() % 2 for t in given)
    bad = [f"{tuple(t.shape)} at {t.data_ptr() % ALIGNMENT} mod {ALIGNMENT}" for t in given
           if t.data_ptr() % ALIGNMENT or not t.is_contiguous()]
    assert not bad, bad
    with maskprop.use_mask(model, mask, "masked"):
        expected = model(images)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["eager", "static"])
def test_gathered_layernorm_parameters_start_at_aligned_addresses(path, dtype, monkeypatch):
    """Every LayerNorm's weight and bias (16 here) gathered aligned: :func:`gathered_norm_tensors_are_aligned`."""
    model = maskprop.make_prunable(_vit(), SIZE).to(dtype)
    gathered_norm_tensors_are_aligned(model, SparseLayerNorm, path, dtype, 16, monkeypatch)


class _GatherOps(TorchDispatchMode):
    """Counts the gathering and scattering operators reaching the kernels (index_select, gather, index_add, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(word in name for word in ("index", "gather", "scatter")):
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["eager", "static"])
def test_the_packed_forward_gathers_as_often_with_layernorms_as_without(path):
    """The ViT with eight pruned LayerNorms and the plain one (the same groups and linear layers) issue the same
    gathers and scatters in a compact forward and backward off the CPU: one ``index_select`` for all weights, biases
    and LayerNorm parameters, one ``index_copy_`` for their gradients (was one ``index_select`` and one ``index_add``
    per LayerNorm weight and bias)."""
    counts, norms = {}, {}
    for normed in (True, False):
        model = maskprop.make_prunable(_vit(qk_norm=normed, scale_attn_norm=normed, scale_mlp_norm=normed), SIZE)
        norms[normed] = sum(isinstance(m, SparseLayerNorm) for m in model.modules())
        mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
        _, context = _packed_state(model, mask, path, 4)
        images = torch.randn(2, *SIZE)
        with _GatherOps() as ops:
            with context():
                loss = model(images).square().sum()
            loss.backward()
        counts[normed] = ops.counts
    assert norms == {True: 8, False: 0}
    assert counts[True] == counts[False]
    assert counts[True].get("index_select") == 1 and counts[True].get("index_copy_") == 1, counts[True]


def test_count_ops_builds_models_with_keywords_and_counts_no_gathers_per_layernorm(tmp_path, monkeypatch):
    """``tools/count_ops.py --model-kwargs``: the small ViT with and without its eight LayerNorms, counted on ``meta``
    (the CUDA code path): the compact step issues as many gathers and scatters either way."""
    tool = load_tool("count_ops")
    small = {"img_size": 16, "patch_size": 4, "embed_dim": WIDTH, "depth": 2, "num_heads": HEADS}
    counts, layer_norms = {}, {}
    for normed in (True, False):
        kwargs = small | {"qk_norm": normed, "scale_attn_norm": normed, "scale_mlp_norm": normed}
        out = tmp_path / f"{normed}.json"
        monkeypatch.setattr(sys, "argv", ["count_ops.py", "--models", "timm:vit_tiny_patch16_224", "--devices", "meta",
                                          "--image-size", "16", "--model-kwargs", json.dumps(kwargs), "--json",
                                          str(out)])
        tool.main()
        rows = {r["step"]: r for r in json.loads(out.read_text())}
        ops = rows["compact"]["compute_ops"]
        counts[normed] = {k: n for k, n in ops.items() if any(w in k for w in ("index", "gather", "scatter"))}
        layer_norms[normed] = ops["native_layer_norm"]
    # two forwards a step, eight more LayerNorms in each (q_norm and k_norm of 3 heads run as one call each)
    assert layer_norms[True] - layer_norms[False] == 16
    assert counts[True] == counts[False] and counts[True].get("index_add", 0) == 0
