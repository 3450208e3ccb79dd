"""Training a fixed subnetwork as the physically narrow model, with its weights and optimizer state kept in the full
model and optimizer.

Once the subnetwork is fixed (the finetune phase), gathering the kept channels at every step, as compact execution
does, buys nothing: the kept set never changes. :class:`NarrowSubnetwork` gathers them once instead. It builds the
narrow model (:func:`maskprop.materialize`: plain torch layers holding only the kept channels, same module tree and
parameter names) and a narrow optimizer of the same class, hyperparameters and param groups, whose per-parameter state
(SGD momentum buffers; Adam's moments and step) is gathered from the full optimizer's by the same index sets. The run
trains the narrow pair; :meth:`NarrowSubnetwork.write_back` scatters weights, BatchNorm running statistics,
``num_batches_tracked`` and optimizer state back into the full model and optimizer, so checkpoints keep their format
and a resumed run rebuilds the narrow pair from the full state it saved.

Exactness. SGD with momentum and weight decay, Adam and AdamW update every element from that element's weight,
gradient and state alone, so the kept entries after any number of narrow steps equal those after as many compact
steps of the full model under the same mask, up to rounding (tested in float64 and float32 against compact steps).
The dropped entries do not: a compact step gives them a zero gradient, so weight decay shrinks them and momentum
keeps moving them; the narrow model does not hold them, and they keep the values they had when the narrow model was
built (a momentum buffer the full optimizer did not have yet is written back with zeros there). Dropped channels are
zero after BatchNorm whatever their weights, so the network's function under the mask is the same either way.

Aligned widths. A GPU runs widths that are multiples of 8 far faster than odd ones (tensor cores, cuDNN's kernels),
so with ``align > 1`` (the trainer passes ``sparsity.align``: 8 on CUDA) each group of the narrow model is padded up to
a multiple of ``align`` with channels that stay exactly zero: their conv rows and BatchNorm weight and bias are zero,
and so are the columns of every layer that reads them. Such a channel outputs 0 (BatchNorm normalises a constant 0 to
0 and scales it by 0), every layer ignores it, and every gradient it could receive is a product with one of those
zeros, so its weights, momentum and Adam moments stay 0 under any number of steps, weight decay included. The padded
model computes what the unpadded one does, up to the order of the sums (tested in float64); write-back scatters the
subnetwork's own entries only. The padding channels are taken from the group's dropped channels, whose full-model
entries stay untouched.

Memory: the narrow model and optimizer state are a second copy of the kept entries (at keep 0.5 about a quarter of
the full model's), held beside the full ones for the phase.

The learning-rate schedule keeps driving the full optimizer (its param groups are what a checkpoint saves); every
narrow step first copies the full param groups' hyperparameters (``lr`` and the rest) into the narrow ones.

Plain ``nn.Conv2d`` lacks the route around a oneDNN crash that maskprop's sparse convs take (the CPU weight gradient
of a strided 1x1 conv with a batch the thread count does not divide, ``maskprop._workarounds``); the narrow model is
built with :class:`PointwiseSafeConv2d`, an ``nn.Conv2d`` that takes the same route, as its conv type (the export
keeps plain layers).

Under torchrun the ranks' narrow models are the same, built from the same full model and mask; the eager steps run
a DDP wrapper of it that the training loop builds (:attr:`NarrowSubnetwork.step_model`), the static steps of a GPU run
average its gradients themselves (``graphs.py``). With ``sync_bn`` its BatchNorm layers are
:class:`~maskprop.sparse.SparseBatchNorm2d` (``norm_type``), which normalise with the statistics of the global batch as
the full model's do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._workarounds import subsampled_pointwise_input
from ..cost import dense_step_flops
from ..sparse import aligned_width, channel_groups, check_align, check_mask, kept_ratio
from ..surgery import gather, index_sets, materialize, scatter_
from .steps import StepContext, StepResult, subnet_step

__all__ = ["ELEMENTWISE_OPTIMIZERS", "NarrowSubnetwork", "PointwiseSafeConv2d"]

ELEMENTWISE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
"""Optimizers whose update of an element depends on that element alone, so that gathering their state is exact."""


class PointwiseSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs a strided 1x1 convolution on the subsampled input where oneDNN would crash.

    Same parameters, output and gradients as ``nn.Conv2d`` (see :func:`maskprop._workarounds.subsampled_pointwise_input`
    for when and why).
    """

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        subsampled = subsampled_pointwise_input(x, self.kernel_size, self.stride, self.padding)
        if subsampled is not None:
            return F.conv2d(subsampled, weight, bias, 1, 0, self.dilation, self.groups)
        return super()._conv_forward(x, weight, bias)


