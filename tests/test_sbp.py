"""Tests for maskprop.sbp: meProp / SBP / MSBP layers, sparsifiers, budget, angle diagnostic."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maskprop
from maskprop import sbp
from maskprop.sbp import (
    GlobalBudget,
    SparseBackwardConv2d,
    SparseBackwardLinear,
    balance,
    balance_step,
    convert,
    gradient_angles,
    threshold_spread,
    top_k_indices,
    variance_scales,
)

DTYPE = torch.float64


def _reference_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k by a stable descending sort (lower index first among ties), rows sorted ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def _keep_mask(grad: torch.Tensor, k: int, sparsifier: str) -> torch.Tensor:
    """0/1 mask of kept units, shape (batch, units), computed independently of the library."""
    per_example = grad.abs().sum(dim=tuple(range(2, grad.dim()))) if grad.dim() > 2 else grad.abs()
    mask = torch.zeros_like(per_example)
    if sparsifier == "topk":
        mask.scatter_(1, _reference_topk(per_example, k), 1.0)
    else:
        mask[:, _reference_topk(per_example.sum(0), k)] = 1.0
    return mask


def _linear_pair(fan_in: int, units: int, **kwargs) -> tuple[SparseBackwardLinear, nn.Linear]:
    torch.manual_seed(0)
    dense = nn.Linear(fan_in, units).to(DTYPE)
    layer = SparseBackwardLinear(fan_in, units, **kwargs).to(DTYPE)
    layer.load_state_dict(dense.state_dict())
    return layer, dense


def _grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_out)
    return module.weight.grad.clone(), module.bias.grad.clone(), x.grad.clone()


# ---------------------------------------------------------------------------------------------------------------
# Exactness and selection


@pytest.mark.parametrize("sparsifier", ["topk", "topk_unified", "randomk"])
def test_k_equal_to_units_gives_dense_gradients(sparsifier):
    layer, dense = _linear_pair(7, 5, k=5, sparsifier=sparsifier)
    x, g = torch.randn(4, 3, 7, dtype=DTYPE), torch.randn(4, 3, 5, dtype=DTYPE)
    for got, want in zip(_grads(layer, x, g), _grads(dense, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    torch.manual_seed(1)
    conv_dense = nn.Conv2d(3, 4, 3, stride=2, padding=1).to(DTYPE)
    conv = SparseBackwardConv2d(3, 4, 3, stride=2, padding=1, k=4, sparsifier=sparsifier).to(DTYPE)
    conv.load_state_dict(conv_dense.state_dict())
    x, g = torch.randn(2, 3, 9, 9, dtype=DTYPE), torch.randn(2, 4, 5, 5, dtype=DTYPE)
    for got, want in zip(_grads(conv, x, g), _grads(conv_dense, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dense_backward", [False, True])
def test_bf16_autocast_gives_float32_gradients_close_to_autocast_dense(dense_backward):
    """Under autocast the layers compute their backward in the weights' dtype from the bf16 activations and gradients:
    gradients of the same dtypes as the plain modules' and within bf16 rounding of them (k = n, and the exact dense
    backward that the angle diagnostic uses)."""
    torch.manual_seed(0)
    pairs = [(SparseBackwardLinear(12, 6, k=6), nn.Linear(12, 6)),
             (SparseBackwardConv2d(3, 4, 3, padding=1, k=4), nn.Conv2d(3, 4, 3, padding=1))]
    for layer, plain in pairs:
        layer.load_state_dict(plain.state_dict())
        # bf16 input: what a layer inside an autocast region receives from the layer before it
        x = (torch.randn(5, 12) if isinstance(plain, nn.Linear) else torch.randn(2, 3, 6, 6)).bfloat16()
        results = []
        for module in (layer, plain):
            xi = x.clone().requires_grad_(True)
            exact = sbp.dense_backward(module) if dense_backward else contextlib.nullcontext()
            with torch.autocast("cpu", dtype=torch.bfloat16), exact:
                out = module(xi)
            assert out.dtype == torch.bfloat16
            out.float().square().sum().backward()
            results.append((module.weight.grad, module.bias.grad, xi.grad))
        for got, want in zip(*results):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
        assert layer.weight.grad.dtype == torch.float32


def test_top_k_ties_lower_index_wins():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    assert top_k_indices(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert top_k_indices(scores, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert top_k_indices(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]
    assert top_k_indices(torch.tensor([[0.0, float("nan"), 1.0]]), 1).tolist() == [[1]]  # NaN is kept
    # Many ties at random: the same as a stable sort.
    torch.manual_seed(0)
    ints = torch.randint(0, 4, (50, 40)).double()
    for k in (1, 7, 20, 39, 40):
        assert torch.equal(top_k_indices(ints, k), _reference_topk(ints, k))


def test_unified_uses_batch_summed_magnitudes_and_per_example_its_own_sets():
    # Unit 0 is largest for the batch in total, units 1 and 2 each win in one example only.
    grad = torch.tensor([[3.0, 4.0, 0.0, 0.1], [3.0, 0.0, -4.0, 0.2]])
    assert sbp.topk_unified(grad, 1).tolist() == [0]
    assert sbp.topk(grad, 1).tolist() == [[1], [2]]
    assert sbp.topk_unified(grad.unsqueeze(-1).expand(2, 4, 3), 2).tolist() == [0, 1]

    x = torch.randn(2, 6, dtype=DTYPE)
    for sparsifier, rows in (("topk_unified", [0]), ("topk", [1, 2])):
        layer, dense = _linear_pair(6, 4, k=1, sparsifier=sparsifier)
        g = grad.to(DTYPE)
        mask = _keep_mask(g, 1, sparsifier)
        w_grad, b_grad, x_grad = _grads(layer, x, g)
        ref = _grads(dense, x, g * mask)
        for got, want in zip((w_grad, b_grad, x_grad), ref):
            torch.testing.assert_close(got, want)
        assert w_grad.abs().sum(1).nonzero()[:, 0].tolist() == rows


@pytest.mark.parametrize("sparsifier", ["topk", "topk_unified"])
def test_linear_matches_masked_dense_reference(sparsifier):
    layer, dense = _linear_pair(12, 10, k=3, sparsifier=sparsifier)
    x, g = torch.randn(6, 12, dtype=DTYPE), torch.randn(6, 10, dtype=DTYPE)
    for got, want in zip(_grads(layer, x, g), _grads(dense, x, g * _keep_mask(g, 3, sparsifier))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("sparsifier", ["topk", "topk_unified"])
@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(stride=2, padding=1), dict(padding="same", padding_mode="reflect"), dict(dilation=2, bias=False)],
)
def test_conv_matches_masked_dense_reference(sparsifier, conv_kwargs):
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, **conv_kwargs).to(DTYPE)
    conv = SparseBackwardConv2d(3, 8, 3, k=3, sparsifier=sparsifier, **conv_kwargs).to(DTYPE)
    conv.load_state_dict(dense.state_dict())
    x = torch.randn(4, 3, 10, 10, dtype=DTYPE)
    g = torch.randn_like(dense(x))
    mask = _keep_mask(g, 3, sparsifier)[:, :, None, None]  # kept channels, whole maps

    def grads(module, grad_out):
        xr = x.clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        module(xr).backward(grad_out)
        return [t.grad for t in (module.weight, module.bias, xr) if t is not None]

    for got, want in zip(grads(conv, g), grads(dense, g * mask)):
        torch.testing.assert_close(got, want)
    assert int((conv.weight.grad.flatten(1).abs().sum(1) > 0).sum()) <= (3 if sparsifier == "topk_unified" else 8)


def test_chunked_unit_scores_match_direct(monkeypatch):
    from maskprop.sbp import sparsifiers

    grad, offset = torch.randn(37, 6, 5, dtype=DTYPE), torch.randn(6, 5, dtype=DTYPE)
    direct = [sbp.unit_scores(grad, per_example=False), sbp.unit_scores(grad, per_example=False, offset=offset)]
    monkeypatch.setattr(sparsifiers, "_CHUNK_ABOVE", 0)
    monkeypatch.setattr(sparsifiers, "_CHUNK_ELEMENTS", 64)  # chunks of two examples
    torch.testing.assert_close(sbp.unit_scores(grad, per_example=False), direct[0])
    torch.testing.assert_close(sbp.unit_scores(grad, per_example=False, offset=offset), direct[1])
    torch.testing.assert_close(direct[1], (grad + offset).abs().sum(dim=(0, 2)))


def test_randomk_is_reproducible_with_a_generator():
    grad = torch.randn(3, 20)
    a = sbp.randomk(grad, 5, torch.Generator().manual_seed(7))
    b = sbp.randomk(grad, 5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.tolist() == sorted(set(a.tolist())) and len(a) == 5


def test_top_k_without_ties_is_sorted_and_unit_scores_sum_over_positions():
    """The fast path (no tie at the cut) returns each row's indices sorted ascending too, and per-example scores sum
    the magnitudes over a channel's positions, as the unified ones do."""
    torch.manual_seed(0)
    scores = torch.randn(6, 20, dtype=DTYPE)  # distinct values: no ties
    for k in (1, 5, 19):
        assert torch.equal(top_k_indices(scores, k), _reference_topk(scores, k))
    grad, offset = torch.randn(3, 5, 4, dtype=DTYPE), torch.randn(5, 4, dtype=DTYPE)
    torch.testing.assert_close(sbp.unit_scores(grad), grad.abs().sum(dim=2), rtol=1e-15, atol=0)
    torch.testing.assert_close(sbp.unit_scores(grad, offset=offset), (grad + offset).abs().sum(dim=2),
                               rtol=1e-15, atol=0)


