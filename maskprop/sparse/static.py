"""Static-shape compact execution: per-group capacities fixed for a window of steps, masks as buffer contents.

The compact execution of :mod:`maskprop.sparse.execution` gives every step the widths of its own mask: new shapes in
every step, index sets built on the host, and a host read of every mask. On a GPU that means new kernel plans per
shape and a step that cannot be recorded once and replayed. Here a step runs with shapes fixed in advance instead.
Each group ``g`` gets a *capacity* ``C_g``: the width its layers compute, chosen once per window of steps from the keep
probabilities (:func:`choose_capacities`: a high quantile of the kept count, rounded up to the alignment) and chosen
again only when the probabilities have moved past it (:func:`rechoose_capacities`). A
:class:`StaticExecutionState` is built once per window: it holds, on the model's device, an index buffer of ``C_g``
channels and a 0/1 buffer ``real`` for every group, and the flat indices that gather every conv, linear, LayerNorm,
RMSNorm, GroupNorm and BatchNorm parameter of those widths, all of sizes fixed by the capacities. Each step,
:meth:`StaticExecutionState.update` writes the new mask into those buffers in place with a fixed sequence of device
operations whose output shapes never depend on the mask (one stable sort of all channels by group, kept first; a gather
of each group's first ``C_g`` positions; the flat indices recomputed from precomputed tables) and without reading
anything back to the host. A group keeping fewer than ``C_g`` channels fills the rest with dropped channels, which run
as padding exactly as ``align`` pads today: their gathered weight rows and BatchNorm parameters are multiplied by zero,
so they output exactly zero, get zero gradients, and their running statistics are not written back. Since neither the
shapes nor the addresses of the buffers change between steps, the whole step (update, forward, backward, optimizer)
issues the same kernels on the same memory every time, which is what lets it be captured as one CUDA graph per step kind
and replayed, with new masks written into the same buffers before each replay. A group that keeps more than ``C_g``
channels (an overflow, about once per thousand steps per group at the default quantile) keeps the ``C_g`` of them with
the smallest tie-breaking uniforms ``u`` (the lowest channel numbers without ``u``); the mask actually used is recorded
on the device (:attr:`StaticExecutionState.mask_used`, the one to give the score estimator), and on-device counters of
overflowing steps and cut channels are read by the caller every ``N`` steps (:meth:`StaticExecutionState.read_overflow`,
one transfer). Several states of one window can share their buffers as the rows of common tensors
(:class:`StaticStates`): one update then writes all their masks with the kernels of one, as a search step writes its
``m`` and ``m'``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .execution import ForwardPass, ModelPlan, RowBlock, gather_tables, gathered, installed, model_plan
from .gather import ALIGN_ELEMENTS, GatherTable, gather_norms, gather_pieces, write_back_norms
from .groups import aligned_width, check_align
from .layernorm import SparseChannelNorm
from .modules import SparseBatchNorm2d, SparseConv2d, SparseLinear

if TYPE_CHECKING:
    from ..vrpge import ChannelScores

__all__ = [
    "CapacityUpdate",
    "KeptCount",
    "OverflowReport",
    "StaticExecutionState",
    "StaticLayout",
    "StaticStates",
    "check_capacities",
    "choose_capacities",
    "kept_count_moments",
    "mask_capacities",
    "rechoose_capacities",
    "use_static",
]

DEFAULT_QUANTILE = 0.999
DEFAULT_OVERFLOW_THRESHOLD = 0.01
DEFAULT_MIN_SHRINK = 0.05
"""The share of its channels a window must give up before shrinking alone starts a new one (a new window costs eager
warm-up steps and a graph capture; :func:`rechoose_capacities`). On ResNet-32 with the quickstart's search it cut the
windows from 7 to 3 (docs/methods.md, "How a step runs on a GPU")."""
_TIE_BITS = 32  # tie-breaking uniforms enter the sort key as 32-bit integers below the group and dropped bits


# --- capacities -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptCount:
    """The kept count ``K = sum_j m_j`` of one group under independent ``m_j ~ Bernoulli(s_j)`` (a Poisson-binomial
    variable), through its mean and variance: its tail is taken from the normal approximation with continuity
    correction, ``P(K <= c) ~ Phi((c + 1/2 - mean) / sd)``, close for groups of more than a few channels whose
    probabilities are not all near 0 or 1 (and exact when they are all 0 or 1: then ``K`` is the constant ``mean``).

    Attributes:
        channels: The group's channels ``n``.
        mean: ``sum_j s_j``.
        variance: ``sum_j s_j (1 - s_j)``.
    """

    channels: int
    mean: float
    variance: float

    def quantile(self, q: float) -> int:
        """The smallest count ``c`` with ``P(K <= c) >= q``, in ``[0, channels]``."""
        if self.variance <= 0.0:
            raw = self.mean
        else:
            raw = self.mean + statistics.NormalDist().inv_cdf(q) * math.sqrt(self.variance) - 0.5
        # A small tolerance keeps an integer mean of 0/1 probabilities (summed in floating point) at that integer.
        return min(max(math.ceil(raw - 1e-9), 0), self.channels)

    def overflow_probability(self, capacity: int) -> float:
        """``P(K > capacity)``."""
        if capacity >= self.channels:
            return 0.0
        if self.variance <= 0.0:
            return 0.0 if capacity >= self.mean - 1e-9 else 1.0
        return 1.0 - statistics.NormalDist().cdf((capacity + 0.5 - self.mean) / math.sqrt(self.variance))


def _probabilities(scores: ChannelScores | Mapping[str, Tensor]) -> tuple[list[str], list[Tensor]]:
    if isinstance(scores, Mapping):
        names = list(scores)
        values = [scores[g] for g in names]
    elif hasattr(scores, "split") and isinstance(getattr(scores, "scores", None), Tensor):  # a ChannelScores
        split = scores.split(scores.scores.detach())
        names, values = list(split), list(split.values())
    else:
        raise TypeError(f"keep probabilities are a ChannelScores or a dict of group -> 1-d tensor, "
                        f"got {type(scores).__name__}")
    bad = [g for g, v in zip(names, values) if not isinstance(v, Tensor) or v.dim() != 1 or not v.is_floating_point()]
    if bad:
        raise ValueError(f"keep probabilities of group {bad[0]!r} are not a 1-d floating-point tensor")
    return names, values


def kept_count_moments(scores: ChannelScores | Mapping[str, Tensor]) -> dict[str, KeptCount]:
    """The :class:`KeptCount` of every group, from its keep probabilities (one transfer to the host).

    Args:
        scores: A :class:`~maskprop.vrpge.ChannelScores`, or ``{group: 1-d tensor of keep probabilities}``.

    Raises:
        ValueError: a probability outside ``[0, 1]`` (or NaN), or a value that is not a 1-d float tensor.
    """
    names, values = _probabilities(scores)
    if not names:
        return {}
    flat = torch.cat([v.detach().double().reshape(-1) for v in values])
    group_of = torch.repeat_interleave(torch.arange(len(values), device=flat.device),
                                       torch.tensor([v.numel() for v in values], device=flat.device))
    sums = torch.zeros(3, len(values), dtype=torch.float64, device=flat.device)
    sums[0].index_add_(0, group_of, flat)
    sums[1].index_add_(0, group_of, flat * (1 - flat))
    sums[2].index_add_(0, group_of, ((flat < 0) | (flat > 1) | flat.isnan()).double())
    means, variances, invalid = sums.tolist()
    bad = [g for g, count in zip(names, invalid) if count]
    if bad:
        raise ValueError(f"keep probabilities of group {bad[0]!r} are not all in [0, 1]")
    return {g: KeptCount(v.numel(), mean, max(var, 0.0))
            for g, v, mean, var in zip(names, values, means, variances)}


def _capacity(count: KeptCount, align: int, quantile: float) -> int:
    # At least one channel: a sampler keeps one channel of a group that drew none.
    return aligned_width(max(count.quantile(quantile), 1), count.channels, align)


def _check_quantile(quantile: float) -> float:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile={quantile!r} is not in [0.5, 1); expected e.g. 0.999")
    return float(quantile)


def choose_capacities(scores: ChannelScores | Mapping[str, Tensor], align: int = 8,
                      quantile: float = DEFAULT_QUANTILE) -> dict[str, int]:
    """Each group's capacity: the ``quantile`` of its kept count (:class:`KeptCount`, normal approximation), at least
    1, rounded up to a multiple of ``align`` and clamped to ``[min(align, n), n]``.

    Args:
        scores: A :class:`~maskprop.vrpge.ChannelScores`, or ``{group: 1-d tensor of keep probabilities}``.
        align: Capacities are multiples of this (8 for CUDA tensor cores), or the group's size.
        quantile: A group overflows its capacity with probability about ``1 - quantile`` per sampled mask.
    """
    align, quantile = check_align(align), _check_quantile(quantile)
    return {g: _capacity(count, align, quantile) for g, count in kept_count_moments(scores).items()}


@dataclass(frozen=True)
class CapacityUpdate:
    """What :func:`rechoose_capacities` decided.

    Attributes:
        capacities: ``{group: capacity}`` for the next window.
        changed: Whether any capacity differs from the current ones (the state must be rebuilt, and graphs captured
            anew).
        rechosen: The groups whose capacity changed.
    """

    capacities: dict[str, int]
    changed: bool
    rechosen: tuple[str, ...] = ()


def rechoose_capacities(capacities: Mapping[str, int], scores: ChannelScores | Mapping[str, Tensor], align: int = 8,
                        quantile: float = DEFAULT_QUANTILE, overflow_threshold: float | None = None,
                        min_shrink: float = DEFAULT_MIN_SHRINK) -> CapacityUpdate:
    """Capacities for the next window, with hysteresis so that scores hovering near a boundary, or drifting by a few
    channels, do not change shapes (and capture a new graph) every window.

    A group's capacity ``C`` is due to be chosen again (as :func:`choose_capacities` would) when the keep probabilities
    have moved past it: when it overflows too often, ``P(K > C) > overflow_threshold`` (grow), or when it wastes more
    than an alignment step, ``C - quantile(K) > align`` (shrink). A group that must grow starts a new window, and every
    group due for a change changes with it; shrinking alone starts one only when it gives up at least ``min_shrink``
    of the channels computed per step (the sum of the capacities). Otherwise every capacity stays.

    Args:
        capacities: The current ``{group: capacity}``.
        scores: The keep probabilities now (as for :func:`choose_capacities`), with the same groups.
        align: As for :func:`choose_capacities`.
        quantile: As for :func:`choose_capacities`.
        overflow_threshold: The overflow probability per mask above which a group grows; above ``1 - quantile``.
            None: ten times the cut rate the quantile aims at, at least ``DEFAULT_OVERFLOW_THRESHOLD`` (1%: the
            threshold of the default quantile) and at most halfway from ``1 - quantile`` to 1.
        min_shrink: The share in ``[0, 1)`` of the channels computed per step that shrinking alone must save; 0
            shrinks at every group's first spare alignment step.
    """
    align, quantile = check_align(align), _check_quantile(quantile)
    if overflow_threshold is None:
        cut = 1.0 - quantile
        overflow_threshold = max(DEFAULT_OVERFLOW_THRESHOLD, min(round(10 * cut, 12), 0.5 + cut / 2))
    if not 1.0 - quantile <= overflow_threshold < 1.0:
        raise ValueError(f"overflow_threshold={overflow_threshold!r} is not in [1 - quantile, 1) = "
                         f"[{1.0 - quantile:g}, 1)")
    if isinstance(min_shrink, bool) or not isinstance(min_shrink, (int, float)) or not 0.0 <= min_shrink < 1.0:
        raise ValueError(f"min_shrink={min_shrink!r} is not in [0, 1); expected e.g. {DEFAULT_MIN_SHRINK}")
    counts = kept_count_moments(scores)
    current = check_capacities(capacities, {g: c.channels for g, c in counts.items()}, align)
    chosen, grows = dict(current), False
    for g, count in counts.items():
        capacity = current[g]
        grow = count.overflow_probability(capacity) > overflow_threshold
        shrink = capacity - count.quantile(quantile) > align
        if grow or shrink:
            chosen[g] = _capacity(count, align, quantile)
            grows = grows or chosen[g] > capacity
    total = sum(current.values())
    if not grows and total - sum(chosen.values()) < min_shrink * total:
        chosen = dict(current)
    rechosen = tuple(g for g in chosen if chosen[g] != current[g])
    return CapacityUpdate(chosen, bool(rechosen), rechosen)


def mask_capacities(mask: Mapping[str, Tensor], align: int = 8) -> dict[str, int]:
    """Capacities for one fixed mask (a finetune): each group's kept count rounded up to ``align`` (never past the
    group's size), so that the mask never overflows. Reads the mask to the host once."""
    align = check_align(align)
    names = list(mask)
    counts = torch.stack([mask[g].reshape(-1).sum() for g in names]).tolist() if names else []
    return {g: aligned_width(max(int(c), 1), mask[g].numel(), align) for g, c in zip(names, counts)}


