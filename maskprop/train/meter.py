"""What the static steps measure, summed on the device (``maskprop.train.graphs``): each step adds its losses, correct
count, loss gap, gradient norm and kept ratio to one device tensor in place (inside a captured graph, no host read),
and the trainer reads the sums every ``log_every`` steps, in one transfer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DeviceMeter", "MeterWindow"]


@dataclass
class MeterWindow:
    """Sums over the steps since the last read.

    Attributes:
        loss: ``sum`` of loss x examples of the back-propagated pass (``L(m)`` in search steps).
        loss2: The same of ``L(m')`` (search steps).
        correct: Correctly classified examples.
        loss_gap: ``sum |L(m) - L(m')|`` over search steps.
        grad_norm: ``sum`` of the weight-gradient norms.
        count: Examples.
        steps: Steps.
        pairs: Search steps.
        kept: ``sum`` of the kept ratios of the masks used.
        overflow_steps: Search steps whose mask ``m`` or ``m'`` overflowed a capacity (each mask counts).
        overflow_channels: Kept channels cut by the capacities, per group.
    """

    loss: float = 0.0
    loss2: float = 0.0
    correct: float = 0.0
    loss_gap: float = 0.0
    grad_norm: float = 0.0
    count: int = 0
    steps: int = 0
    pairs: int = 0
    kept: float = 0.0
    overflow_steps: int = 0
    overflow_channels: dict[str, int] = field(default_factory=dict)


class DeviceMeter:
    """Running sums of the steps' statistics: what only the device knows (losses, correct counts, loss gaps, gradient
    norms, kept ratios of sampled masks) in one device tensor that captured steps add to in place; what the host knows
    (examples, steps) on the host."""

    _DEVICE = ("loss", "loss2", "correct", "loss_gap", "grad_norm", "kept")

    _SUMMED = 3  # loss, loss2 and correct are this rank's sums; the rest is the same on every rank

    def __init__(self, device: torch.device, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.sums = torch.zeros(len(self._DEVICE), dtype=dtype, device=device)
        self.host = MeterWindow()
        self.reduce = reduce

    @torch.no_grad()
    def add(self, loss: Tensor, loss2: Tensor | None, logits: Tensor, labels: Tensor, grad_norm: Tensor,
            kept: Tensor | None = None, gap: Tensor | None = None) -> None:
        """Add one step's device values (inside the step: no host read). ``gap``: ``|L(m) - L(m')|`` of the global
        batch under torchrun (default: of ``loss`` and ``loss2``, where a pair is given with ``kept``)."""
        # One stack and one conversion for the float values, in the order of _DEVICE less correct and the gap (a few
        # launches fewer than one conversion each: this runs on every step's critical path).
        n, dtype = labels.shape[0], self.sums.dtype
        zero = loss.new_zeros(()) if loss2 is None or kept is None else None
        values = [loss, zero if loss2 is None else loss2, grad_norm, zero if kept is None else kept]
        if gap is not None:
            values.append(gap)
        common = functools.reduce(torch.promote_types, [v.dtype for v in values])  # float32 in a training run
        values = torch.stack([v.detach().to(common) for v in values]).to(dtype)
        if gap is not None:
            gap = values[4]
        elif kept is not None:  # |L(m) - L(m')| in the meter's precision
            gap = (values[0] - values[1]).abs()
        else:  # no pair: zero, as values[3]
            gap = values[3]
        correct = (logits.argmax(1) == labels).sum()
        self.sums.add_(torch.cat([values[:2] * n, correct.view(1), gap.view(1), values[2:4]]))

    def add_host(self, count: int, pair: bool, kept: float | None) -> None:
        """Add one step's host values (outside the step); ``kept``: the kept ratio where the host knows it."""
        self.host.count += count
        self.host.steps += 1
        self.host.pairs += int(pair)
        if kept is not None:
            self.host.kept += kept

    def read(self, extra: list[Tensor] = ()) -> tuple[MeterWindow, list[float]]:
        """The sums since the last read, with ``extra`` device tensors read in the same transfer; all reset. With
        ``reduce`` (under torchrun, a collective: every rank reads at the same steps) the losses, correct counts and
        examples are summed over the ranks first."""
        parts = [self.sums, *(t.reshape(-1).to(self.sums.dtype) for t in extra)]
        if self.reduce is not None:  # appended: [loss, loss2, correct, examples] of all ranks
            parts.append(self.reduce(torch.cat([self.sums[:self._SUMMED], self.sums.new_tensor([self.host.count])])))
        values = torch.cat(parts).tolist()
        self.sums.zero_()
        window, self.host = self.host, MeterWindow()
        if self.reduce is not None:
            *summed, count = values[-self._SUMMED - 1:]
            values = summed + values[self._SUMMED:-self._SUMMED - 1]
            window.count = int(count)
        sums = dict(zip(self._DEVICE, values))
        window.loss, window.loss2, window.correct = sums["loss"], sums["loss2"], sums["correct"]
        window.loss_gap, window.grad_norm = sums["loss_gap"], sums["grad_norm"]
        window.kept += sums["kept"]
        return window, values[len(self._DEVICE):]