def test_keep_count_rounds_to_nearest_and_keeps_at_least_one_unit():
    """k = round(ratio * n), but never 0: a ratio too small for the layer still propagates one unit."""
    assert [sbp.keep_count(10, r) for r in (0.01, 0.04, 0.14, 0.16, 0.5, 1.0)] == [1, 1, 1, 2, 5, 10]
    layer, dense = _linear_pair(5, 10, ratio=0.01)
    assert layer.k == 1
    x, g = torch.randn(3, 5, dtype=DTYPE), torch.randn(3, 10, dtype=DTYPE)
    for got, want in zip(_grads(layer, x, g), _grads(dense, x, g * _keep_mask(g, 1, "topk_unified"))):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's, for the (4, 3) kernel
@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(kernel_size=3, padding=(0, 2)),  # symmetric, but unequal between height and width
     dict(kernel_size=(4, 3), padding="same"),  # asymmetric in height only (1 above, 2 below)
     dict(kernel_size=(3, 4), padding="same")],  # asymmetric in width only
)
def test_conv_with_unequal_or_asymmetric_padding_matches_nn_conv2d(conv_kwargs):
    """With k = n the layer is nn.Conv2d: the same output shape and values, and the same gradients."""
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 5, **conv_kwargs).to(DTYPE)
    conv = SparseBackwardConv2d(3, 5, k=5, **conv_kwargs).to(DTYPE)
    conv.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 7, 8, dtype=DTYPE)
    torch.testing.assert_close(conv(x.clone().requires_grad_(True)), dense(x), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(dense(x))
    for got, want in zip(_grads(conv, x, g), _grads(dense, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# MSBP memory


def _step(layer: SparseBackwardLinear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x).backward(grad_out)


def test_msbp_memory_update_unified_hand_computed():
    layer = SparseBackwardLinear(2, 3, k=1, sparsifier="topk_unified", memory=0.5).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)

    # Step 1: M = 0; batch-summed |H| = [2, 3, 0.5] keeps unit 1; M = 0.5 * (sum_b G_b - sum_b g_b).
    _step(layer, x, torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(layer.msbp_memory, torch.tensor([1.0, 0.0, 0.25], dtype=DTYPE))
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=DTYPE))

    # Step 2: H_b = G_b + M / 2 = [[1.5, 0, .125], [.5, .5, .125]]; sums [2, .5, .25] keep unit 0; g_k = [1.5, .5].
    x_in = x.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x_in).backward(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(layer.msbp_memory, torch.tensor([0.0, 0.25, 0.125], dtype=DTYPE))
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[3.0, 5.0], [0.0, 0.0], [0.0, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(layer.bias.grad, torch.tensor([2.0, 0.0, 0.0], dtype=DTYPE))
    torch.testing.assert_close(x_in.grad, torch.tensor([[1.5, 3.0], [0.5, 1.0]], dtype=DTYPE))  # g_k W[0]


def test_msbp_memory_per_example_sets_and_batch_size_changes():
    layer = SparseBackwardLinear(2, 3, k=1, sparsifier="topk", memory=0.5).to(DTYPE)
    # Example 0 keeps unit 1; example 1 has a tie between units 0 and 1: the lower index (0) wins.
    # M = 0.5 * ([2, -1, .5] - [1, -2, 0]).
    _step(layer, torch.ones(2, 2, dtype=DTYPE), torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 0.0]], dtype=DTYPE))
    torch.testing.assert_close(layer.msbp_memory, torch.tensor([0.5, 0.5, 0.25], dtype=DTYPE))
    torch.testing.assert_close(layer.weight.grad[:, 0], torch.tensor([1.0, -2.0, 0.0], dtype=DTYPE))
    # A batch of one receives the whole memory: H = [0.5, 0.5, 1.25] keeps unit 2.
    _step(layer, torch.ones(1, 2, dtype=DTYPE), torch.tensor([[0.0, 0.0, 1.0]], dtype=DTYPE))
    torch.testing.assert_close(layer.msbp_memory, torch.tensor([0.25, 0.25, 0.0], dtype=DTYPE))
    torch.testing.assert_close(layer.weight.grad[:, 0], torch.tensor([0.0, 0.0, 1.25], dtype=DTYPE))
    # A batch of three shares it: H_b = [1/12, 1/12, 0] each, every example keeps unit 0 (tie, lower index).
    _step(layer, torch.ones(3, 2, dtype=DTYPE), torch.zeros(3, 3, dtype=DTYPE))
    torch.testing.assert_close(layer.msbp_memory, torch.tensor([0.0, 0.125, 0.0], dtype=DTYPE))
    torch.testing.assert_close(layer.weight.grad[:, 0], torch.tensor([0.25, 0.0, 0.0], dtype=DTYPE))


