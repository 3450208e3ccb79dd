"""The training loop: ``train_one_epoch``, ``evaluate``, ``fix_subnetwork`` and ``fit``, which runs the phases.

A VR-PGE run (docs/methods.md, section 1) has three phases:

1. ``search``: ``optim.epochs`` epochs of VR-PGE steps (``steps.vrpge_step``): weights by SGD, keep probabilities by
   Adam with projection. After each epoch the deterministic subnetwork (``scores.top_mask()``) is evaluated. The first
   ``sparsity.warmup_epochs`` of them are dense steps (``steps.subnet_step`` without a mask; the scores wait), and over
   the next ``sparsity.anneal_epochs`` the budget falls from every channel to ``keep_ratio`` (``state.schedule``,
   :mod:`maskprop.vrpge.budget`). With ``sparsity.fix: random`` there is no search: a random subnetwork of the budget
   is fixed before the first step and trained like the finetune phase trains its subnetwork (the random baseline).
2. fix: one subnetwork is chosen, ``best_of_n`` (the official code: ``fix_samples`` masks sampled from the scores,
   each scored in eval mode on the training set, or its first ``fix_examples`` examples; the best training accuracy
   wins, the earliest sample on ties) or ``top_scores`` (the largest keep probabilities up to the budget).
3. ``finetune``: ``finetune.epochs`` epochs of SGD on that subnetwork (lr 1e-3, cosine), trained as the physically
   narrow model (``narrow.py``; written back into the full model after every epoch, so checkpoints hold the full
   model), under torchrun too (its gradients averaged over the ranks); compact steps of the full model only with
   ``finetune.narrow: false``.

A ``dense`` run trains the same model with the same harness for ``optim.epochs`` epochs (phase ``train``), and so does
a sparse-backward run (``meprop``, ``sbp``, ``msbp``: docs/methods.md, sections 4-6), whose linear and conv layers
propagate only ``k`` of their output units in the backward (``steps.sbp_step``); every ``sbp.angle_every`` steps it
measures the gradient estimation angles and logs them to TensorBoard (``angle/overall``, ``angle/<layer>``).

Every epoch is one ``train_one_epoch`` call; checkpoints are written after every ``save_every`` epochs and at the end
of every phase, within epochs every ``save_every_steps`` steps and when a stop signal comes (:class:`StepCheckpoints`,
``stopping.py``), and a resumed run continues from the last one exactly as if it had not stopped (an epoch from the
checkpoint's batch: its order drawn again from the loader generator's state at its start, its sums so far restored).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .._files import make_directory
from ..models import converted_source, model_entrypoint
from ..models.spec import ModelSpec
from ..sbp import sparse_layers
from ..sparse import SparseBatchNorm2d, channel_groups, random_mask, sync_batchnorm, use_mask
from ..threads import RunThreads, run_threads
from ..vrpge import ChannelScores, score_statistics
from .checkpoint import save_checkpoint
from .config import SPARSE_BACKWARD_METHODS, Config, SparsityConfig, config_to_dict, load_config, save_config
from .data import build_loader
from .decode import DecodeLoader, decode_loader, is_encoded
from .device_data import DeviceLoader, ImageTensors
from .distributed import (
    agree,
    average_buffers,
    check_same_config,
    current,
    gather_objects,
    init_from_env,
    rank_local,
    share_model,
    wrap_model,
)
from .graphs import GraphedDenseReference, MeterWindow, StaticSteps
from .logs import RunLogger
from .narrow import NarrowSubnetwork
from .optim import run_optimizer
from .setup import Run, phase_epochs, phase_optimizer, prepare
from .state import PHASES, TrainState, search_schedule
from .steps import StepContext, StepResult, sbp_step, subnet_step, vrpge_step
from .stopping import RunStopped, StopSignals
from .summary import read_summary, summarize, write_json
from .timing import DenseReference, timed_step

__all__ = ["evaluate", "fit", "fix_subnetwork", "plan_run", "train_one_epoch"]

logger = logging.getLogger(__name__)

DENSE_REFERENCE_SHARE = 0.01
"""Time the dense reference steps may take, as a share of the run's step time (``timing.py``)."""
DENSE_REFERENCE_MIN_PAIRS = 5
"""Dense reference steps per phase at least, each paired with an adjacent step of the run (``timing.py``)."""
POLARISED_MARGIN = 0.05
"""A keep probability this close to 0 or 1 counts as settled in the search diagnostics."""
Loader = torch.utils.data.DataLoader | DeviceLoader | DecodeLoader
"""What gives a run's batches: torch's DataLoader, batches made on the device (``data.on_device``), or decoded there
(``data.decode: device``)."""
TOP_MASK_EXAMPLES = 512
"""The first training examples the top-score subnetwork's training accuracy is measured on after each search epoch."""


# ---------------------------------------------------------------------------------------------------------------------
# One epoch, evaluation, the fix


@dataclass
class EpochMeter:
    """Running sums of one epoch's steps."""

    loss: float = 0.0
    loss2: float = 0.0
    correct: int = 0
    count: int = 0
    kept: float = 0.0
    steps: int = 0
    angle: float = 0.0
    angles: int = 0
    pairs: int = 0
    loss_gap: float = 0.0
    grad_norm: float = 0.0
    grad_norms: int = 0
    seconds: float = 0.0
    """Wall time of the epoch before this process took it over (a resumed epoch's first part)."""
    data_s: float = 0.0
    """Seconds the loop waited for the loader's batches (starting its workers included)."""

    def __post_init__(self) -> None:
        self._since = time.perf_counter()  # not a field: what a checkpoint saves is :meth:`saved`

    def elapsed(self) -> float:
        """The epoch's wall time so far."""
        return self.seconds + time.perf_counter() - self._since

    def saved(self) -> dict[str, float]:
        """The sums as a checkpoint within the epoch holds them (the time so far included)."""
        return dict(dataclasses.asdict(self), seconds=self.elapsed())

    def update(self, result: StepResult) -> None:
        self.loss += result.loss * result.count
        self.loss2 += (result.loss2 or 0.0) * result.count
        self.correct += result.correct
        self.count += result.count
        self.kept += result.kept_ratio
        self.steps += 1
        angle = (result.diagnostics or {}).get("angle/overall", math.nan)
        if not math.isnan(angle):  # not measured this step, or undefined (a zero gradient)
            self.angle += angle
            self.angles += 1
        if result.loss2 is not None:  # a VR-PGE step: two sampled subnetworks
            self.pairs += 1
            self.loss_gap += abs(result.loss - result.loss2)
        if result.grad_norm is not None:
            self.grad_norm += result.grad_norm
            self.grad_norms += 1

    def add_window(self, window: MeterWindow) -> None:
        """Add the sums of several static steps read at once (``graphs.py``), as their steps one by one would."""
        self.loss += window.loss
        self.loss2 += window.loss2
        self.correct += round(window.correct)
        self.count += window.count
        self.kept += window.kept
        self.steps += window.steps
        self.pairs += window.pairs
        self.loss_gap += window.loss_gap
        self.grad_norm += window.grad_norm
        self.grad_norms += window.steps

    def summary(self) -> dict[str, float]:
        """The epoch's means: loss and accuracy per example; sampled kept ratio, ``loss_gap`` (``|L(m) - L(m')|``) and
        ``grad_norm`` per step; ``train_loss2`` and ``loss_gap`` only where VR-PGE steps ran."""
        n = max(self.count, 1)
        metrics = {"train_loss": self.loss / n, "train_loss2": self.loss2 / n,
                   "train_accuracy": 100.0 * self.correct / n, "kept_ratio_sampled": self.kept / max(self.steps, 1)}
        if self.pairs:
            metrics["loss_gap"] = self.loss_gap / self.pairs
        else:
            metrics.pop("train_loss2")
        if self.grad_norms:
            metrics["grad_norm"] = self.grad_norm / self.grad_norms
        if self.angles:
            metrics["angle_overall"] = self.angle / self.angles
        return metrics


