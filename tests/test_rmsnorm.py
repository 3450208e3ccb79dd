"""RMSNorm over a group's channels (``SparseRMSNorm``): a subnetwork normalises its kept channels alone.

Each check against an independent computation: ``nn.RMSNorm`` of the kept width on the kept channels gathered by hand
(and its autograd), the root mean square written out in float64, timm's own modules, the masked reference, the narrow
model ``materialize`` builds. The machinery it shares with ``SparseLayerNorm`` (``SparseLastDimNorm``: the area-1
gather, the static layout, surgery) is exercised here through RMSNorm models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import compact_equals_masked
from test_layernorm import (
    HIDDEN,
    KEPT,
    _keeping,
    _loss_and_grads,
    _odd_mask,
    _packed_state,
    _Wrapped,
    compact_attention_is_by_hand,
    gathered_norm_tensors_are_aligned,
    packed_norms_equal_masked,
    padded_channels_stay_out,
    static_step_equals_masked,
    subnetworks_compute_the_narrow_network,
)
from torch import nn

import maskprop
from maskprop.sparse import SparseLastDimNorm, SparseLinear, SparseRMSNorm
from maskprop.sparse.layernorm import kept_rms_norm

timm = pytest.importorskip("timm")

EPS = 1e-5


def _is_rms(module: nn.Module) -> bool:
    return isinstance(module, (nn.RMSNorm, timm.layers.RmsNorm))


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every RMSNorm's weight drawn away from 1, so that a wrong or missing entry shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if _is_rms(module) and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
    return model


def _closed_form(x: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The kept channels of ``x`` over the root of the mean of their squares plus ``eps``, times their weight: float64,
    written out with no torch normalisation function."""
    x = x.double()[..., kept]
    y = x / (x.square().sum(-1, keepdim=True) / kept.numel() + eps).sqrt()
    return y if weight is None else y * weight.double()[kept]


# --- the kept-channel RMSNorm against independent float64 computations -------------------------------------------