@pytest.mark.parametrize("sparsifier", ["topk", "topk_unified"])
def test_msbp_matches_direct_implementation_of_its_equations(sparsifier):
    layer, dense = _linear_pair(5, 12, k=3, sparsifier=sparsifier, memory=0.8)
    memory = torch.zeros(12, dtype=DTYPE)
    torch.manual_seed(5)
    for batch in (4, 4, 2, 6, 4):
        x, g = torch.randn(batch, 5, dtype=DTYPE), torch.randn(batch, 12, dtype=DTYPE)
        h = g + memory / batch  # every example gets an equal share of M (MSBP paper eq. (20), batch layout)
        kept_g = h * _keep_mask(h, 3, sparsifier)  # g = SI_k(dL/dh + M)
        memory = 0.8 * (h.sum(0) - kept_g.sum(0))  # MSBP paper eq. (22) on the batch sums
        for got, want in zip(_grads(layer, x, g), _grads(dense, x, kept_g)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(layer.msbp_memory, memory)


def test_msbp_conv_memory_is_per_channel_and_position():
    conv = SparseBackwardConv2d(2, 4, 3, padding=1, k=1, memory=0.8).to(DTYPE)
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    g = torch.randn(3, 4, 5, 5, dtype=DTYPE)
    conv(x).backward(g)
    kept = int(g.abs().sum(dim=(0, 2, 3)).argmax())
    expected = 0.8 * g.sum(0).flatten(1)
    expected[kept] = 0.0
    torch.testing.assert_close(conv.msbp_memory, expected)


@pytest.mark.parametrize("sparsifier", ["topk", "topk_unified"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_msbp_conv_matches_its_equations_in_both_memory_formats(sparsifier, memory_format):
    """The conv path gathers, sums and keeps its memory in the layout of the gradient (channels_last gradients are
    seen as (batch, channels, H*W) with the channels innermost); values must not depend on it."""
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 8, 3, padding=1).to(DTYPE)
    conv = SparseBackwardConv2d(3, 8, 3, padding=1, k=3, sparsifier=sparsifier, memory=0.8).to(DTYPE)
    conv.load_state_dict(dense.state_dict())
    memory = torch.zeros(8, 5, 5, dtype=DTYPE)
    for batch in (4, 4, 2, 4):
        x = torch.randn(batch, 3, 5, 5, dtype=DTYPE).contiguous(memory_format=memory_format)
        g = torch.randn(batch, 8, 5, 5, dtype=DTYPE).contiguous(memory_format=memory_format)
        h = g + memory / batch  # MSBP paper eq. (20), batch layout: every example gets an equal share of M
        kept_g = h * _keep_mask(h, 3, sparsifier)[:, :, None, None]
        memory = 0.8 * (h.sum(0) - kept_g.sum(0))  # eq. (22) on the batch sums, per channel and position
        for got, want in zip(_grads(conv, x, g), _grads(dense, x, kept_g)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(conv.msbp_memory, memory.flatten(1))
    if memory_format == torch.channels_last:
        assert conv.msbp_memory.stride() == (1, 8)  # kept in the gradient's layout


def test_recorded_scores_are_those_selected_with_the_msbp_memory_share():
    """What the global budget balances (``last_scores``) is the selection score |dL/dh + M / B| summed over the
    batch, memory included."""
    layer, _ = _linear_pair(5, 6, k=2, memory=0.5)
    layer.record_scores = True
    memory = torch.zeros(6, dtype=DTYPE)
    torch.manual_seed(2)
    for batch in (3, 2, 4):
        x, g = torch.randn(batch, 5, dtype=DTYPE), torch.randn(batch, 6, dtype=DTYPE)
        h = g + memory / batch
        _grads(layer, x, g)
        torch.testing.assert_close(layer.last_scores, h.abs().sum(0))
        memory = 0.5 * (h.sum(0) - (h * _keep_mask(h, 2, "topk_unified")).sum(0))
    assert memory.abs().sum() > 0


def test_msbp_memory_restarts_at_zero_when_the_gradient_dtype_changes():
    """A memory left in another dtype (e.g. by a step under autocast) is not mixed into this gradient."""
    layer, dense = _linear_pair(5, 6, k=2, memory=0.5)
    torch.manual_seed(3)
    x, g = torch.randn(3, 5, dtype=DTYPE), torch.randn(3, 6, dtype=DTYPE)
    layer.msbp_memory = torch.ones(6, dtype=torch.float32)
    for got, want in zip(_grads(layer, x, g), _grads(dense, x, g * _keep_mask(g, 2, "topk_unified"))):
        torch.testing.assert_close(got, want)
    assert layer.msbp_memory.dtype == DTYPE
    torch.testing.assert_close(layer.msbp_memory, 0.5 * (g - g * _keep_mask(g, 2, "topk_unified")).sum(0))


def test_take_units_and_batch_sum_keep_values_in_every_layout():
    from maskprop.sbp.sparsifiers import batch_sum, take_units

    index = torch.tensor([0, 2, 5])
    for t in (torch.randn(4, 6, 9, dtype=DTYPE), torch.randn(4, 9, 6, dtype=DTYPE).transpose(1, 2),
              torch.randn(4, 6, dtype=DTYPE)):
        torch.testing.assert_close(take_units(t, index), t[:, index])
        torch.testing.assert_close(batch_sum(t), t.sum(0))
    strided = torch.randn(4, 9, 6, dtype=DTYPE).transpose(1, 2)  # units innermost, as a channels_last gradient
    assert take_units(strided, index).stride(1) == 1 and batch_sum(strided).stride(0) == 1


def test_gamma_zero_equals_sbp_and_gamma_positive_differs():
    torch.manual_seed(0)
    xs, gs = torch.randn(3, 5, 6, dtype=DTYPE), torch.randn(3, 5, 8, dtype=DTYPE)
    sbp_layer, dense = _linear_pair(6, 8, k=2, memory=0.0)
    msbp_layer, _ = _linear_pair(6, 8, k=2, memory=0.7)
    for step, (x, g) in enumerate(zip(xs, gs)):
        got = _grads(sbp_layer, x, g)
        want = _grads(dense, x, g * _keep_mask(g, 2, "topk_unified"))  # SBP: no memory at any step
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        other = _grads(msbp_layer, x, g)
        if step == 0:
            torch.testing.assert_close(other[0], got[0])
        else:
            assert not torch.allclose(other[0], got[0])
    assert sbp_layer.msbp_memory is None


# ---------------------------------------------------------------------------------------------------------------
# Gradient buffer and optimizers


def _reference_sparse_grads(layer: SparseBackwardLinear, dense: nn.Linear, x, g):
    mask = _keep_mask(g, layer.k, layer.sparsifier)
    return _grads(dense, x, g * mask)


def test_sgd_step_equals_step_with_reference_sparse_gradient():
    layer, dense = _linear_pair(10, 16, k=3)
    reference = copy.deepcopy(dense)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    torch.manual_seed(3)
    for _ in range(4):  # several steps: the buffer is reused and only last step's rows are re-zeroed
        x, g = torch.randn(5, 10, dtype=DTYPE), torch.randn(5, 16, dtype=DTYPE)
        opt.zero_grad()
        layer(x).backward(g)
        dense.load_state_dict(reference.state_dict())
        w_grad, b_grad, _ = _reference_sparse_grads(layer, dense, x, g)
        torch.testing.assert_close(layer.weight.grad, w_grad)
        opt.step()
        opt_ref.zero_grad()
        reference.weight.grad, reference.bias.grad = w_grad, b_grad
        opt_ref.step()
        torch.testing.assert_close(layer.weight, reference.weight)
        torch.testing.assert_close(layer.bias, reference.bias)

    adam = torch.optim.Adam(layer.parameters(), lr=1e-2)
    before = layer.weight.detach().clone()
    adam.zero_grad()
    layer(torch.randn(5, 10, dtype=DTYPE)).sum().backward()
    adam.step()
    assert not torch.equal(before, layer.weight)


def test_gradients_accumulate_and_survive_in_place_changes():
    layer, dense = _linear_pair(6, 9, k=2)
    torch.manual_seed(4)
    batches = [(torch.randn(3, 6, dtype=DTYPE), torch.randn(3, 9, dtype=DTYPE)) for _ in range(4)]
    refs = [_reference_sparse_grads(layer, dense, x, g)[0] for x, g in batches]

    layer.zero_grad(set_to_none=True)
    layer(batches[0][0]).backward(batches[0][1])
    layer(batches[1][0]).backward(batches[1][1])  # no zero_grad: accumulate
    torch.testing.assert_close(layer.weight.grad, refs[0] + refs[1])

    layer.weight.grad.mul_(0.5)  # e.g. clipping, in place
    layer.zero_grad(set_to_none=True)
    layer(batches[2][0]).backward(batches[2][1])
    torch.testing.assert_close(layer.weight.grad, refs[2])

    layer.zero_grad(set_to_none=False)  # zeroed in place, kept as the same tensor
    layer(batches[3][0]).backward(batches[3][1])
    torch.testing.assert_close(layer.weight.grad, refs[3])
    layer.zero_grad(set_to_none=True)
    layer(batches[0][0]).backward(batches[0][1])
    torch.testing.assert_close(layer.weight.grad, refs[0])


def test_autograd_grad_and_partial_backward():
    layer, dense = _linear_pair(6, 9, k=2)
    x, g = torch.randn(3, 6, dtype=DTYPE), torch.randn(3, 9, dtype=DTYPE)
    w_ref, b_ref, x_ref = _reference_sparse_grads(layer, dense, x, g)
    xr = x.clone().requires_grad_(True)
    w_grad, x_grad = torch.autograd.grad(layer(xr), [layer.weight, xr], g)
    torch.testing.assert_close(w_grad, w_ref)
    torch.testing.assert_close(x_grad, x_ref)
    assert layer.weight.grad is None
    layer(xr).backward(g, inputs=[xr])  # nobody asked for dL/dW
    assert layer.weight.grad is None

    layer.direct_grad = False  # gradients through autograd: weight hooks fire
    seen = []
    handle = layer.weight.register_hook(lambda grad: seen.append(grad.clone()))
    layer(x).backward(g)
    handle.remove()
    torch.testing.assert_close(seen[0], w_ref)
    torch.testing.assert_close(layer.weight.grad, w_ref)


def test_weight_hooks_see_the_sparse_gradient_with_direct_grad_on():
    """A hook on the weight (a user's, or a gradient-clipping or logging tool's) makes the layer hand its weight
    gradient to autograd, so the hook fires, even with ``direct_grad`` left on."""
    layer, dense = _linear_pair(6, 9, k=2)
    assert layer.direct_grad
    x, g = torch.randn(3, 6, dtype=DTYPE), torch.randn(3, 9, dtype=DTYPE)
    w_ref = _reference_sparse_grads(layer, dense, x, g)[0]
    seen, accumulated = [], []
    handle = layer.weight.register_hook(lambda grad: seen.append(grad.clone()))
    layer(x).backward(g)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], w_ref)
    torch.testing.assert_close(layer.weight.grad, w_ref)
    layer.zero_grad(set_to_none=True)
    handle = layer.weight.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    layer(x).backward(g)
    handle.remove()
    assert len(accumulated) == 1
    torch.testing.assert_close(accumulated[0], w_ref)


# ---------------------------------------------------------------------------------------------------------------
# Conversion


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def test_convert_swaps_layers_keeps_parameters_and_exempts_the_output():
    torch.manual_seed(0)
    model = _Net()
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    convert(model, ratio=0.5, memory=0.3)
    assert isinstance(model.features[0], SparseBackwardConv2d) and isinstance(model.head[1], SparseBackwardLinear)
    assert type(model.head[3]) is nn.Linear  # output layer left dense
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())
    torch.testing.assert_close(model(x), before)
    assert model.features[2].k == 4 and model.head[1].k == 8 and model.features[0].memory_ratio == 0.3

    model = convert(_Net(), k=2, output_k=3, exempt=("features.0",))
    assert type(model.features[0]) is nn.Conv2d
    assert isinstance(model.head[3], SparseBackwardLinear) and model.head[3].k == 3

    class MyLinear(nn.Linear):
        pass

    assert isinstance(convert(nn.Sequential(MyLinear(4, 4), nn.Linear(4, 2)), k=1)[0], SparseBackwardLinear)


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg11_bn"])
def test_a_converted_maskprop_model_names_no_channel_group(name):
    """The layers convert leaves (BatchNorm, the exempt classifier) stop naming groups: none reads a group that no layer
    writes any more (the MLP's classifier read its last hidden layer's), and the model answers no groups; its output is
    unchanged. A conversion that converts nothing (everything exempt) leaves the groups."""
    import maskprop

    torch.manual_seed(0)
    model = maskprop.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32) if name != "mlp" else torch.randn(2, 3 * 32 * 32)
    before = model(x)
    convert(model, ratio=0.5)
    assert maskprop.channel_groups(model) == model.channel_groups() == {}
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)

    untouched = maskprop.create_model(name, num_classes=10)
    groups = untouched.channel_groups()
    convert(untouched, ratio=0.5, exempt=[n for n, m in untouched.named_modules() if isinstance(m, (nn.Linear,
                                                                                                    nn.Conv2d))])
    assert maskprop.channel_groups(untouched) == groups  # read again: model.channel_groups() keeps its first answer


