"""Row gathers with a cheap backward.

A compact conv runs on ``W[out_kept][:, in_kept]``. Chained ``index_select`` calls cost two gathers forward and two
``index_add_`` scatters backward; here one ``index_select`` reads the rows of a contiguous 2-d view (of all weights
of one kernel area at once, see :mod:`maskprop.sparse.execution`) with precomputed flat indices, and the backward
writes the gradient into a zero tensor with one ``index_copy_``: the indices are unique, so a copy is exact, and it is
cheaper than an accumulate (BENCHMARKS.md, "Implementation choices": weight gathers).

Gathered rows that hold several tensors carry padding rows between them, so that each tensor starts at an aligned
address; :func:`split_padded` cuts such a buffer into its tensors, leaving the padding out.

What one buffer gathers is a :class:`GatherTable` of :class:`GatherPiece` entries, and :func:`gather_pieces`,
:func:`gather_norms` and :func:`write_back_norms` gather a table and write BatchNorm statistics back for both execution
states: the eager one (:mod:`maskprop.sparse.execution`, index sets built per mask) and the static one
(:mod:`maskprop.sparse.static`, index buffers rewritten in place); they differ only in where the flat indices come
from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layernorm import SparseChannelNorm

# Every tensor gathered into a buffer shared with others starts at a multiple of this many elements of it: at least
# 16 bytes for every dtype a model trains in. Vectorised GPU kernels (cuBLASLt, cuDNN) choose their loads by the
# alignment of their operands' addresses; a weight at an arbitrary offset of a shared buffer makes them fail
# ("misaligned address") or find no kernel at all.
ALIGN_ELEMENTS = 16


class _Gather(torch.autograd.Function):
    """``source.index_select(dim, index)`` whose backward is one zero-fill and one ``index_copy_``."""

    @staticmethod
    def forward(ctx, source: Tensor, index: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.source_shape, ctx.dim = source.shape, dim
        return source.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.source_shape)
        full.index_copy_(ctx.dim, index, grad)
        return full, None, None


def gather_rows(source: Tensor, index: Tensor, dim: int = 0) -> Tensor:
    """Rows ``index`` (int64) of a tensor (its slices along ``dim``), differentiable with a copy-based backward.

    The indices are unique, except that padding rows may all read one row: their gradient is zero, so whichever copy
    lands last writes the same zero there.
    """
    if not source.requires_grad or not torch.is_grad_enabled():
        return source.index_select(dim, index)
    return _Gather.apply(source, index, dim)


def gather_side(tensor: Tensor, dim: int | None, index: Tensor, area: int, channels: int) -> Tensor:
    """A weight (or bias) of ``channels`` input channels read on the sides a subnetwork prunes, from the tensor itself:
    ``dim`` 0, its output channels ``index`` (rows of its ``(outputs, rest)`` view); ``dim`` 1, its input channels
    ``index`` (of its ``(outputs, channels, rest)`` view); ``None``, both: ``index`` the flat rows of its
    ``(rows, area)`` view. A side kept whole takes no index at all, so a tensor pruned on one side costs one index
    of its channels instead of one per row it keeps (BENCHMARKS.md, "Implementation choices": weight gathers)."""
    if dim is None:
        return gather_rows(tensor.reshape(-1, area), index)
    rest = (-1,) if dim == 0 else (channels, -1)
    return gather_rows(tensor.reshape(tensor.shape[0], *rest), index, dim)


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
        padded = sum(ctx.pads) > 0  # no zero tensor (and no call) for a buffer without padding
        paddings = like.new_zeros(sum(ctx.pads), *ctx.row_shape).split(ctx.pads) if padded else [None] * len(ctx.pads)
        parts = []
        for grad, size, padding in zip(grads, ctx.sizes, paddings):  # a piece no layer used has no gradient
            parts.append(like.new_zeros(size, *ctx.row_shape) if grad is None else grad)
            if padding is not None and padding.shape[0]:
                parts.append(padding)
        return torch.cat(parts), None, None


def split_padded(rows: Tensor, sizes: list[int], pads: list[int]) -> list[Tensor]:
    """The pieces of ``sizes`` rows of ``rows``, each followed by ``pads`` rows that are left out."""
    if not rows.requires_grad or not torch.is_grad_enabled():
        return list(rows.split(interleave(sizes, pads))[::2])
    return list(_SplitPadded.apply(rows, sizes, pads))


# --- what one buffer gathers: its tensors and where they sit -----------------------------------------------------


@dataclass(frozen=True)
class GatherPiece:
    """One gathered tensor (a weight, a bias, a LayerNorm's weight or bias, or one BatchNorm unit's weight or bias):
    its entries in its table.

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
    """The tensors gathered together: conv and linear weights (and biases, and LayerNorms' weights and biases, in the
    area-1 table) of one kernel area, or the BatchNorm units.

    Attributes:
        area: Elements per row (the kernel area; 1 for linear weights, biases, LayerNorm and BatchNorm parameters).
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

    @functools.cached_property
    def needs_factor(self) -> bool:
        """Whether its padded entries must be multiplied by zero. Not for weights whose layers leave their output to be
        masked by the grouped BatchNorm that follows (``mask_output`` false): a padded output channel, whatever its
        weights, leaves that BatchNorm as zero (its gathered weight and bias are zero there; one without them multiplies
        its output by zero there), and so receives a zero gradient; a padded input channel reads zeros (its producer's
        padded output, or a sum of them). So one multiply of every gathered weight, and one in the backward, are saved,
        and the weights, outputs and gradients stay those of the subnetwork (given finite values); a GroupNorm of the
        group that follows (``mask_output`` false too) zeroes a padded channel's output and gradient whatever its
        input. Nor for a LayerNorm's, RMSNorm's or GroupNorm's weight and bias: with padded channels it normalises
        with ``kept_layer_norm``, ``kept_rms_norm`` or ``kept_group_norm``, whose padded outputs are zero whatever
        their weight (their normalised values are zero) and bias (multiplied by the 0/1 factors there), and so are
        those entries' gradients. The BatchNorm table itself,
        and layers that mask their own output, need it. Read at every pass, found once (a table is complete before its
        first pass)."""
        return bool(self.modules) or any(getattr(p.layer, "mask_output", True) for p in self.pieces
                                         if not isinstance(p.layer, SparseChannelNorm))


# --- gathering a table for one mask: shared by the eager and the static execution states ----------------------------


def gather_pieces(table: GatherTable, flat: Tensor, factor: Tensor | None = None,
                  source: Tensor | None = None) -> list[Tensor]:
    """The table's tensors for one mask, shaped as its pieces say.

    With ``source`` (the concatenation, as ``(rows, area)`` views, of every tensor ``flat`` indexes, and a zero row that
    the padding entries read) one ``index_select`` gathers all pieces, which are cut from its rows at their aligned
    starts; without, each piece is gathered from its own tensor, ``flat`` holding each piece's rows in that tensor and
    no padding. ``factor``: the entries' 0/1 factors (0 for a padded channel) when some are padding, applied where
    the table needs them (:attr:`GatherTable.needs_factor`).
    """
    factor = factor if table.needs_factor else None
    if source is not None:
        rows = gather_rows(source, flat)
        if factor is not None:
            rows = rows * factor.view(-1, 1)
        pieces = split_padded(rows, table.sizes, table.pads)
    else:
        sizes = table.sizes
        pieces = [gather_rows(getattr(p.layer, p.kind).reshape(-1, table.area), f)
                  for p, f in zip(table.pieces, flat.split(sizes))]
        if factor is not None:
            pieces = [piece * f.view(-1, 1) for piece, f in zip(pieces, factor.split(sizes))]
    return [piece.view(p.shape) for p, piece in zip(table.pieces, pieces)]


def gather_norms(table: GatherTable, flat: Tensor, factor: Tensor | None, zero: Tensor,
                 deferred: bool = False) -> dict:
    """The BatchNorm table's tensors for one mask: ``{id(unit): (running mean, running var, weight, bias)}`` of the
    channels each unit computes, and ``"source"``: ``(the concatenated statistics, the gathered ones)`` for
    :func:`write_back_norms`.

    The table's pieces are every unit's weight, then every unit's bias; the concatenation of the means and variances
    has the same layout, so ``flat`` gathers both (one ``index_select`` each). ``factor`` zeroes the weight and bias of
    padded channels; ``zero`` (one element) is appended to both concatenations for the padding entries to read.
    ``deferred``: the running statistics handed to the units are zeros, not the model's (which are not read), so that
    a training pass leaves in them ``momentum x`` its batch statistics, to be added to the model's later
    (:func:`write_back_norms` with ``momentum``); the source is then ``None``.
    """
    modules = table.modules
    params = [m.weight for m in modules] + [m.bias for m in modules]
    gathered = gather_rows(torch.cat([*params, zero.to(params[0].dtype)]), flat)
    if factor is not None:
        gathered = gathered * factor
    buffers = [m.running_mean for m in modules] + [m.running_var for m in modules]
    source = None if deferred else torch.cat([*buffers, zero.to(buffers[0].dtype)])
    stats = buffers[0].new_zeros(flat.shape) if deferred else source.index_select(0, flat)
    # Each unit updates its statistics in place, and autograd saved them: pieces with version counters of their own
    # (an in-place update of one must not look like a change of another's saved input).
    params_of = split_padded(gathered, table.sizes, table.pads)
    stats_of = stats.unsafe_split_with_sizes(interleave(table.sizes, table.pads))[::2]
    n = len(modules)
    tensors: dict = {id(m): (stats_of[i], stats_of[n + i], params_of[i], params_of[n + i])
                     for i, m in enumerate(modules)}
    tensors["source"] = (source, stats)
    return tensors


def add_batches(counters: Sequence[Tensor | None], batches: Sequence[int]) -> None:
    """Add ``batches[i]`` to ``counters[i]`` (BatchNorm layers' ``num_batches_tracked``; ``None``: the layer tracks no
    count) with one multi-tensor add: of one number where every layer counts the same (a forward that ran each layer
    once), of one per layer otherwise."""
    pairs = [(c, int(n)) for c, n in zip(counters, batches, strict=True) if c is not None and n]
    if not pairs:
        return
    counts = {n for _, n in pairs}
    tensors = [c for c, _ in pairs]
    torch._foreach_add_(tensors, counts.pop() if len(counts) == 1 else [n for _, n in pairs])


def _decay(table: GatherTable, momentum: float, batches: Sequence[int] | None) -> float | Tensor:
    """``(1 - momentum)^k`` for the entries of each unit of the BatchNorm table that ran ``k`` times in a deferred
    pass: one number where every unit ran once (a forward that runs each layer once), else one per entry."""
    counts = [1] * len(table.modules) if batches is None else [int(n) for n in batches]
    if set(counts) == {1}:
        return 1.0 - momentum
    unit = {id(m): k for m, k in zip(table.modules, counts, strict=True)}
    like = table.modules[0].running_mean
    return torch.cat([like.new_full((size,), (1.0 - momentum) ** unit[id(piece.layer)])
                      for piece, size in zip(table.pieces, table.split_sizes)])


def write_back_norms(table: GatherTable, tensors: dict, flat: Tensor, kept: Tensor | None = None,
                     momentum: float | None = None, batches: Sequence[int] | None = None) -> None:
    """Write the statistics the units updated in place (``tensors`` from :func:`gather_norms`) back into the units'
    buffers with a fixed number of calls; with ``kept`` (bool, one per entry) only those of kept channels, padding's
    left as they were.

    ``momentum``: the statistics were gathered ``deferred`` (they hold ``momentum x`` the pass's batch statistics);
    each running statistic ``r`` becomes ``(1 - momentum) r + momentum b``, from ``r`` as it is now (which may have
    moved since the pass ran: the same as if the pass had run now). ``batches``: the batches each unit counts
    (``num_batches_tracked``, which the units left alone: one per training call in the pass), with one multi-tensor
    add."""
    targets = [m.running_mean for m in table.modules] + [m.running_var for m in table.modules]
    source, stats = tensors["source"]
    if momentum is not None:  # the statistics as they are now (a deferred pass did not gather them)
        source = torch.cat([*targets, stats.new_zeros(1)])
    if momentum is not None or kept is not None:
        current = source.index_select(0, flat)
        if momentum is not None:  # a unit that ran k times decays by (1 - momentum)^k (its stats summed k batches)
            stats = current * _decay(table, momentum, batches) + stats
        if kept is not None:
            stats = torch.where(kept, stats, current)
    if batches is not None:
        add_batches([m.num_batches_tracked for m in table.modules], batches)
    source.index_copy_(0, flat, stats)
    sizes = [t.numel() for t in targets]
    torch._foreach_copy_(targets, list(source[:sum(sizes)].split(sizes)))  # the zero at the end stays behind
