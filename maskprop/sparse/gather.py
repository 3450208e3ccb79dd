"""Row gathers with a cheap backward.

A compact conv runs on ``W[out_kept][:, in_kept]``. Chained ``index_select`` calls cost two gathers forward and two
``index_add_`` scatters backward; here one ``index_select`` reads the rows of a contiguous 2-d view (of all weights
of one kernel area at once, see :mod:`maskprop.sparse.execution`) with precomputed flat indices, and the backward
writes the gradient into a zero tensor with one ``index_copy_``: the indices are unique, so a copy is exact, and it is
cheaper than an accumulate (BENCHMARKS.md, "Implementation choices": weight gathers).
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
    """Rows ``index`` (unique, int64) of a tensor, differentiable with a copy-based backward."""
    if not source.requires_grad or not torch.is_grad_enabled():
        return source.index_select(0, index)
    return _GatherRows.apply(source, index)