@pytest.mark.parametrize("eps", [EPS, None])
@pytest.mark.parametrize("affine", [True, False])
def test_kept_rms_norm_is_the_narrow_rmsnorm_of_the_kept_channels(affine, eps):
    """``kept_rms_norm`` against ``nn.RMSNorm`` of the kept width on the kept channels and against the closed form:
    whatever the dropped channels hold (large values, not zeros) they change nothing, the outputs there are exactly
    zero and no gradient reaches them; ``eps=None`` is ``torch.finfo`` of the input's dtype, as in ``nn.RMSNorm``."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 11, dtype=torch.float64, generator=generator)
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    kept = keep.bool()
    x[..., ~kept] = 1e3
    x.requires_grad_(True)
    weight = torch.rand(11, dtype=torch.float64, generator=generator) + 0.5 if affine else None
    y = kept_rms_norm(x, keep, weight, eps)
    narrow = nn.RMSNorm(int(kept.sum()), eps=eps, elementwise_affine=affine).double()
    if affine:
        narrow.weight.data.copy_(weight[kept])
    torch.testing.assert_close(y[..., kept], narrow(x.detach()[..., kept]), rtol=1e-12, atol=1e-12)
    closed = _closed_form(x.detach(), kept.nonzero().flatten(), weight,
                          torch.finfo(torch.float64).eps if eps is None else eps)
    torch.testing.assert_close(y[..., kept], closed, rtol=1e-12, atol=1e-12)
    assert y[..., ~kept].abs().max() == 0
    y.square().sum().backward()
    assert x.grad[..., ~kept].abs().max() == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_takes_float32_statistics_as_rms_norm_does(autocast):
    """In bfloat16 the mean of the squares is a float32 one: the result is the float64 closed form to bfloat16's
    rounding of the output alone (a bfloat16 sum of squares of values near 100 is off by far more), in bfloat16 (under
    the CPU's autocast too), and ``F.rms_norm``'s of the kept channels to within one bfloat16 step."""
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 5, 48, generator=generator) * 4 + 100).bfloat16()
    keep = (torch.arange(48) % 3 != 0).bfloat16()
    kept = keep.bool()
    weight = (torch.rand(48, generator=generator) + 0.5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = kept_rms_norm(x, keep, weight, EPS)
        expected = F.rms_norm(x[..., kept], (int(kept.sum()),), weight[kept], EPS)
    assert y.dtype == expected.dtype == torch.bfloat16
    truth = _closed_form(x, kept.nonzero().flatten(), weight, EPS)
    # the float32 statistics are exact to ~1e-7: what is left is rounding the output to bfloat16 (8 bits)
    assert ((y[..., kept].double() - truth).abs() <= truth.abs() * 2.0 ** -8).all()
    torch.testing.assert_close(y[..., kept].float(), expected.float(), rtol=2 ** -7, atol=0)
    assert y[..., ~kept].abs().max() == 0


# --- a subnetwork's RMSNorm: compact, masked, padded, static and narrow -------------------------------------------


class Tokens(nn.Module):
    """``fc1`` writes the hidden group, ``norm`` takes its RMS over the last dimension, ``fc2`` reads it."""

    def __init__(self, affine: bool = True, eps: float | None = EPS) -> None:
        super().__init__()
        self.fc1 = SparseLinear(6, HIDDEN, out_group="hidden", mask_output=True)
        self.norm = SparseRMSNorm(HIDDEN, eps=eps, elementwise_affine=affine, group="hidden")
        self.fc2 = SparseLinear(HIDDEN, 4, in_group="hidden")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


def _tokens(affine: bool = True, eps: float | None = EPS) -> Tokens:
    torch.manual_seed(0)
    return _perturbed(Tokens(affine, eps).double())


def _by_hand(model: Tokens, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The narrow network written out: ``fc1``'s kept rows, ``nn.RMSNorm`` of the kept width holding the kept
    entries of the weight, ``fc2``'s kept columns."""
    index = torch.tensor(kept)
    hidden = x @ model.fc1.weight[index].T + model.fc1.bias[index]
    norm = nn.RMSNorm(len(kept), eps=model.norm.eps, elementwise_affine=model.norm.weight is not None).double()
    weight = {} if norm.weight is None else {"weight": model.norm.weight[index]}  # its gradient reaches the full one
    normed = torch.func.functional_call(norm, weight, (hidden,))
    return normed @ model.fc2.weight[:, index].T + model.fc2.bias


@pytest.mark.parametrize("kept", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("affine,eps", [(True, EPS), (True, None), (False, EPS)], ids=["affine", "eps-none", "plain"])
def test_a_subnetworks_rmsnorm_is_rms_norm_of_its_kept_channels(kept, affine, eps):
    """Compact and masked execution both compute ``nn.RMSNorm`` of the kept channels alone (the root mean square over
    the kept ones, the kept entries of the weight), and their gradients of the input and every parameter are that
    computation's; a dropped channel's weight entry gets none."""
    subnetworks_compute_the_narrow_network(_tokens(affine, eps), _by_hand, kept)


def test_no_mask_is_nn_rmsnorm_itself():
    """Without a mask (and with one keeping every channel), the layer is ``nn.RMSNorm`` exactly, with its state-dict
    keys; its ``bias`` is ``None`` (as a LayerNorm's without one), which the shared machinery reads."""
    model = _tokens(eps=None)
    plain = nn.RMSNorm(HIDDEN).double()
    plain.load_state_dict(model.norm.state_dict())
    x = torch.randn(2, 3, HIDDEN, dtype=torch.float64)
    assert torch.equal(model.norm(x), plain(x))
    with maskprop.use_mask(model, _keeping(KEPT["all"]), "masked"):
        assert torch.equal(model.norm(x), plain(x))
    assert list(model.norm.state_dict()) == ["weight"] and model.norm.bias is None
    assert isinstance(model.norm, SparseLastDimNorm) and isinstance(model.norm, nn.RMSNorm)


@pytest.mark.parametrize("align", [2, 4])
def test_padded_channels_stay_out_of_the_root_mean_square(align):
    """Padding channels are not in an RMSNorm's mean of squares (:func:`test_layernorm.padded_channels_stay_out`)."""
    padded_channels_stay_out(_tokens(), align)


def test_the_static_step_normalises_its_kept_channels_alone():
    """An RMSNorm's static step: :func:`test_layernorm.static_step_equals_masked`."""
    static_step_equals_masked(_tokens())


@pytest.mark.parametrize("eps", [EPS, None])
def test_the_narrow_model_holds_an_rmsnorm_of_the_kept_width(eps):
    """``materialize`` gives an ``nn.RMSNorm`` of the kept channels holding their weight entries and the ``eps``
    (``None`` too; ``index_sets``: the kept rows of its weight): it computes the masked reference, and the cost model
    counts its kept parameters."""
    model = _tokens(eps=eps)
    mask = _keeping(KEPT["odd"])
    narrow = maskprop.materialize(model, mask)
    assert type(narrow.norm) is nn.RMSNorm and tuple(narrow.norm.normalized_shape) == (5,)
    assert narrow.norm.eps == eps and list(narrow.norm.state_dict()) == ["weight"]
    assert torch.equal(narrow.norm.weight, model.norm.weight[mask["hidden"]])
    sets = maskprop.surgery.index_sets(model, mask)  # what the finetune phase moves weights and optimizer state by
    assert sets["norm.weight"][0].tolist() == KEPT["odd"] and sets["norm.weight"][1] is None
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with maskprop.use_mask(model, mask, "masked"):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-12, atol=1e-12)
    params = sum(p.numel() for p in narrow.parameters())
    cost = maskprop.CostModel(_Wrapped(model), (1, 6, 6))
    assert cost.params(mask) == params
    assert cost.params() - cost.params(mask) == (HIDDEN - 5) * (1 + 6 + 1 + 4)  # the norm's weight, fc1, fc2


def test_refusals_are_one_line():
    """An RMSNorm over more than one dimension, and an input of another width than the subnetwork computes: each one
    line naming the layer and its class."""
    with pytest.raises(ValueError, match=r"an? RMSNorm over \(3, 4\) cannot be channel-pruned") as err:
        SparseRMSNorm((3, 4), group="g")
    assert "\n" not in str(err.value)
    model = _tokens()
    with maskprop.use_mask(model, _keeping(KEPT["odd"])), \
            pytest.raises(ValueError, match=r"'norm' \(SparseRMSNorm.*5") as err:
        model.norm(torch.randn(2, 3, HIDDEN, dtype=torch.float64))
    assert "\n" not in str(err.value)


# --- make_prunable: a model of torch layers, and timm's ViT with RmsNorm ----------------------------------------


class Mlp(nn.Module):
    """Patches as tokens through an MLP whose hidden units torch's ``nn.RMSNorm`` (``eps=None``) normalises."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, 2)
        self.fc1 = nn.Linear(8, 13)
        self.norm = nn.RMSNorm(13)
        self.fc2 = nn.Linear(13, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.fc2(self.norm(F.gelu(self.fc1(tokens)))).mean(1))


def test_torchs_rmsnorm_converts_and_its_subnetworks_check():
    """``nn.RMSNorm`` on an MLP's hidden units becomes the hidden group's ``SparseRMSNorm`` (its ``eps=None`` kept):
    the same outputs and state-dict keys; compact equals masked at an odd width; check_model passes; a sparse-backward
    conversion leaves it naming no group."""
    torch.manual_seed(0)
    plain = _perturbed(Mlp()).double()
    model = maskprop.make_prunable(copy.deepcopy(plain), (3, 8, 8))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert type(model.norm) is SparseRMSNorm and model.norm.group == "fc1" and model.norm.eps is None
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    mask["fc1"][:] = torch.arange(13) % 2 == 0  # 7 of 13
    grads = compact_equals_masked(model, mask, x)
    assert grads["norm.weight"][~mask["fc1"]].abs().max() == 0
    maskprop.check_model(model, (3, 8, 8))
    from maskprop.sbp.convert import convert

    convert(model, ratio=0.5)
    assert model.norm.group is None and maskprop.channel_groups(model) == {}


class VectorHead(nn.Module):
    """A pooled feature vector ``(N, C)`` through a hidden layer normalised by RMSNorm, and an RMSNorm over a feature
    map's width (not its channels)."""

    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.width_norm = norm(6)
        self.fc1 = nn.Linear(8, 12)
        self.norm = norm(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.width_norm(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.norm(self.fc1(y))))


@pytest.mark.parametrize("norm", [nn.RMSNorm, timm.layers.RmsNorm], ids=["torch", "timm"])
def test_rmsnorm_of_a_vector_prunes_and_of_a_maps_width_stays_whole(norm):
    """An RMSNorm of a vector's channels becomes the hidden group's; one over a feature map's last dimension (its
    width, not its channels) stays as it is and leaves the channels it reads whole; check_model passes."""
    torch.manual_seed(0)
    model = _perturbed(VectorHead(norm)).double()
    plain = copy.deepcopy(model)
    maskprop.make_prunable(model, (3, 6, 6))
    assert maskprop.channel_groups(model) == {"fc1": 12}
    assert type(model.width_norm) is norm and type(model.norm) is SparseRMSNorm and model.norm.group == "fc1"
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    maskprop.check_model(model, (3, 6, 6))


SIZE = (3, 16, 16)
HEADS, HEAD_DIM, WIDTH = 3, 8, 24
VIT = {"img_size": 16, "patch_size": 4, "embed_dim": WIDTH, "depth": 2, "num_heads": HEADS, "qk_norm": True,
       "scale_attn_norm": True, "scale_mlp_norm": True}


def _vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = dict(VIT, num_classes=5, qkv_bias=True, norm_layer=timm.layers.RmsNorm) | kwargs
    return _perturbed(timm.models.vision_transformer.VisionTransformer(**options))


def test_timms_rmsnorm_vit_converts_its_head_and_mlp_norms_computing_the_same():
    """A ViT built with ``norm_layer=RmsNorm`` (query-key, attention-output and MLP-hidden norms too): those over a
    group's channels become ``SparseRMSNorm`` of that group (timm's eps, 1e-6), those over the residual stream stay
    timm's; the model computes what it did (to float64's rounding: ``F.rms_norm`` in place of timm's formula)."""
    plain = _vit().double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    block = converted.blocks[0]
    attn, mlp = block.attn, block.mlp
    assert [(type(m), m.group, m.eps) for m in (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)] == [
        (SparseRMSNorm, "blocks.0.attn", 1e-6), (SparseRMSNorm, "blocks.0.attn", 1e-6),
        (SparseRMSNorm, "blocks.0.attn.proj:input", 1e-6), (SparseRMSNorm, "blocks.0.mlp.fc1", 1e-6)]
    assert type(block.norm1) is timm.layers.RmsNorm and type(converted.norm) is timm.layers.RmsNorm
    assert maskprop.channel_groups(converted) == {"blocks.0.attn": HEAD_DIM, "blocks.0.mlp.fc1": 4 * WIDTH,
                                                  "blocks.1.attn": HEAD_DIM, "blocks.1.mlp.fc1": 4 * WIDTH}
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


def test_a_subnetworks_attention_takes_each_heads_rms_over_its_kept_features():
    """Compact attention equals attention written out by hand on the kept head features, with the RMS of each head's
    kept query and key features and of all heads' kept outputs before ``proj`` (``F.rms_norm`` over them); compact
    equals masked, gradients included."""
    model = maskprop.make_prunable(_vit(), SIZE).double()
    mask, grads = compact_attention_is_by_hand(model, lambda t, m, i: F.rms_norm(t, (len(i),), m.weight[i], m.eps))
    assert grads["blocks.0.attn.q_norm.weight"][~mask["blocks.0.attn"]].abs().max() == 0
    assert grads["blocks.1.mlp.norm.weight"][~mask["blocks.1.mlp.fc1"]].abs().max() == 0


def test_check_model_and_export_take_a_vit_with_rmsnorm(tmp_path):
    """check_model's every check passes (compact, static, narrow, FLOPs); the exported narrow model holds
    ``nn.RMSNorm`` of the kept widths (timm's eps), loads back from its files and computes the subnetwork; its
    parameters are the cost model's count."""
    spec = maskprop.ModelSpec.resolve("timm:vit_tiny_patch16_224", dict(VIT, norm_layer="rmsnorm"), num_classes=5,
                                      input_size=SIZE)
    torch.manual_seed(0)
    model = _perturbed(spec.build()).eval()
    assert sum(isinstance(m, SparseRMSNorm) for m in model.modules()) == 8
    maskprop.check_model(model, SIZE)
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    info = maskprop.save_exported(model, mask, tmp_path / "vit", spec=spec, formats="safetensors,pt2")
    narrow = maskprop.load_exported(tmp_path / "vit")
    kept = int(mask["blocks.0.attn"].sum())
    attn = narrow.blocks[0].attn
    assert type(attn.q_norm) is nn.RMSNorm and tuple(attn.q_norm.normalized_shape) == (kept,)
    assert attn.q_norm.eps == 1e-6 and tuple(attn.norm.normalized_shape) == (HEADS * kept,)
    assert tuple(narrow.blocks[1].mlp.norm.normalized_shape) == (int(mask["blocks.1.mlp.fc1"].sum()),)
    params = sum(p.numel() for p in narrow.parameters())
    assert info["params"] == params == maskprop.CostModel(model, SIZE).params(mask)
    x = torch.randn(2, *SIZE)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.load(tmp_path / "vit" / "model.pt2").module()
    torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)


