"""Measured train time: the run's own steps, each paired now and then with a dense reference step timed next to it.

Table 5 (supplement C.2) of "Efficient Neural Network Training via Forward and Backward Propagation Sparsification"
(NeurIPS 2021) compares the summed forward and backward time of sparse training with dense training. A run cannot
also train densely, so it times dense steps of the same model on the same batch during the run (on a private copy of
the model with its own optimizer) and pairs each with the run step next to it: the dense step
runs right before or right after that step (alternately), so whatever else the machine does hits both members of a
pair alike. Pairs are taken throughout the run, for every kind of step (a VR-PGE search's dense ``warmup`` steps, its
``anneal`` steps, its ``search`` steps at the budget, the ``finetune`` steps, and the ``train`` steps of the other
methods): whenever the dense reference has used less than ``share`` of the run's step time so far, and at least
``min_pairs`` times per kind, spread evenly over the kind's steps (a short run spends more than ``share``; the summary
states how much).

For each kind k with run steps, the ratio ``r = dense step / run step`` of every pair gives the kind's speedup
``R_k = median(r)`` (how many times faster than a dense step a step of that kind is), and the run's

    measured_speedup = D / sum_k (n_k / R_k)

where ``n_k`` are the kind's steps and ``D`` the dense baseline's steps: as many as the search phase of a VR-PGE run
(warm-up and anneal included), or the training of a sparse-backward run (the budget ``method: dense`` trains; the same
convention as the train-cost saving). A warm-up step is a dense step (its ratio is about 1) and an anneal step runs a
mask wider than the budget, so each is its own kind: mixed into the search's pairs they would misstate the search's
median. Using the first and third quartiles of each kind's ratios instead of the median gives the interquartile range
stored beside it; a range wider than ``SPREAD_WARNING`` of the speedup is flagged. Step times cover forward, backward
and the optimizer updates, not the data loading.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from ..bench import quartiles
from .steps import StepContext, subnet_step

if TYPE_CHECKING:
    from .config import Config

__all__ = ["SPREAD_WARNING", "DenseReference", "SpeedupEstimate", "StepTimes", "phase_epochs", "synchronize",
           "timed_step"]

T = TypeVar("T")

SPREAD_WARNING = 0.25
"""An interquartile range of the measured speedup wider than this fraction of it is flagged in the summary."""

STEP_KINDS = ("warmup", "anneal", "search", "finetune", "train")
"""The kinds of run steps timed and paired apart: the search's dense warm-up, its anneal, the search at the budget,
the finetune, and the training of dense and sparse-backward runs."""

_EPOCHS_SECTION = {"search": "optim", "train": "optim", "finetune": "finetune"}
"""The config section whose ``epochs`` a phase runs."""

perf_counter = time.perf_counter  # the clock of every step time (a test may replace it)


def phase_epochs(config: Config | Mapping[str, Any], phase: str) -> int | None:
    """Epochs of ``phase`` (``search``, ``train``: ``optim.epochs``; ``finetune``: ``finetune.epochs``; ``done``: 0).

    Args:
        config: The run's :class:`~maskprop.train.config.Config`, or the dict its ``config.yaml`` holds (what a report
            reads, possibly of an older schema or edited by hand).
        phase: The phase.

    Returns:
        The count, or ``None`` for an unknown phase or a config dict without an integer there.
    """
    if phase == "done":
        return 0

    def field(node: Any, name: str) -> Any:
        return node.get(name) if isinstance(node, Mapping) else getattr(node, name, None)

    section = _EPOCHS_SECTION.get(phase)
    epochs = field(field(config, section), "epochs") if section is not None else None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SpeedupEstimate:
    """The measured speedup of a run and how it was reached (see the module docstring).

    Attributes:
        speedup: ``D / sum_p (n_p / R_p)``, dense train time over the run's train time.
        low: The same with each kind's first-quartile ratio (the interquartile range's low end).
        high: The same with each kind's third-quartile ratio.
        phases: Per kind with steps: ``{"median", "q1", "q3"}`` of its per-pair ratios and ``pairs``, their count.
        warning: Why the estimate deserves caution (a wide spread), or ``None``.
    """

    speedup: float
    low: float
    high: float
    phases: dict[str, dict[str, float]]
    warning: str | None = None


class StepTimes:
    """Wall times (seconds) of the run's steps by kind (``search``, ``finetune``, ``train``; ``dense_ref`` for the
    timed dense reference steps), the pairs of a run step and its adjacent dense step by kind, and the dense
    reference's whole time cost (``overhead_s``: timed and warm-up steps); and the seconds the training loop waited
    for its loader's batches in the epochs completed (``data_wait_s``)."""

    KINDS = (*STEP_KINDS, "dense_ref")

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {kind: [] for kind in self.KINDS}
        self.pairs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in STEP_KINDS}
        self.overhead_s = 0.0
        self.data_wait_s = 0.0
        self._run_s = 0.0

    def add(self, kind: str, seconds: float) -> None:
        self.times[kind].append(seconds)
        if kind in STEP_KINDS:
            self._run_s += seconds

    def add_pair(self, kind: str, run_s: float, dense_s: float) -> None:
        """A run step of ``kind`` and the dense step timed next to it (both already added by kind)."""
        self.pairs[kind].append((run_s, dense_s))

    def median(self, kind: str) -> float | None:
        values = self.times[kind]
        return statistics.median(values) if values else None

    def run_seconds(self) -> float:
        """Summed time of the run's own steps (kept as a running total: the schedule asks at every step)."""
        return self._run_s

    def phase_ratios(self, kind: str) -> list[float]:
        """Dense step over run step, per pair of ``kind``."""
        return [dense / run for run, dense in self.pairs[kind] if run > 0]

    def measured_speedup(self, steps: Mapping[str, int]) -> SpeedupEstimate | None:
        """Estimated dense train time over the run's train time from the paired ratios (see the module docstring).

        Args:
            steps: Run steps per kind (:data:`STEP_KINDS`).

        Returns:
            The estimate, or ``None`` when the dense baseline has no steps or a kind with steps has no pair.
        """
        dense_steps = sum(n for kind, n in steps.items() if kind != "finetune")
        phases: dict[str, dict[str, float]] = {}
        for kind in STEP_KINDS:
            if steps.get(kind, 0) == 0:
                continue
            ratios = self.phase_ratios(kind)
            if not ratios:
                return None
            q1, median, q3 = quartiles(ratios)
            phases[kind] = {"median": median, "q1": q1, "q3": q3, "pairs": len(ratios)}
        if dense_steps == 0 or not phases:
            return None

        def combined(key: str) -> float:
            return dense_steps / sum(steps[kind] / phases[kind][key] for kind in phases)

        speedup, low, high = combined("median"), combined("q1"), combined("q3")
        warning = None
        if (high - low) > SPREAD_WARNING * speedup:
            warning = (f"the measured speedup {speedup:.2f}x has a wide spread (interquartile range {low:.2f}-"
                       f"{high:.2f}x): the step times varied (a busy machine, or steps whose widths vary)")
        return SpeedupEstimate(speedup, low, high, phases, warning)

    def state_dict(self) -> dict[str, Any]:
        return {**{kind: list(values) for kind, values in self.times.items()},
                "pairs": {kind: [list(pair) for pair in pairs] for kind, pairs in self.pairs.items()},
                "overhead_s": self.overhead_s, "data_wait_s": self.data_wait_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore; a checkpoint written before the pairs existed restores the step times alone."""
        self.times = {kind: [float(v) for v in state.get(kind, [])] for kind in self.KINDS}
        pairs = state.get("pairs", {})
        self.pairs = {kind: [(float(r), float(d)) for r, d in pairs.get(kind, [])] for kind in STEP_KINDS}
        self.overhead_s = float(state.get("overhead_s", sum(self.times["dense_ref"])))
        self.data_wait_s = float(state.get("data_wait_s", 0.0))  # not measured before 2026-12-07
        self._run_s = sum(sum(self.times[kind]) for kind in STEP_KINDS)


class DenseReference:
    """Dense steps on a private copy of the model, paired with the run's own steps (see the module docstring).

    The copy has its own optimizer (the run's kind, same hyperparameters) and never touches the run's model,
    optimizers or random number generators (torch's RNGs are forked around each step), so timing does not change the
    training.

    Args:
        model: The private copy of the dense network to time (the reference trains it): a copy of the run's model, or
            the unconverted copy of a sparse-backward run.
        make_optimizer: Builds the optimizer for the copy's parameters.
        ctx: The run's step settings.
        share: Time the dense reference may use, as a fraction of the run's step time.
        min_pairs: Pairs per kind at least, spread evenly over its steps.
        warmup: Untimed steps before the first timed one (allocates optimizer buffers, warms kernels).
    """

    def __init__(self, model: nn.Module, make_optimizer: Callable[[Any], torch.optim.Optimizer], ctx: StepContext,
                 share: float = 0.01, min_pairs: int = 5, warmup: int = 1) -> None:
        self.ctx = ctx
        self.share = share
        self.min_pairs = min_pairs
        self.warmup = warmup
        self._model = model.train()
        self._optimizer = make_optimizer(self._model.parameters())
        self._warm = False

    def due(self, times: StepTimes, kind: str, index: int, total: int) -> bool:
        """Whether the ``index``-th step (0-based) of the ``total`` steps of ``kind`` is to be paired."""
        pairs = len(times.pairs[kind])
        if pairs < self.min_pairs and index >= math.floor((pairs + 0.5) * total / self.min_pairs):
            return True
        return times.overhead_s < self.share * times.run_seconds()

    def time_step(self, batch: tuple[Tensor, Tensor], times: StepTimes) -> float:
        """Seconds of one dense step on ``batch`` (after the warm-up on the first call); all of it, warm-up included,
        is added to ``times.overhead_s``."""
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        started = perf_counter()
        with torch.random.fork_rng(devices=devices):
            if not self._warm:
                self._warm = True
                for _ in range(self.warmup):
                    subnet_step(self._model, self._optimizer, batch, None, self.ctx)
            synchronize(self.ctx.device)
            start = perf_counter()
            subnet_step(self._model, self._optimizer, batch, None, self.ctx)
            synchronize(self.ctx.device)
            seconds = perf_counter() - start
        times.overhead_s += perf_counter() - started
        return seconds


def timed_step(step: Callable[[], T], kind: str, times: StepTimes, device: torch.device,
               reference: DenseReference | None = None, batch: tuple[Tensor, Tensor] | None = None,
               index: int = 0, total: int = 1, timed: bool = True) -> T:
    """Run and time one step of ``kind`` (recorded in ``times``), paired with a dense reference step when due.

    Args:
        step: The run's step.
        kind: Its kind.
        times: Where the times go.
        device: Synchronised around the timed intervals.
        reference: The dense reference, or ``None`` (a dense run: nothing to pair).
        batch: The step's batch, which the dense step trains on too.
        index: The step's index within its kind (0-based), for the schedule of pairs.
        total: The kind's steps.
        timed: ``False`` for a step that also measures something besides training (the sparse-backward steps'
            gradient angles: a second backward): it runs neither timed nor paired, and a pair due is taken at the
            next step.

    Returns:
        What ``step`` returned.
    """
    if not timed:
        return step()
    pair = reference is not None and reference.due(times, kind, index, total)
    dense_first = pair and len(times.pairs[kind]) % 2 == 1  # alternate the order within the pairs
    if dense_first:
        dense_s = reference.time_step(batch, times)
    synchronize(device)
    began = perf_counter()
    result = step()
    synchronize(device)
    run_s = perf_counter() - began
    times.add(kind, run_s)
    if pair:
        if not dense_first:
            dense_s = reference.time_step(batch, times)
        times.add("dense_ref", dense_s)
        times.add_pair(kind, run_s, dense_s)
    return result
