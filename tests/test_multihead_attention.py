"""torch's ``nn.MultiheadAttention`` made prunable (``SparseMultiheadAttention``): torchvision's vision transformers.

Each check against an independent computation: torch's own module (float64, full width), torchvision's model,
attention written out by hand on the kept features, torch's FLOP counter, central differences of the FLOPs."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging

import pytest
import torch
from conftest import attention_by_hand, compact_equals_masked
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import maskprop
from maskprop.cost import CostModel, counted_flops, counting_flops
from maskprop.sparse import SparseMultiheadAttention

SIZE = (3, 32, 32)  # 16 patches of 8 x 8 and a class token
HEADS, HEAD_DIM, WIDTH, TOKENS = 4, 8, 32, 17
ATTENTION = "encoder.layers.encoder_layer_{}.self_attention"


def _vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """torchvision's ViT, its classifier and every bias and LayerNorm parameter moved off the zeros and ones torchvision
    starts them at (a classifier of zeros would hide every difference)."""
    torch.manual_seed(seed)
    options = dict(image_size=32, patch_size=8, num_layers=2, num_heads=HEADS, hidden_dim=WIDTH, mlp_dim=64,
                   num_classes=10) | kwargs
    model = VisionTransformer(**options)
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    return model


@pytest.fixture
def vit64():
    return maskprop.make_prunable(_vit(), SIZE).double()


def _mask(model, seed: int = 0, keep: float = 0.5) -> dict[str, torch.Tensor]:
    return maskprop.random_mask(maskprop.channel_groups(model), keep, torch.Generator().manual_seed(seed))


def _images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_torchvisions_attention_becomes_maskprops_computing_the_same():
    """The converted ViT computes what torchvision's did (train and eval mode), with the same state-dict keys in the
    same order, and each block's heads' features are a group of head_dim channels that qkv writes once per head
    slice and proj reads once per head. A model in eval mode converts to eval mode."""
    plain = _vit().double()
    converted = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    assert list(converted.state_dict()) == list(plain.state_dict())
    attention = [converted.encoder.layers[i].self_attention for i in range(2)]
    assert [type(a) for a in attention] == [SparseMultiheadAttention] * 2 and attention[0].batch_first
    assert maskprop.channel_groups(converted) == {name: n for i in range(2) for name, n in (
        (ATTENTION.format(i), HEAD_DIM), (f"encoder.layers.encoder_layer_{i}.mlp.0", 64))}  # its output is whole
    name = ATTENTION.format(0)
    assert (attention[0].qkv.out_group, attention[0].proj.in_group, attention[0].group) == (
        f"{name}.qkv", f"{name}.proj:input", name)
    concatenated = maskprop.sparse.concatenations(converted)
    assert concatenated[f"{name}.qkv"] == ((name, HEAD_DIM),) * (3 * HEADS)
    assert concatenated[f"{name}.proj:input"] == ((name, HEAD_DIM),) * HEADS
    x = _images()
    for training in (True, False):
        plain.train(training)
        converted.train(training)
        torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)
    evaluated = maskprop.make_prunable(_vit().eval(), SIZE)
    assert isinstance(evaluated.encoder.layers[0].self_attention, SparseMultiheadAttention)
    assert not any(m.training for m in evaluated.modules())


def test_checkpoints_load_both_ways_under_torchs_keys_and_the_parameters_are_torchs_own():
    """torchvision's state dict loads strictly into the prunable model, and the prunable model's into torchvision's
    (each built from another seed): the same outputs. The projections hold the module's parameter tensors
    themselves, none copied or duplicated."""
    plain = _vit().double().eval()
    x = _images()
    converted = maskprop.make_prunable(_vit(seed=1), SIZE).double().eval()
    converted.load_state_dict(plain.state_dict())
    torch.testing.assert_close(converted(x), plain(x), rtol=1e-12, atol=1e-12)
    back = _vit(seed=2).double().eval()
    back.load_state_dict(converted.state_dict())
    torch.testing.assert_close(back(x), plain(x), rtol=1e-12, atol=1e-12)

    model = _vit()
    torch_attention = model.encoder.layers[0].self_attention
    tensors = [torch_attention.in_proj_weight, torch_attention.in_proj_bias, torch_attention.out_proj.weight,
               torch_attention.out_proj.bias]
    maskprop.make_prunable(model, SIZE)
    ours = model.encoder.layers[0].self_attention
    assert all(a is b for a, b in zip((ours.qkv.weight, ours.qkv.bias, ours.proj.weight, ours.proj.bias), tensors))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in _vit().parameters())


def test_a_partial_torch_state_dict_names_what_it_lacks_by_torchs_keys():
    """A state dict without some of the attention's tensors: load_state_dict's missing keys (strict=False) and its
    strict error name them as nn.MultiheadAttention does, not by maskprop's qkv and proj."""
    converted = maskprop.make_prunable(_vit(seed=1), SIZE)
    state = _vit().state_dict()
    attention = "encoder.layers.encoder_layer_0.self_attention"
    for key in ("in_proj_bias", "out_proj.weight"):
        del state[f"{attention}.{key}"]
    result = converted.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == [f"{attention}.in_proj_bias", f"{attention}.out_proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*self_attention\.in_proj_bias") as error:
        converted.load_state_dict(state)
    assert "qkv" not in str(error.value) and ".proj." not in str(error.value)


