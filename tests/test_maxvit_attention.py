"""torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``) with its heads' features as a channel
group (``SparseRelativePositionalAttention``).

Each check against an independent computation: torchvision's own module (with every feature kept, and with the
dropped features zeroed in its weights and bias: what dropping them means), torchvision's model, the masked reference
in float64 (outputs and gradients), check_model's checks, and an exported narrow model loaded again. Every parameter
is perturbed first: torchvision initialises the linear biases to zero, which would hide them."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compact_equals_masked, converted_keeps_whole

import maskprop
from maskprop.sparse import SparseRelativePositionalAttention

maxvit = pytest.importorskip("torchvision.models.maxvit")
pytestmark = pytest.mark.usefixtures("one_thread")  # small models: on a shared 2-core machine a second thread waits

SIZE = (3, 32, 32)  # stem: 16 x 16; blocks of 8 x 8 and 4 x 4 maps, windows (and grids) of 4 x 4 tokens
WIDTHS, HEAD_DIM, PARTITION = (16, 32), 4, 4  # 4 and 8 heads of 4 features; the scale is the width's, not the head's
ATTENTION = "blocks.{}.layers.0.layers.{}_attention.attn_layer.1"


def _maxvit(num_classes: int = 5, **kwargs) -> torch.nn.Module:
    """torchvision's MaxViT at small sizes, its parameters moved off the zeros torchvision starts biases at."""
    torch.manual_seed(0)
    options = dict(input_size=SIZE[1:], stem_channels=8, partition_size=PARTITION, block_channels=list(WIDTHS),
                   block_layers=[1, 1], head_dim=HEAD_DIM, stochastic_depth_prob=0.0, num_classes=num_classes) | kwargs
    model = maxvit.MaxVit(**options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def _mask(model, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.get_submodule(ATTENTION.format(b, kind)) for b in range(2) for kind in ("window", "grid")]


def test_torchvisions_maxvit_attention_becomes_maskprops_computing_the_same():
    """The converted model computes what torchvision's did, in train and eval mode, holding the same parameter tensors
    under the same state-dict keys (the saved index too); each attention's heads' features are a group of head_dim
    channels, written by to_qkv once per head slice and read by merge once per head; torchvision's attribute names
    read as its own do."""
    plain = _maxvit().double()
    parameters = dict(plain.named_parameters())
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    same = maskprop.make_prunable(plain, SIZE)  # in place: the very tensors
    assert all(same.get_parameter(name) is tensor for name, tensor in parameters.items())
    plain = _maxvit().double()
    assert [type(a) for a in _attention(converted)] == [SparseRelativePositionalAttention] * 4
    groups = maskprop.channel_groups(converted)
    assert {g: n for g, n in groups.items() if g.endswith("attn_layer.1")} == {
        ATTENTION.format(b, kind): HEAD_DIM for b in range(2) for kind in ("window", "grid")}
    name = ATTENTION.format(1, "grid")
    concatenated = maskprop.sparse.concatenations(converted)
    assert concatenated[f"{name}.qkv"] == ((name, HEAD_DIM),) * (3 * 8)
    assert concatenated[f"{name}.proj:input"] == ((name, HEAD_DIM),) * 8
    attn, theirs = converted.get_submodule(name), plain.get_submodule(name)
    assert (attn.n_heads, attn.head_dim, attn.size, attn.max_seq_len) == (8, HEAD_DIM, PARTITION, PARTITION ** 2)
    assert attn.scale_factor == theirs.scale_factor == WIDTHS[1] ** -0.5 != HEAD_DIM ** -0.5
    assert attn.qkv is attn.to_qkv and attn.proj is attn.merge
    torch.testing.assert_close(attn.get_relative_positional_bias(), theirs.get_relative_positional_bias(), rtol=0,
                               atol=0)
    x = _images()
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)


def _zeroed(module: torch.nn.Module, dropped: torch.Tensor) -> torch.nn.Module:
    """A copy of torchvision's attention with the dropped features' rows of ``to_qkv`` (weight and bias) and columns
    of ``merge`` set to zero: what dropping them means."""
    module = copy.deepcopy(module)
    rows, columns = dropped.repeat(3 * module.n_heads), dropped.repeat(module.n_heads)  # (3, heads, head_dim)
    with torch.no_grad():
        module.to_qkv.weight[rows] = 0
        module.to_qkv.bias[rows] = 0
        module.merge.weight[:, columns] = 0
    return module