def check_capacities(capacities: Mapping[str, int], groups: Mapping[str, int], align: int = 1) -> dict[str, int]:
    """``capacities`` in the order of ``groups`` if every group has one in ``[min(align, n), n]``, else a one-line
    ``ValueError``."""
    align = check_align(align)
    if not isinstance(capacities, Mapping):
        raise TypeError(f"capacities are a dict of group -> int, got {type(capacities).__name__}")
    unknown = [g for g in capacities if g not in groups]
    missing = [g for g in groups if g not in capacities]
    if unknown or missing:
        raise ValueError(f"capacities do not match the model's groups: unknown {unknown[:4]}, missing {missing[:4]}")
    for g, n in groups.items():
        c = capacities[g]
        if isinstance(c, bool) or not isinstance(c, int) or c > n:
            raise ValueError(f"capacity {c!r} of group {g!r} is not an integer in [1, {n}] (its channels)")
        if c < min(align, n):
            raise ValueError(f"capacity {c} of group {g!r} is below the alignment {align}; expected at least "
                             f"{min(align, n)} (the group has {n} channels)")
    return {g: capacities[g] for g in groups}


# --- the layout: everything fixed by the capacities, built once per window --------------------------------------------


@dataclass(frozen=True)
class GroupSlots:
    """Where one group's channels sit in the mask and its computed channels ("slots") in the index buffer.

    Attributes:
        name: The group.
        channels: Its channels ``n``.
        capacity: Its computed width ``C`` (slots).
        first_channel: Its first entry in the flat mask (groups in model order).
        first_slot: Its first slot in the extended index buffer.
    """

    name: str
    channels: int
    capacity: int
    first_channel: int
    first_slot: int