def test_a_subnetwork_runs_attention_on_its_kept_features_only(vit64):
    """Compact execution computes attention on the kept head features alone (the projections run narrow), equal to
    attention written out by hand on them, weights included where asked for, and to masked execution, gradients
    included."""
    mask = _mask(vit64)
    attn = vit64.encoder.layers[0].self_attention
    kept = mask[ATTENTION.format(0)].nonzero().flatten()
    x = torch.randn(2, TOKENS, WIDTH, dtype=torch.float64)
    widths = []
    hook = attn.qkv.register_forward_hook(lambda m, i, o: widths.append(o.shape[-1]))
    outputs = {}
    for mode in ("compact", "masked"):
        with maskprop.use_mask(vit64, mask, mode):
            outputs[mode] = (attn(x, x, x, need_weights=False)[0], *attn(x, x, x))
    hook.remove()
    assert widths[:2] == [3 * HEADS * len(kept)] * 2 and 0 < len(kept) < HEAD_DIM
    expected, weights = attention_by_hand(attn, x, kept)
    for mode, (fused, out, averaged) in outputs.items():
        for got, want in ((fused, expected), (out, expected), (averaged, weights)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=mode)
    grads = compact_equals_masked(vit64, mask, _images(1))
    in_grad = grads[f"{ATTENTION.format(0)}.qkv.weight"].reshape(3, HEADS, HEAD_DIM, WIDTH)
    assert in_grad[:, :, ~mask[ATTENTION.format(0)]].abs().max() == 0  # a dropped feature's rows learn nothing


def _torch_and_ours(batch_first: bool, bias: bool = True, dropout: float = 0.0
                    ) -> tuple[nn.MultiheadAttention, SparseMultiheadAttention]:
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(WIDTH, HEADS, dropout, bias=bias, batch_first=batch_first).double()
    if bias:
        with torch.no_grad():  # torch starts them at 0
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    ours = SparseMultiheadAttention(nn.Linear(WIDTH, 3 * WIDTH, bias=bias), nn.Linear(WIDTH, WIDTH, bias=bias), HEADS,
                                    HEAD_DIM, dropout=dropout, batch_first=batch_first).double()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch first", "sequence first"])