@pytest.mark.parametrize(("block", "kind"), [(0, "window"), (1, "grid")])
def test_a_maxvit_subnetwork_is_torchvisions_attention_with_the_dropped_features_zeroed(block, kind):
    """Compact execution of an attention computes to_qkv on the kept features alone and equals torchvision's module
    with the dropped features zeroed (with every feature kept: torchvision's module as it is); the whole model's
    compact and masked execution agree, gradients included (a dropped feature's rows learn nothing, the bias table
    learns)."""
    plain = _maxvit().double()
    model = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    mask = _mask(model, seed=3)
    name = ATTENTION.format(block, kind)
    attn, theirs = model.get_submodule(name), plain.get_submodule(name)
    kept = mask[name]
    assert 0 < int(kept.sum()) < HEAD_DIM
    groups, tokens = (4 if block == 0 else 1), PARTITION ** 2
    x = torch.randn(2, groups, tokens, WIDTHS[block], dtype=torch.float64)
    widths = []
    hook = attn.to_qkv.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    with torch.no_grad():
        with maskprop.use_mask(model, mask):
            compact = attn(x)
        with maskprop.use_mask(model, maskprop.full_mask(maskprop.channel_groups(model))):
            whole = attn(x)
        torch.testing.assert_close(compact, _zeroed(theirs, ~kept)(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(whole, theirs(x), rtol=1e-12, atol=1e-12)
    hook.remove()
    assert widths[0] == 3 * attn.n_heads * int(kept.sum())
    grads = compact_equals_masked(model, mask, _images())
    qkv_grad = grads[f"{name}.to_qkv.weight"].reshape(3, attn.n_heads, HEAD_DIM, WIDTHS[block])
    assert qkv_grad[:, :, ~kept].abs().max() == 0 < qkv_grad[:, :, kept].abs().max()
    assert grads[f"{name}.relative_position_bias_table"].abs().max() > 0


def test_check_model_takes_torchvisions_maxvit():
    maskprop.check_model(maskprop.make_prunable(_maxvit(), SIZE), SIZE)


class RelativePositionalMultiHeadAttentionTwice(maxvit.RelativePositionalMultiHeadAttention):
    def forward(self, x):
        return super().forward(x) + super().forward(x)


def test_torchvisions_attention_of_another_class_keeps_its_heads_whole():
    """A subclass of torchvision's attention may compute something else: it is traced through (its to_qkv chunked,
    which reads its channels), its heads whole, and the model still computes what it did."""
    plain = _maxvit().double()
    old = plain.get_submodule(ATTENTION.format(0, "window"))
    twice = RelativePositionalMultiHeadAttentionTwice(WIDTHS[0], HEAD_DIM, PARTITION ** 2).double()
    twice.load_state_dict(old.state_dict())
    plain.get_submodule(ATTENTION.format(0, "window").rpartition(".")[0])[1] = twice
    converted_keeps_whole(plain, ATTENTION.format(0, "window"), RelativePositionalMultiHeadAttentionTwice,
                          ATTENTION.format(0, "grid"), _images())


def test_exclude_takes_torchvisions_names_of_the_projections():
    """``exclude`` names to_qkv as the model names it: that attention's heads stay whole."""
    name = ATTENTION.format(0, "window")
    model = maskprop.make_prunable(_maxvit(), SIZE, exclude=[f"{name}.to_qkv"])
    assert name not in maskprop.channel_groups(model)
    assert ATTENTION.format(0, "grid") in maskprop.channel_groups(model)


@pytest.fixture
def registered_maxvit():
    """A small torchvision MaxViT made prunable, registered (an export rebuilds it by name), removed after."""
    from maskprop.models import _registry

    def torchvision_maxvit_for_tests(num_classes: int = 5, prune_residual: bool = True) -> torch.nn.Module:
        return maskprop.make_prunable(_maxvit(num_classes), SIZE, prune_residual=prune_residual)

    maskprop.register_model(torchvision_maxvit_for_tests)
    yield "torchvision_maxvit_for_tests"
    _registry._MODELS.pop("torchvision_maxvit_for_tests", None)


def test_an_exported_narrow_maxvit_loads_and_computes_what_compact_execution_did(registered_maxvit, tmp_path):
    """The exported subnetwork, loaded again by name, runs each attention at the kept head width with the full
    model's scale and whole bias (the saved index under torchvision's key), and computes what compact execution did."""
    spec = maskprop.ModelSpec.resolve(registered_maxvit, {}, num_classes=5, input_size=SIZE)
    model = spec.build().eval()
    mask = _mask(model, seed=4)
    maskprop.save_exported(model, mask, tmp_path / "maxvit", spec=spec, formats="safetensors")
    narrow = maskprop.load_exported(tmp_path / "maxvit")
    name = ATTENTION.format(1, "window")
    attn, full = narrow.get_submodule(name), model.get_submodule(name)
    kept = int(mask[name].sum())
    assert type(attn) is SparseRelativePositionalAttention and attn.group is None
    assert type(attn.to_qkv) is torch.nn.Linear and attn.to_qkv.out_features == 3 * 8 * kept
    assert attn.merge.in_features == 8 * kept and attn.scale == full.scale == WIDTHS[1] ** -0.5
    assert torch.equal(attn.relative_position_index, full.relative_position_index)
    assert f"{name}.relative_position_index" in narrow.state_dict()
    x = torch.randn(2, *SIZE)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)