def _search_kind(state: TrainState, cfg: Config, step: int | None = None) -> str:
    """The kind of search step ``step`` (default: the next one): ``warmup`` (dense), ``random`` (the fixed random
    subnetwork of ``fix: random``), ``anneal`` (VR-PGE under a falling budget) or ``search`` (VR-PGE at the
    budget)."""
    step = state.counters["search_steps"] if step is None else step
    kind = "search" if state.schedule is None else state.schedule.kind(step)
    return "random" if kind != "warmup" and cfg.sparsity.fix == "random" else kind


def _step_function(state: TrainState, cfg: Config, ctx: StepContext) -> Callable[[tuple[Tensor, Tensor]], StepResult]:
    """The step of the current phase, as a function of the batch."""
    if state.phase == "search":
        kind = _search_kind(state, cfg)
        if kind == "warmup":  # every channel, no second forward, the scores left as they are
            return lambda batch: subnet_step(state.step_model, state.weight_optimizer, batch, None, ctx)
        if kind == "random":  # compact steps of the fixed subnetwork (finetune.narrow: false)
            return lambda batch: subnet_step(state.step_model, state.weight_optimizer, batch, state.fixed_mask, ctx)
        optimizers = (state.weight_optimizer, state.score_optimizer)

        def search(batch: tuple[Tensor, Tensor]) -> StepResult:
            _set_next_budget(state)
            return vrpge_step(state.step_model, state.scores, optimizers, batch, state.mask_generator, cfg.sparsity,
                              ctx)

        return search
    if cfg.method in SPARSE_BACKWARD_METHODS:
        return lambda batch: sbp_step(state.model, state.weight_optimizer, batch, ctx, state.budget,
                                      measure_angles=_measures_angles(state, cfg))
    return lambda batch: subnet_step(state.step_model, state.weight_optimizer, batch, state.fixed_mask, ctx)


def _set_next_budget(state: TrainState) -> None:
    """Before a search step of an annealed budget: the step projects its updated scores onto the next step's budget
    ``K(t + 1)``, so that every step samples from scores feasible for its own budget (the first from their start,
    feasible for ``K(W)``)."""
    schedule = state.schedule
    if schedule is not None and schedule.anneal_steps > 0:
        state.scores.set_budget(schedule.at(state.counters["search_steps"] + 1))


def _count_step(state: TrainState, phase: str, result: StepResult) -> None:
    """A step's counters: the phase's steps (and the weights' schedule at them), the run's step, the train FLOPs."""
    state.counters[f"{phase}_steps"] += 1
    state.weight_schedule.step_update(state.counters[f"{phase}_steps"])
    state.step += 1
    state.counters["train_flops"] += result.flops
    if phase != "finetune":  # the dense baseline trains as many steps as the search (see timing.py)
        state.counters["dense_train_flops"] += result.dense_flops


def _progress_bar(state: TrainState, loader: Loader, total: int) -> tqdm:
    """The epoch's progress bar: rank 0's alone (a resumed epoch's starts at its batch)."""
    return tqdm(loader, desc=f"{state.phase} {state.epoch + 1}/{total}", leave=False, dynamic_ncols=True,
                disable=None if current().is_main else True, initial=state.batch, total=len(loader))


def _start_epoch(state: TrainState, loader: Loader) -> EpochMeter:
    """The meter of the epoch about to run. A new epoch notes the loader generator's state (what a checkpoint within
    it needs); an epoch resumed from such a checkpoint sets the generator back to it, so the epoch draws its order
    again, starts its loader at the checkpoint's batch, and goes on from the sums it had."""
    if state.batch == 0:
        state.epoch_start = {"loader": state.loader_generator.get_state()}
        return EpochMeter()
    state.loader_generator.set_state(state.epoch_start["loader"])
    (loader.batch_sampler if isinstance(loader, DataLoader) else loader.sampler).start = state.batch
    return EpochMeter(**state.epoch_start["meter"])


class StepCheckpoints:
    """Checkpoints within an epoch, looked at after every step: every ``save_every_steps`` steps, and when a stop
    signal came (``stopping.py``: the checkpoint saved, :class:`~maskprop.train.stopping.RunStopped` is raised).

    Args:
        save: Writes ``last.pt`` from the run's state.
        every: ``save_every_steps`` (0: on a signal only).
        signals: The run's stop signals, or ``None``.
        device: Where a collective's tensors go (torchrun).
        agree_every: Steps between the ranks' agreements on a signal under torchrun (``log_every``).
    """

    def __init__(self, save: Callable[[], None], every: int, signals: StopSignals | None,
                 device: torch.device, agree_every: int = 1) -> None:
        self.save, self.every, self.signals, self.device = save, every, signals, device
        self.agree_every = agree_every

    def after_step(self, state: TrainState, meter: EpochMeter, batches: int,
                   before_saving: Callable[[], None] | None = None) -> None:
        """Save the state (``before_saving`` first: the static steps' sums read, the narrow model written back)
        when a checkpoint is due after the step just counted, and raise after saving on a stop signal.

        Args:
            state: The run state, its step and batch counted.
            meter: The epoch's sums so far (saved with the checkpoint).
            batches: The epoch's batches (at its last one the checkpoint at the epoch's end serves).
            before_saving: What makes the state complete before it is saved.
        """
        # under torchrun the ranks agree (a collective and a host read) every agree_every steps, where the step
        # statistics are read anyway, not at every step; one process looks at its flag after every step
        looks = not current().enabled or state.step % self.agree_every == 0
        signum = self.signals.pending(self.device) if self.signals is not None and looks else None
        due = self.every and state.step % self.every == 0 and state.batch < batches
        if not (due or signum):
            return
        if before_saving is not None:
            before_saving()
        state.epoch_start["meter"] = meter.saved()
        self.save()
        if signum:
            raise RunStopped(signum, state.step, f"{state.phase} epoch {state.epoch + 1}, batch {state.batch} of "
                                                 f"{batches}")


def _timed_batches(batches: Iterable, meter: EpochMeter) -> Iterator:
    """``batches`` one by one, the seconds the loop waits for each (and for the iterator: a DataLoader starts its
    workers there) added to ``meter.data_s``."""
    start = time.perf_counter()
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            meter.data_s += time.perf_counter() - start
            return
        meter.data_s += time.perf_counter() - start
        yield batch
        start = time.perf_counter()


def _end_epoch(state: TrainState, cfg: Config, meter: EpochMeter) -> dict[str, float]:
    """The epoch's metrics, after checking it trained a step; the state's epoch counted, its wait for data added to
    the run's."""
    if meter.steps == 0:
        raise ValueError(f"the training loader gave no batch (batch size {cfg.data.batch_size}); "
                         f"expected at least one full batch per epoch")
    state.epoch += 1
    state.batch, state.epoch_start = 0, None
    seconds = meter.elapsed()
    state.times.data_wait_s += meter.data_s
    return dict(meter.summary(), epoch_time_s=seconds, data_wait_s=meter.data_s)


def _measures_angles(state: TrainState, cfg: Config) -> bool:
    """Whether the next step of a sparse-backward run measures its gradient angles (every ``sbp.angle_every``): it
    then runs a second backward, and is left out of the step times (``timed_step``)."""
    every = cfg.sbp.angle_every if cfg.method in SPARSE_BACKWARD_METHODS else 0
    return every > 0 and (state.step + 1) % every == 0