# --- the gathers off the CPU: RMSNorm weights in the packed weight gather ---------------------------------------


@pytest.mark.parametrize("path", ["eager", "static"])
@pytest.mark.parametrize("align", [1, 4])
def test_packed_gathers_of_an_rmsnorm_vit_equal_the_masked_reference(path, align):
    """Off the CPU a ViT's RMSNorms (each head's query and key features, all heads' outputs before ``proj``, the MLP's
    hidden units) take their weight from the gather of all layers' weights; compact equals masked in float64, the loss
    and every gradient, at odd kept widths and with widths padded to ``align``."""
    model = maskprop.make_prunable(_vit(), SIZE).double()
    mask = _odd_mask(maskprop.channel_groups(model), torch.Generator().manual_seed(3))
    images = torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norms, grads = packed_norms_equal_masked(model, mask, images, SparseRMSNorm, path, align, bias=False)
    assert len(norms) == 8  # each RMSNorm's weight comes from the one gather, and it has no bias
    assert grads["blocks.1.mlp.norm.weight"][~mask["blocks.1.mlp.fc1"]].abs().max() == 0


@pytest.mark.parametrize("path", ["eager", "static"])
def test_packed_gathers_take_rmsnorms_without_a_weight(path):
    """An RMSNorm without affine parameters gathers nothing and still equals the masked reference off the CPU, at a
    padded width."""
    model = _tokens(affine=False)
    images = torch.randn(2, 3, 6, dtype=torch.float64)
    mask = _keeping(KEPT["odd"])
    state, context = _packed_state(model, mask, path, 4)
    with context():
        assert state.weight_and_bias(model.norm) == (None, None)
    compact = _loss_and_grads(model, context, images)
    masked = _loss_and_grads(model, lambda: maskprop.use_mask(model, mask, "masked"), images)
    assert compact[0] == pytest.approx(masked[0], rel=1e-12)
    for name, grad in compact[1].items():
        torch.testing.assert_close(grad, masked[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["eager", "static"])
def test_gathered_rmsnorm_weights_start_at_aligned_addresses(path, dtype, monkeypatch):
    """With odd kept widths every RMSNorm's gathered weight (8 here) starts at a 16-byte boundary and is contiguous;
    the step still computes the masked reference (:func:`test_layernorm.gathered_norm_tensors_are_aligned`)."""
    model = maskprop.make_prunable(_vit(), SIZE).to(dtype)
    gathered_norm_tensors_are_aligned(model, SparseRMSNorm, path, dtype, 8, monkeypatch)