class NarrowSubnetwork:
    """The physically narrow model and optimizer of a fixed subnetwork, trained in place of compact steps.

    Args:
        model: The full maskprop model (not modified until :meth:`write_back`).
        mask: The fixed subnetwork, ``{group: bool tensor}``.
        optimizer: The full model's optimizer (SGD, Adam or AdamW over the model's parameters); its param groups'
            hyperparameters keep driving the narrow optimizer, so its learning-rate schedule stays as it is.
        align: Each group's width in the narrow model is its kept count rounded up to a multiple of this (never past
            the group's size), padded with channels that stay exactly zero (see the module docstring); 1: no padding.
        norm_type: The BatchNorm class of the narrow model (:func:`maskprop.materialize`'s ``norm_type``).

    Attributes:
        model: The narrow model (``maskprop.materialize`` with :class:`PointwiseSafeConv2d` convs).
        optimizer: The narrow optimizer, its state gathered from ``optimizer``'s.
        mask: The subnetwork (on the CPU).
        computed: The channels the narrow model holds: ``mask`` and, with ``align > 1``, the padding channels.
        widths: ``{group: channels}`` of ``computed``: the widths the narrow model computes.
        step_model: The module the eager training steps run: ``model``, or the DDP wrapper the training loop gives it
            under torchrun.

    Raises:
        ValueError: ``mask`` does not fit ``model``, ``align`` is not a positive integer, or ``optimizer`` is not
            elementwise (SGD, Adam, AdamW) or holds tensors that are not the model's parameters.
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                 align: int = 1, norm_type: type[nn.BatchNorm2d] = nn.BatchNorm2d) -> None:
        if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
            raise ValueError(f"narrow training needs an optimizer that updates every element on its own (SGD, Adam, "
                             f"AdamW) so that gathering its state is exact; got {type(optimizer).__name__}")
        check_mask(mask, channel_groups(model))
        self.full, self.full_optimizer = model, optimizer
        self.mask = {g: m.detach().cpu() for g, m in mask.items()}
        self.computed = _padded(self.mask, check_align(align))
        # Fixed for the phase: counted once here, not in every step.
        self.widths = {g: int(m.sum()) for g, m in self.computed.items()}
        self._kept_ratio = kept_ratio(self.mask, {g: m.numel() for g, m in self.mask.items()})
        self.model = materialize(model, self.computed, conv_type=PointwiseSafeConv2d, norm_type=norm_type)
        self.step_model: nn.Module = self.model
        sets, own = index_sets(model, self.computed), index_sets(model, self.mask)  # what materialize sliced by
        narrow_tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        # Every parameter and buffer, in the model's order: the full and narrow tensors, the rows and columns of the
        # full one the narrow one holds, and the subnetwork's own entries (full indices; positions in the narrow one).
        self._pairs = [_Pair(name, full, narrow_tensors[name], *sets[name], *own[name])
                       for name, full in (*model.named_parameters(), *model.named_buffers())]
        self._by_param = {id(pair.full): pair for pair in self._pairs if isinstance(pair.full, nn.Parameter)}
        groups = []
        for group in optimizer.param_groups:
            if any(id(p) not in self._by_param for p in group["params"]):
                raise ValueError("the optimizer holds tensors that are not parameters of the model; expected the "
                                 "optimizer of the model's own parameters")
            groups.append({**self._hyperparameters(group),
                           "params": [self._by_param[id(p)].narrow for p in group["params"]]})
        self.optimizer = type(optimizer)(groups, **optimizer.defaults)
        with torch.no_grad():
            for pair in self._pairs:
                pair.zero_padding(pair.narrow, fill=1.0 if pair.is_variance else 0.0)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    pair = self._by_param[id(param)]
                    if optimizer.state.get(param):
                        self.optimizer.state[pair.narrow] = {
                            key: self._gather_state(value, pair)
                            for key, value in optimizer.state[param].items()}

    @staticmethod
    def _hyperparameters(group: Mapping) -> dict:
        return {key: value for key, value in group.items() if key != "params"}

    @staticmethod
    def _gather_state(value: object, pair: _Pair) -> object:
        """A per-element state tensor (the parameter's shape) gathered, zero at the padding; anything else (Adam's
        step) copied."""
        if isinstance(value, Tensor):
            if value.shape != pair.full.shape:
                return value.clone()
            part = gather(value, pair.rows, pair.columns)
            pair.zero_padding(part)
            return part
        return value

    def sync_hyperparameters(self) -> None:
        """Copy the full optimizer's param-group hyperparameters (``lr``, set by the schedule, and the rest)."""
        for full, narrow in zip(self.full_optimizer.param_groups, self.optimizer.param_groups):
            narrow.update(self._hyperparameters(full))

    def kept_ratio(self) -> float:
        """Kept fraction of the prunable channels (of the subnetwork, the padding left out)."""
        return self._kept_ratio

    def step(self, batch: tuple[Tensor, Tensor], ctx: StepContext) -> StepResult:
        """One SGD step of the narrow model: what ``subnet_step`` does to the full model under the mask.

        The result counts what a compact step of the mask counts: 3 f train FLOPs (supplement C.1), f at the widths
        computed (the aligned ones, padding included), and the mask's kept ratio.
        """
        self.sync_hyperparameters()
        result = subnet_step(self.step_model, self.optimizer, batch, None, ctx)
        return dataclasses.replace(result, kept_ratio=self.kept_ratio(),
                                   flops=int(dense_step_flops(ctx.cost.flops(self.widths, result.count))))

    def step_function(self, ctx: StepContext) -> Callable[[tuple[Tensor, Tensor]], StepResult]:
        """The training step as a function of the batch (the narrow model put in train mode)."""
        self.model.train()
        return lambda batch: self.step(batch, ctx)

    @torch.no_grad()
    def write_back(self) -> None:
        """Scatter the narrow weights, buffers and optimizer state into the full model and optimizer (exactly).

        A state tensor the full optimizer does not have yet (the first steps ran narrow) is created with zeros in the
        dropped entries.
        """
        for pair in self._pairs:
            scatter_(pair.full, pair.own_part(pair.narrow), pair.own_rows, pair.own_columns)
        for group in self.full_optimizer.param_groups:
            for param in group["params"]:
                pair = self._by_param[id(param)]
                state = self.optimizer.state.get(pair.narrow)
                if not state:
                    continue
                full_state = self.full_optimizer.state[param]
                for key, value in state.items():
                    if not isinstance(value, Tensor) or value.shape != pair.narrow.shape:  # Adam's step: copied
                        full_state[key] = value.clone() if isinstance(value, Tensor) else value
                        continue
                    if not isinstance(full_state.get(key), Tensor):
                        full_state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    scatter_(full_state[key], pair.own_part(value), pair.own_rows, pair.own_columns)