def train_one_epoch(state: TrainState, cfg: Config, ctx: StepContext, loader: Loader,
                    log: RunLogger, dense_reference: DenseReference | None = None,
                    narrow: NarrowSubnetwork | None = None, static: StaticSteps | None = None,
                    threads: RunThreads | None = None,
                    checkpoints: StepCheckpoints | None = None) -> dict[str, float]:
    """Train one epoch of the current phase (or the rest of one: ``state.batch``); update the state's counters,
    step count and epoch.

    Args:
        state: The run state (its ``phase`` selects the step).
        cfg: The run configuration.
        ctx: Step settings.
        loader: The training loader (a DataLoader, or a DeviceLoader: ``data.on_device``).
        log: Where per-step scalars go (every ``cfg.log_every`` steps).
        dense_reference: Times dense steps paired with some of the epoch's steps, for the measured speedup.
        narrow: The fixed subnetwork's narrow model and optimizer, trained instead of compact steps of the full model
            (finetune phase; see ``narrow.py``).
        static: The run's static-shape steps (``graphs.py``), run instead of the eager ones.
        threads: The run's CPU threads, re-chosen between steps as the machine's load moves (``threads: auto``).
        checkpoints: The checkpoints within the epoch (``save_every_steps``, stop signals).

    Returns:
        The epoch's training metrics.
    """
    if static is not None:
        return _train_static_epoch(state, cfg, ctx, loader, log, static, dense_reference, narrow, threads,
                                   checkpoints)
    phase, model = state.phase, state.model
    model.train()
    step = _step_function(state, cfg, ctx) if narrow is None else narrow.step_function(ctx)
    meter = _start_epoch(state, loader)
    total = phase_epochs(cfg, phase)
    kind, first, kind_steps = _timed_kind(state, total * len(loader))
    bar = _progress_bar(state, loader, total)
    for images, labels in _timed_batches(bar, meter):
        batch = ctx.inputs(images, labels)
        result = timed_step(lambda: step(batch), kind, state.times, ctx.device, dense_reference, batch,
                            index=state.counters[f"{phase}_steps"] - first, total=kind_steps,
                            timed=not (narrow is None and _measures_angles(state, cfg)))
        _count_step(state, phase, result)
        meter.update(result)
        bar.set_postfix(loss=f"{result.loss:.3f}", acc=f"{100.0 * meter.correct / meter.count:.1f}",
                        kept=f"{result.kept_ratio:.2f}", refresh=False)
        if state.step % cfg.log_every == 0:
            log.scalars(_step_scalars(state, result), state.step)
        if result.diagnostics:
            state.diagnostics = result.diagnostics
            log.scalars(result.diagnostics, state.step)
        if threads is not None:
            threads.tick()
        state.batch += 1
        if checkpoints is not None:
            checkpoints.after_step(state, meter, len(loader),
                                   before_saving=None if narrow is None else narrow.write_back)
    bar.close()
    return _end_epoch(state, cfg, meter)


def _static_step_function(state: TrainState, cfg: Config, static: StaticSteps,
                          narrow: NarrowSubnetwork | None) -> Callable[[tuple[Tensor, Tensor]], Any]:
    """The static step of the current phase (``graphs.py``), as a function of the batch: what ``_step_function``
    picks, with static shapes (under torchrun on the models themselves: the static steps average the gradients)."""
    if narrow is not None:
        return lambda batch: static.plain(narrow.model, narrow.optimizer, batch, narrow=narrow)
    kind = _search_kind(state, cfg) if state.phase == "search" else state.phase
    if kind in ("search", "anneal"):
        optimizers = (state.weight_optimizer, state.score_optimizer)

        def search(batch: tuple[Tensor, Tensor]) -> Any:
            _set_next_budget(state)
            return static.search(state.model, state.scores, optimizers, batch)

        return search
    mask = None if kind in ("warmup", "train") else state.fixed_mask  # dense, or the fixed subnetwork
    return lambda batch: static.plain(state.model, state.weight_optimizer, batch, mask)


def _window_result(window: MeterWindow) -> StepResult:
    """A read of static steps as one step's result, for the step logs: the means over its steps."""
    count, steps = max(window.count, 1), max(window.steps, 1)
    return StepResult(loss=window.loss / count, loss2=window.loss2 / count if window.pairs else None,
                      correct=round(window.correct), count=window.count, kept_ratio=window.kept / steps,
                      flops=0, dense_flops=0, grad_norm=window.grad_norm / steps)


def _train_static_epoch(state: TrainState, cfg: Config, ctx: StepContext, loader: Loader,
                        log: RunLogger, static: StaticSteps, dense_reference: DenseReference | None,
                        narrow: NarrowSubnetwork | None, threads: RunThreads | None = None,
                        checkpoints: StepCheckpoints | None = None) -> dict[str, float]:
    """``train_one_epoch`` with static steps: nothing is read from the device inside a step; every ``log_every``
    steps and at the end of the epoch the steps' sums come back in one transfer (and the search re-chooses its
    capacities)."""
    phase = state.phase
    state.model.train()
    if narrow is not None:
        narrow.model.train()
    step = _static_step_function(state, cfg, static, narrow)
    meter = _start_epoch(state, loader)
    total = phase_epochs(cfg, phase)
    kind, first, kind_steps = _timed_kind(state, total * len(loader))
    scores = state.scores if phase == "search" else None
    bar = _progress_bar(state, loader, total)
    for images, labels in _timed_batches(bar, meter):
        batch = ctx.inputs(images, labels)
        result = timed_step(lambda b=batch: step(b), kind, state.times, ctx.device, dense_reference, batch,
                            index=state.counters[f"{phase}_steps"] - first, total=kind_steps)
        _count_step(state, phase, result)
        if state.step % cfg.log_every == 0:
            window = static.read()  # capacities are re-chosen at the epoch's end only: each window costs a capture
            meter.add_window(window)
            read = _window_result(window)
            bar.set_postfix(loss=f"{read.loss:.3f}", acc=f"{100.0 * meter.correct / max(meter.count, 1):.1f}",
                            kept=f"{read.kept_ratio:.2f}", refresh=False)
            log.scalars(_step_scalars(state, read), state.step)
        if threads is not None:
            threads.tick()
        state.batch += 1
        if checkpoints is not None:
            checkpoints.after_step(state, meter, len(loader),
                                   before_saving=lambda: _complete_static_state(meter, static, narrow))
    bar.close()
    meter.add_window(static.read(scores))
    return _end_epoch(state, cfg, meter)


def _complete_static_state(meter: EpochMeter, static: StaticSteps, narrow: NarrowSubnetwork | None) -> None:
    """Before a checkpoint within a static epoch: the steps' sums since the last read into the meter, the narrow
    model's weights into the full model."""
    meter.add_window(static.read())
    if narrow is not None:
        narrow.write_back()


def _timed_kind(state: TrainState, phase_steps: int) -> tuple[str, int, int]:
    """How the current epoch's steps are timed: their kind in ``state.times`` (:data:`timing.STEP_KINDS`), the phase
    step their kind starts at, and the kind's steps.

    A search's dense warm-up steps and its anneal steps are kinds of their own: a warm-up step is a dense step (its
    ratio is about 1) and an anneal step runs a mask wider than the budget, so mixed into the search's pairs either
    would pull the search's median away from what a step at the budget costs. The schedule's phases start on epoch
    boundaries, so one epoch's steps are all of one kind.
    """
    schedule = state.schedule
    if state.phase != "search" or schedule is None:
        return state.phase, 0, phase_steps
    warmup, anneal, done = schedule.warmup_steps, schedule.anneal_steps, state.counters["search_steps"]
    if done < warmup:
        return "warmup", 0, warmup
    if done < warmup + anneal:
        return "anneal", warmup, anneal
    return "search", warmup + anneal, phase_steps - warmup - anneal