def test_masks_weights_and_layouts_behave_as_torchs(batch_first):
    """Against ``nn.MultiheadAttention`` itself in float64 at full width: boolean and float key padding and attention
    masks (2-d and per head), the is_causal hint, the weights (averaged or per head), unbatched inputs, in training
    (its dropout drawing the same weights from the same seed) and in eval mode without gradients (torch's fast path
    where batch_first)."""
    theirs, ours = _torch_and_ours(batch_first, dropout=0.3)
    batch, tokens = 3, 5
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch, tokens, WIDTH) if batch_first else (tokens, batch, WIDTH), dtype=torch.float64,
                    generator=generator)
    padding = torch.rand(batch, tokens, generator=generator) > 0.6
    blocked = torch.rand(tokens, tokens, generator=generator) > 0.5
    padding[:, 0] = blocked[:, 0] = False  # every query attends the first key at least
    causal = torch.triu(torch.full((tokens, tokens), float("-inf"), dtype=torch.float64), 1)
    cases = [{}, {"key_padding_mask": padding}, {"attn_mask": blocked}, {"attn_mask": blocked, "key_padding_mask":
                                                                         padding},
             {"attn_mask": torch.randn(batch * HEADS, tokens, tokens, dtype=torch.float64, generator=generator)},
             {"key_padding_mask": torch.randn(batch, tokens, dtype=torch.float64, generator=generator)},
             {"attn_mask": causal, "is_causal": True}, {"attn_mask": causal.isinf(), "is_causal": True,
                                                        "key_padding_mask": padding}]
    for case in cases:
        for need_weights, average in ((False, True), (True, True), (True, False)):
            keywords = dict(case, need_weights=need_weights, average_attn_weights=average)
            for training in (True, False):
                theirs.train(training)
                ours.train(training)
                with torch.set_grad_enabled(training):
                    torch.manual_seed(1)
                    expected, expected_weights = theirs(x, x, x, **keywords)
                    torch.manual_seed(1)
                    out, weights = ours(x, x, x, **keywords)
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=str(keywords))
                assert (weights is None) == (expected_weights is None) and out.shape == expected.shape
                assert batch_first or out.is_contiguous()  # as torch's (L, N, E) output: view() takes it
                if weights is not None:
                    torch.testing.assert_close(weights, expected_weights, rtol=1e-12, atol=1e-12, msg=str(keywords))
    single = x[0] if batch_first else x[:, 0]  # one sequence, (L, E)
    for out, expected in zip(ours.eval()(single, single, single, key_padding_mask=padding[0]),
                             theirs.eval()(single, single, single, key_padding_mask=padding[0])):
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sparse_multihead_attention_says_what_it_does_not_take_in_one_line():
    theirs, ours = _torch_and_ours(batch_first=True, bias=False)
    assert list(ours.state_dict()) == ["in_proj_weight", "out_proj.weight"]
    x = torch.randn(2, 5, WIDTH, dtype=torch.float64)
    cases = [((x, x.clone(), x), {}, r"attends a tensor to itself, got a key or value that is not the query; "
                                     r"expected attention\(x, x, x\)"),
             ((x, x, x.clone()), {}, r"attends a tensor to itself, got a key or value that is not the query"),
             ((x, x, x), {"is_causal": True}, r"is_causal=True without attn_mask; expected the causal mask"),
             ((x, x, x), {"attn_mask": torch.zeros(5, 4, dtype=torch.bool)},
              r"attn_mask has shape \(5, 4\); expected \(5, 5\) or \(8, 5, 5\)"),
             ((x, x, x), {"key_padding_mask": torch.zeros(5, dtype=torch.bool)},
              r"key_padding_mask has shape \(5,\); expected \(2, 5\)"),
             ((x, x, x), {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)},
              r"attn_mask is a torch.int64 tensor; expected a bool or floating-point mask"),
             ((x[0, 0],) * 3, {}, r"query has shape \(32,\); expected \(L, E\) or \(N, L, E\) \(batch_first=True\)")]
    for args, keywords, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(*args, **keywords)
    with pytest.raises(ValueError, match="qkv writes 96 and proj reads 24 features; expected 96 and 32"):
        SparseMultiheadAttention(nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(24, WIDTH), HEADS, HEAD_DIM)