class StaticLayout:
    """Everything a static compact step needs that the capacities fix: slots per group, gather tables, and the
    device tables that turn an index buffer into flat gather indices. Built once per window (per capacities) and
    shared by the states of that window (a search step's two masks use two states of one layout).

    The flat index of entry ``e`` (gathered row ``(o, i)`` of some tensor) is
    ``row_base[r] + row_stride[r] * ext[row_slot[r]] + ext[entry_slot[e]]`` with ``r = entry_row[e]``, where ``ext``
    is the extended index buffer: the groups' slots, then the concatenated groups' slots (their parts' slots side by
    side), then an identity segment (sides never pruned), then a zero segment (index 0, real 0) that the padding
    between gathered pieces reads. The tables come from the row blocks of
    :func:`~maskprop.sparse.execution.gather_tables`, as the index sets of one mask do. Only ``ext`` changes from
    mask to mask.

    Args:
        model: A maskprop model.
        capacities: ``{group: computed width}`` (:func:`check_capacities`).
        align: The alignment ``capacities`` were chosen for (checked: none below it unless the group is smaller).
        concatenate: Gather all weights of one kernel area from their concatenation with one call (default off the
            CPU, where calls are launches) or layer by layer (default on the CPU, where copying every weight per pass
            costs more than a call).
        device: Where the buffers live (default: the model's).

    Attributes:
        norm_momentum: The momentum all the model's BatchNorm layers share, when they do and all are in the layout
            (not ``None``, the cumulative average); else ``None``. A state of this layout then counts its passes'
            batches for the layers (its :attr:`StaticExecutionState.layers_count_batches` is false).
        can_defer_statistics: Whether a state of this layout can defer a pass's statistics
            (:attr:`StaticExecutionState.defers_statistics`): a model without BatchNorm, or ``norm_momentum`` set.
    """

    def __init__(self, model: nn.Module, capacities: Mapping[str, int], align: int = 1,
                 concatenate: bool | None = None, device: torch.device | str | None = None) -> None:
        self.model = model
        self.plan = model_plan(model)  # the model's layers and groups, and the zero rows the gathers append
        self.layers, self.groups = self.plan.layers, self.plan.groups
        self.align = check_align(align)
        self.capacities = check_capacities(capacities, self.groups, self.align)
        parameter = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            parameter.device if parameter is not None else torch.device("cpu"))
        self.dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        self.concatenate = self.device.type != "cpu" if concatenate is None else concatenate
        self.slots: dict[str, GroupSlots] = {}
        first_channel = first_slot = 0
        for g, n in self.groups.items():
            self.slots[g] = GroupSlots(g, n, self.capacities[g], first_channel, first_slot)
            first_channel, first_slot = first_channel + n, first_slot + self.capacities[g]
        self.num_channels, self.num_slots = first_channel, first_slot
        # The slots of each concatenated group follow: each part's slots (its identity range for a part of no group)
        # shifted by the channels of the parts before it, rewritten by every mask update from the groups' slots.
        self.concatenated_slots: dict[str, GroupSlots] = {}
        width = {name: sum(n if g is None else self.capacities[g] for g, n in parts)
                 for name, parts in self.plan.concatenations.items()}
        self.identity_slot = self.num_slots + sum(width.values())
        sources, shifts = [], []
        for name, parts in self.plan.concatenations.items():
            self.concatenated_slots[name] = GroupSlots(name, sum(n for _, n in parts), width[name], -1, first_slot)
            first_slot += width[name]
            shift = 0
            for g, n in parts:
                slots = None if g is None else self.slots[g]
                start = self.identity_slot if slots is None else slots.first_slot
                sources.append(torch.arange(start, start + (n if slots is None else slots.capacity)))
                shifts.append(torch.full_like(sources[-1], shift))
                shift += n
        packed = {id(m) for m in self.plan.packed_norms}
        unpacked = [m for m in self.plan.norms if id(m) not in packed]
        if unpacked:
            raise ValueError("static execution needs affine BatchNorm layers with running statistics; a pruned "
                             f"BatchNorm of group {unpacked[0].group!r} has none")
        # The extended index buffer: the groups' slots, the concatenated groups' slots, an identity segment (sides
        # never pruned), a zero segment that the padding between gathered pieces reads (index 0, not a kept channel).
        self.zero_slot = self.identity_slot + self.plan.max_channels
        self.ext_size = self.zero_slot + ALIGN_ELEMENTS
        self.concatenated_source, self.concatenated_shift = (
            (torch.cat(sources).to(self.device), torch.cat(shifts).to(self.device)) if sources else (None, None))
        self.read_slots = self.slots | self.concatenated_slots  # what a layer's group names: either kind
        offsets = {g: (slots.first_slot, slots.capacity) for g, slots in self.read_slots.items()}
        self.tables, self.norm_table, blocks = gather_tables(self.plan, offsets, self.identity_slot, self.concatenate)
        self.weighted = {id(p.layer) for table in self.tables for p in table.pieces}
        self.norm_position = {} if self.norm_table is None else {
            id(m): i for i, m in enumerate(self.norm_table.modules)}
        self.num_entries = sum(t.entries for t in self.tables) + (0 if self.norm_table is None
                                                                   else self.norm_table.entries)
        # A pass can defer its running statistics (StaticExecutionState.defers_statistics) when the model has no
        # BatchNorm, or when every one is in the norm table and all share one momentum (not the cumulative average).
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = {m.momentum for m in norms}
        self.norm_momentum: float | None = None
        if len(momenta) == 1 and None not in momenta and all(id(m) in self.norm_position for m in norms):
            self.norm_momentum = float(momenta.pop())
        self.can_defer_statistics = not norms or self.norm_momentum is not None
        # The zero rows the gathers append are made now, once: made lazily by the first pass of a step, they could be
        # filled on one CUDA stream (a search step's m' runs first, on a side stream) and read on another unordered.
        for table in self.tables if self.concatenate else ():
            piece = table.pieces[0]
            self.plan.zero_row(getattr(piece.layer, piece.kind).reshape(-1, table.area))
        if self.norm_table is not None:
            self.plan.zero_row(self.norm_table.modules[0].weight)
        self._build_rows(blocks)
        self._build_sort_tables()

    def _build_rows(self, blocks: list[RowBlock]) -> None:
        """The device tables of the flat index formula (class docstring), one row per computed output channel of
        every gathered tensor and one entry per gathered row, from the tensors' row blocks."""
        outputs = torch.tensor([b.outputs for b in blocks], dtype=torch.int64)
        first_row = (outputs.cumsum(0) - outputs).tolist()

        def cat(pieces: list[Tensor]) -> Tensor:
            return torch.cat(pieces).to(self.device) if pieces else torch.zeros(0, dtype=torch.int64,
                                                                                 device=self.device)

        def per_row(values: list[int]) -> Tensor:
            return torch.repeat_interleave(torch.tensor(values, dtype=torch.int64), outputs).to(self.device)

        self.row_slot = cat([torch.arange(b.out_start, b.out_start + b.outputs) for b in blocks])
        self.row_base, self.row_stride = per_row([b.base for b in blocks]), per_row([b.stride for b in blocks])
        self.entry_row = cat([torch.arange(r, r + b.outputs).repeat_interleave(b.inputs)
                              for b, r in zip(blocks, first_row)])
        self.entry_slot = cat([torch.arange(b.in_start, b.in_start + b.inputs).repeat(b.outputs) for b in blocks])

    def _build_sort_tables(self) -> None:
        """What a mask update reads: each channel's sort key if kept and if dropped (its group and the dropped bit
        above the tie-breaking bits: :meth:`StaticExecutionState.update`), the sorted positions that fill each group's
        slots (a group's channels occupy its own range of the sorted order), and each slot's first channel."""
        groups = list(self.slots.values())
        self.group_of = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([s.channels for s in groups],
                                                                                        dtype=torch.int64))
        self.take = torch.cat([torch.arange(s.first_channel, s.first_channel + s.capacity) for s in groups]) \
            if groups else torch.zeros(0, dtype=torch.int64)
        self.slot_channel = torch.cat([torch.full((s.capacity,), s.first_channel) for s in groups]) \
            if groups else torch.zeros(0, dtype=torch.int64)
        self.key_kept = (self.group_of * 2 ** (_TIE_BITS + 1)).to(self.device)
        self.key_dropped = self.key_kept + 2 ** _TIE_BITS
        self.group_of, self.take, self.slot_channel = (t.to(self.device) for t in
                                                       (self.group_of, self.take, self.slot_channel))

    @property
    def widths(self) -> dict[str, int]:
        """``{group: channels computed}``: the capacities (what the train-cost accounting counts)."""
        return dict(self.capacities)


