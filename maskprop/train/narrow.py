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

Memory: the narrow model and optimizer state are a second copy of the kept entries (at keep 0.5 about a quarter of
the full model's), held beside the full ones for the phase.

The learning-rate schedule keeps driving the full optimizer (its param groups are what a checkpoint saves); every
narrow step first copies the full param groups' hyperparameters (``lr`` and the rest) into the narrow ones.

Plain ``nn.Conv2d`` lacks the route around a oneDNN crash that maskprop's sparse convs take (the CPU weight gradient
of a strided 1x1 conv with an odd batch size, ``maskprop._workarounds``); the narrow model is built with
:class:`PointwiseSafeConv2d`, an ``nn.Conv2d`` that takes the same route, as its conv type (the export keeps plain
layers).

Under torchrun the training loop keeps compact steps of the full model (its DDP wrapper is the full model's; the
narrow model would need its own): the simple, safe choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._workarounds import subsampled_pointwise_input
from ..cost import dense_step_flops
from ..sparse import channel_groups, check_mask, kept_ratio
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

    Attributes:
        model: The narrow model (``maskprop.materialize`` with :class:`PointwiseSafeConv2d` convs).
        optimizer: The narrow optimizer, its state gathered from ``optimizer``'s.

    Raises:
        ValueError: ``mask`` does not fit ``model``, or ``optimizer`` is not elementwise (SGD, Adam, AdamW) or holds
            tensors that are not the model's parameters.
    """

    def __init__(self, model: nn.Module, mask: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
        if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
            raise ValueError(f"narrow training needs an optimizer that updates every element on its own (SGD, Adam, "
                             f"AdamW) so that gathering its state is exact; got {type(optimizer).__name__}")
        check_mask(mask, channel_groups(model))
        self.full, self.full_optimizer = model, optimizer
        self.mask = {g: m.detach().cpu() for g, m in mask.items()}
        self.model = materialize(model, self.mask, conv_type=PointwiseSafeConv2d)
        sets = index_sets(model, self.mask)  # what materialize sliced by
        narrow_tensors = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        # (full tensor, narrow tensor, rows, columns) for every parameter and buffer, in the model's order
        self._pairs = [(full, narrow_tensors[name], *sets[name])
                       for name, full in (*model.named_parameters(), *model.named_buffers())]
        self._by_param = {id(full): (narrow, rows, columns) for full, narrow, rows, columns in self._pairs
                          if isinstance(full, nn.Parameter)}
        groups = []
        for group in optimizer.param_groups:
            if any(id(p) not in self._by_param for p in group["params"]):
                raise ValueError("the optimizer holds tensors that are not parameters of the model; expected the "
                                 "optimizer of the model's own parameters")
            groups.append({**self._hyperparameters(group),
                           "params": [self._by_param[id(p)][0] for p in group["params"]]})
        self.optimizer = type(optimizer)(groups, **optimizer.defaults)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    narrow, rows, columns = self._by_param[id(param)]
                    if optimizer.state.get(param):
                        self.optimizer.state[narrow] = {
                            key: self._gather_state(value, param, rows, columns)
                            for key, value in optimizer.state[param].items()}

    @staticmethod
    def _hyperparameters(group: Mapping) -> dict:
        return {key: value for key, value in group.items() if key != "params"}

    @staticmethod
    def _gather_state(value: object, param: Tensor, rows: Tensor | None, columns: Tensor | None) -> object:
        """A per-element state tensor (the parameter's shape) gathered, anything else (Adam's step) copied."""
        if isinstance(value, Tensor):
            return gather(value, rows, columns) if value.shape == param.shape else value.clone()
        return value

    def sync_hyperparameters(self) -> None:
        """Copy the full optimizer's param-group hyperparameters (``lr``, set by the schedule, and the rest)."""
        for full, narrow in zip(self.full_optimizer.param_groups, self.optimizer.param_groups):
            narrow.update(self._hyperparameters(full))

    def kept_ratio(self) -> float:
        """Kept fraction of the prunable channels."""
        return kept_ratio(self.mask, {g: m.numel() for g, m in self.mask.items()})

    def step(self, batch: tuple[Tensor, Tensor], ctx: StepContext) -> StepResult:
        """One SGD step of the narrow model: what ``subnet_step`` does to the full model under the mask.

        The result counts what a compact step of the mask counts: 3 f(mask) train FLOPs (supplement C.1), f of the
        kept widths (nothing is padded here), and the mask's kept ratio.
        """
        self.sync_hyperparameters()
        result = subnet_step(self.model, self.optimizer, batch, None, ctx)
        return dataclasses.replace(result, kept_ratio=self.kept_ratio(),
                                   flops=int(dense_step_flops(ctx.cost.flops(self.mask, result.count))))

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
        for full, narrow, rows, columns in self._pairs:
            scatter_(full, narrow, rows, columns)
        for group in self.full_optimizer.param_groups:
            for param in group["params"]:
                narrow, rows, columns = self._by_param[id(param)]
                state = self.optimizer.state.get(narrow)
                if not state:
                    continue
                full_state = self.full_optimizer.state[param]
                for key, value in state.items():
                    if not isinstance(value, Tensor) or value.shape != narrow.shape:  # Adam's step: copied
                        full_state[key] = value.clone() if isinstance(value, Tensor) else value
                        continue
                    if not isinstance(full_state.get(key), Tensor):
                        full_state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    scatter_(full_state[key], value, rows, columns)