def _padded(mask: Mapping[str, Tensor], align: int) -> dict[str, Tensor]:
    """``mask`` with each group's kept set grown to its aligned width by its first dropped channels (the channels
    compact execution pads with)."""
    if align == 1:
        return dict(mask)
    padded = {}
    for g, m in mask.items():
        m = m.reshape(-1).clone()
        kept = int(m.sum())
        extra = aligned_width(kept, m.numel(), align) - kept
        m[(~m).nonzero().flatten()[:extra]] = True
        padded[g] = m
    return padded


def _positions(held: Tensor | None, own: Tensor | None) -> Tensor | None:
    """Where the entries ``own`` stand in the held index set ``held`` (both sorted; None: every index); None where
    they are the same set."""
    if own is None or (held is not None and held.numel() == own.numel()):
        return None
    return own if held is None else torch.searchsorted(held, own)


@dataclasses.dataclass
class _Pair:
    """One parameter or buffer of the full model and its narrow copy.

    Attributes:
        name: Its name in the state dict.
        full: The full model's tensor.
        narrow: The narrow model's.
        rows, columns: The full tensor's rows and columns the narrow one holds (None: all).
        own_rows, own_columns: Those of the subnetwork itself (without the padding).
        row_positions, column_positions: Where the subnetwork's own rows and columns stand in the narrow tensor
            (None: all of it).
        padding_rows, padding_columns: Where the padding stands in it (None: no padding).
    """

    name: str
    full: Tensor
    narrow: Tensor
    rows: Tensor | None
    columns: Tensor | None
    own_rows: Tensor | None
    own_columns: Tensor | None
    row_positions: Tensor | None = dataclasses.field(init=False)
    column_positions: Tensor | None = dataclasses.field(init=False)
    padding_rows: Tensor | None = dataclasses.field(init=False)
    padding_columns: Tensor | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.row_positions = _positions(self.rows, self.own_rows)
        self.column_positions = _positions(self.columns, self.own_columns)
        self.padding_rows = _complement(self.row_positions, self.narrow.shape[0] if self.narrow.dim() else None)
        self.padding_columns = _complement(self.column_positions,
                                           self.narrow.shape[1] if self.narrow.dim() > 1 else None)

    @property
    def is_variance(self) -> bool:
        """A BatchNorm's ``running_var`` (its padding holds 1, as a fresh BatchNorm's)."""
        return self.name.rsplit(".", 1)[-1] == "running_var"

    def own_part(self, narrow: Tensor) -> Tensor:
        """The subnetwork's own entries of a narrow-shaped tensor (the padding left out)."""
        return gather(narrow, self.row_positions, self.column_positions)

    def zero_padding(self, narrow: Tensor, fill: float = 0.0) -> None:
        """Set the padding entries of a narrow-shaped tensor (in place)."""
        if self.padding_rows is not None:
            narrow.data.index_fill_(0, self.padding_rows, fill)
        if self.padding_columns is not None:
            narrow.data.index_fill_(1, self.padding_columns, 0.0)


def _complement(positions: Tensor | None, size: int | None) -> Tensor | None:
    """The positions in ``range(size)`` not in ``positions`` (None where there is nothing to pad)."""
    if positions is None or size is None:
        return None
    keep = torch.ones(size, dtype=torch.bool, device=positions.device)
    keep[positions] = False
    return keep.nonzero().flatten()