# --- the state: the buffers one mask lives in -----------------------------------------------------------------------


@dataclass(frozen=True)
class OverflowReport:
    """Overflows since the last read: steps (updates) in which some group kept more channels than its capacity, and
    the kept channels cut from each group."""

    steps: int
    channels: dict[str, int]


def _check_uniforms(u: Tensor, mask: Tensor) -> Tensor:
    """``u`` as tie-breaking uniforms of ``mask`` (a float tensor of its shape, on its device)."""
    if not isinstance(u, Tensor) or u.shape != mask.shape or u.device != mask.device or not u.is_floating_point():
        got = f"{tuple(u.shape)} {u.dtype} on {u.device}" if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u is {got}; expected a float tensor of shape {tuple(mask.shape)} on {mask.device}")
    return u


class _MaskRows:
    """The buffers a mask update writes, for ``k`` masks of one layout: row ``i`` of each is the ``i``-th state's
    (``k = 1`` for a state alone, ``k = 2`` for the two masks a search step draws together: :class:`StaticStates`).
    :meth:`write` updates all rows with the launches of one; ``rows.row(i)`` is row ``i`` as ``(1, ...)`` views."""

    def __init__(self, layout: StaticLayout, k: int, *, _views: tuple[Tensor, ...] | None = None) -> None:
        self.layout, self.k = layout, k
        if _views is not None:
            (self.ext, self.real, self.flat, self.factor, self.norm_real, self.mask_used, self.overflow_steps,
             self.overflow_channels) = _views
            return
        device, dtype = layout.device, layout.dtype
        # The extended index buffer: the groups' slots, the identity segment, the zero segment; and its 0/1 reals.
        self.ext = torch.zeros(k, layout.ext_size, dtype=torch.int64, device=device)
        self.ext[:, layout.identity_slot:layout.zero_slot] = torch.arange(layout.zero_slot - layout.identity_slot,
                                                                          device=device)
        self.real = torch.zeros(k, layout.ext_size, dtype=dtype, device=device)
        self.real[:, layout.identity_slot:layout.zero_slot] = 1
        self.flat = torch.zeros(k, layout.num_entries, dtype=torch.int64, device=device)
        self.factor = torch.zeros(k, layout.num_entries, dtype=dtype, device=device)
        norm = layout.norm_table
        self.norm_real = torch.zeros(k, 0 if norm is None else norm.entries, dtype=torch.bool, device=device)
        self.mask_used = torch.zeros(k, layout.num_channels, dtype=torch.bool, device=device)
        self.overflow_steps = torch.zeros(k, dtype=torch.int64, device=device)
        self.overflow_channels = torch.zeros(k, len(layout.groups), dtype=torch.int64, device=device)

    def row(self, i: int) -> _MaskRows:
        views = (self.ext, self.real, self.flat, self.factor, self.norm_real, self.mask_used, self.overflow_steps,
                 self.overflow_channels)
        return _MaskRows(self.layout, 1, _views=tuple(t[i:i + 1] for t in views))

    def by_dtype(self) -> list[list[Tensor]]:
        """The mask's buffers (the counters aside), grouped by dtype: a multi-tensor kernel takes one dtype."""
        return [[self.ext, self.flat], [self.real, self.factor], [self.mask_used, self.norm_real]]

    def write(self, mask: Tensor, u: Tensor | None) -> None:
        """Make row ``i`` hold ``mask[i]`` (``(k, channels)`` bool; ``u``: ``(k, channels)`` tie-breaking uniforms or
        ``None``): :meth:`StaticExecutionState.update`'s fixed sequence of device operations, one for all rows."""
        layout = self.layout
        # (2 x group + dropped) x 2^32 + u's 32 leading bits: group by group, kept channels first, by increasing u
        key = torch.where(mask, layout.key_kept, layout.key_dropped)
        if u is not None:
            if torch.finfo(u.dtype).eps > 2.0 ** -23:  # half, bfloat16: u x 2^32 overflows half; a draw may round to 1
                ties = (u.float() * 2.0 ** _TIE_BITS).long().clamp_(0, 2 ** _TIE_BITS - 1)
            else:
                ties = (u * 2.0 ** _TIE_BITS).long()  # exact, and below 2^32 for u < 1
            key.add_(ties)
        order = torch.sort(key, dim=-1, stable=True).indices
        chosen = order.index_select(1, layout.take)  # each group's first `capacity` channels in sorted order
        real = mask.gather(1, chosen)
        torch.sub(chosen, layout.slot_channel, out=self.ext[:, :layout.num_slots])
        self.real[:, :layout.num_slots].copy_(real)
        if layout.concatenated_source is not None:  # the concatenated groups' slots, from their parts'
            ends = slice(layout.num_slots, layout.identity_slot)
            source = layout.concatenated_source
            self.ext[:, ends].copy_(self.ext.index_select(1, source).add_(layout.concatenated_shift))
            self.real[:, ends].copy_(self.real.index_select(1, source))
        self.mask_used.zero_().scatter_(1, chosen, real)
        cut = torch.gt(mask, self.mask_used)  # kept, not used
        self.overflow_channels.index_add_(1, layout.group_of, cut.long())
        self.overflow_steps.add_(cut.any(dim=1))
        # The flat gather indices and 0/1 factors of every gathered entry, from the new slots.
        first = torch.addcmul(layout.row_base, layout.row_stride, self.ext.index_select(1, layout.row_slot))
        torch.add(first.index_select(1, layout.entry_row), self.ext.index_select(1, layout.entry_slot), out=self.flat)
        torch.index_select(self.real.index_select(1, layout.row_slot), 1, layout.entry_row, out=self.factor)
        norm = layout.norm_table
        if norm is not None:
            torch.ne(self.factor[:, norm.start:norm.start + norm.entries], 0, out=self.norm_real)

    def take(self, other: _MaskRows) -> None:
        """Copy ``other``'s masks into these rows (one multi-tensor copy per dtype) and move its overflow counts here
        (added here, zeroed there)."""
        for mine, theirs in zip(self.by_dtype(), other.by_dtype()):
            torch._foreach_copy_(mine, theirs)
        counters = [self.overflow_steps, self.overflow_channels]
        theirs = [other.overflow_steps, other.overflow_channels]
        torch._foreach_add_(counters, theirs)
        torch._foreach_zero_(theirs)


