"""Weight gathers with a cheap backward.

A compact conv runs on ``W[out_kept][:, in_kept]``. Chained ``index_select`` calls cost two gathers forward and two
``index_add_`` scatters backward; here one ``index_select`` reads the rows of a contiguous 2-d view of the weight with
precomputed flat indices, and the backward writes the gradient into a zero tensor with one ``index_copy_`` (indices
are unique, so a copy is exact and cheaper than an accumulate). On this project's 2-core CPU that cut the gather's
backward about 2.5x (DESIGN.md, "What measurements on this machine showed").
"""

from __future__ import annotations

import torch
from torch import Tensor


class _GatherRows(torch.autograd.Function):
    """``source.index_select(0, index)`` whose backward is one zero-fill and one ``index_copy_``."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.source_shape = source.shape
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.source_shape)
        full.index_copy_(0, index, grad)
        return full, None


def gather_rows(source: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (unique, int64) of a 2-d tensor, differentiable with a copy-based backward."""
    if not source.requires_grad or not torch.is_grad_enabled():
        return source.index_select(0, index)
    return _GatherRows.apply(source, index)


def flat_index(out_index: Tensor | None, in_index: Tensor | None, in_channels: int) -> Tensor | None:
    """Row indices into the ``(c_out * c_in, k*k)`` view of a weight that select ``W[out_index][:, in_index]``.

    ``None`` for a side means that side is kept whole; the flat index is only needed (and only returned) when both
    sides are gathered.
    """
    if out_index is None or in_index is None:
        return None
    return torch.add(in_index, out_index[:, None], alpha=in_channels).view(-1)


def gather_weight(weight: Tensor, out_index: Tensor | None, in_index: Tensor | None, flat: Tensor | None) -> Tensor:
    """``weight[out_index][:, in_index]`` for a weight of shape ``(c_out, c_in, *kernel)``.

    Args:
        weight: full-size master weight (contiguous).
        out_index: kept output channels, or ``None`` for all.
        in_index: kept input channels, or ``None`` for all.
        flat: the precomputed :func:`flat_index` of ``(out_index, in_index)``.
    """
    if out_index is None and in_index is None:
        return weight
    c_out, c_in = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    if in_index is None:
        rows = gather_rows(weight.reshape(c_out, -1), out_index)
        return rows.view(out_index.numel(), c_in, *kernel)
    if out_index is None:
        # Whole output side, gathered inputs: gather along dim 1 (rare; an always-full residual stream feeding a unit).
        return weight.index_select(1, in_index)
    rows = gather_rows(weight.reshape(c_out * c_in, -1), flat)
    return rows.view(out_index.numel(), in_index.numel(), *kernel)
