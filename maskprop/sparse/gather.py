"""Row gathers with a cheap backward.

A compact conv runs on ``W[out_kept][:, in_kept]``. Chained ``index_select`` calls cost two gathers forward and two
``index_add_`` scatters backward; here one ``index_select`` reads the rows of a contiguous 2-d view (of all weights
of one kernel area at once, see :mod:`maskprop.sparse.execution`) with precomputed flat indices, and the backward
writes the gradient into a zero tensor with one ``index_copy_``: the indices are unique, so a copy is exact, and it is
cheaper than an accumulate (BENCHMARKS.md, "Implementation choices": weight gathers).

Gathered rows that hold several tensors carry padding rows between them, so that each tensor starts at an aligned
address; :func:`split_padded` cuts such a buffer into its tensors, leaving the padding out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

# Every tensor gathered into a buffer shared with others starts at a multiple of this many elements of it: at least
# 16 bytes for every dtype a model trains in. Vectorised GPU kernels (cuBLASLt, cuDNN) choose their loads by the
# alignment of their operands' addresses; a weight at an arbitrary offset of a shared buffer makes them fail
# ("misaligned address") or find no kernel at all.
ALIGN_ELEMENTS = 16


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
    """Rows ``index`` (int64) of a tensor, differentiable with a copy-based backward.

    The indices are unique, except that padding rows may all read one row: their gradient is zero, so whichever copy
    lands last writes the same zero there.
    """
    if not source.requires_grad or not torch.is_grad_enabled():
        return source.index_select(0, index)
    return _GatherRows.apply(source, index)


def interleave(sizes: list[int], pads: list[int]) -> list[int]:
    """``[sizes[0], pads[0], sizes[1], ...]``: the split of a buffer of tensors each followed by its padding."""
    return [n for pair in zip(sizes, pads) for n in pair]


class _SplitPadded(torch.autograd.Function):
    """The tensors of a padded buffer as views. The backward cuts the padding's gradient from one zero tensor with one
    split and concatenates once: ``split``'s own backward would make a zero tensor per unused piece, and slicing one
    zero tensor per piece would add a call per piece."""

    @staticmethod
    def forward(ctx, rows: Tensor, sizes: list[int], pads: list[int]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.sizes, ctx.pads, ctx.row_shape = sizes, pads, rows.shape[1:]
        return tuple(rows.split(interleave(sizes, pads))[::2])

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        like = next((grad for grad in grads if grad is not None), None)
        if like is None:
            return None, None, None
        paddings = like.new_zeros(sum(ctx.pads), *ctx.row_shape).split(ctx.pads)
        parts = []
        for grad, size, padding in zip(grads, ctx.sizes, paddings):  # a piece no layer used has no gradient
            parts += [like.new_zeros(size, *ctx.row_shape) if grad is None else grad, padding]
        return torch.cat(parts), None, None


def split_padded(rows: Tensor, sizes: list[int], pads: list[int]) -> list[Tensor]:
    """The pieces of ``sizes`` rows of ``rows``, each followed by ``pads`` rows that are left out."""
    if not rows.requires_grad or not torch.is_grad_enabled():
        return list(rows.split(interleave(sizes, pads))[::2])
    return list(_SplitPadded.apply(rows, sizes, pads))


# --- what one buffer gathers: its tensors and where they sit -----------------------------------------------------


@dataclass(frozen=True)
class GatherPiece:
    """One gathered tensor (a weight, a bias, or one BatchNorm unit's weight or bias): its entries in its table.

    Attributes:
        layer: The layer that owns it.
        kind: ``"weight"`` or ``"bias"``.
        shape: The gathered tensor's shape.
        start: Its first entry in its table (a multiple of the alignment when concatenated).
        entries: Its entries (rows of its ``(rows, area)`` view); padding up to the next piece follows.
    """

    layer: nn.Module
    kind: str
    shape: tuple[int, ...]
    start: int
    entries: int


@dataclass
class GatherTable:
    """The tensors gathered together: conv and linear weights (and biases) of one kernel area, or the BatchNorm units.

    Attributes:
        area: Elements per row (the kernel area; 1 for linear weights, biases and BatchNorm parameters).
        pieces: Its tensors, in the order of their concatenation.
        start: Its first entry in the state's flat index buffer.
        entries: Its entries, padding included.
        split_sizes: Entry counts that cut its gathered rows into pieces, each with the padding that follows it.
        modules: For the BatchNorm table, its units (a piece for each one's weight, then each one's bias).
    """

    area: int
    pieces: list[GatherPiece]
    start: int
    entries: int
    split_sizes: list[int]
    modules: list[nn.Module] = field(default_factory=list)

    @property
    def sizes(self) -> list[int]:
        """Each piece's entries, padding left out."""
        return [p.entries for p in self.pieces]

    @property
    def pads(self) -> list[int]:
        """The padding entries after each piece."""
        return [n - p.entries for n, p in zip(self.split_sizes, self.pieces)]
