"""Training-mode BatchNorm of channels_last CPU activations with any number of channels.

Compact execution gives BatchNorm whatever number of channels a sampled mask keeps: 12, 17, 61. PyTorch's CPU kernel
for channels_last activations vectorises over the channels and is fast when their number is a multiple of 16; for
other counts it is several times slower, enough to double BatchNorm's share of a compact step with sampled widths
(the figures: BENCHMARKS.md, "Implementation choices": BatchNorm).

Here the activations of ``C`` channels are viewed as the rows of an ``(N / r, r C)`` matrix, ``r`` the smallest
factor that makes ``r C`` a multiple of 16 (a free view of channels_last memory; ``N = batch x H x W``). Column sums
come from one matrix-vector product and are folded back onto the ``C`` channels, and the normalisation is one
broadcast multiply-add over rows of ``r C`` elements, so everything runs vectorised (``tools/bench_batchnorm.py``
times both). The statistics are computed in two passes (mean, then the mean squared deviation), as exact as the
native kernel; the backward is the usual BatchNorm backward from the saved centred input. Outside its conditions
(:func:`eligible`: fewer than 64 channels, off the multiples of 16) the native kernel runs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["batch_norm_nhwc", "eligible"]

_VECTOR = 16  # floats per AVX-512 register; a multiple of the AVX2 width too
_NATIVE_FROM = 64  # channels from which the native kernel is about as fast at any count (tools/bench_batchnorm.py)


def _fold(c: int) -> int:
    """Rows folded into one matrix row: the smallest ``r`` with ``r * c`` a multiple of 16."""
    return _VECTOR // math.gcd(c, _VECTOR)


def eligible(x: Tensor) -> bool:
    """Whether :func:`batch_norm_nhwc` serves ``x``: a float32/float64 CPU tensor ``(B, C, H, W)`` in channels_last
    memory with fewer than 64 channels, not a multiple of 16, and ``B x H x W`` dividing into the folded rows.

    Where the native kernel is fast (multiples of 16, and 64 channels or more) it keeps the work; below 64 the path
    here is the faster one (``tools/bench_batchnorm.py``; the figures are in BENCHMARKS.md).
    """
    if x.dim() != 4 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    batch, channels, height, width = x.shape
    if channels % _VECTOR == 0 or channels >= _NATIVE_FROM or height * width == 1 or channels == 1:
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and (batch * height * width) % _fold(channels) == 0


def _rows(t: Tensor, fold: int) -> Tensor:
    """The ``(N / fold, fold * C)`` matrix view of a channels_last ``(B, C, H, W)`` tensor."""
    channels = t.shape[1]
    return t.permute(0, 2, 3, 1).reshape(-1, fold * channels)


def _column_sums(rows: Tensor, channels: int) -> Tensor:
    """Per-channel sums of a folded matrix: one matrix-vector product, then the ``fold`` copies added up."""
    ones = rows.new_ones(1, rows.shape[0])
    return (ones @ rows).view(-1, channels).sum(0)


class _BatchNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):  # type: ignore[override]
        batch, channels, height, width = x.shape
        n, fold = batch * height * width, _fold(channels)
        rows = _rows(x, fold)
        mean = _column_sums(rows, channels) / n
        centered = rows - mean.repeat(fold)  # saved for the backward (with invstd it gives the normalised input)
        var = _column_sums(centered.square(), channels) / n
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else weight * invstd
        # The output is a tensor of its own (not a view: an in-place ReLU follows), written through its row view.
        y = torch.empty_like(x, memory_format=torch.channels_last)
        if bias is None:
            torch.mul(centered, scale.repeat(fold), out=_rows(y, fold))
        else:
            torch.addcmul(bias.repeat(fold), centered, scale.repeat(fold), out=_rows(y, fold))
        ctx.save_for_backward(centered, weight, invstd)
        ctx.shape = (batch, channels, height, width)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):  # type: ignore[override]
        centered, weight, invstd = ctx.saved_tensors
        batch, channels, height, width = ctx.shape
        n, fold = batch * height * width, _fold(channels)
        rows_dy = _rows(grad_y.contiguous(memory_format=torch.channels_last), fold)
        sum_dy = _column_sums(rows_dy, channels)
        sum_dy_xhat = _column_sums(rows_dy * centered, channels) * invstd  # sum(dy * xhat), xhat = centered * invstd
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = k (dy - sum(dy) / n - xhat sum(dy xhat) / n),  k = weight * invstd
            k = invstd if weight is None else weight * invstd
            grad_x = torch.addcmul((-k * sum_dy / n).repeat(fold), centered,
                                   (-k * invstd * sum_dy_xhat / n).repeat(fold))
            grad_x.addcmul_(rows_dy, k.repeat(fold))
            grad_x = grad_x.view(batch, height, width, channels).permute(0, 3, 1, 2)
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def batch_norm_nhwc(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm of ``x`` with batch statistics (requires :func:`eligible`).

    Returns:
        ``(y, mean, var)``: the normalised output (channels_last), and the batch mean and biased variance of each
        channel (not differentiable), for the caller's running statistics.
    """
    return _BatchNormNHWC.apply(x, weight, bias, eps)
