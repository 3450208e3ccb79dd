"""Running a model as one channel subnetwork: masks, their validation, the execution state and ``use_mask``.

An :class:`ExecutionState` holds everything the layers need to run one mask, prepared once per mask (off the CPU
with a fixed number of tensor calls whatever the depth of the model; on the CPU, where a call costs no launch, with
one call per gathered tensor; docs/methods.md, "Compact execution"):

* the index sets of the groups that lose channels, built on the host with one ``cumsum`` and one ``nonzero`` over all
  groups, padded up to a multiple of ``align`` (see below), and moved to the model's device in one copy (from pinned
  memory, without blocking, on CUDA);
* the flat indices that gather every pruned conv and linear weight (and bias) from the concatenation of the weights
  of one kernel area, built on the device from that copy with a fixed number of calls (on the CPU, without padding,
  each tensor is read from itself: along its one pruned side by that group's index set, a transformer's linear
  layers and a network's first and last layers; by flat indices only where both sides are pruned); a pruned
  LayerNorm's (RMSNorm's, GroupNorm's) weight and bias are gathered as a bias is, in the area-1 table
  (:meth:`ExecutionState.weight_and_bias`);
* the flat indices that gather the BatchNorm parameters and running statistics of all pruned units.

Tensors gathered into one buffer (the weights of one kernel area, the BatchNorm parameters and statistics) are
padded apart so that each starts at an aligned address (:data:`~maskprop.sparse.gather.ALIGN_ELEMENTS`), as
vectorised GPU kernels need.

A forward pass is one forward of the model: :func:`use_mask` hooks the model's forward so that a pass starts when it
starts and ends when it returns. In a pass the first layer that needs its gathered weight gathers those of all layers:
off the CPU with one ``index_select`` per kernel area from the concatenation of their weights (whose backward writes all
their gradients with one zero-fill and one ``index_copy_``), on the CPU layer by layer (a call is cheap there, copying
every weight in each pass is not: BENCHMARKS.md, "A fixed number of gathering calls per step"); the first BatchNorm
gathers the parameters and statistics of all units with one call each; the running statistics are written back with
two calls when the forward returns. The next forward gathers afresh, so weights changed by an optimizer step in between
are the ones it runs.

**Aligned widths.** With ``align = A`` each group's kept set is padded up to a multiple of ``A`` channels (never past
the group's size) with its first dropped channels, so that the convolutions run on widths that GPU tensor cores and
cuDNN's plan cache like. A padded channel does not exist for the step either: the gathered weight rows of padded
output channels and the gathered BatchNorm weight and bias of padded channels are multiplied by zero, so its unit
output is exactly zero, every gradient it could receive is zero, and its running statistics are not written back. The
loss, gradients and statistics equal those of the unpadded mask; only the computed (and counted) width grows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .gather import ALIGN_ELEMENTS, GatherPiece, GatherTable, gather_norms, gather_pieces, gather_side, write_back_norms
from .groups import aligned_width, channel_groups, check_align, concatenations, count_kept, declared_in
from .layernorm import SparseChannelNorm
from .modules import SparseBatchNorm2d, SparseConv2d, SparseLinear, SparseModule, set_execution_state

Mask = dict[str, Tensor]
MODES = ("compact", "masked")


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_mask(mask: Mapping[str, Tensor], groups: Mapping[str, int]) -> list[int]:
    """Raise a one-line ``ValueError`` unless ``mask`` is a valid mask for ``groups``; return the kept counts.

    A valid mask has exactly the model's groups as keys, and for each a 1-d bool tensor with one entry per channel
    that keeps at least one channel. An empty group is an error rather than a silent zero network: a sampler must
    decide which channel survives (``maskprop.vrpge.ChannelScores.sample`` keeps the highest-scoring one).

    Returns:
        The number of kept channels of each group, in the order of ``groups``.
    """
    if not isinstance(mask, Mapping):
        raise TypeError(f"a mask is a dict of group name -> bool tensor, got {type(mask).__name__}")
    if not groups:
        raise ValueError("this model has no channel groups to mask: expected a maskprop model (maskprop.create_model, "
                         "or a network of plain torch layers after maskprop.make_prunable(model, input_size)), not a "
                         "plain torch one or a materialized subnetwork")
    unknown = [g for g in mask if g not in groups]
    if unknown:
        raise ValueError(
            f"mask has unknown group(s) {_names(unknown)}; this model's groups are {_names(list(groups))} "
            "(was the mask made for another model?)"
        )
    missing = [g for g in groups if g not in mask]
    if missing:
        raise ValueError(f"mask is missing group(s) {_names(missing)}; a mask names every group of the model")
    for name, size in groups.items():
        m = mask[name]
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != (size,):
            got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"mask for group {name!r} is {got}; expected a bool tensor of shape ({size},)")
        if m.is_meta:  # its kept channels are what the execution is built from
            raise ValueError(f"mask for group {name!r} is on the meta device; expected a tensor with values (on the "
                             f"CPU or the model's device)")
    counts = count_kept([mask[g] for g in groups])
    empty = [g for g, count in zip(groups, counts) if count == 0]
    if empty:
        raise ValueError(f"mask keeps no channel of group(s) {_names(empty)}; every group must keep at least one")
    return counts


class GatherSource(NamedTuple):
    """One conv or linear weight (or bias) a subnetwork gathers from, in the concatenation of its kernel area; or a
    LayerNorm's, RMSNorm's or GroupNorm's weight (or bias), gathered as a bias is: one entry per channel of its group,
    in the area-1 table.

    Attributes:
        layer: The layer that owns it.
        kind: ``"weight"`` or ``"bias"``.
        out_group: The group of its output channels (``None``: never pruned); a norm's group.
        in_group: The group of its input channels (``None`` for a bias, a norm's tensors, a side never pruned, or
            the weight of a depthwise conv, whose rows alone follow its group).
        outputs: Its output channels (rows of its ``(rows, area)`` view: ``outputs x inputs``).
        inputs: Its input channels (1 for a bias and a norm's tensors).
        tail: The kernel's shape after the channels (``()`` for linear weights and biases).
    """

    layer: nn.Module
    kind: str
    out_group: str | None
    in_group: str | None
    outputs: int
    inputs: int
    tail: tuple[int, ...]


class RowBlock(NamedTuple):
    """The gathered rows of one tensor (a :class:`GatherSource` or a BatchNorm unit's weight or bias), or the padding
    after it, in terms of the extended index sets ``ext`` (the groups' index sets, then an identity segment for sides
    kept whole, then a zero segment that padding reads): computed output ``o`` reads the flat rows
    ``base + stride * ext[out_start + o] + ext[in_start + i]`` for ``i < inputs``.

    Attributes:
        outputs: Computed output channels (padding: entries).
        base: The tensor's first row in its concatenation (padding: the zero row after it).
        stride: Rows per output channel: the tensor's input channels (padding: 0).
        out_start: Where its output channels' indices start in ``ext``.
        in_start: Where its input channels' indices start in ``ext``.
        inputs: Computed input channels (padding: 1).
    """

    outputs: int
    base: int
    stride: int
    out_start: int
    in_start: int
    inputs: int


def weight_view(layer: SparseConv2d | SparseLinear) -> tuple[int, int, tuple[int, ...]]:
    """``(outputs, input channels, the shape after them)`` of a layer's weight: a conv's ``(out, in, kh, kw)``, a
    linear layer's ``(out, in)``, or ``(out, channels, positions)`` for one on a flattened feature map."""
    if isinstance(layer, SparseLinear) and layer.in_positions > 1:
        return layer.out_features, layer.in_channels, (layer.in_positions,)
    c_out, c_in, *tail = layer.weight.shape
    return c_out, c_in, tuple(tail)


class ModelPlan:
    """What running a model as a subnetwork needs to know about it, computed once per model: its sparse layers and
    its channel groups.

    Attributes:
        layers: Every :class:`SparseModule` of the model, in module order.
        groups: ``{group: channels}`` (:func:`~maskprop.sparse.groups.channel_groups`).
        concatenations: ``{concatenated group: its parts}`` (:func:`~maskprop.sparse.groups.concatenate_groups`).
        weighted: The conv and linear layers that read or write a group.
        norms: The BatchNorm layers of a group.
        layer_norms: The LayerNorms, RMSNorms and GroupNorms (:class:`~maskprop.sparse.SparseChannelNorm`) of a
            group (or a concatenated group) with a weight (and maybe a bias): gathered with the linear biases, in the
            area-1 table.
    """

    def __init__(self, model: nn.Module, layers: list[nn.Module]) -> None:
        self.layers = layers
        self._names = {m: name for name, m in model.named_modules() if isinstance(m, SparseModule)}  # a deep copy's too
        self.groups = channel_groups(model)
        self.concatenations = concatenations(model)
        self.weighted = [m for m in layers if isinstance(m, (SparseConv2d, SparseLinear))
                         and (m.in_group is not None or m.out_group is not None)]
        self.norms = [m for m in layers if isinstance(m, SparseBatchNorm2d) and m.group is not None]
        self.layer_norms = [m for m in layers if isinstance(m, SparseChannelNorm) and m.group is not None
                            and m.weight is not None]
        widest = [max(weight_view(m)[:2]) for m in self.weighted]
        whole_parts = [n for parts in self.concatenations.values() for g, n in parts if g is None]
        self.max_channels = max(widest + whole_parts, default=1)
        # Host tensors every mask's index sets use: the group of each channel, each group's first channel, the
        # identity segment that serves whole and never-pruned sides, and the zero segment that the alignment padding
        # between gathered pieces reads (offset 0, not a kept channel).
        sizes = torch.tensor(list(self.groups.values()), dtype=torch.int64)
        self.layout = (torch.repeat_interleave(torch.arange(len(sizes)), sizes), _exclusive_cumsum(sizes))
        self.identity = (torch.arange(self.max_channels), torch.ones(self.max_channels, dtype=torch.bool))
        self.filler = (torch.zeros(ALIGN_ELEMENTS, dtype=torch.int64), torch.zeros(ALIGN_ELEMENTS, dtype=torch.bool))
        # What gathers the weights and biases, by kernel area (weights, then biases after the area-1 weights, then the
        # LayerNorms' weights and biases: vectors over their group's channels, as a bias is over its outputs').
        self.by_area: dict[int, list[GatherSource]] = {}
        for m in self.weighted:
            c_out, c_in, tail = weight_view(m)
            self.by_area.setdefault(math.prod(tail), []).append(
                GatherSource(m, "weight", m.out_group, m.weight_in_group, c_out, c_in, tail))
        for m in self.weighted:
            if m.bias is not None and m.out_group is not None:
                self.by_area.setdefault(1, []).append(GatherSource(m, "bias", m.out_group, None, m.weight.shape[0], 1,
                                                                   ()))
        for m in self.layer_norms:
            for kind in ("weight", "bias") if m.bias is not None else ("weight",):
                self.by_area.setdefault(1, []).append(GatherSource(m, kind, m.group, None, m.num_features, 1, ()))
        # BatchNorm units gathered together: those with affine parameters and running statistics (all of maskprop's).
        self.packed_norms = [m for m in self.norms if m.affine and m.running_mean is not None
                             and m.running_var is not None]
        self._zero_rows: dict[tuple, Tensor] = {}

    def name_of(self, layer: nn.Module) -> str:
        """``layer``'s name in the model (for error messages)."""
        return self._names.get(layer, type(layer).__name__)

    def zero_row(self, like: Tensor) -> Tensor:
        """One zero row shaped as a row of ``like`` (same dtype and device), made once: the last row of every
        concatenation gathered from, which the alignment padding between gathered pieces reads."""
        key = (tuple(like.shape[1:]), like.dtype, like.device)
        row = self._zero_rows.get(key)
        if row is None:
            row = self._zero_rows[key] = like.new_zeros(1, *like.shape[1:])
        return row

    def concatenated(self, area: int) -> Tensor:
        """All weights (and biases) of one kernel area as one ``(rows, area)`` tensor and a zero row after them (see
        :meth:`zero_row`), the source of every gather.

        Made afresh in every forward pass: a cache keyed by the parameters' version counters would miss the updates
        of fused optimizers, which do not bump them (torch's fused SGD on the CPU).
        """
        parts = [getattr(source.layer, source.kind).reshape(-1, area) for source in self.by_area[area]]
        return torch.cat([*parts, self.zero_row(parts[0])])


_PLAN_ATTRIBUTE = "_maskprop_plan"


def model_plan(model: nn.Module) -> ModelPlan:
    """The :class:`ModelPlan` of ``model``, computed on first use and again only when its layers or its concatenated
    groups changed (a layer replaced or added; parameters moved to another device or dtype need no new plan).

    The plan is kept on the model itself (a plain attribute, not a submodule: no parameter, buffer or state_dict key),
    so it lives and dies with the model, and a deep copy of the model carries a plan of the copy's own layers.
    """
    modules = list(model.modules())  # one walk of the module tree for the layers and the declarations
    layers = [m for m in modules if isinstance(m, SparseModule)]
    plan = getattr(model, _PLAN_ATTRIBUTE, None)
    if plan is None or len(plan.layers) != len(layers) or any(a is not b for a, b in zip(plan.layers, layers)) \
            or plan.concatenations != declared_in(modules):
        plan = ModelPlan(model, layers)
        setattr(model, _PLAN_ATTRIBUTE, plan)
    return plan


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """``host`` on ``device`` in one copy: from pinned memory and without blocking the host where ``device`` is CUDA
    (the copy is ordered on the current stream before any kernel that reads it)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class ForwardPass:
    """The gathered tensors of one forward pass of the model: built by the first layer that asks, read by every layer.

    A pass starts and ends with the model's forward (:func:`installed` hooks it): the first layer that asks gathers
    for all layers, and the running statistics go back once, when the forward ends. A layer called outside the model's
    forward (a submodule run on its own) gathers a pass that lasts until the next forward of the model or the end of
    the block."""

    def __init__(self, tensors: dict, grad: bool) -> None:
        self.tensors = tensors
        self.grad = grad
        self.updated = False  # running statistics changed in place: to be written back
        self.batches: dict[int, int] = {}  # by id(layer): the training calls of each BatchNorm layer in this pass


def gathered(current: ForwardPass | None, gather: Callable[[], dict],
             before: Callable[[], None] | None = None) -> ForwardPass:
    """``current``, or a new pass from ``gather()`` when there is none yet or it was gathered in the other grad mode
    (``before`` runs first then, e.g. to write that pass's statistics back)."""
    if current is None or current.grad != torch.is_grad_enabled():
        if before is not None and current is not None:
            before()
        current = ForwardPass(gather(), torch.is_grad_enabled())
    return current


@contextlib.contextmanager
def installed(model: nn.Module, layers: list[nn.Module], state) -> Iterator[nn.Module]:
    """Run ``layers`` (those of ``model``) under ``state`` inside the ``with`` block, each forward of ``model`` one
    pass: a hook before it drops the previous pass's gathered tensors, a hook after it writes the running statistics
    back (``state.release()`` both times, and once more at the end of the block)."""
    previous = [m.execution_state for m in layers]
    set_execution_state(layers, [state] * len(layers))
    hooks = (model.register_forward_pre_hook(lambda *_: state.release()),
             model.register_forward_hook(lambda *_: state.release()))
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        state.release()
        set_execution_state(layers, previous)


class ExecutionState:
    """Everything the layers need to run one mask, prepared once so that a forward pass does no index arithmetic
    (off the CPU, a fixed number of gathering calls whatever the depth; on the CPU one per gathered tensor: see the
    module docstring).

    Layers read it (``layer.execution_state``); :func:`use_mask` sets it. Build one with :func:`prepare_mask`
    to do the work before a forward (a search step prepares both of its masks first), or let :func:`use_mask` build it.

    Attributes:
        mode: ``"compact"`` or ``"masked"``.
        align: Kept widths are padded up to multiples of this (compact mode).
        kept: ``{group: kept channels}``.
        widths: ``{group: channels computed}``: ``kept`` padded to ``align`` (equal to ``kept`` for ``align=1`` and
            in masked mode); what the train-cost accounting counts.
        layers_count_batches: Always true: BatchNorm layers count their batches themselves (``num_batches_tracked``; a
            static state counts them all at once: :class:`~maskprop.sparse.static.StaticExecutionState`).
    """

    layers_count_batches = True

    def __init__(self, mask: Mapping[str, Tensor], model: nn.Module, mode: str = "compact",
                 device: torch.device | None = None, counts: list[int] | None = None, align: int = 1,
                 plan: ModelPlan | None = None, concatenate: bool | None = None) -> None:
        """``mask`` holds every group of ``model`` (:func:`check_mask`); ``counts`` its kept counts in the order of
        ``mask`` when already known; ``device`` defaults to the model's. ``concatenate``: gather the weights of one
        kernel area from their concatenation with one call (default off the CPU, where calls are launches), or
        layer by layer (default on the CPU, where a call is cheap and copying every weight per pass is not)."""
        if mode not in MODES:
            raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.align = check_align(align)
        self.plan = model_plan(model) if plan is None else plan
        self.device = _model_device(model) if device is None else torch.device(device)
        self.concatenate = self.device.type != "cpu" if concatenate is None else concatenate
        names = list(mask)
        masks = [mask[g] for g in names]
        counts = count_kept(masks) if counts is None else counts
        sizes = [m.numel() for m in masks]
        self.kept = dict(zip(names, counts))
        align = self.align if mode == "compact" else 1
        self.widths = {g: aligned_width(c, n, align) for g, c, n in zip(names, counts, sizes)}
        self.masks: dict[str, Tensor] = {}
        self._index: dict[str, Tensor] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # gathered group -> (start, width) in the copied index sets
        self._weights: list[TableIndex] = []  # what gathers each table (off the CPU, or with padding)
        self._layer_gathers: list[LayerGather] = []  # or each tensor of them (on the CPU, without padding)
        self._weight_layers: set[int] = set()
        self._norm: TableIndex | None = None
        self._norm_position: dict[int, int] = {}  # id(BatchNorm unit) -> its place in the BatchNorm table
        self._norm_kept: Tensor | None = None  # with padding: whether each BatchNorm entry is a kept channel
        self._one: dict[int, tuple[Tensor | None, Tensor | None]] = {}  # BatchNorm outside the packed gather
        self.padded = False
        self._weight_pass: ForwardPass | None = None
        self._norm_pass: ForwardPass | None = None
        if mode == "masked":
            pruned = [g for g, c, n in zip(names, counts, sizes) if c < n]
            host = {g: mask[g].cpu() for g in pruned}
            for name, parts in self.plan.concatenations.items():  # a concatenation of pruned parts is pruned
                if any(g in host for g, _ in parts):
                    host[name] = torch.cat([host[g] if g in host else torch.ones(n, dtype=torch.bool)
                                            for g, n in parts])
            if host:
                moved = to_device(torch.cat(list(host.values())), self.device)
                self.masks = dict(zip(host, moved.split([m.numel() for m in host.values()])))
            self._mask_values: dict[tuple[str, torch.dtype, int], Tensor] = {}  # (group, dtype, dims after it)
            return
        self._prepare_compact(names, masks, counts, sizes)

    # --- preparation (once per mask) -----------------------------------------------------------------------------

    def _prepare_compact(self, names: list[str], masks: list[Tensor], counts: list[int], sizes: list[int]) -> None:
        widths = [self.widths[g] if c < n else 0 for g, c, n in zip(names, counts, sizes)]
        if not any(widths):
            return
        host_masks = torch.cat([m if m.device.type == "cpu" else m.cpu() for m in masks])
        layout = self.plan.layout if names == list(self.plan.groups) else None
        index, real = _padded_index_sets(host_masks, sizes, counts, widths, layout)
        start = 0
        for g, w in zip(names, widths):
            if w:
                self._offsets[g] = (start, w)
                start += w
        if self.plan.concatenations:
            index, real = self._concatenated_index_sets(index, real)
        identity = len(index)  # an identity segment after the index sets serves whole and never-pruned sides
        index_ext = torch.cat([index, self.plan.identity[0], self.plan.filler[0]])
        real_ext = torch.cat([real, self.plan.identity[1], self.plan.filler[1]])
        self.padded = any(w > c for w, c in zip(widths, counts) if w)
        weights, norm, blocks = gather_tables(self.plan, self._offsets, identity, self.concatenate)
        self._weight_layers = {id(p.layer) for table in weights for p in table.pieces}
        rows = _row_table(blocks, index_ext, real_ext)

        # One host-to-device copy of everything, then the flat rows built on the device: there is one per gathered
        # weight entry, far more than the index sets they come from, too many to build on the host and copy over.
        # (Their number for ResNet-50: BENCHMARKS.md, "A fixed number of gathering calls per step".)
        pieces = [index_ext, real_ext.long(), rows.view(-1)]
        moved = to_device(torch.cat(pieces), self.device).split([p.numel() for p in pieces])
        self._index_ext, self._real_ext = moved[0], moved[1]
        tables = weights + ([norm] if norm is not None else [])
        if not self.concatenate and not self.padded:
            # The CPU path (layer by layer): the host pays per call, not per launch. A tensor pruned on one side is
            # read along that side by its group's index set; one pruned on both sides (and the BatchNorm table) by
            # flat rows, one broadcast add per tensor, which touches only the entries it makes. Both beat the
            # fixed-count expansion below.
            firsts = moved[2].view(-1, 4)[:, 0].split([b.outputs for b in blocks])
            pieces = [(table, p) for table in weights for p in table.pieces]
            self._layer_gathers = [self._layer_gather(table, piece, block, first, identity) for (table, piece), block,
                                   first in zip(pieces, blocks, firsts)]
            if norm is not None:  # its rows follow the weights' in the row table: expanded as off the CPU
                rows = moved[2].view(-1, 4)
                weight_rows = sum(block.outputs for block in blocks[:len(pieces)])
                norm_rows = rows[weight_rows:].clone()
                norm_rows[:, 1] += rows[:weight_rows, 3].sum()  # shifts counted from the BatchNorm table's first entry
                self._norm = TableIndex(norm, _flat_rows(norm_rows, norm.entries, self._index_ext, False)[0])
                self._norm_position = {id(m): i for i, m in enumerate(norm.modules)}
            return
        flat, real_rows = _flat_rows(moved[2].view(-1, 4), sum(t.entries for t in tables), self._index_ext,
                                     self.padded)
        entry_counts = [t.entries for t in tables]
        flats = flat.split(entry_counts)
        reals = real_rows.split(entry_counts) if real_rows is not None else [None] * len(tables)
        self._weights = [TableIndex(table, t_flat, t_real) for table, t_flat, t_real in zip(weights, flats, reals)]
        if norm is not None:
            self._norm = TableIndex(norm, flats[-1], reals[-1])
            self._norm_position = {id(m): i for i, m in enumerate(norm.modules)}
            self._norm_kept = reals[-1].bool() if self.padded else None

    def _layer_gather(self, table: GatherTable, piece: GatherPiece, block: RowBlock, first: Tensor,
                      identity: int) -> LayerGather:
        """How the CPU path reads one tensor of a weight table for this mask, from its row block: along its one
        pruned side, or by flat rows (``first``: each computed output's first flat row) where both are pruned."""
        out_whole, in_whole = block.out_start == identity, block.in_start == identity
        if in_whole:  # its rows (a bias, a weight whose input channels are kept whole)
            dim, index = 0, self._index_ext[block.out_start:block.out_start + block.outputs]
        elif out_whole:
            dim, index = 1, self._index_ext[block.in_start:block.in_start + block.inputs]
        else:
            dim, index = None, self._block_rows(block, first)
        return LayerGather(piece, table.area, block.stride, dim, index)

    def _block_rows(self, block: RowBlock, first: Tensor) -> Tensor:
        """The flat rows of a row block (``first``: each computed output's first flat row), one broadcast add: each
        output's rows are its first plus the block's input indices."""
        return (first[:, None] + self._index_ext[block.in_start:block.in_start + block.inputs]).view(-1)

    def _concatenated_index_sets(self, index: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
        """``index`` and ``real`` followed by the index sets of the concatenated groups that lose channels: each
        part's set (its whole range, from the identity segment, where this mask prunes it not) shifted by the
        channels of the parts before it. A fixed number of tensor calls for all of them, whatever their parts."""
        identity = index.numel()  # where the identity segment starts in the source below
        starts, lengths, shifts = [], [], []
        start = identity
        for name, parts in self.plan.concatenations.items():
            if not any(g in self._offsets for g, _ in parts):
                continue  # read whole
            first = width = 0
            for g, n in parts:
                at, w = self._offsets.get(g, (identity, n))
                starts.append(at)
                lengths.append(w)
                shifts.append(first)
                first += n
                width += w
            self._offsets[name] = (start, width)
            start += width
        if not lengths:
            return index, real
        lengths_t = torch.tensor(lengths)
        total = start - identity
        positions = torch.repeat_interleave(torch.tensor(starts) - _exclusive_cumsum(lengths_t), lengths_t,
                                            output_size=total).add_(torch.arange(total))
        shifts_t = torch.repeat_interleave(torch.tensor(shifts), lengths_t, output_size=total)
        source = torch.cat([index, self.plan.identity[0]])
        source_real = torch.cat([real, self.plan.identity[1]])
        return (torch.cat([index, source.index_select(0, positions).add_(shifts_t)]),
                torch.cat([real, source_real.index_select(0, positions)]))

    # --- what layers read ----------------------------------------------------------------------------------------

    def index(self, group: str | None) -> Tensor | None:
        """Channels of ``group`` the compact layers compute (kept, and padding), on the model's device; ``None`` when
        the group is kept whole, is never pruned, or in masked mode."""
        if group is None or group not in self._offsets:
            return None
        start, width = self._offsets[group]
        return self._index_ext[start:start + width]

    def real(self, group: str | None) -> Tensor | None:
        """1 for the channels of ``group`` (or of a concatenated group) that the compact layers compute and the mask
        keeps, 0 for padding, in the order of :meth:`index`; ``None`` where none is padding (``align=1``) or the
        group is computed whole."""
        if not self.padded or group not in self._offsets:
            return None
        start, width = self._offsets[group]
        return self._real_ext[start:start + width]

    def weight_and_bias(self, layer: SparseConv2d | SparseLinear | SparseChannelNorm
                        ) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias ``layer`` (a conv, a linear layer, a LayerNorm, an RMSNorm or a GroupNorm; either may be
        ``None``) runs with in compact mode: gathered when it reads or writes a pruned group (all layers' at once, by
        the first layer of a forward pass that asks), its own otherwise."""
        if id(layer) not in self._weight_layers:
            return layer.weight, layer.bias
        self._weight_pass = gathered(self._weight_pass, self._gather_weights)
        return self._weight_pass.tensors[id(layer)]

    def batch_norm(self, layer: SparseBatchNorm2d) -> tuple[Tensor | None, Tensor | None, Tensor | None,
                                                             Tensor | None] | None:
        """``(running_mean, running_var, weight, bias)`` of the channels ``layer`` computes, gathered with those of
        all units; ``None`` when its group is kept whole (the layer runs as ``nn.BatchNorm2d``).

        The running statistics returned are the ones to update in place; call :meth:`batch_norm_done` after the
        forward so that they are written back (for the truly kept channels only) when the pass ends.
        """
        if layer.group not in self._offsets:
            return None
        if id(layer) not in self._norm_position:
            return self._gather_one(layer)
        self._norm_pass = gathered(self._norm_pass, self._gather_norms, self.flush)
        return self._norm_pass.tensors[id(layer)]

    def padding_factor(self, layer: SparseBatchNorm2d) -> Tensor | None:
        """The 0/1 factors of the channels ``layer`` computes (0 for padding) when some are padding, else ``None``."""
        return self.real(layer.group)

    def batch_norm_done(self, layer: SparseBatchNorm2d, updated: bool) -> None:
        """Record that ``layer`` ran (``updated``: its running statistics moved in place); the statistics of every
        unit go back into the model when the pass ends (:meth:`release`)."""
        if id(layer) not in self._norm_position:
            if updated:
                self._write_back_one(layer)
            return
        self._norm_pass.updated |= updated

    def release(self) -> None:
        """End the current pass: write its running statistics back and drop its gathered tensors (the model's forward
        hooks do it when a forward starts and ends, :func:`use_mask` at the end of its block)."""
        self.flush()
        self._weight_pass = self._norm_pass = None

    def flush(self) -> None:
        """Write pending running statistics back into the model (harmless when none are pending)."""
        current = self._norm_pass
        if current is None or not current.updated:
            return
        write_back_norms(self._norm.table, current.tensors, self._norm.flat, self._norm_kept)
        current.updated = False

    def apply_mask(self, group: str | None, y: Tensor, last: bool = False) -> Tensor:
        """``y`` with the dropped channels of ``group`` set to zero (``masked`` mode): channels in dimension 1 (a
        feature map), or in the last dimension where ``last`` (a linear layer's output, whatever its rank)."""
        mask = self.masks.get(group) if group is not None else None
        if mask is None:
            return y
        trailing = 0 if last else y.dim() - 2
        key = (group, y.dtype, trailing)
        values = self._mask_values.get(key)
        if values is None:
            values = mask.to(y.dtype).view(-1, *([1] * trailing))
            self._mask_values[key] = values
        return y * values

    # --- gathering (once per forward pass) -----------------------------------------------------------------------

    def _gather_weights(self) -> dict[int, list[Tensor | None]]:
        """The gathered weights (and biases) of all layers: off the CPU one concatenation and one ``index_select`` per
        kernel area, each piece starting at an aligned address (the backward writes all their gradients with one
        zero-fill and one ``index_copy_``); on the CPU layer by layer, reading only the kept rows of each weight."""
        tensors: dict[int, list[Tensor | None]] = {}
        for gather in self._layer_gathers:  # the CPU path
            p = gather.piece
            pair = tensors.setdefault(id(p.layer), [p.layer.weight, p.layer.bias])
            pair[0 if p.kind == "weight" else 1] = gather_side(getattr(p.layer, p.kind), gather.dim, gather.index,
                                                               gather.area, gather.channels).view(p.shape)
        for index in self._weights:
            table = index.table
            source = self.plan.concatenated(table.area) if self.concatenate else None
            factor = index.factor(table.pieces[0].layer.weight.dtype) if self.padded else None
            for p, piece in zip(table.pieces, gather_pieces(table, index.flat, factor, source)):
                pair = tensors.setdefault(id(p.layer), [p.layer.weight, p.layer.bias])
                pair[0 if p.kind == "weight" else 1] = piece
        return tensors

    def _gather_norms(self) -> dict:
        """BatchNorm weights and biases of all units with one gather (padded channels' multiplied by zero), running
        means and variances with another; each unit's pieces start at aligned addresses."""
        norm = self._norm
        first = norm.table.modules[0]
        factor = norm.factor(first.weight.dtype) if self.padded else None
        return gather_norms(norm.table, norm.flat, factor, self.plan.zero_row(first.weight))

    def _gather_one(self, layer: SparseBatchNorm2d) -> tuple[Tensor | None, ...]:
        """A BatchNorm the packed gather does not serve (no affine parameters or no running statistics)."""
        index = self.index(layer.group)
        mean = None if layer.running_mean is None else layer.running_mean.index_select(0, index)
        var = None if layer.running_var is None else layer.running_var.index_select(0, index)
        weight = None if layer.weight is None else layer.weight.index_select(0, index)
        bias = None if layer.bias is None else layer.bias.index_select(0, index)
        factor = self.real(layer.group)
        if factor is not None:
            weight = None if weight is None else weight * factor.to(weight.dtype)
            bias = None if bias is None else bias * factor.to(bias.dtype)
        self._one[id(layer)] = (mean, var)
        return mean, var, weight, bias

    def _write_back_one(self, layer: SparseBatchNorm2d) -> None:
        mean, var = self._one.pop(id(layer))
        index = self.index(layer.group)
        start, width = self._offsets[layer.group]
        real = self._real_ext[start:start + width].bool()
        for running, new in ((layer.running_mean, mean), (layer.running_var, var)):
            running.index_copy_(0, index, torch.where(real, new, running.index_select(0, index)))


@dataclass
class TableIndex:
    """What gathers a :class:`~maskprop.sparse.gather.GatherTable` for one mask, on the model's device.

    Attributes:
        table: The tensors gathered and where each sits.
        flat: The flat rows of every entry (padding included) in the concatenation of the table's sources (with
            ``concatenate``) or in each source's own ``(rows, area)`` view.
        real: With aligned widths, 1 for the entries of kept channels and 0 for padding (int64); else ``None``.
    """

    table: GatherTable
    flat: Tensor
    real: Tensor | None = None
    _factors: dict[torch.dtype, Tensor] = field(default_factory=dict, repr=False)

    def factor(self, dtype: torch.dtype) -> Tensor:
        """``real`` in ``dtype``, made once per dtype: the 0/1 factors of the gathered entries."""
        factor = self._factors.get(dtype)
        if factor is None:
            factor = self._factors[dtype] = self.real.to(dtype)
        return factor


class LayerGather(NamedTuple):
    """How the CPU path reads one weight or bias for a mask (:func:`~maskprop.sparse.gather.gather_side`).

    Attributes:
        piece: The tensor, and the shape it is gathered to.
        area: Its table's kernel area (the elements of a flat row).
        channels: Its input channels.
        dim: 0: ``index`` holds its computed output channels (its input side kept whole); 1: its computed input
            channels (its output side kept whole); ``None``: the flat rows of both.
        index: As ``dim`` says, on the model's device.
    """

    piece: GatherPiece
    area: int
    channels: int
    dim: int | None
    index: Tensor


def _exclusive_cumsum(t: Tensor) -> Tensor:
    return t.cumsum(0) - t


def _padded_index_sets(masks: Tensor, sizes: list[int], counts: list[int], widths: list[int],
                       layout: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Index sets of the groups with ``widths > 0``, each its kept channels padded with its first dropped channels up
    to its width, in channel order, concatenated; and whether each entry is a kept channel (not padding).

    All groups at once, from one ``cumsum`` and one ``nonzero`` on the host. ``layout``: ``(group of each channel,
    first channel of each group)`` when already known (:class:`ModelPlan`).
    """
    if layout is None:
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        layout = (torch.repeat_interleave(torch.arange(len(sizes)), sizes_t), _exclusive_cumsum(sizes_t))
    group_of, starts = layout
    widths_t = torch.tensor(widths, dtype=torch.int64)
    pruned = None if all(widths) else (widths_t > 0)[group_of]  # groups kept whole take no index set
    selected = masks if pruned is None else masks & pruned
    pad = [w - c if w else 0 for w, c in zip(widths, counts)]
    if any(pad):
        dropped = ~masks if pruned is None else ~masks & pruned
        rank = dropped.cumsum(0)  # 1-based rank of a dropped channel among all dropped channels
        rank -= (rank - dropped.long())[starts][group_of]  # ... among those of its group
        selected = selected | (dropped & (rank <= torch.tensor(pad)[group_of]))
    positions = selected.nonzero().view(-1)
    real = masks[positions]
    positions -= starts.repeat_interleave(widths_t, output_size=positions.numel())
    return positions, real


def gather_tables(plan: ModelPlan, offsets: Mapping[str, tuple[int, int]], identity: int,
                  concatenate: bool = True) -> tuple[list[GatherTable], GatherTable | None, list[RowBlock]]:
    """What a subnetwork gathers, from where its groups' index sets sit in the extended index sets (``offsets``:
    ``{group: (start, width)}`` of the groups that lose channels; :class:`RowBlock`): a table per kernel area (the
    weights and biases to concatenate, each piece's shape and entries), one for the BatchNorm units, and the row
    blocks of every gathered tensor. A side kept whole reads the identity segment at ``identity``; the zero segment
    follows it at ``identity + plan.max_channels``. Without ``concatenate`` the rows are those of each tensor's own
    ``(rows, area)`` view. The tables' entries follow each other in one flat index (``GatherTable.start``): the weight
    tables', then the BatchNorm table's. Used per mask by :func:`prepare_mask` and per window of capacities by
    :class:`~maskprop.sparse.static.StaticLayout`.

    Where pieces are gathered into one buffer (the weights with ``concatenate``, the BatchNorm tensors always), each
    piece is followed by padding entries that make the next one start at a multiple of ``ALIGN_ELEMENTS``
    elements. They read the zero row after the concatenation (a block with no input channels whose outputs come from
    the zero segment), and they are not kept channels.
    """
    tables, blocks = [], []
    filler = identity + plan.max_channels
    start = 0  # the next table's first entry in the flat index of all tables

    def add(table: GatherTable, layer: nn.Module, kind: str, shape_tail: tuple, base: int, stride: int,
            out_side: tuple[int, int], in_side: tuple[int, int], zero_row: int | None, step: int) -> None:
        (out_start, n_out), (in_start, n_in) = out_side, in_side
        blocks.append(RowBlock(n_out, base, stride, out_start, in_start, n_in))
        n = n_out * n_in
        pad = -n % step if zero_row is not None else 0
        if pad:
            blocks.append(RowBlock(pad, zero_row, 0, filler, filler, 1))
        vector = kind == "bias" or isinstance(layer, SparseChannelNorm)  # a bias, a norm's weight: one per output
        shape = (n_out,) if vector else (n_out, n_in, *shape_tail)
        table.pieces.append(GatherPiece(layer, kind, shape, table.entries, n))
        table.split_sizes.append(n + pad)
        table.entries += n + pad

    for area, sources in plan.by_area.items():
        table = GatherTable(area, [], start, 0, [])
        zero_row = sum(src.outputs * src.inputs for src in sources) if concatenate else None
        step = ALIGN_ELEMENTS // math.gcd(area, ALIGN_ELEMENTS)
        base = 0
        for src in sources:  # rows of the area's concatenation
            if src.out_group in offsets or src.in_group in offsets:
                out_side = offsets.get(src.out_group, (identity, src.outputs))
                in_side = offsets.get(src.in_group, (identity, src.inputs))
                add(table, src.layer, src.kind, src.tail, base if concatenate else 0, src.inputs, out_side, in_side,
                    zero_row, step)
            base += src.outputs * src.inputs
        if table.pieces:
            tables.append(table)
            start += table.entries
    modules = [m for m in plan.packed_norms if m.group in offsets]
    if not modules:
        return tables, None, blocks
    norm = GatherTable(1, [], start, 0, [], modules)
    total = sum(m.num_features for m in modules)
    for kind, first in (("weight", 0), ("bias", total)):  # cat(weights + biases): the layout of cat(means + vars)
        base = first
        for m in modules:
            add(norm, m, kind, (), base, 1, offsets[m.group], (identity, 1), 2 * total, ALIGN_ELEMENTS)
            base += m.num_features
    return tables, norm, blocks


def _row_table(blocks: list[RowBlock], index_ext: Tensor, real_ext: Tensor) -> Tensor:
    """One row per (gathered tensor, computed output channel), with a fixed number of host calls for all of them:
    ``[first flat row, shift, kept (1) or padding (0), computed inputs]``, where ``shift`` is the start of the row's
    inputs in the extended index sets minus the row's first entry in the expanded table (the entries of all rows
    before it).

    Expanded over its computed inputs (:func:`_flat_rows`), entry ``e`` of the table (input ``i`` of its row) has
    ``shift + e`` = that start ``+ i``, and gives the flat row ``first + index_ext[start + i]`` of the tensor's
    ``(rows, kernel area)`` view inside the concatenation of its kind.
    """
    table = torch.tensor(blocks, dtype=torch.int64)
    block_of = torch.repeat_interleave(table[:, 0])  # the row block of each row
    _, base, stride, out_start, in_start, n_in = table[block_of].unbind(1)  # RowBlock's fields
    out_pos = out_start + torch.arange(len(block_of)) - _exclusive_cumsum(table[:, 0])[block_of]
    real = real_ext[out_pos].long()
    first = base + index_ext[out_pos] * stride
    return torch.stack([first, in_start - _exclusive_cumsum(n_in), real, n_in], 1)


def _flat_rows(rows: Tensor, entries: int, index_ext: Tensor, padded: bool) -> tuple[Tensor, Tensor | None]:
    """Flat rows (and, with padding, their 0/1 kept flags) from the row table, on the table's device with a fixed
    number of calls: each row expanded over its computed inputs.

    Only the row numbers are expanded (one 1-d ``repeat_interleave``), and the columns are gathered by them: expanding
    the 4-column table itself would write four entries for each one kept (the timings: BENCHMARKS.md, "A fixed number
    of gathering calls per step").
    """
    row_of = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), rows[:, 3], output_size=entries)
    offsets = rows[:, 1].index_select(0, row_of).add_(torch.arange(entries, device=rows.device))
    flat = rows[:, 0].index_select(0, row_of).add_(index_ext.index_select(0, offsets))
    return flat, (rows[:, 2].index_select(0, row_of) if padded else None)


def prepare_mask(model: nn.Module, mask: Mapping[str, Tensor], mode: str = "compact", align: int = 1) -> ExecutionState:
    """Validate ``mask`` for ``model`` and prepare everything its layers need to run it (see :class:`ExecutionState`).

    Args:
        model: A maskprop model.
        mask: Group name -> bool tensor (one entry per channel), on any device.
        mode: ``"compact"`` or ``"masked"``.
        align: Pad each group's kept set up to a multiple of this many channels, never past the group's size
            (compact mode; exact, see the module docstring). 1: no padding.
    """
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
    check_align(align)
    plan = model_plan(model)
    counts = check_mask(mask, plan.groups)
    return ExecutionState({g: mask[g] for g in plan.groups}, model, mode, None, counts, align, plan)


@contextlib.contextmanager
def use_mask(model: nn.Module, mask: Mapping[str, Tensor] | ExecutionState | None, mode: str = "compact",
             align: int = 1) -> Iterator[nn.Module]:
    """Run ``model`` as the subnetwork ``mask`` inside the ``with`` block.

    Args:
        model: a maskprop model (its layers are :mod:`maskprop.sparse.modules` layers).
        mask: group name -> bool tensor (one entry per channel); an :class:`ExecutionState` from
            :func:`prepare_mask` (its mode and alignment apply); ``None`` runs the dense model.
        mode: ``"compact"`` (gathered channels: the cost follows the kept channels) or ``"masked"`` (dense kernels,
            mask after BatchNorm: the reference semantics).
        align: pad kept widths to multiples of this (compact mode; see :func:`prepare_mask`).

    Example:
        >>> with maskprop.use_mask(model, mask):
        ...     loss = criterion(model(images), labels)
        >>> loss.backward()  # gradients land in the full-size parameters, zero for dropped channels
    """
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
    if mask is None:
        yield model
        return
    state = mask if isinstance(mask, ExecutionState) else prepare_mask(model, mask, mode, align)
    with installed(model, model_plan(model).layers, state):
        yield model
