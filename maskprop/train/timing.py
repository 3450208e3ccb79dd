"""Measured train time: per-step wall times of the run's own steps, and dense reference steps timed beside them.

The paper's Table 5 (supplement C.2) compares the summed forward and backward time of sparse training with dense
training. A run cannot also train densely, so it times a few dense steps of the same model and batch during the run
(on a copy of the model, once per search or training epoch, so machine drift hits both alike) and estimates:

    measured_speedup = median(dense step) x dense steps
                       / (median(search step) x search steps + median(finetune step) x finetune steps
                          + median(train step) x train steps)

where the dense baseline trains as many steps as the search phase of a VR-PGE run, or the training of a
sparse-backward run (the same budget ``method: dense`` trains), the same convention as the train-cost saving. Step times cover forward, backward and the optimizer updates, not the data
loading.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .steps import StepContext, subnet_step

__all__ = ["DenseReference", "StepTimes", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimes:
    """Wall times (seconds) of the run's steps by kind: ``search``, ``finetune``, ``train`` (dense), ``dense_ref``."""

    KINDS = ("search", "finetune", "train", "dense_ref")

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {kind: [] for kind in self.KINDS}

    def add(self, kind: str, seconds: float) -> None:
        self.times[kind].append(seconds)

    def median(self, kind: str) -> float | None:
        values = self.times[kind]
        return statistics.median(values) if values else None

    def measured_speedup(self, steps: dict[str, int]) -> float | None:
        """Estimated dense train time over the sparse run's train time (see the module docstring)."""
        dense = self.median("dense_ref")
        if dense is None:
            return None
        sparse_time = sum((self.median(kind) or 0.0) * steps.get(kind, 0) for kind in ("search", "finetune", "train"))
        dense_steps = steps.get("search", 0) + steps.get("train", 0)
        return dense * dense_steps / sparse_time if sparse_time > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {kind: list(values) for kind, values in self.times.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.times = {kind: [float(v) for v in state.get(kind, [])] for kind in self.KINDS}


class DenseReference:
    """Dense steps on a private copy of the model, to time against the sparse steps of the same run.

    The copy has its own optimizer (the run's kind, same hyperparameters) and never touches the run's model,
    optimizers or random number generators (torch's RNGs are forked around each step), so timing does not change the
    training.

    Args:
        model: The private copy of the dense network to time (the reference trains it): a copy of the run's model, or
            the unconverted copy of a sparse-backward run.
        make_optimizer: Builds the optimizer for the copy's parameters.
        ctx: The run's step settings.
        warmup: Untimed steps before the first timed one (allocates optimizer buffers, warms kernels).
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[Any], torch.optim.Optimizer], ctx: StepContext,
                 warmup: int = 1) -> None:
        self.ctx = ctx
        self.warmup = warmup
        self._model = model.train()
        self._optimizer = make_optimizer(self._model.parameters())
        self._warm = False

    def time_steps(self, batch: tuple[Tensor, Tensor], steps: int = 1) -> list[float]:
        """Seconds of each of ``steps`` dense steps on ``batch``."""
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        times = []
        with torch.random.fork_rng(devices=devices):
            if not self._warm:
                self._warm = True
                for _ in range(self.warmup):
                    subnet_step(self._model, self._optimizer, batch, None, self.ctx)
            for _ in range(steps):
                synchronize(self.ctx.device)
                start = time.perf_counter()
                subnet_step(self._model, self._optimizer, batch, None, self.ctx)
                synchronize(self.ctx.device)
                times.append(time.perf_counter() - start)
        return times