def _step_scalars(state: TrainState, result: StepResult) -> dict[str, float]:
    loss_tag = f"{state.phase}/loss" if result.loss2 is None else f"{state.phase}/loss_m"
    scalars = {loss_tag: result.loss, f"{state.phase}/accuracy": 100.0 * result.correct / result.count,
               f"{state.phase}/kept_ratio_sampled": result.kept_ratio,
               "lr/weights": state.weight_optimizer.param_groups[0]["lr"]}
    if result.loss2 is not None:
        scalars[f"{state.phase}/loss_m2"] = result.loss2
        scalars["lr/scores"] = state.score_optimizer.param_groups[0]["lr"]
    if result.grad_norm is not None:
        scalars[f"{state.phase}/grad_norm"] = result.grad_norm
    if state.budget is not None:
        scalars.update({f"sbp_k/{name}": k for name, k in _budget_ks(state).items()})
    return scalars


def _budget_ks(state: TrainState) -> dict[str, int]:
    """Units each layer of a global sparse-backward budget keeps now, by layer name."""
    names = {id(layer): name for name, layer in sparse_layers(state.model)}
    return {names[id(layer)]: k for layer, k in zip(state.budget.layers, state.budget.ks)}


@contextlib.contextmanager
def _new_widths() -> Iterator[None]:
    """cuDNN's benchmark mode off inside (and back as it was after): for compact forwards of masks whose widths the run
    has not met, each of whose new convolution shapes the mode would time again (the static steps turn it on)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, mask: Mapping[str, Tensor] | None,
             ctx: StepContext) -> dict[str, float]:
    """Top-1 accuracy (percent) and mean cross entropy of the subnetwork ``mask`` (dense for ``None``), eval mode.

    Under torchrun each rank evaluates its share of ``loader`` and the sums go through ``ctx.reduce_stats``.
    """
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    widths = _new_widths() if mask is not None else contextlib.nullcontext()
    try:
        with use_mask(model, mask, "compact", ctx.align), widths:
            for images, labels in loader:
                images, labels = ctx.inputs(images, labels)
                with ctx.autocast():
                    logits = model(images).float()
                loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                count += labels.shape[0]
    finally:
        model.train(was_training)
    if ctx.reduce_stats is not None:
        totals = ctx.reduce_stats(torch.tensor([loss, correct, count], dtype=torch.float64, device=ctx.device))
        loss, correct, count = totals[0].item(), int(totals[1].item()), int(totals[2].item())
    return {"loss": loss / max(count, 1), "accuracy": 100.0 * correct / max(count, 1)}


@torch.no_grad()
def _best_of_n(scores: ChannelScores, model: nn.Module, generator: torch.Generator, samples: int,
               loader: Loader, ctx: StepContext) -> tuple[dict[str, Tensor], dict[str, Any]]:
    masks = [scores.split(scores.sample_flat(generator).cpu()) for _ in range(samples)]
    correct, count = [0] * samples, 0
    model.eval()
    with _new_widths():
        for images, labels in loader:  # every mask sees the same batches (same augmentation draws)
            images, labels = ctx.inputs(images, labels)
            count += labels.shape[0]
            for i, mask in enumerate(masks):
                with use_mask(model, mask, "compact", ctx.align), ctx.autocast():
                    correct[i] += int((model(images).argmax(1) == labels).sum())
    model.train()
    if ctx.reduce_stats is not None:  # every rank scored its share: the same choice everywhere
        totals = ctx.reduce_stats(torch.tensor([*correct, count], dtype=torch.float64, device=ctx.device))
        *correct, count = (int(t) for t in totals.tolist())
    accuracies = [100.0 * c / max(count, 1) for c in correct]
    best = max(range(samples), key=lambda i: (correct[i], -i))
    return masks[best], {"rule": "best_of_n", "train_accuracies": accuracies, "chosen": best, "examples": count}


def _top_scores(scores: ChannelScores, *args: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return {g: m.cpu() for g, m in scores.top_mask().items()}, {"rule": "top_scores"}


_FIX_RULES = {"best_of_n": _best_of_n, "top_scores": _top_scores}


def fix_subnetwork(state: TrainState, cfg: Config, ctx: StepContext,
                   train_set: Dataset | ImageTensors) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Choose the subnetwork to finetune (``sparsity.fix``; see the module docstring).

    ``train_set`` is the training set, or its images on the device (``data.on_device``), whose batches are then made
    there, with crops and flips drawn from a generator seeded with ``cfg.seed``.

    Returns:
        The mask (on the CPU) and a json-able description of how it was chosen.
    """
    sparsity = cfg.sparsity
    if sparsity.fix == "random":  # fixed before the search's first step (the random baseline): nothing to choose
        _draw_random_subnetwork(state, cfg)
        return state.fixed_mask, state.fix_info
    loader = None
    if sparsity.fix == "best_of_n":
        count = len(train_set) if sparsity.fix_examples is None else min(sparsity.fix_examples, len(train_set))
        if isinstance(train_set, ImageTensors):
            loader = _augmented_examples(train_set.head(count), cfg)
        else:
            subset = train_set if count == len(train_set) else Subset(train_set, range(count))
            loader = _examples_loader(subset, cfg, ctx, cfg.data.workers)
    scores = state.scores
    if scores.scores.device != state.mask_generator.device:  # static steps keep them on the device (graphs.py)
        scores = copy.deepcopy(scores).to(state.mask_generator.device)
    mask, info = _FIX_RULES[sparsity.fix](scores, state.model, state.mask_generator, sparsity.fix_samples, loader, ctx)
    info["budget_spent"] = scores.spent() / scores.budget if scores.budget > 0 else 1.0
    logger.info("fixed the subnetwork by %s: %s", sparsity.fix, _fix_line(info))
    if info["budget_spent"] < SPENT_SHARE and current().is_main:
        anneal = 0 if state.schedule is None else state.schedule.anneal_steps
        travel = (f" (sparsity.score_lr x anneal steps = {sparsity.score_lr:g} x {anneal} = "
                  f"{sparsity.score_lr * anneal:.3g}, the most a probability can move in the anneal; measured "
                  f"searches spending 81-100% had 14-154)") if anneal else ""
        logger.warning("the search ended spending %.0f%% of its budget (sparsity.keep_ratio=%g): keep probabilities "
                       "the estimator drove to 0 stay there, so the subnetwork is smaller than asked and a random "
                       "subnetwork of the same budget is larger; a lower sparsity.score_lr settles them more "
                       "slowly%s (docs/methods.md, \"Fixing the subnetwork\")", 100 * info["budget_spent"],
                       sparsity.keep_ratio, travel)
    return mask, info


def _fix_line(info: Mapping[str, Any]) -> str:
    """How the subnetwork was chosen, for the log: the sample chosen with its training accuracy and the others' range
    (``best_of_n``), and the share of the budget its keep probabilities spent."""
    spent = f"{100 * info['budget_spent']:.0f}% of the budget spent"
    accuracies = info.get("train_accuracies")
    if not accuracies:
        return spent
    chosen = info["chosen"]
    others = [a for i, a in enumerate(accuracies) if i != chosen]
    rest = f" (the others {min(others):.1f}-{max(others):.1f}%)" if others else ""
    return (f"sample {chosen + 1} of {len(accuracies)}, training accuracy {accuracies[chosen]:.1f}% on "
            f"{info['examples']} examples{rest}; {spent}")


SPENT_SHARE = 0.9
"""The share of its budget below which a search's end is worth a warning (the default search at keep 0.1 on VGG-19
spent 57-100% of it over five seeds, and its accuracy followed: BENCHMARKS.md)."""