class StaticExecutionState:
    """Compact execution with static shapes: the layers' protocol (``mode``, :meth:`weight_and_bias`,
    :meth:`batch_norm`, :meth:`batch_norm_done`, :meth:`index`, :meth:`flush`) served from device
    buffers whose shapes and addresses stay fixed while :meth:`update` rewrites their contents for each mask (module
    docstring).

    Install it on the model's layers with :func:`use_static`. Build one per mask in flight from one
    :class:`StaticLayout` per window, alone or, for masks drawn together (a search step's ``m`` and ``m'``), as the
    rows of one :class:`StaticStates`.

    Attributes:
        mode: Always ``"compact"``.
        layout: The window's :class:`StaticLayout`.
        mask_used: The flat mask (channels of all groups, in model order) the layers run after the last update: the
            update's mask less the overflow cut (bool, on the device; refreshed in place).
        overflow_steps: Updates since the last :meth:`read_overflow` that cut a channel (int64 scalar, device).
        overflow_channels: Kept channels cut per group since then (int64, one per group, device).
    """

    mode = "compact"

    def __init__(self, layout: StaticLayout, rows: _MaskRows | None = None) -> None:
        self.layout = layout
        self.masks: dict[str, Tensor] = {}  # masked mode's per-group masks: none (BatchNorm's masked path never runs)
        # The buffers update() writes, as the one row of a (1, ...) view: alone, or one of StaticStates' rows.
        if rows is not None and rows.k != 1:
            raise ValueError(f"a state takes one row of buffers, got {rows.k}; build states of several rows with "
                             "StaticStates")
        self._rows = _MaskRows(layout, 1) if rows is None else rows
        self._ext, self._real, self._flat, self._factor, self._norm_real, self.mask_used = (
            t[0] for t in (self._rows.ext, self._rows.real, self._rows.flat, self._rows.factor, self._rows.norm_real,
                           self._rows.mask_used))
        self.overflow_steps, self.overflow_channels = self._rows.overflow_steps[0], self._rows.overflow_channels[0]
        self._weight_pass: ForwardPass | None = None
        self._norm_pass: ForwardPass | None = None
        self._defers = False
        self._deferred: ForwardPass | None = None  # a deferred pass's statistics, until commit_statistics()
        # Until the first update: every channel kept, cut to each group's capacity (a valid subnetwork; the cuts of
        # this start are not counted: the counters are zeroed below).
        self.update(torch.ones(layout.num_channels, dtype=torch.bool, device=layout.device))
        self.overflow_steps.zero_()
        self.overflow_channels.zero_()

    @classmethod
    def create(cls, model: nn.Module, capacities: Mapping[str, int], align: int = 1,
               concatenate: bool | None = None) -> StaticExecutionState:
        """A state with a layout of its own (see :class:`StaticLayout` for the arguments)."""
        return cls(StaticLayout(model, capacities, align, concatenate))

    @property
    def widths(self) -> dict[str, int]:
        """``{group: channels computed}``: the capacities."""
        return self.layout.widths

    # --- the mask (once per step, on the device, in place) ------------------------------------------------------

    def _flat_mask(self, mask: Tensor | Mapping[str, Tensor]) -> Tensor:
        layout = self.layout
        if isinstance(mask, Mapping):
            missing = [g for g in layout.groups if g not in mask]
            if missing or len(mask) != len(layout.groups):
                raise ValueError(f"mask does not name exactly the model's groups (missing {missing[:4]})")
            mask = torch.cat([mask[g] for g in layout.groups])
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (layout.num_channels,):
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask is {got}; expected a flat bool tensor of shape ({layout.num_channels},) or a dict "
                             "of group -> bool tensor")
        if mask.device != self.mask_used.device:
            raise ValueError(f"mask is on {mask.device}, the state's buffers on {self.mask_used.device}; sample it "
                             "there (a copy from the host would block or read the mask)")
        return mask

    @torch.no_grad()
    def update(self, mask: Tensor | Mapping[str, Tensor], u: Tensor | None = None) -> Tensor:
        """Make ``mask`` the mask the layers run, rewriting the buffers in place with a fixed sequence of device
        operations (no host read, no output shape that depends on the mask).

        Each group's slots take its kept channels (in channel order, or by increasing ``u``), then its dropped ones
        as padding, up to its capacity. A group keeping more channels than its capacity keeps those with the smallest
        ``u`` (the lowest channel numbers without ``u``); the cut is added to the overflow counters.

        Args:
            mask: The flat bool mask of all channels (groups in model order), or ``{group: bool tensor}``, on the
                state's device; every group should keep at least one channel.
            u: Optional tie-breaking uniforms in ``[0, 1)``, one per channel (flat, same device), e.g. those the mask
                was sampled with (``m = u < s``: the smallest ``u`` are the surest keeps).

        Returns:
            :attr:`mask_used` (the state's own buffer).
        """
        mask = self._flat_mask(mask)
        self._rows.write(mask.unsqueeze(0), None if u is None else _check_uniforms(u, mask).unsqueeze(0))
        return self.mask_used

    @torch.no_grad()
    def take(self, other: StaticExecutionState) -> None:
        """Make the mask ``other`` was last updated with this state's, as if :meth:`update` had written it here: its
        buffers copied (one multi-tensor copy per dtype) and its overflow counts moved to this state's counters
        (added here, zeroed there), with no host read. ``other`` must share this state's layout.

        With it a mask can be prepared while this state's is still in use: a search step writes its next ``m`` and
        ``m'`` into a second pair of states beside the backward of the current ``m``, which reads this pair's
        buffers, and takes them at the start of the next step (:meth:`StaticStates.take`, the same for several
        states at once; ``maskprop.train.static_steps.SearchStep``)."""
        if other.layout is not self.layout:
            raise ValueError("take() needs a state of the same layout (the same window)")
        self._rows.take(other._rows)

    @property
    def plan(self) -> ModelPlan:
        """The model's layers and groups (its layout's), as an eager state's: what layers' error messages read."""
        return self.layout.plan

    @property
    def layers_count_batches(self) -> bool:
        """Whether BatchNorm layers count their batches themselves: only where they need the count in the pass
        (``momentum=None``, the cumulative average: :attr:`StaticLayout.norm_momentum` is ``None``). Otherwise the
        state counts a training pass's batch in all of them with one multi-tensor add when it writes their statistics
        back (on a GPU one launch instead of one per layer)."""
        return self.layout.norm_momentum is None

    @property
    def defers_statistics(self) -> bool:
        """Whether a training pass under this state leaves the model's BatchNorm running statistics and batch counts
        alone (it neither reads nor writes them) and keeps its own until :meth:`commit_statistics` adds them to the
        model's as they are then: the same as if the pass had run at that moment. A search step sets it on the state
        of ``m'``, whose forward can then run on another CUDA stream at the same time as the forward of ``m``, which
        updates the same statistics (``maskprop.train.static_steps.SearchStep``). Needs every BatchNorm of the model
        in the layout, with one momentum (:attr:`StaticLayout.can_defer_statistics`)."""
        return self._defers

    @defers_statistics.setter
    def defers_statistics(self, value: bool) -> None:
        if value and not self.layout.can_defer_statistics:
            raise ValueError("this model's BatchNorm layers cannot defer their statistics: they need one momentum "
                             "(not None), all of them in the pruned groups' layout")
        self.flush()
        self._defers = bool(value)

    @property
    def deferred(self) -> ForwardPass | None:
        """The deferred pass whose statistics :meth:`commit_statistics` adds next (``None``: none pending). A step whose
        capture failed after the commit (the commit's kernels never ran) sets it back, to commit it again."""
        return self._deferred

    @deferred.setter
    def deferred(self, value: ForwardPass | None) -> None:
        self._deferred = value

    def discard_statistics(self) -> None:
        """Drop a deferred pass whose statistics were not committed: that of a step that failed between the pass and
        its commit (a capture that raised: its kernels never ran), so that the next step starts clean."""
        self._deferred = None

    def commit_statistics(self) -> None:
        """Add the statistics of the last deferred pass to the model's running statistics (for the kept channels),
        and count its batch in every BatchNorm layer; nothing when no pass is pending. A fixed sequence of device
        operations, no host read."""
        pending, self._deferred = self._deferred, None
        if pending is not None:
            norm = self.layout.norm_table
            write_back_norms(norm, pending.tensors, self._slice(norm)[0], self._norm_real,
                             momentum=self.layout.norm_momentum, batches=_batches(norm, pending))

    def buffers(self) -> dict[str, Tensor]:
        """The device buffers :meth:`update` rewrites in place, by name: a captured graph reads them at these
        addresses, so they must stay these tensors for the state's life."""
        return {"index": self._ext, "real": self._real, "flat": self._flat, "factor": self._factor,
                "norm_real": self._norm_real, "mask_used": self.mask_used, "overflow_steps": self.overflow_steps,
                "overflow_channels": self.overflow_channels}

    def mask_used_by_group(self) -> dict[str, Tensor]:
        """:attr:`mask_used` as ``{group: view}`` (views of the buffer: copy them to keep a step's mask)."""
        return dict(zip(self.layout.groups, self.mask_used.split(list(self.layout.groups.values()))))

    def read_overflow(self, reset: bool = True) -> OverflowReport:
        """The overflow counters, read with one transfer (call it every ``N`` steps, outside the step), and zeroed
        unless ``reset`` is false."""
        return self.overflow_report(torch.cat(self.overflow_counters()).tolist(), reset)

    def overflow_counters(self) -> list[Tensor]:
        """The overflow counters as device tensors, ``1 + groups`` numbers in all: what :meth:`read_overflow` reads,
        and what a caller reading other sums in the same transfer appends to them (``maskprop.train.graphs``)."""
        return [self.overflow_steps.view(1), self.overflow_channels]

    def overflow_report(self, values: Sequence[float], reset: bool = True) -> OverflowReport:
        """The report of :meth:`overflow_counters` read as ``values``; the counters zeroed unless ``reset`` is
        false."""
        if reset:
            self.overflow_steps.zero_()
            self.overflow_channels.zero_()
        return OverflowReport(int(values[0]), dict(zip(self.layout.groups, (int(v) for v in values[1:]))))

    # --- what layers read ---------------------------------------------------------------------------------------

    def index(self, group: str | None) -> Tensor | None:
        """The channels of ``group`` its layers compute now (kept first, then padding), a view of the index buffer;
        ``None`` for a group that is never pruned."""
        slots = self.layout.read_slots.get(group)
        if slots is None:
            return None
        return self._ext[slots.first_slot:slots.first_slot + slots.capacity]

    def real(self, group: str) -> Tensor:
        """1 for the slots of ``group`` (or of a concatenated group) that hold a kept channel, 0 for padding (a view
        of the 0/1 buffer)."""
        slots = self.layout.read_slots[group]
        return self._real[slots.first_slot:slots.first_slot + slots.capacity]

    def weight_and_bias(self, layer: SparseConv2d | SparseLinear | SparseChannelNorm
                        ) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias ``layer`` (a conv, a linear layer, a LayerNorm, an RMSNorm or a GroupNorm) runs with:
        gathered at the capacities (all layers' at once, by the first layer of a forward pass that asks) when a side is
        pruned, its own otherwise."""
        if id(layer) not in self.layout.weighted:
            return layer.weight, layer.bias
        self._weight_pass = gathered(self._weight_pass, self._gather_weights)
        return self._weight_pass.tensors[id(layer)]

    def batch_norm(self, layer: SparseBatchNorm2d) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """``(running_mean, running_var, weight, bias)`` of the channels ``layer`` computes, gathered with those of
        all units (padding's weight and bias zero); ``None`` for a BatchNorm outside every group."""
        if layer.group is None or id(layer) not in self.layout.norm_position:
            return None
        self._norm_pass = gathered(self._norm_pass, self._gather_norms, self.flush)
        return self._norm_pass.tensors[id(layer)]

    def padding_factor(self, layer: SparseBatchNorm2d) -> None:
        """``None``: every BatchNorm of a pruned group has affine parameters here (the layout refuses others), whose
        gathered weight and bias zero the padded outputs."""
        return None

    def batch_norm_done(self, layer: SparseBatchNorm2d, updated: bool) -> None:
        """Record that ``layer`` ran; the statistics of all units go back when the pass ends (:meth:`release`)."""
        current = self._norm_pass
        if current is not None and id(layer) in self.layout.norm_position:
            current.updated |= updated
            if updated:  # a batch it counts: once per call (a layer may run twice in a forward, or not at all)
                current.batches[id(layer)] = current.batches.get(id(layer), 0) + 1

    def flush(self) -> None:
        """Write pending running statistics back into the model, for the slots holding kept channels only (padding's
        are written back unchanged), with a fixed number of calls."""
        current = self._norm_pass
        if current is None or not current.updated:
            return
        if self._defers:  # kept for commit_statistics
            if self._deferred is not None and self._deferred is not current:
                raise RuntimeError("a second deferred pass ran before the first one's statistics were committed")
            self._deferred = current
        else:
            norm = self.layout.norm_table
            write_back_norms(norm, current.tensors, self._slice(norm)[0], self._norm_real,
                             batches=None if self.layers_count_batches else _batches(norm, current))
            current.batches = {}  # counted: a later write-back of this pass counts only what runs after it
        current.updated = False

    def release(self) -> None:
        """End the current pass: write its running statistics back and drop its gathered tensors (the model's forward
        hooks do it when a forward starts and ends, :func:`use_static` at the end of its block). A state lives for a
        whole window, and those tensors hold the step's autograd graph (its gradient accumulators included, bound to
        the stream they ran on, which a CUDA graph captured on another stream must not depend on) and their memory
        until the next step."""
        self.flush()
        self._weight_pass = self._norm_pass = None

    def apply_mask(self, group: str | None, y: Tensor, last: bool = False) -> Tensor:
        """Masked mode only; a static state is compact (kept for the layers' protocol)."""
        raise RuntimeError("a StaticExecutionState runs compact mode only")

    # --- gathering (once per forward pass) ----------------------------------------------------------------------

    def _slice(self, table: GatherTable) -> tuple[Tensor, Tensor]:
        """The table's flat indices and 0/1 factors (views of the state's buffers)."""
        end = table.start + table.entries
        return self._flat[table.start:end], self._factor[table.start:end]

    def _gather_weights(self) -> dict[int, list[Tensor | None]]:
        """Every gathered weight (and bias): per kernel area one concatenation, one ``index_select`` and one multiply
        by the 0/1 factors off the CPU; layer by layer on the CPU."""
        tensors: dict[int, list[Tensor | None]] = {}
        for table in self.layout.tables:
            flat, factor = self._slice(table)
            source = None
            if self.layout.concatenate:
                sources = [getattr(p.layer, p.kind).reshape(-1, table.area) for p in table.pieces]
                source = torch.cat([*sources, self.layout.plan.zero_row(sources[0])])
            dtype = table.pieces[0].layer.weight.dtype
            for p, piece in zip(table.pieces, gather_pieces(table, flat, factor.to(dtype), source)):
                pair = tensors.setdefault(id(p.layer), [p.layer.weight, p.layer.bias])
                pair[0 if p.kind == "weight" else 1] = piece
        return tensors

    def _gather_norms(self) -> dict:
        """BatchNorm weights and biases of all units with one gather (padding's multiplied by zero), running means and
        variances with another."""
        norm = self.layout.norm_table
        flat, factor = self._slice(norm)
        weight = norm.modules[0].weight
        deferred = False
        if self._defers:  # training passes only: in eval mode the layers normalise with the running statistics
            training = {m.training for m in norm.modules}
            if len(training) > 1:
                raise ValueError("a pass that defers its statistics needs all BatchNorm layers in one mode (train or "
                                 "eval)")
            deferred = training == {True}
        return gather_norms(norm, flat, factor.to(weight.dtype), self.layout.plan.zero_row(weight), deferred)


def _batches(norm: GatherTable, current: ForwardPass) -> list[int]:
    """The batches each unit of the BatchNorm table counted in ``current`` (its training calls)."""
    return [current.batches.get(id(m), 0) for m in norm.modules]


class StaticStates:
    """``k`` static execution states of one layout whose buffers are the rows of shared tensors, so that one
    :meth:`update` writes all ``k`` masks with the launches of one (a mask update is some forty small kernels whatever
    the number of masks; on CUDA the sort of several rows of more than 4096 channels adds a few) and one :meth:`take`
    copies them all.

    A search step draws its two masks ``m`` and ``m'`` from the same scores: it prepares both with one update
    (``maskprop.train.static_steps.SearchStep``).

    Example:
        >>> states = StaticStates(StaticLayout(model, choose_capacities(scores), align=8), 2)
        >>> u = torch.rand(2, scores.num_channels, generator=generator)
        >>> states.update(scores.mask_from_uniforms(u), u)   # row i: states[i]'s mask
        >>> with use_static(states[0]):
        ...     loss = criterion(model(images), labels)

    Args:
        layout: The window's layout.
        k: The number of states.
    """

    def __init__(self, layout: StaticLayout, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.layout = layout
        self._rows = _MaskRows(layout, k)
        self.states = tuple(StaticExecutionState(layout, self._rows.row(i)) for i in range(k))

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> StaticExecutionState:
        return self.states[i]

    def __iter__(self) -> Iterator[StaticExecutionState]:
        return iter(self.states)

    @torch.no_grad()
    def update(self, masks: Tensor, u: Tensor | None = None) -> Tensor:
        """Make ``masks[i]`` the mask of ``self[i]``, for every ``i`` at once, as :meth:`StaticExecutionState.update`
        does for one (same arguments with a leading dimension of ``k``: ``(k, channels)`` bool masks and optional
        uniforms). Returns the ``(k, channels)`` masks used (the states' :attr:`~StaticExecutionState.mask_used` are
        its rows)."""
        shape = (len(self), self.layout.num_channels)
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.shape != shape:
            got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks is {got}; expected a bool tensor of shape {shape} (one flat mask per state)")
        if masks.device != self._rows.mask_used.device:
            raise ValueError(f"masks are on {masks.device}, the states' buffers on {self._rows.mask_used.device}")
        self._rows.write(masks, None if u is None else _check_uniforms(u, masks))
        return self._rows.mask_used

    @torch.no_grad()
    def take(self, other: StaticStates) -> None:
        """Make every mask of ``other`` (same layout and ``k``) this one's, as :meth:`StaticExecutionState.take` does
        for one state, with the same five launches."""
        if other.layout is not self.layout or len(other) != len(self):
            raise ValueError("take() needs states of the same layout (the same window) and number")
        self._rows.take(other._rows)


@contextlib.contextmanager
def use_static(state: StaticExecutionState) -> Iterator[nn.Module]:
    """Run the state's model on the state's current mask inside the ``with`` block (as :func:`maskprop.use_mask`
    does for an :class:`~maskprop.sparse.execution.ExecutionState`).

    Example:
        >>> layout = StaticLayout(model, choose_capacities(scores), align=8)
        >>> state = StaticExecutionState(layout)
        >>> state.update(scores.sample_flat(generator))   # in place, on the device
        >>> with use_static(state):
        ...     loss = criterion(model(images), labels)
        >>> loss.backward()
    """
    with installed(state.layout.model, state.layout.layers, state) as model:
        yield model