def test_the_cost_model_counts_the_attentions_products_by_its_kept_features(vit64):
    """Both products cost ``2 x 2 x heads x tokens^2`` FLOPs per kept feature; forward and backward against torch's
    counter on a compact step, no FLOP outside the layers the masks narrow; prices against central differences."""
    cost = CostModel(vit64, SIZE)
    for seed, keep in ((0, 0.5), (1, 0.25), (2, 1.0)):
        mask = _mask(vit64, seed, keep)
        kept = int(mask[ATTENTION.format(1)].sum())
        assert cost.by_layer(mask)[f"{ATTENTION.format(1)}:products"] == 4 * HEADS * TOKENS ** 2 * kept
        with counting_flops() as counter, maskprop.use_mask(vit64, mask):
            loss = vit64(_images(seed)).sum()
            forward = counter.get_total_flops()
            loss.backward()
        assert forward == cost.flops(mask, batch_size=2)
        assert counter.get_total_flops() - forward == cost.backward_flops(mask, batch_size=2)
    assert cost.other_flops == 0
    half = {g: n // 2 for g, n in cost.groups.items()}
    prices = cost.channel_prices(0.5)
    for group in half:
        more, fewer = dict(half, **{group: half[group] + 1}), dict(half, **{group: half[group] - 1})
        assert prices[group] == pytest.approx((cost.flops(more) - cost.flops(fewer)) / 2, rel=1e-12)


def test_a_narrow_vit_keeps_the_scale_and_is_priced_at_its_kept_head_width(vit64):
    """materialize: the narrow model computes the masked one, runs attention at the kept head width with the full
    width's scale, and is priced so; made prunable again, its attention is kept as it is (one reason) and it
    checks."""
    mask = _mask(vit64)
    narrow = maskprop.materialize(vit64, mask).eval()
    attn = narrow.encoder.layers[0].self_attention
    kept = int(mask[ATTENTION.format(0)].sum())
    assert (attn.head_width, attn.head_dim, attn.scale) == (kept, HEAD_DIM, HEAD_DIM ** -0.5)
    assert attn.group is None and type(attn.qkv) is nn.Linear
    x = _images()
    vit64.eval()
    with maskprop.use_mask(vit64, mask):
        torch.testing.assert_close(narrow(x), vit64(x), rtol=1e-12, atol=1e-12)
    assert CostModel(narrow, SIZE).flops() == counted_flops(narrow, x[:1]) == CostModel(vit64, SIZE).flops(mask)
    again = maskprop.make_prunable(copy.deepcopy(narrow), SIZE)
    assert ATTENTION.format(0) not in maskprop.channel_groups(again)
    maskprop.check_model(again, SIZE)


@pytest.fixture
def registered_vit():
    """A small torchvision ViT made prunable, registered (an export rebuilds it by name), removed after."""
    from maskprop.models import _registry

    def torchvision_vit_for_tests(num_classes: int = 10, prune_residual: bool = True) -> nn.Module:
        return maskprop.make_prunable(_vit(num_classes=num_classes), SIZE, prune_residual=prune_residual)

    maskprop.register_model(torchvision_vit_for_tests)
    yield "torchvision_vit_for_tests"
    _registry._MODELS.pop("torchvision_vit_for_tests", None)


def test_check_model_and_export_take_a_torchvision_vit_with_pruned_heads(registered_vit, tmp_path):
    """check_model's every check passes; the exported narrow model (every file format) and the one load_exported
    rebuilds run attention at the kept head width with the full width's scale."""
    spec = maskprop.ModelSpec.resolve(registered_vit, {}, num_classes=10, input_size=SIZE)
    model = spec.build().eval()
    maskprop.check_model(model, SIZE)
    mask = _mask(model)
    formats = "safetensors,pt2,onnx" if importlib.util.find_spec("onnxscript") else "safetensors,pt2"
    info = maskprop.save_exported(model, mask, tmp_path / "vit", spec=spec, formats=formats)
    assert info["flops"] == CostModel(model, SIZE).flops(mask)
    assert max(info["check"]["files_vs_narrow_model"].values()) <= 1e-5
    narrow = maskprop.load_exported(tmp_path / "vit")
    attn = narrow.encoder.layers[0].self_attention
    kept = int(mask[ATTENTION.format(0)].sum())
    assert isinstance(attn, SparseMultiheadAttention) and attn.group is None and attn.scale == HEAD_DIM ** -0.5
    assert attn.qkv.out_features == 3 * HEADS * kept and type(attn.qkv) is nn.Linear
    x = torch.randn(2, *SIZE)
    with maskprop.use_mask(model, mask):
        expected = model(x)
    torch.testing.assert_close(narrow(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_on_the_attention_weights_draws_alike_in_both_modes():
    """torch's ``dropout`` of the module is the fused kernel's: one number per attention weight whatever the head
    width, so compact and masked steps with the same seed drop the same weights."""
    model = maskprop.make_prunable(_vit(attention_dropout=0.3), SIZE).double()
    mask = _mask(model, 3)
    outputs = []
    for mode in ("compact", "masked"):
        torch.manual_seed(7)
        with maskprop.use_mask(model, mask, mode):
            outputs.append(model(_images()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.manual_seed(8)
    with maskprop.use_mask(model, mask):
        assert not torch.allclose(model(_images()), outputs[0])  # the dropout does drop


class Tokens(nn.Module):
    """Tokens in torch's ``(L, N, E)`` layout (``batch_first=False``), embedded and read by attention directly (no
    LayerNorm), its output added to them, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(2)[..., :16].transpose(0, 1))  # 3 tokens of 16 features, (3, N, 16)
        tokens = tokens + self.attn(tokens, tokens, tokens)[0]
        return self.fc2(torch.relu(self.fc1(tokens))).mean(0)


def test_attention_on_sequence_first_tokens_reads_and_writes_them_as_linear_layers_do():
    """The token space is a group that qkv reads and proj writes (its output added to the tokens); every check passes
    in the (L, N, E) layout, FLOPs included. ``exclude`` takes the module's ``out_proj`` (its proj) and its ``qkv``;
    the heads whole, torch's module stays, and so do the tokens it reads and writes."""
    net = maskprop.make_prunable(Tokens(), SIZE)
    assert isinstance(net.attn, SparseMultiheadAttention) and not net.attn.batch_first
    assert net.attn.qkv.in_group == net.attn.proj.out_group == net.embed.out_group == net.fc1.in_group == "embed"
    assert set(maskprop.channel_groups(net)) == {"embed", "attn", "fc1"}
    maskprop.check_model(net, SIZE)
    x = torch.randn(2, *SIZE)  # 3 tokens of 2 examples: the layout counts
    mask = _mask(net)
    with maskprop.use_mask(net, mask), torch.no_grad(), counting_flops() as counter:
        net(x)
    assert counter.get_total_flops() == CostModel(net, SIZE).flops(mask, batch_size=2)

    excluded = maskprop.make_prunable(Tokens(), SIZE, exclude=["attn.out_proj"])
    assert set(maskprop.channel_groups(excluded)) == {"attn", "fc1"} and excluded.attn.proj.out_group is None
    plain = Tokens()
    expected = plain(x)
    kept = maskprop.make_prunable(plain, SIZE, exclude=["attn.qkv"])
    assert type(kept.attn) is nn.MultiheadAttention and set(maskprop.channel_groups(kept)) == {"fc1"}
    torch.testing.assert_close(kept(x), expected, rtol=0, atol=0)


class Attending(nn.Module):
    """Tokens embedded and read by ``attn`` as queries; keys and values the same tokens (``keys="tokens"``), others
    (``"other"``), or 16 features of others (``"narrow"``); then a head."""

    def __init__(self, attn: nn.Module, keys: str = "tokens") -> None:
        super().__init__()
        self.embed, self.attn, self.keys, self.head = nn.Linear(16, WIDTH), attn, keys, nn.Linear(WIDTH, 5)
        self.other = nn.Linear(16, WIDTH) if keys != "tokens" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.flatten(2)[..., :16]
        q = self.embed(t)
        k = q if self.keys == "tokens" else self.other(t)[..., :16] if self.keys == "narrow" else self.other(t)
        return self.head(self.attn(q, k, k)[0]).mean(1)


class Shared(nn.Module):
    """Two attention modules sharing their output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = (nn.MultiheadAttention(WIDTH, HEADS, batch_first=True) for _ in range(2))
        self.b.out_proj = self.a.out_proj

    def forward(self, x, y, z):
        return self.a(x, y, z)[0] + self.b(x, y, z)[0], None


class AlsoOutProj(nn.Module):
    """An attention module whose ``out_proj`` the forward also calls on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x, y, z):
        return self.inner(x, y, z)[0] + self.inner.out_proj(x), None


@pytest.mark.parametrize("make, keys, why", [
    (lambda: nn.MultiheadAttention(WIDTH, HEADS, add_bias_kv=True, batch_first=True), "tokens",
     r"an nn.MultiheadAttention with add_bias_kv=True at 'attn'"),
    (lambda: nn.MultiheadAttention(WIDTH, HEADS, add_zero_attn=True, batch_first=True), "tokens",
     r"an nn.MultiheadAttention with add_zero_attn=True at 'attn'"),
    (lambda: nn.MultiheadAttention(WIDTH, HEADS, kdim=16, vdim=16, batch_first=True), "narrow",
     r"an nn.MultiheadAttention with separate query, key and value projections \(kdim=16, vdim=16, embed_dim=32\)"),
    (lambda: nn.MultiheadAttention(WIDTH, HEADS, batch_first=True), "other",
     r"nn.MultiheadAttention as cross-attention \(its query, key and value not one tensor\) at 'attn'"),
    (Shared, "tokens", r"an nn.MultiheadAttention whose projections another module holds too at 'attn.a'"),
    (AlsoOutProj, "tokens", r"attn.inner.out_proj called outside its nn.MultiheadAttention"),
], ids=["bias_kv", "zero_attn", "kdim", "cross-attention", "shared out_proj", "out_proj called"])
def test_multihead_attention_in_another_form_stays_whole_saying_why(make, keys, why):
    """Each form SparseMultiheadAttention does not compute is left whole, with the tokens it reads, and make_prunable
    says why (here in its error: nothing else can be pruned)."""
    net = Attending(make(), keys)
    with pytest.raises(ValueError, match=rf"no channel of Attending can be pruned: .*'embed' \(32 channels\): {why}"):
        maskprop.make_prunable(net, SIZE)
    assert type(net.attn) is type(make())


class ReadsItsWeights(nn.Module):
    """An attention module whose parameters the forward also reads itself (a penalty on them)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.inner, self.name = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True), name

    def forward(self, x, y, z):
        read = {"in_proj_weight": lambda: self.inner.in_proj_weight, "in_proj_bias": lambda: self.inner.in_proj_bias,
                "out_proj.weight": lambda: self.inner.out_proj.weight}[self.name]
        return self.inner(x, y, z)[0] + read().sum(), None


@pytest.mark.parametrize("name", ["in_proj_weight", "in_proj_bias", "out_proj.weight"])
def test_multihead_attention_whose_parameters_the_forward_reads_stays_whole(name):
    """A forward that computes with the parameters themselves would read the full tensors while a subnetwork's
    attention runs gathered ones: torch's module stays, and the model still runs."""
    net = Attending(ReadsItsWeights(name))
    x = torch.randn(2, *SIZE)
    expected = net(x)
    with pytest.raises(ValueError, match=rf"'attn.inner' \(8 channels\): attn.inner.{name} read outside its "
                                         rf"nn.MultiheadAttention"):
        maskprop.make_prunable(net, SIZE)
    assert type(net.attn.inner) is nn.MultiheadAttention
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


class ReadsItsSettings(nn.Module):
    """A forward that reads its attention's settings: the layout by ``batch_first``, a per-head mask of
    ``num_heads``, an output scaled by ``embed_dim`` (as a transformer's block may)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(16, WIDTH), nn.Linear(WIDTH, 5)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, dropout=0.25, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(2)[..., :16])  # 3 tokens of 16 features, (N, 3, 16) -> (N, 3, WIDTH)
        t = t if self.attn.batch_first else t.transpose(0, 1)  # sequence first: (3, N, WIDTH), the features last
        mask = x.new_ones(x.shape[0] * self.attn.num_heads, 3, 3, dtype=torch.bool).triu(1)  # causal, per head
        out = self.attn(t, t, t, attn_mask=mask, need_weights=False)[0] * self.attn.embed_dim ** -0.5
        return self.head(out).mean(1 if self.attn.batch_first else 0)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch first", "sequence first"])
def test_a_forward_reading_torchs_settings_runs_converted_full_compact_and_narrow(batch_first):
    """SparseMultiheadAttention answers torch's attribute names as torch does (settings, and the same tensors and
    layer under in_proj_weight, in_proj_bias, out_proj), so a forward reading them is converted and runs: the full
    model computes torch's, compact execution masked's, and the narrow model compact's (its embed_dim the full
    model's, which this forward scales by)."""
    torch.manual_seed(0)
    plain = ReadsItsSettings(batch_first).double().eval()
    x = torch.randn(3, *SIZE, dtype=torch.float64)
    expected = plain(x)
    torch_attn = plain.attn
    net = maskprop.make_prunable(copy.deepcopy(plain), SIZE)
    attn = net.attn
    assert isinstance(attn, SparseMultiheadAttention)
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim",
                 "_qkv_same_embed_dim", "bias_k", "bias_v", "add_zero_attn", "q_proj_weight"):
        assert getattr(attn, name) == getattr(torch_attn, name), name
    assert attn.in_proj_weight is attn.qkv.weight and attn.in_proj_bias is attn.qkv.bias and attn.out_proj is attn.proj
    torch.testing.assert_close(attn.in_proj_weight, torch_attn.in_proj_weight, rtol=0, atol=0)
    torch.testing.assert_close(attn.out_proj.weight, torch_attn.out_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)

    mask = _mask(net, keep=0.5)
    assert 0 < int(mask["attn"].sum()) < HEAD_DIM
    compact_equals_masked(net, mask, x)
    with maskprop.use_mask(net, mask), torch.no_grad():
        compact = net(x)
    narrow = maskprop.materialize(copy.deepcopy(net), mask)
    kept_tokens = int(mask["embed"].sum())
    assert narrow.attn.head_width == int(mask["attn"].sum()) and narrow.attn.qkv.in_features == kept_tokens < WIDTH
    assert (narrow.attn.embed_dim, narrow.attn.head_dim) == (WIDTH, HEAD_DIM)  # as the scale: what it trained with
    torch.testing.assert_close(narrow(x), compact, rtol=1e-12, atol=1e-12)


def test_every_setting_torch_names_reads_as_torchs_at_a_dropout_of_its_own():
    """Each of torch's settings and absent tensors, at a dropout other than the test above's: ``dropout`` is the
    attention's own (following its ``attn_drop``), and the separate projections torch's packed form lacks are None."""
    plain = nn.MultiheadAttention(WIDTH, HEADS, dropout=0.125, batch_first=True)
    attn = maskprop.make_prunable(Attending(copy.deepcopy(plain)), SIZE).attn
    assert isinstance(attn, SparseMultiheadAttention)
    for name in ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "_qkv_same_embed_dim",
                 "bias_k", "bias_v", "add_zero_attn", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
        assert getattr(attn, name) == getattr(plain, name), name
    attn.attn_drop.p = 0.5
    assert attn.dropout == 0.5


class ScalesByHeadDim(nn.Module):
    """A forward scaling the attention's output by torch's ``head_dim`` (``embed_dim // num_heads`` in torch)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(16, WIDTH), nn.Linear(WIDTH, 5)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(2)[..., :16])
        return self.head(self.attn(t, t, t, need_weights=False)[0] * self.attn.head_dim ** -0.5).mean(1)


def test_a_forward_reading_head_dim_computes_narrow_what_it_does_compact():
    """A narrow model keeps torch's head_dim the full width's (as it keeps the scale and embed_dim); its heads run at
    head_width."""
    torch.manual_seed(0)
    net = maskprop.make_prunable(ScalesByHeadDim().double(), SIZE)
    mask = _mask(net, seed=1)
    assert 0 < int(mask["attn"].sum()) < HEAD_DIM
    x = _images()
    with maskprop.use_mask(net, mask), torch.no_grad():
        compact = net(x)
    narrow = maskprop.materialize(copy.deepcopy(net), mask)
    torch.testing.assert_close(narrow(x), compact, rtol=1e-12, atol=1e-12)


def test_its_output_pair_read_otherwise_than_item_by_item_leaves_the_output_whole():
    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(16, WIDTH), nn.Linear(WIDTH, 5)
            self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

        def forward(self, x):
            t = self.embed(x.flatten(2)[..., :16])
            return self.head(self.attn(t, t, t)[:1][0]).mean(1)

    net = maskprop.make_prunable(Sliced(), SIZE)
    assert isinstance(net.attn, SparseMultiheadAttention) and net.attn.proj.out_group is None
    maskprop.check_model(net, SIZE)


class Paired(nn.Module):
    """Attention's output pair read by negative index (``pair[-2]``, ``pair[-1]``), or unpacked with the per-head
    weights used (``out, w = ...``)."""

    def __init__(self, negative: bool) -> None:
        super().__init__()
        self.embed, self.head, self.negative = nn.Linear(16, WIDTH), nn.Linear(WIDTH, 5), negative
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

    def forward(self, x):
        t = self.embed(x.flatten(2)[..., :16])
        if self.negative:
            pair = self.attn(t, t, t)
            out, weights = pair[-2], pair[-1]
        else:
            out, weights = self.attn(t, t, t, average_attn_weights=False)
        return self.head(t + out).mean(1) + weights.flatten(1).mean(1, keepdim=True)


@pytest.mark.parametrize("negative", [True, False], ids=["pair[-2], pair[-1]", "out, weights ="])
def test_the_output_item_is_in_the_tokens_space_and_the_weights_in_none(negative):
    """Item 0 (-2) of the pair is the output in the space proj writes, here the embedding's (added to it); item 1 (-1),
    the weights, is in no channel space (a mean over them reads no channel)."""
    net = maskprop.make_prunable(Paired(negative), SIZE)
    assert isinstance(net.attn, SparseMultiheadAttention)
    assert net.attn.qkv.in_group == net.attn.proj.out_group == net.head.in_group == "embed"
    maskprop.check_model(net, SIZE)


def test_a_subclass_of_multihead_attention_is_not_converted():
    """A subclass of nn.MultiheadAttention may compute something else: make_prunable never puts maskprop's
    attention in its place (it says it cannot trace it, or keeps it)."""

    class Doubled(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            out, weights = super().forward(query, key, value, **kwargs)
            return 2 * out, weights

    net = Attending(Doubled(WIDTH, HEADS, batch_first=True))
    x = torch.randn(2, *SIZE)
    expected = net(x)
    with contextlib.suppress(ValueError):
        maskprop.make_prunable(net, SIZE)
    assert type(net.attn) is Doubled
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_attention_whose_value_is_another_tensor_stays_whole():
    class Values(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.other, self.head = nn.Linear(16, WIDTH), nn.Linear(16, WIDTH), nn.Linear(WIDTH, 5)
            self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)

        def forward(self, x):
            t = x.flatten(2)[..., :16]
            q = self.embed(t)
            return self.head(self.attn(q, q, self.other(t))[0]).mean(1)

    net = Values()
    x = torch.randn(2, *SIZE)
    expected = net(x)
    with pytest.raises(ValueError, match=r"nn.MultiheadAttention as cross-attention \(its query, key and value not "
                                         r"one tensor\) at 'attn'"):
        maskprop.make_prunable(net, SIZE)
    assert type(net.attn) is nn.MultiheadAttention
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)

def test_a_module_held_under_two_names_is_converted_under_both():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm = nn.Linear(16, WIDTH), nn.LayerNorm(WIDTH)
            self.a1 = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
            self.a2 = self.a1
            self.head = nn.Linear(WIDTH, 3)

        def forward(self, x):
            x = self.norm(self.embed(x.flatten(2)[..., :16]))
            y = self.norm(x)
            return self.head((x + self.a1(x, x, x)[0] + self.a2(y, y, y, need_weights=False)[0]).mean(1))

    twice = Twice().double()
    maskprop.make_prunable(twice, SIZE)
    assert isinstance(twice.a1, SparseMultiheadAttention) and twice.a2 is twice.a1
    maskprop.check_model(twice, SIZE)


def test_a_transformer_encoder_layer_keeps_its_attention_whole_and_its_fast_path():
    """nn.TransformerEncoderLayer's inference fast path reads its attention's parameters itself: the layer stays
    torch's (said in one line), and in eval mode without gradients the converted model computes what it did, on that
    fast path."""

    class Encoder(nn.Module):
        def __init__(self, hidden: bool) -> None:
            super().__init__()
            self.embed = nn.Linear(16, WIDTH)
            self.layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 64, dropout=0.0, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(WIDTH, 24), nn.ReLU(), nn.Linear(24, 5)) if hidden else nn.Linear(
                WIDTH, 5)

        def forward(self, x):
            return self.mlp(self.layer(self.embed(x.flatten(2)[..., :16])).mean(1))

    with pytest.raises(ValueError, match=r"'embed' \(32 channels\): TransformerEncoderLayer, which maskprop keeps "
                                         r"whole \(its inference fast path reads its nn.MultiheadAttention's "
                                         r"parameters\) at 'layer'"):
        maskprop.make_prunable(Encoder(hidden=False), SIZE)
    torch.manual_seed(0)
    model = Encoder(hidden=True).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = model(x)
    maskprop.make_prunable(model, SIZE)
    assert set(maskprop.channel_groups(model)) == {"mlp.0"} and type(model.layer.self_attn) is nn.MultiheadAttention
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_make_prunables_summary_counts_each_heads_features_once(caplog):
    with caplog.at_level(logging.DEBUG, logger="maskprop.prunable"):
        maskprop.make_prunable(_vit(), SIZE)
    assert "has 4 channel groups (144 channels, 4 concatenations of them) in 10 converted layers" in caplog.text