def _draw_random_subnetwork(state: TrainState, cfg: Config) -> None:
    """Fix the random baseline's subnetwork (``sparsity.fix: random``) unless it is fixed already: every group keeps
    ``max(1, round(keep_ratio x channels))`` channels drawn uniformly, from the run's mask generator (``random_mask``),
    so the seed decides it and a resumed run keeps the one in its checkpoint."""
    if state.fixed_mask is None:
        groups = {name: int(size) for name, size in channel_groups(state.model).items()}
        state.fixed_mask = random_mask(groups, cfg.sparsity.keep_ratio, state.mask_generator)
        state.fix_info = {"rule": "random"}


# ---------------------------------------------------------------------------------------------------------------------
# Running the phases


class _Saver:
    """Writes ``last.pt`` / ``best.pt`` (atomically) and keeps the run's wall time across processes."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._started = time.perf_counter()
        self._base = run.state.elapsed_s

    def elapsed(self) -> float:
        return self._base + time.perf_counter() - self._started

    def save(self, name: str = "last.pt") -> None:
        self.run.state.elapsed_s = self.elapsed()
        if self.run.run_dir is not None:  # every rank builds it (it gathers their random states), rank 0 writes
            checkpoint = self.run.state.checkpoint(self.run.cfg, self.run.groups)
            checkpoint["model_spec"] = self.run.spec.to_dict()  # how the model was built: what export rebuilds
            if self.run.static is not None:  # the device generator and the capacity windows (graphs.py)
                checkpoint["static"] = self.run.static.state_dict()
            if self.run.initial_weights is not None:  # what the run started from, for the summary after a resume
                checkpoint["initial_weights"] = self.run.initial_weights.to_dict()
            if self.run.given_data is not None:  # datasets given to fit: a resume must give them again
                checkpoint["given_data"] = dict(self.run.given_data)
            if self.run.state.batch and current().enabled and not self.run.cfg.sync_bn:
                # within an epoch each rank's BatchNorm statistics are its own (averaged at the epoch's end)
                checkpoint["rank_buffers"] = gather_objects(_buffers(self.run.state.model))
            if current().is_main:
                save_checkpoint(checkpoint, self.run.run_dir / name)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    """The buffers of ``model`` that its state dict holds (BatchNorm's statistics), on the CPU."""
    names = {name for name, _ in model.named_buffers()}
    return {name: value.detach().cpu() for name, value in model.state_dict().items() if name in names}


def _eval_mask(state: TrainState) -> dict[str, Tensor] | None:
    """The subnetwork evaluated in the current phase: the top scores while searching, the fixed one after (and in the
    random baseline's search)."""
    if state.phase == "search" and state.scores is not None:
        return {g: m.cpu() for g, m in state.scores.top_mask().items()}
    return state.fixed_mask


def _within_budget(state: TrainState) -> bool:
    """Whether the subnetwork the epoch evaluated fits the final budget; not while the budget is annealed (nor in the
    warm-up before an anneal), when the top scores keep more channels, so their accuracy is no best subnetwork's."""
    return (state.phase != "search" or state.scores is None or state.schedule is None
            or state.scores.budget <= state.schedule.final)


def _augmented_examples(data: ImageTensors, cfg: Config) -> DeviceLoader:
    """Training examples on the device in order, augmented alike at every pass (a generator seeded with ``cfg.seed``
    each time), for evaluations on the training set: the fix's, the search's probe."""
    return DeviceLoader(data, cfg.data.batch_size, train=False, seed=cfg.seed, augment=True, augment_seed=cfg.seed,
                        memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def _training_examples(run: Run) -> Dataset | ImageTensors:
    """The run's training set: its images on the device (``data.on_device``), else the dataset."""
    return run.train_loader.data if isinstance(run.train_loader, DeviceLoader) else run.train_set


def _probe_loader(run: Run) -> Loader | None:
    """The first ``TOP_MASK_EXAMPLES`` training examples, in order, for the top-score subnetwork's training accuracy
    after each search epoch; ``None`` for runs without scores."""
    if run.state.scores is None or run.state.phase != "search":
        return None
    examples = _training_examples(run)
    count = min(TOP_MASK_EXAMPLES, len(examples))
    if isinstance(examples, ImageTensors):
        return _augmented_examples(examples.head(count), run.cfg)
    return _examples_loader(Subset(examples, range(count)), run.cfg, run.ctx, 0)


def _examples_loader(examples: Dataset, cfg: Config, ctx: StepContext, workers: int) -> Loader:
    """Training examples in order, for evaluations on the training set: a DataLoader, its batches decoded on the
    device where the examples are encoded (``data.decode: device``)."""
    if is_encoded(examples):
        return decode_loader(examples, cfg.data.batch_size, False, ctx.device,
                             torch.channels_last if cfg.channels_last else torch.contiguous_format, workers=workers,
                             seed=cfg.seed)
    return build_loader(examples, cfg.data.batch_size, train=False, workers=workers, seed=cfg.seed)


def _search_diagnostics(run: Run, probe: Loader | None) -> dict[str, Any]:
    """How the search stands after a search epoch (docs/methods.md, "Diagnostics of a search"): the kind of its last
    step, the budget ``K(t) / N`` of the step after it (the budget the scores meet), and after VR-PGE steps the shares
    of keep probabilities within ``POLARISED_MARGIN`` of 0 and 1, their mean Bernoulli entropy (nats) and the training
    accuracy of the top-score subnetwork on the probe examples (eval mode; torch's RNG forked and seeded, so every
    epoch sees the same augmentation draws and the training draws nothing else)."""
    state, cfg = run.state, run.cfg
    if state.phase != "search" or state.schedule is None:
        return {}
    schedule, steps = state.schedule, state.counters["search_steps"]
    kind = _search_kind(state, cfg, steps - 1)
    diagnostics: dict[str, Any] = {"step_kind": kind, "budget_ratio": schedule.at(steps) / schedule.num_channels}
    if state.scores is None or kind == "warmup":
        return diagnostics
    stats = score_statistics(state.scores.scores, POLARISED_MARGIN)
    diagnostics.update(scores_near_0=stats.near_zero, scores_near_1=stats.near_one, score_entropy=stats.entropy)
    if probe is not None:  # the same probe every epoch; only the CPU's generator is seeded and given back (a CUDA
        # generator seeded here would restart the run's dropout draws every epoch, and alike on every rank)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            diagnostics["train_accuracy_top"] = evaluate(state.model, probe, _eval_mask(state), run.ctx)["accuracy"]
    return diagnostics


def _epoch_record(run: Run, train_metrics: dict[str, float], val: dict[str, float] | None) -> dict[str, Any]:
    state, counters = run.state, run.state.counters
    record: dict[str, Any] = {"phase": state.phase, "epoch": state.epoch, "step": state.step, **train_metrics}
    if state.phase != "search":
        record.pop("train_loss2", None)
    if val is not None:
        record.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
    if state.budget is not None:
        record["sbp_k"] = _budget_ks(state)
    if state.scores is not None:
        expected = state.scores.expected_kept()
        record["kept_ratio_expected"] = expected.ratio
        record["widths_expected"] = expected.per_group
    record["lr"] = state.weight_optimizer.param_groups[0]["lr"]
    record["train_flops"] = counters["train_flops"]
    record["dense_train_flops"] = counters["dense_train_flops"]
    record["train_cost_saving"] = counters["dense_train_flops"] / max(counters["train_flops"], 1)
    return record


_SEARCH_SCALARS = ("budget_ratio", "loss_gap", "scores_near_0", "scores_near_1", "score_entropy", "train_accuracy_top")


def _log_epoch(run: Run, log: RunLogger, record: dict[str, Any]) -> None:
    state = run.state
    phase, step = state.phase, state.step
    scalars = {f"{phase}/epoch_loss": record["train_loss"], f"{phase}/epoch_accuracy": record["train_accuracy"],
               f"{phase}/kept_ratio_sampled_mean": record["kept_ratio_sampled"],
               "cost/train_flops": record["train_flops"], "cost/train_cost_saving": record["train_cost_saving"]}
    if "angle_overall" in record:
        scalars[f"{phase}/epoch_angle_overall"] = record["angle_overall"]
    if "grad_norm" in record:
        scalars[f"{phase}/epoch_grad_norm"] = record["grad_norm"]
    scalars.update({f"search/{key}": record[key] for key in _SEARCH_SCALARS if key in record})
    if "val_accuracy" in record:
        scalars.update({f"val/{phase}_accuracy": record["val_accuracy"], f"val/{phase}_loss": record["val_loss"]})
    if "kept_ratio_expected" in record:
        scalars["search/kept_ratio_expected"] = record["kept_ratio_expected"]
        scalars.update({f"widths/{g}": w for g, w in record["widths_expected"].items()})
        log.histogram("search/scores", state.scores.scores, step)
    log.scalars(scalars, step)
    log.epoch(record, phase_epochs(run.cfg, phase))


def _narrow_subnetwork(run: Run) -> NarrowSubnetwork | None:
    """The narrow model and optimizer that train the fixed subnetwork of the finetune phase (``narrow.py``), built from
    the full model and optimizer (a resumed run's included); ``None``: compact steps of the full model.

    Under torchrun the narrow model has ``sync_bn`` BatchNorm layers that synchronise over the ranks as the full
    model's do, and the eager steps get a DDP wrapper of its own (its ``step_model``; building it is a collective, and
    every rank builds the same narrow model at the same epoch); the static steps average its gradients themselves.
    ``finetune.narrow: false`` keeps compact steps (for comparison).
    """
    cfg, state = run.cfg, run.state
    fixed = state.phase == "finetune" or (state.phase == "search" and cfg.sparsity.fix == "random"
                                          and _search_kind(state, cfg) == "random")
    if (not fixed or state.fixed_mask is None or state.epoch >= phase_epochs(cfg, state.phase)
            or not cfg.finetune.narrow):
        return None
    synchronised = current().enabled and cfg.sync_bn
    narrow = NarrowSubnetwork(state.model, state.fixed_mask, state.weight_optimizer, align=run.ctx.align,
                              norm_type=SparseBatchNorm2d if synchronised else nn.BatchNorm2d)
    if state.ddp is not None and run.static is None:
        narrow.step_model = wrap_model(narrow.model, run.ctx.device, sync_bn=cfg.sync_bn)
    elif synchronised:
        sync_batchnorm.enable(narrow.model)
    return narrow


def _run_phase(run: Run, log: RunLogger, saver: _Saver, dense_reference: DenseReference | None,
               checkpoints: StepCheckpoints | None = None) -> None:
    """Train the remaining epochs of the current phase, evaluating and saving as configured."""
    cfg, state = run.cfg, run.state
    epochs = phase_epochs(cfg, state.phase)
    narrow = _narrow_subnetwork(run)
    probe = _probe_loader(run)
    while state.epoch < epochs:
        if narrow is None and state.phase == "search" and cfg.sparsity.fix == "random":  # past the dense warm-up
            narrow = _narrow_subnetwork(run)
        run.threads.update()  # threads: auto follows the machine's load (and within the epoch, every INTERVAL_S)
        metrics = train_one_epoch(state, cfg, run.ctx, run.train_loader, log, dense_reference, narrow, run.static,
                                  run.threads, checkpoints)
        if not cfg.sync_bn:  # DDP: each rank's running statistics saw its share; their mean (no-op in one process)
            average_buffers(state.model if narrow is None else narrow.model)
        if narrow is not None:  # checkpoints, best.pt and the summary read the full model and optimizer
            narrow.write_back()
        metrics.update(_search_diagnostics(run, probe))
        last = state.epoch == epochs
        val = None
        if (cfg.eval_every and state.epoch % cfg.eval_every == 0) or last:
            model, mask = (state.model, _eval_mask(state)) if narrow is None else (narrow.model, None)
            val = evaluate(model, run.val_loader, mask, run.ctx)
            if last and state.phase != "search":
                state.final_accuracy = val["accuracy"]
        # the accuracy of the weights the checkpoint saves, with the subnetwork an export of it gives (not the top
        # scores above the final budget, in a warm-up or anneal)
        state.last_accuracy = val["accuracy"] if val is not None and _within_budget(state) else None
        _log_epoch(run, log, _epoch_record(run, metrics, val))
        if val is not None and val["accuracy"] > state.best_accuracy and _within_budget(state):
            state.best_accuracy = val["accuracy"]
            saver.save("best.pt")
        if last or (cfg.save_every and state.epoch % cfg.save_every == 0):
            saver.save()


def _next_phase(run: Run) -> None:
    """Move the state to its next phase (fixing the subnetwork after the search) and save."""
    cfg, state = run.cfg, run.state
    if state.phase == "search":
        if run.static is not None:
            run.static.end_search()
        state.fixed_mask, state.fix_info = fix_subnetwork(state, cfg, run.ctx, _training_examples(run))
        state.phase, state.epoch = "finetune", 0
        state.last_accuracy = None  # measured with the top scores, not with the fixed subnetwork
        state.weight_optimizer, state.weight_schedule = phase_optimizer(cfg, state.model, "finetune",
                                                                         len(run.train_loader))
    else:
        if state.final_accuracy is None:  # no epoch ran in this phase (finetune.epochs == 0)
            state.final_accuracy = evaluate(state.model, run.val_loader, state.fixed_mask, run.ctx)["accuracy"]
        state.phase = "done"


def _prepare_search(run: Run) -> None:
    """The search's budget schedule, the scores' budget at the step the run starts from, and the random baseline's
    subnetwork (drawn before the first step; a resumed run has it from its checkpoint)."""
    cfg, state = run.cfg, run.state
    if cfg.method != "vrpge":
        return
    state.schedule = search_schedule(cfg.sparsity, sum(run.groups.values()), len(run.train_loader))
    if state.scores is not None:  # a resumed anneal continues from its step's budget (the value a fresh run starts at)
        state.scores.set_budget(state.schedule.sampling_budget(state.counters["search_steps"]))
    if cfg.sparsity.fix == "random" and state.phase == "search":
        _draw_random_subnetwork(state, cfg)
    elif state.phase == "search" and not run.resumed and current().is_main:  # one line, not one a rank
        _warn_if_short(state.schedule.warmup_steps, cfg.optim.epochs * len(run.train_loader),
                       state.schedule.num_channels)
        _warn_if_floor(state.scores.floor, state.schedule.final, cfg.sparsity)


STEPS_PER_CHANNEL = 7
"""The fewest search steps per prunable channel after which the score estimator reads a channel of typical
importance (signal-to-noise ratio 1): 7-23 measured on ResNet-32 (docs/methods.md, "How the search behaves early")."""


def _warn_if_short(warmup_steps: int, search_steps: int, channels: int) -> None:
    """Say, once at the start of a search, when it samples too few masks for the estimator to choose channels."""
    sampled = search_steps - warmup_steps
    if 0 < sampled < STEPS_PER_CHANNEL * channels:
        logger.warning("the search samples masks for %d step%s over %d prunable channels; the score estimator needs "
                       "%d or more (%d+ a channel) to read a channel of typical importance, so the channels kept "
                       "will be close to a random choice of the same budget (docs/methods.md, \"How the search "
                       "behaves early\"); compare with sparsity.fix=random, a subnetwork of the same budget trained "
                       "from the first step, which ended level with such searches or above them in the short runs "
                       "measured",
                       sampled, "s" * (sampled != 1), channels, STEPS_PER_CHANNEL * channels, STEPS_PER_CHANNEL)


FLOOR_SHARE = 0.5
"""The share of the budget above which the one channel every group keeps leaves the search too little to choose."""


def _warn_if_floor(floor: float, budget: float, sparsity: SparsityConfig) -> None:
    """Say, once at the start of a search, when one channel per group already spends most of the budget."""
    if floor > FLOOR_SHARE * budget:
        unit = "channels" if sparsity.budget_unit == "channels" else "channel-equivalents of FLOPs"
        logger.warning("at sparsity.keep_ratio=%g one channel of every group (kept even when a sample drops the "
                       "whole group) costs %.1f of the budget's %.1f %s (%.0f%%): the search chooses among few "
                       "channels, and its subnetwork computes more than the budget (docs/methods.md, \"A budget in "
                       "FLOPs\")", sparsity.keep_ratio, floor, budget, unit, 100 * floor / budget)


def _check_config_type(config: Any) -> None:
    """Refuse what is no configuration (``None`` too: the defaults train for hours)."""
    if not isinstance(config, (Config, Mapping, str, os.PathLike)):
        raise TypeError(f"config is {type(config).__name__}; expected a Config, a mapping or a yaml path "
                        f"(maskprop.train.config; load_config(None) gives the defaults)")


def plan_run(config: Config | Mapping[str, Any] | str | os.PathLike, train_set: Dataset | None = None,
             val_set: Dataset | None = None, out: str | os.PathLike | None = None, *,
             resume: bool = False) -> dict[str, Any]:
    """Check a run as :func:`fit` would start it and say what it would do, training nothing and writing nothing
    (``maskprop train --dry-run``): the configuration, the data (ImageNet's folders scanned, their classes counted),
    the model built (``model.weights`` loaded, a network of the user's own checked), a resumed run's checkpoint
    checked against the settings, and the warnings a run gives at its start.

    Args: as :func:`fit`'s.

    Returns:
        ``model``, ``source`` (the module that defines it), ``params``, ``flops`` (a forward of one example),
        ``input_size``, ``num_classes``, ``groups`` and ``channels`` (the prunable channel groups and their
        channels); ``data`` (the dataset's name, ``custom`` for datasets passed in; ``imagenet, decoded on
        <device>`` with ``data.decode: device``), ``decode`` (``data.decode``), ``train_examples``,
        ``val_examples``, ``batch_size``, ``steps_per_epoch``; ``method``, ``subnetwork`` (a VR-PGE run's:
        ``searched``, or ``random`` for the baseline of ``sparsity.fix: random``) and ``phases``, a list of ``{"phase",
        "epochs", "steps"}`` in the order they run (a search's ``warm-up`` and ``anneal`` inside its ``search``);
        ``keep_ratio`` and ``budget`` (the channels, or channel-equivalents of FLOPs, a search's subnetwork keeps in
        expectation; ``None`` for the other methods); ``device``, ``amp``, ``channels_last``, ``steps`` (``CUDA
        graphs``, ``static shapes`` or ``eager``) and ``steps_reason`` (why not graphs, where auto fell back);
        ``initial_weights`` (what ``model.weights`` loaded, as the summary records it, or ``None``); ``run_dir``;
        ``resume_from`` (``{"phase", "epoch", "batch", "step"}`` of the checkpoint a resume continues
        from, ``None`` for a new run) and ``finished`` (a resumed run that has nothing left to train).

    Raises:
        As :func:`fit` before its first step.
    """
    _check_config_type(config)
    init_from_env()
    try:  # under torchrun, as fit: the ranks agree whether the set-up failed anywhere
        cfg = config if isinstance(config, Config) else load_config(config)
        cfg.validate()
        out = out if out is not None else cfg.out
        run = prepare(cfg, train_set, val_set, None if out is None else Path(out), resume)
        _prepare_search(run)
    except Exception as err:
        agree(err)
        raise
    agree(None)
    state, spe = run.state, len(run.train_loader)
    phases = []
    if cfg.method == "vrpge":
        sp = cfg.sparsity
        anneal = 0 if sp.fix == "random" else sp.anneal_epochs
        phases.append({"phase": "search", "epochs": cfg.optim.epochs, "steps": cfg.optim.epochs * spe})
        phases += [{"phase": name, "epochs": e, "steps": e * spe}
                   for name, e in (("warm-up", sp.warmup_epochs), ("anneal", anneal)) if e]
        if cfg.finetune.epochs:
            phases.append({"phase": "finetune", "epochs": cfg.finetune.epochs, "steps": cfg.finetune.epochs * spe})
    else:
        phases.append({"phase": "train", "epochs": cfg.optim.epochs, "steps": cfg.optim.epochs * spe})
    graphs = run.graphs
    resumed = {"phase": state.phase, "epoch": state.epoch, "batch": state.batch, "step": state.step} \
        if run.resumed else None
    return {
        "model": run.spec.name,
        "source": converted_source(run.spec.name) or model_entrypoint(run.spec.name).__module__,
        "params": sum(p.numel() for p in state.model.parameters()),
        "flops": run.ctx.cost.flops(),
        "input_size": list(run.spec.input_size),
        "num_classes": run.spec.num_classes,
        "groups": len(run.groups),
        "channels": sum(run.groups.values()),
        "data": (cfg.data.dataset if run.given_data is None else "custom")
        + (f", decoded on {run.ctx.device.type}" if isinstance(run.train_loader, DecodeLoader) else ""),
        "decode": cfg.data.decode,
        "train_examples": _examples(run.train_loader),
        "val_examples": _examples(run.val_loader),
        "batch_size": cfg.data.batch_size,
        "steps_per_epoch": spe,
        "method": cfg.method,
        "subnetwork": ("random" if cfg.sparsity.fix == "random" else "searched") if cfg.method == "vrpge" else None,
        "phases": phases,
        "keep_ratio": cfg.sparsity.keep_ratio if cfg.method == "vrpge" else None,
        "budget": state.schedule.final if cfg.method == "vrpge" else None,
        "budget_unit": cfg.sparsity.budget_unit if cfg.method == "vrpge" else None,
        "device": str(run.ctx.device),
        "amp": cfg.amp,
        "channels_last": cfg.channels_last,
        "steps": "CUDA graphs" if graphs.capture else "static shapes" if graphs.static else "eager",
        "steps_reason": graphs.reason or None,
        "initial_weights": None if run.initial_weights is None else run.initial_weights.to_dict(),
        "run_dir": None if run.run_dir is None else str(run.run_dir),
        "resume_from": resumed,
        "finished": run.resumed and state.phase == "done",
    }


def _examples(loader: Loader) -> int:
    """The examples a loader goes through in an epoch: its dataset's, or the images a :class:`DeviceLoader` holds."""
    return loader.data.images.shape[0] if isinstance(loader, DeviceLoader) else len(loader.dataset)


class FitResult(dict):
    """What :func:`fit` returns: the run's summary (this dict, as written to ``summary.json``) with the trained network
    attached, so that a run without a directory (``out=None``) still hands its result over.

    Attributes:
        model: The full maskprop model with the final weights (a plain model built from :attr:`spec` holding the run's
            final weight tensors: no DDP wrapper, no sparse-backward layers), in eval mode, on the run's device.
        mask: The subnetwork the run fixed (``{group: bool tensor}``, VR-PGE), or ``None``: the whole model (dense
            and sparse-backward runs).
        spec: How :attr:`model` was built (:class:`~maskprop.models.spec.ModelSpec`): what an export rebuilds.
    """

    def __init__(self, summary: Mapping[str, Any], model: nn.Module, mask: Mapping[str, Tensor] | None,
                 spec: ModelSpec) -> None:
        super().__init__(summary)
        self.model, self.mask, self.spec = model, None if mask is None else dict(mask), spec

    def narrow(self) -> nn.Module:
        """The subnetwork as a plain, physically smaller model of the same architecture (:func:`maskprop.materialize`:
        what ``model`` computes under ``mask``, in eval mode)."""
        from ..surgery import materialize

        return materialize(self.model, self.mask).eval()

    def export(self, out: str | os.PathLike, formats: str | list[str] | None = None, *,
               force: bool = False) -> dict[str, Any] | None:
        """Export the subnetwork to the directory ``out`` as ``maskprop export`` does for a run directory
        (:func:`maskprop.export.save_exported`: every file written is checked; ``export.json`` records the run's
        final accuracy). Returns the content of ``export.json``; under torchrun only the main rank writes (the
        ranks hold the same network), and the others return ``None``."""
        from ..export import save_exported

        if not current().is_main:
            return None
        source = {"source": {"method": self["method"], "mask": "fixed" if self.mask is not None else
                             "none (whole model)"},
                  "accuracy": self["accuracy"], "accuracy_source": "the run's final accuracy (maskprop.fit)"}
        return save_exported(self.model, self.mask, out, spec=self.spec, formats=formats, force=force, source=source)


def _trained_model(run: Run) -> nn.Module:
    """The run's model with its final weights as a plain model built from the run's spec (the weights its tensors, not
    copies), in eval mode."""
    model = run.spec.build("meta")
    model.load_state_dict(run.state.model.state_dict(), strict=True, assign=True)
    run.spec.build_unsaved_buffers(model, run.state.model)  # those no state dict holds, as the run's model has them
    return model.eval()


def _saved_summary(run: Run) -> dict[str, Any] | None:
    """The summary of a resumed run that had finished (as its ``summary.json`` holds it), else ``None``."""
    path = None if run.run_dir is None else run.run_dir / "summary.json"
    if not run.resumed or run.state.phase != "done" or path is None or not path.is_file():
        return None
    return read_summary(path).to_dict()


def fit(config: Config | Mapping[str, Any] | str | os.PathLike, train_set: Dataset | None = None,
        val_set: Dataset | None = None, out: str | os.PathLike | None = None, *,
        resume: bool = False, threads: int | str | None = None) -> FitResult:
    """Train a model as the configuration says (VR-PGE search + fix + finetune, dense, or a sparse-backward baseline)
    and summarise the run.

    Args:
        config: A ``Config``, a mapping or a yaml path (see ``maskprop.train.config``).
        train_set: Training set of ``(image, label)`` pairs; default: the one ``config.data`` names.
        val_set: Validation set; given together with ``train_set``.
        out: Run directory (default ``config.out``); ``None`` for both writes nothing.
        resume: Continue the run in ``out`` from its ``last.pt``, exactly as if it had not stopped.
        threads: torch's CPU threads for the run (set back when it returns): an integer, ``"auto"`` (the cores other
            processes leave free, re-chosen before each epoch and every 30 s within one; ``threads.py``; ``maskprop
            train``'s default) or ``None`` (torch's threads as they are). A run's floating-point results depend on its
            thread count, so runs to be compared bit for bit take a fixed one.

    Returns:
        The summary (also written to ``summary.json``): ``accuracy`` (top-1 % of the final network), ``dense_params``,
        ``subnet_params``, ``dense_flops``, ``subnet_flops`` (forward, one example), ``train_cost_saving``
        (supplement C.1, over the masks actually used, finetuning included), ``measured_speedup`` (``timing.py``),
        ``widths`` (kept channels per group of the final mask), ``run_time_s`` and more; a :class:`FitResult`, which
        also holds the trained network (``.model``, ``.mask``, ``.narrow()``, ``.export(dir)``).

    Raises:
        TypeError: ``config`` is not one of the above (``None`` included).
        ValueError: Bad configuration, data, checkpoint or run directory (one line each; nothing is written).
        FileNotFoundError: A missing config file, dataset directory or checkpoint.
        RunStopped: SIGTERM or SIGUSR1 came while a run with a directory trained: it saved its checkpoint after the
            step it was in (``stopping.py``); ``fit(..., resume=True)`` continues it.
    """
    _check_config_type(config)
    with run_threads(threads) as cpu_threads:
        return _fit(config, train_set, val_set, out, resume, cpu_threads)


def _fit(config: Config | Mapping[str, Any] | str | os.PathLike, train_set: Dataset | None, val_set: Dataset | None,
         out: str | os.PathLike | None, resume: bool, threads: RunThreads) -> FitResult:
    """:func:`fit` with its threads set."""
    place = init_from_env()  # under torchrun (WORLD_SIZE > 1): DDP, see maskprop/train/distributed.py
    try:  # no collective inside: a rank that fails here tells the others in agree() below, and all stop
        cfg = config if isinstance(config, Config) else load_config(config)
        cfg.validate()
        out = out if out is not None else cfg.out
        run = prepare(cfg, train_set, val_set, None if out is None else Path(out), resume)
        run.threads = threads
        _prepare_search(run)
    except Exception as err:
        agree(err)
        raise
    agree(None)
    check_same_config({k: v for k, v in config_to_dict(cfg).items() if k != "data"}
                      | {"data": {k: v for k, v in config_to_dict(cfg)["data"].items() if k != "root"}})
    state = run.state
    saved = _saved_summary(run)
    if saved is not None:  # a finished run: nothing to train, and its record stays as it was
        logger.info("the run in '%s' has finished: nothing to train; its summary as saved", run.run_dir)
        return FitResult(saved, _trained_model(run), state.fixed_mask if cfg.method == "vrpge" else None, run.spec)
    if place.enabled and run.static is None:
        state.ddp = wrap_model(state.model, run.ctx.device, sync_bn=cfg.sync_bn)
    elif place.enabled:  # the static steps average the gradients themselves: no wrapper, rank 0's weights shared
        share_model(state.model, sync_bn=cfg.sync_bn)
    state.restore_own_buffers()  # after rank 0's were shared
    if run.run_dir is not None and place.is_main:
        make_directory(run.run_dir)
        save_config(cfg, run.run_dir / "config.yaml")
    position = (PHASES[state.phase], state.epoch)
    log = RunLogger(run.run_dir if place.is_main else None, resume_step=state.step if run.resumed else None,
                    keep_line=(lambda r: (PHASES.get(r.get("phase"), 99), r.get("epoch", 0)) <= position)
                    if run.resumed else None)
    saver = _Saver(run)
    dense_reference = None
    if cfg.method != "dense" and state.phase != "done":
        reference_type, graphed = DenseReference, {}
        if run.graphs.capture:  # graphed steps are timed against graphed dense steps of the same (per-rank) batch
            reference_type, graphed = GraphedDenseReference, {"strict": run.graphs.strict,
                                                              "batch_size": run.static.batch_size}
        dense_reference = reference_type(run.dense_model or copy.deepcopy(state.model),
                                         lambda params: run_optimizer(params, cfg.optim), rank_local(run.ctx),
                                         share=DENSE_REFERENCE_SHARE, min_pairs=DENSE_REFERENCE_MIN_PAIRS, **graphed)
    signals = StopSignals(enabled=run.run_dir is not None)  # a run without a directory has nowhere to save
    checkpoints = None if run.run_dir is None else StepCheckpoints(
        saver.save, cfg.save_every_steps, signals if signals.enabled else None, run.ctx.device, cfg.log_every)
    try:
        with signals:
            while state.phase != "done":
                _run_phase(run, log, saver, dense_reference, checkpoints)
                _next_phase(run)
                saver.save()
        summary = summarize(run, saver.elapsed())
    finally:
        log.close()
        sync_batchnorm.disable(state.model)
    if run.run_dir is not None and place.is_main:
        write_json(summary, run.run_dir / "summary.json")
    return FitResult(summary, _trained_model(run), state.fixed_mask if cfg.method == "vrpge" else None, run.spec)