def test_a_converted_model_names_no_channel_group_where_a_hidden_layer_is_exempt():
    """A hidden conv that ``exempt`` leaves as it is (a maskprop layer) stops naming its output group too: nothing
    in the converted model drops channels."""
    model = maskprop.create_model("resnet20", num_classes=10)
    convert(model, ratio=0.5, exempt=["layer1.0.conv1"])
    assert isinstance(model.layer1[0].conv1, maskprop.sparse.SparseConv2d)
    assert model.layer1[0].conv1.out_group is None and maskprop.channel_groups(model) == {}


def test_converted_layers_keep_every_setting_of_the_original():
    """A converted conv computes nn.Conv2d's output and, with k = n, its gradients, for stride, padding, padding
    mode and dilation that differ from the defaults (and between height and width); the converted layers run the
    sparsifier and memory asked for and keep the training mode."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=(2, 1), padding=(1, 2), dilation=(2, 1), padding_mode="reflect").to(DTYPE)
    reference = copy.deepcopy(conv)
    layer = convert(nn.Sequential(conv), k=4, sparsifier="topk", memory=0.3, exempt=())[0]
    assert isinstance(layer, SparseBackwardConv2d)
    assert (layer.sparsifier, layer.memory_ratio) == ("topk", 0.3)
    x = torch.randn(2, 3, 11, 10, dtype=DTYPE)
    torch.testing.assert_close(layer(x.clone().requires_grad_(True)), reference(x), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(reference(x))
    for got, want in zip(_grads(layer, x, g), _grads(reference, x, g)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    # The sparsifier reaches the backward: per-example top-1 keeps each example's own unit.
    torch.manual_seed(1)
    linear = nn.Linear(6, 4).to(DTYPE)
    reference = copy.deepcopy(linear)
    layer = convert(nn.Sequential(linear), k=1, sparsifier="topk", exempt=())[0]
    grad = torch.tensor([[3.0, 4.0, 0.0, 0.1], [3.0, 0.0, -4.0, 0.2]], dtype=DTYPE)  # unified would keep unit 0
    x = torch.randn(2, 6, dtype=DTYPE)
    for got, want in zip(_grads(layer, x, grad), _grads(reference, x, grad * _keep_mask(grad, 1, "topk"))):
        torch.testing.assert_close(got, want)

    model = _Net().eval()
    convert(model, k=2)
    assert not any(m.training for m in model.modules())
    assert all(m.training for m in convert(_Net().train(), k=2).modules())


def test_dense_backward_nests_and_restores_each_layer_s_own_setting():
    model = convert(_Net(), k=2)
    layers = [layer for _, layer in sbp.sparse_layers(model)]
    layers[0].sparse_enabled = False  # switched off by hand before
    with sbp.dense_backward(model):
        with sbp.dense_backward(model):
            pass
        assert not any(layer.sparse_enabled for layer in layers)  # the outer block still runs dense
    assert [layer.sparse_enabled for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_sbp_state_roundtrip():
    model = convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), k=2, memory=0.5)
    model(torch.randn(3, 4)).sum().backward()
    state = sbp.sbp_state_dict(model)
    fresh = convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), k=5, memory=0.5)
    sbp.load_sbp_state_dict(fresh, state)
    assert fresh[0].k == 2
    torch.testing.assert_close(fresh[0].msbp_memory, model[0].msbp_memory)


# ---------------------------------------------------------------------------------------------------------------
# Budget


def test_balance_keeps_total_and_equalises_thresholds():
    torch.manual_seed(0)
    scores = [torch.rand(50) * 4, torch.rand(30), torch.rand(80) * 0.5 + 0.2]
    total = 40
    allocation = balance(scores, total, ks=[30, 5, 5])  # a badly unbalanced start
    assert sum(allocation.ks) == total
    assert allocation.spreads[0] > 0 and allocation.spreads[-1] == 0.0
    for before, after in zip(allocation.spreads, allocation.spreads[1:]):
        assert after <= before / 2
    # One common threshold: every layer keeps exactly its scores above it (min_k=1 entries aside).
    for s, k in zip(scores, allocation.ks):
        top = s.sort(descending=True).values
        assert all(v > allocation.threshold for v in top[1:k]) and all(v < allocation.threshold for v in top[k:])

    ks = [30, 5, 5]
    spread = threshold_spread(scores, ks)
    for _ in range(5):
        ks = balance_step(scores, ks)
        new_spread = threshold_spread(scores, ks)
        assert sum(ks) == total and new_spread <= spread / 2
        spread = new_spread


def test_variance_scales_and_global_budget():
    geometry = [(3, 16, 9), (16, 32, 9), (32, 10, 1)]
    v2 = 9 * 16 / (9 * 32)
    v3 = v2 * (1 * 32) / (9 * 10)
    assert variance_scales(geometry) == pytest.approx([1.0, 1 / math.sqrt(v2), 1 / math.sqrt(v3)])

    model = convert(nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3)),
                    ratio=0.2)
    budget = GlobalBudget(model, total=9, scale="variance")
    assert budget.ks == [6, 3] and model[0].k == 6
    model(torch.randn(8, 5)).pow(2).sum().backward()
    ks = budget.update()
    assert sum(ks) == 9 and [model[0].k, model[2].k] == ks and budget.spreads[-1] == 0.0


def test_proportional_allocation_shares_what_is_above_min_k_and_ties_go_to_the_earlier_layer():
    # sizes [2, 10], total 6, min_k 1: the 4 units above min_k split over [1, 9]: quotas 0.4 and 3.6 -> [0, 3] and the
    # unit left goes to the larger remainder (0.6): [1 + 0, 1 + 4].
    assert sbp.proportional_allocation([2, 10], 6) == [1, 5]
    assert sbp.proportional_allocation([1, 10], 11) == [1, 10]  # never more than a layer's size
    # sizes [4, 4], total 5: quotas 1.5 and 1.5, the unit left to the earlier layer.
    assert sbp.proportional_allocation([4, 4], 5) == [3, 2]
    assert sbp.proportional_allocation([3, 3], 3, min_k=0) == [2, 1]


def test_balance_step_bisects_the_bracket_at_its_midpoint_hand_computed():
    a, b = torch.tensor([8.0, 6.0, 4.0, 2.0]), torch.tensor([7.0, 5.0, 3.0, 1.0])
    # ks [4, 0]: bracket [2, 7], mid 4.5; 4 entries >= 4.5 (8, 6 | 7, 5) reach the total, so the threshold is in
    # [4.5, 7]: each layer keeps what is above 7 ([1, 0]) and the 3 missing come from [4.5, 7] in proportion to
    # [1, 2] entries there: [2, 2] (a common threshold at once).
    assert balance_step([a, b], [4, 0], min_k=0) == [2, 2]
    # ks [0, 2] of [9, 3] and [4, 2]: bracket [2, 9], mid 5.5; one entry >= 5.5 (9), short of 2, so the threshold is
    # in [2, 5.5): each layer keeps what is >= 5.5 ([1, 0]) and the one missing comes from [2, 5.5) in proportion to
    # [1, 2] entries there (3 | 4, 2): the second layer's share 2/3 has the larger remainder: [1, 1].
    assert balance_step([torch.tensor([9.0, 3.0]), torch.tensor([4.0, 2.0])], [0, 2], min_k=0) == [1, 1]
    # A bracket down to adjacent floats is settled exactly: the global top 2 of {1+ulp} and {1, 1} (ties: lower
    # layer first).
    up = math.nextafter(1.0, 2.0)
    assert balance_step([torch.tensor([up], dtype=DTYPE), torch.tensor([1.0, 1.0], dtype=DTYPE)], [0, 2],
                        min_k=0) == [1, 1]


def test_balance_out_of_steps_takes_the_global_top_entries():
    torch.manual_seed(0)
    scores = [torch.rand(50) * 4, torch.rand(30), torch.rand(80) * 0.5 + 0.2]
    settled = balance(scores, 40, ks=[30, 5, 5])
    direct = balance(scores, 40, ks=[30, 5, 5], max_steps=0)  # no step: the exact global top 40 - 3 beyond min_k
    assert direct.ks == settled.ks and sum(direct.ks) == 40 and direct.spreads[-1] == 0.0
    free = torch.cat([s.sort(descending=True).values[1:] for s in scores])
    cut = free.sort(descending=True).values[40 - 3 - 1]
    assert direct.ks == [1 + int((s.sort(descending=True).values[1:] >= cut).sum()) for s in scores]


@pytest.mark.parametrize("scale", ["none", "variance", "rms"])
def test_global_budget_balances_the_scaled_scores(scale):
    """What ``update`` balances: each layer's recorded scores times its variance factor, or over their root mean
    square."""
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(), nn.Conv2d(24, 8, 3),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(200, 3)), ratio=0.2)
    budget = GlobalBudget(model, total=12, scale=scale)
    start = list(budget.ks)
    model(torch.randn(4, 3, 9, 9)).pow(2).sum().backward()
    raw = [layer.last_scores.double() for layer in budget.layers]
    geometry = [(3, 16, 9), (16, 24, 1), (24, 8, 9)]
    if scale == "variance":
        scaled = [s * f for s, f in zip(raw, variance_scales(geometry))]
    elif scale == "rms":
        scaled = [s / s.square().mean().sqrt() for s in raw]
    else:
        scaled = raw
    assert budget.update() == balance(scaled, 12, ks=start).ks


def test_a_global_budget_by_ratio_keeps_at_least_min_k_per_layer():
    model = convert(nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3)),
                    ratio=0.2)
    budget = GlobalBudget(model, ratio=0.01)  # round(0.01 * 30) = 0 units: raised to min_k = 1 per layer
    assert budget.total == 2 and budget.ks == [1, 1]
    assert GlobalBudget(model, ratio=0.5).total == 15


# ---------------------------------------------------------------------------------------------------------------
# Angle diagnostic


def test_gradient_angles_match_direct_computation():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(DTYPE)
    model = convert(copy.deepcopy(dense), k=3, memory=0.6)
    x, y = torch.randn(10, 6, dtype=DTYPE), torch.randint(0, 3, (10,))
    model(x).sum().backward()  # build some memory first
    model.zero_grad(set_to_none=True)
    memory = model[0].msbp_memory.clone()

    loss = F.cross_entropy(model(x), y)
    angles = gradient_angles(model, loss)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model[0].msbp_memory, memory)  # the probe did not update the memory

    loss.backward()  # the training step: sparse estimate with memory, as the probe saw it
    estimate = [p.grad.clone() for p in model.parameters()]
    F.cross_entropy(dense(x), y).backward()
    true = [p.grad for p in dense.parameters()]

    def angle(a, b):
        a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
        return math.degrees(math.acos((a @ b / (a.norm() * b.norm())).clamp(-1, 1).item()))

    assert angles["angle/overall"] == pytest.approx(angle(estimate, true), abs=1e-9)
    assert angles["angle/0"] == pytest.approx(angle(estimate[0:2], true[0:2]), abs=1e-9)
    assert angles["angle/2"] == pytest.approx(angle(estimate[2:4], true[2:4]), abs=1e-9)
    assert "angle/4" not in angles and 0.0 < angles["angle/0"] < 90.0
    assert sbp.angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(45.0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "make, value",
    [
        (lambda: SparseBackwardLinear(4, 5, k=6), "k=6"),
        (lambda: SparseBackwardLinear(4, 5, k=0), "k=0"),
        (lambda: SparseBackwardLinear(4, 5, k=-2), "k=-2"),
        (lambda: SparseBackwardLinear(4, 5, k=2.5), "k=2.5"),
        (lambda: SparseBackwardLinear(4, 5, ratio=0.0), "ratio=0.0"),
        (lambda: SparseBackwardLinear(4, 5, ratio=1.5), "ratio=1.5"),
        (lambda: SparseBackwardLinear(4, 5), "k=None"),
        (lambda: SparseBackwardLinear(4, 5, k=1, memory=1.0), "memory=1.0"),
        (lambda: SparseBackwardLinear(4, 5, k=1, memory=-0.1), "memory=-0.1"),
        (lambda: SparseBackwardLinear(4, 5, k=1, sparsifier="top"), "'top'"),
        (lambda: SparseBackwardConv2d(4, 4, 3, groups=2, k=1), "groups=2"),
        (lambda: sbp.sparse_layer(nn.Conv1d(2, 2, 3), k=1), "Conv1d"),
        (lambda: convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Linear(2, 2)), k=1), "groups=4"),
        (lambda: convert(nn.Sequential(nn.Linear(2, 2)), k=1, exempt=("nope",)), "nope"),
        (lambda: convert(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), k=3), "k=3"),
        (lambda: balance([torch.rand(3), torch.rand(4)], total=9), "total=9"),
        (lambda: GlobalBudget(nn.Linear(2, 2), total=1), "no sparse-backward layers"),
    ],
)
def test_bad_input_raises_one_line_value_error(make, value):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert value in message and "\n" not in message and "expected" in message


# ---------------------------------------------------------------------------------------------------------------
# Training (slow)


def _synthetic_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 16x16 images: a class template shifted by up to 2 pixels, random contrast, noise."""
    templates = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    templates = F.interpolate(templates, size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    labels = torch.randint(0, 10, (n,), generator=generator)
    dy, dx = torch.randint(0, 5, (2, n), generator=generator)
    images = torch.stack([templates[c, y:y + 16, x:x + 16] for c, y, x in zip(labels, dy, dx)])
    contrast = 0.5 + torch.rand(n, 1, 1, generator=generator)
    images = images * contrast + 0.8 * torch.randn(n, 16, 16, generator=generator)
    return images.flatten(1), labels


def _train_accuracy(model: nn.Module, data, epochs: int = 8) -> float:
    (x_train, y_train), (x_test, y_test) = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train), generator=generator).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item() * 100


@pytest.mark.slow
def test_msbp_mlp_trains_within_two_points_of_dense():
    # MSBP paper Table 2 setting scaled down: 3-layer MLP, h = 500, r = 0.04, gamma = 0.8, Adam 1e-3, batch 32.
    # One thread: on a shared 2-core machine, two threads slow these small products down several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = (_synthetic_images(6000, generator), _synthetic_images(2000, generator))

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(256, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(), nn.Linear(500, 10))

    try:
        dense_acc = _train_accuracy(mlp(), data)
        msbp_acc = _train_accuracy(convert(mlp(), ratio=0.04, memory=0.8), data)  # k = 20, output layer dense
    finally:
        torch.set_num_threads(threads)
    assert 90.0 < dense_acc < 99.9  # learnable, and not trivially perfect for the comparison to mean something
    assert msbp_acc >= dense_acc - 2.0, (dense_acc, msbp_acc)


def test_row_grad_buffer_holds_exactly_the_rows_written_since_the_last_clear():
    """``param.grad`` after every write equals a dense tensor kept by hand: rows accumulated since it was last cleared,
    zero elsewhere; rows written before a clear never come back, also after an in-place change of the gradient that
    touched other rows (weight decay, noise, clipping in place), and after the parameter changes dtype."""
    param = nn.Parameter(torch.zeros(6, 3, dtype=DTYPE))
    buffer, expected = sbp.RowGradBuffer(), torch.zeros(6, 3, dtype=DTYPE)
    gen = torch.Generator().manual_seed(0)

    def write(rows, clear=False):
        nonlocal expected
        if clear:
            param.grad, expected = None, torch.zeros(6, 3, dtype=param.dtype)
        rows = torch.tensor(rows)
        values = torch.randn(len(rows), 3, generator=gen, dtype=DTYPE).to(param.dtype)
        buffer.accumulate(param, rows, values)
        expected = expected.index_add(0, rows, values)
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=0)

    write([1, 4], clear=True)
    write([2, 4])  # accumulated: rows 1, 2 and 4 may be non-zero
    write([0], clear=True)
    param.grad.add_(1.0)  # in place, every row
    expected += 1.0
    write([3], clear=True)
    write([5], clear=True)
    param.grad.add_(1.0)
    expected += 1.0
    write([2])  # accumulated into a gradient changed in place
    write([1], clear=True)
    write([0, 5], clear=True)
    param.data = param.data.float()
    write([2], clear=True)
    assert param.grad.dtype == torch.float32


def test_gradient_angles_are_degrees_in_float64_nan_for_a_zero_vector_and_clamped():
    # nearly parallel float32 vectors: their angle needs float64 sums (in float32 the cosine rounds to 1)
    a = torch.ones(1000)
    b = a.clone()
    b[0] = 1.001
    x, y = 999 + float(b[0]), 999 + float(b[0]) ** 2
    reference = math.degrees(math.acos(x / math.sqrt(1000 * y)))
    assert 0.0 < reference < 0.01
    assert sbp.angle_degrees(a, b) == pytest.approx(reference, rel=1e-6)
    assert sbp.angle_degrees(torch.tensor([1.0, 0.0]), torch.tensor([0.0, -2.0])) == pytest.approx(90.0)
    assert math.isnan(sbp.angle_degrees(torch.zeros(3), torch.ones(3)))
    assert math.isnan(sbp.angle_degrees(torch.ones(3), torch.zeros(3)))
    # parallel and opposite vectors whose cosine rounds past +-1: 0 and 180 degrees, not a math domain error
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(7, generator=gen, dtype=torch.float64)
        assert [sbp.angle_degrees(v, s * v) for s in (0.1, 3.0, -1.0)] == pytest.approx([0.0, 0.0, 180.0], abs=1e-5)
