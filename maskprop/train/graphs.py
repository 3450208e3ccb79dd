"""Static-shape training steps, each captured as one CUDA graph (two under torchrun) and replayed (``cuda_graphs``).

How a step runs on a GPU. The eager steps of ``steps.py`` give every search step the widths of its own masks: new
shapes, index sets built on the host and a read of every mask and loss, so a GPU spends most of a step waiting for the
host to launch its thousands of small kernels. With ``cuda_graphs`` on, every step kind runs with shapes fixed in
advance instead, and is recorded once as a CUDA graph that the GPU then replays with one launch per step:

* a **search step** (:class:`SearchStep`) computes each group at a *capacity* (:mod:`maskprop.sparse.static`), chosen
  from the keep probabilities for a window of steps. Before each replay the host asks the device for fresh uniforms
  ``u`` (from the run's device generator into a fixed buffer, one draw a mask: this step's ``m'`` and the next
  step's ``m``, or where the score update follows the backward, this step's ``m`` and ``m'``) and writes the step's
  budget into a
  device scalar (an annealed budget changes every step); inside the graph the masks are ``m = u < s`` (with
  :class:`~maskprop.vrpge.ChannelScores`'s empty-group rule, all on the device), written into the static execution
  states in place, then come the no-grad forward of ``m'``, the forward and backward of ``m``, the VR-PGE score gradient
  from the loss difference as a device tensor and the masks actually used, gradient clipping, SGD on the weights, Adam
  (``capturable``, fused) on the scores and their projection onto the budget (exact, with a fixed sequence of kernels:
  :func:`~maskprop.vrpge.project_scores`). On CUDA, with ``weight_grad: first``, the branch of ``m'`` runs on a second
  stream: its mask update and forward beside the forward of ``m``, then (once ``m``'s forward is done) its BatchNorm
  statistics, the score update and the next step's ``m`` (drawn from the projected scores with uniforms the host
  drew for it one step early) beside ``m``'s backward, so that a replay runs the two at once and the next replay's
  main stream starts its forward after one copy of that mask's buffers (:class:`SearchStep`).
  Every ``log_every`` steps (and at the end of an epoch) the host reads, in one transfer, the losses, correct counts,
  ``|L(m) - L(m')|``, gradient norms and overflow counters that the steps accumulated on the device; at the end of an
  epoch it also re-chooses the capacities (:func:`~maskprop.sparse.static.rechoose_capacities`, one read of the scores:
  a group that overflows grows, shrinking waits until it saves 5% of the channels computed), and when they change the
  next step builds a new layout and captures a new graph (a new *window*). Windows change at most once an epoch because
  each costs eager warm-up steps and a capture: on an H200 a 6-epoch quickstart that re-chose them every 20 steps
  through its anneal ran mostly warm-up steps and measured 0.11x dense.
* a **fixed-mask step** (:class:`FixedMaskStep`: the finetune or random-baseline subnetwork through the full model,
  with ``finetune.narrow: false``) runs at the aligned kept counts (``mask_capacities``), one window for the phase.
  With ``finetune.narrow: true`` (the default) the phase trains the physically narrow model instead (its widths
  padded to ``align`` with channels that stay zero: :mod:`maskprop.train.narrow`), and its plain dense step is what is
  captured.
* a **dense step** (:class:`DenseStep`: dense runs, a search's dense warm-up, the narrow finetune, and the dense
  reference steps the measured speedup is timed against).

Capture follows torch's rules for CUDA graphs: the first ``WARMUP_STEPS`` steps of a step kind run eagerly on a side
stream (real steps on real batches: cuDNN's benchmark mode, on while graphs are, picks its kernels there, and the
optimizers create their state), then the next step is captured and replayed, and every later step is a replay; a
later window of the search needs only ``NEW_WINDOW_WARMUP_STEPS`` eager step (new widths, nothing else new). Each
batch is copied into fixed input buffers first; a batch of another size runs eagerly (the trainer's loaders drop an
epoch's partial last batch: none occurs in a run). Gradients are set to ``None`` before each backward (its gradient
tensors become the ``.grad``, in the graph's memory, as in torch's whole-network capture), autocast runs without its
cache, the weight SGD is fused with its learning rate in a device tensor refreshed from the schedule before each replay,
and the score Adam is ``capturable`` and fused. A capture restricts this thread alone
(``capture_error_mode="thread_local"``): the data loader's pin-memory thread, which pins the next batches while a step
is captured, and NCCL's watchdog under torchrun go on as usual (in torch's default mode their CUDA calls would break the
capture). With ``cuda_graphs: auto`` a step whose capture fails runs eagerly from then on (one warning; the stream the
capture left current is given back); with ``true`` the failure is an error.  Under torchrun every rank replays the same
steps on its share of the global batch, and the ranks' gradients are averaged between two halves of each step, each
captured as a graph of its own (:class:`GradientAverage`): the first
(masks, forwards, backward) ends by packing this rank's weight gradients, with ``L(m) n``, ``L(m') n`` and ``n``, into
one flat buffer; the host then issues one ``all_reduce`` of that buffer (NCCL on GPUs, a launch that reads nothing
back); the second (the average installed as the gradients, gradient norm, score update from the global batch's
losses, SGD, Adam, projection, the meter) follows. So no collective is recorded in a graph, and a rank whose capture
failed still issues the same collectives as the others. The meter's reads sum the ranks' losses, correct counts and
examples (one all-reduce per read). The static steps bypass the run's DDP wrapper (whose all-reduces are issued from
the host inside the backward).

Where a run cannot be captured but the steps can still have static shapes (``sync_bn``, whose BatchNorm layers
all-gather statistics inside the forward; Adam on the weights; a BatchNorm with ``momentum=None``),
``cuda_graphs: auto`` runs these same steps eagerly (:func:`resolve_cuda_graphs`): fixed widths, so cuDNN keeps its
plans, and no host read inside a step.

Everything here also runs eagerly on any device (the CPU tests run it): ``capture=False`` calls the same step bodies
directly.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..cost import dense_step_flops, vrpge_step_flops
from ..sparse import kept_ratio
from ..sparse.static import (
    StaticExecutionState,
    StaticLayout,
    choose_capacities,
    mask_capacities,
    rechoose_capacities,
    use_static,
)
from ..vrpge import ChannelScores, score_grad
from .config import SPARSE_BACKWARD_METHODS, Config, SparsityConfig
from .steps import StepContext, _clip, _grad_norm
from .timing import DenseReference, synchronize

__all__ = ["NEW_WINDOW_WARMUP_STEPS", "WARMUP_STEPS", "DenseStep", "FixedMaskStep", "GradientAverage",
           "GraphedDenseReference", "GraphsChoice", "MeterWindow", "SearchStep", "StaticStep", "StaticSteps",
           "StepGraph", "resolve_cuda_graphs"]

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3
"""Eager steps on a side stream before a step kind is first captured (torch's CUDA-graph notes use 3): the optimizers
create their state, cuDNN its handles, and its benchmark mode picks kernels for the step's shapes."""
NEW_WINDOW_WARMUP_STEPS = 1
"""Eager steps before the search step of a later window is captured: the model, optimizers and streams are the ones
already captured, and one step lets cuDNN pick kernels for the new widths."""


# --- whether the run uses them ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphsChoice:
    """How the run's steps execute.

    Attributes:
        static: The static-shape steps of this module run (else the eager steps of ``steps.py``).
        capture: They are captured as CUDA graphs (else they run eagerly).
        strict: ``cuda_graphs: true``: a capture that fails is an error (else the step runs eagerly from then on).
        reason: Why they are not captured (or not static) where ``cuda_graphs: auto`` fell back.
    """

    static: bool
    capture: bool
    strict: bool = False
    reason: str = ""


def _blockers(cfg: Config, model: nn.Module | None) -> tuple[list[str], list[str]]:
    """What keeps a run from static steps at all, and what keeps them from being captured, in words (empty lists:
    nothing)."""
    static = []
    if cfg.method in SPARSE_BACKWARD_METHODS:
        static.append(f"method={cfg.method!r} picks its backward's units by top-k with data-dependent shapes in every "
                      f"step")
    capture = []
    if cfg.sync_bn:
        capture.append("sync_bn=true all-gathers BatchNorm statistics between ranks inside the forward")
    if cfg.optim.optimizer != "sgd":
        capture.append(f"optim.optimizer={cfg.optim.optimizer!r} is not the fused SGD whose learning rate lives on the "
                       f"device")
    if model is not None:
        cumulative = [n for n, m in model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None]
        if cumulative:
            capture.append(f"BatchNorm {cumulative[0]!r} has momentum=None (a cumulative average read on the host)")
    return static, capture


def resolve_cuda_graphs(cfg: Config, device: torch.device, model: nn.Module | None = None) -> GraphsChoice:
    """Resolve ``cfg.cuda_graphs`` for a run on ``device``: ``auto`` is on for CUDA devices when nothing in the run
    keeps its steps from being captured; ``true`` must be able to. Where ``auto`` cannot capture, the run still takes
    the static-shape steps (run eagerly: fixed widths, no host read inside a step) unless they cannot run either (the
    sparse-backward methods); one info line says which and why.

    Raises:
        ValueError: ``cuda_graphs: true`` on a device other than CUDA, or for a run that cannot be captured.
    """
    setting = cfg.cuda_graphs
    if setting is False:
        return GraphsChoice(False, False)
    if device.type != "cuda":
        if setting is True:
            raise ValueError(f"cuda_graphs=true needs a CUDA device; device resolves to '{device.type}'")
        return GraphsChoice(False, False)
    no_static, no_capture = _blockers(cfg, model)
    reasons = no_static + no_capture
    if reasons and setting is True:
        raise ValueError(f"cuda_graphs=true cannot capture this run: {reasons[0]}; expected cuda_graphs=auto or "
                         f"false")
    if no_static:
        logger.info("cuda_graphs=auto: eager steps, since %s", no_static[0])
        return GraphsChoice(False, False, reason=no_static[0])
    if no_capture:
        logger.info("cuda_graphs=auto: static-shape steps, run eagerly (not captured), since %s", no_capture[0])
        return GraphsChoice(True, False, reason=no_capture[0])
    return GraphsChoice(True, True, strict=setting is True)


# --- statistics accumulated on the device ----------------------------------------------------------------------------


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


# --- the ranks' gradients --------------------------------------------------------------------------------------------


class GradientAverage:
    """Under torchrun: the weight gradients of a static step averaged over the ranks between the step's two halves,
    with a few of the step's values summed alongside (module docstring).

    One flat buffer holds every parameter's gradient and then the values: :meth:`pack` (the end of the first half, on
    the device) writes this rank's into it, :meth:`all_reduce` (on the host, between the halves) sums it over the ranks
    in place with one collective, and :meth:`unpack` (the start of the second half) divides the gradients by the world
    size and installs views of the buffer as the parameters' ``.grad``, which the clipping and the optimizer then read.
    Each view has its parameter's strides (a channels_last weight gets a channels_last gradient, as autograd gives it,
    and as the fused optimizers require). The buffer never moves, so both halves can be captured as graphs, and the
    collective stays outside them.

    Args:
        parameters: The parameters the step trains (those that require a gradient are averaged; one dtype).
        values: How many step values ride along (summed, not averaged).
        world_size: The ranks the sum runs over.
    """

    def __init__(self, parameters: Iterator[Tensor] | list[Tensor], values: int, world_size: int) -> None:
        self.parameters = [p for p in parameters if p.requires_grad]
        dtypes = {p.dtype for p in self.parameters}
        if len(dtypes) != 1:
            raise ValueError(f"the gradient average needs parameters of one dtype; got {sorted(map(str, dtypes))}")
        self.world_size = world_size
        self._numel = sum(p.numel() for p in self.parameters)
        self.flat = torch.zeros(self._numel + values, dtype=dtypes.pop(), device=self.parameters[0].device)
        # Each gradient's slice laid out as its parameter (dense strides in the parameter's memory format).
        pieces = self.flat[:self._numel].split([p.numel() for p in self.parameters])
        self._grads = [piece.as_strided(p.shape, torch.empty_like(p, device="meta").stride())
                       for piece, p in zip(pieces, self.parameters)]
        self.values = self.flat[self._numel:]
        """The values of the last :meth:`all_reduce`, summed over the ranks."""

    def pack(self, values: list[Tensor] = ()) -> None:
        """This rank's gradients (after the backward) and ``values`` (scalars) into the buffer: a multi-tensor copy."""
        missing = [i for i, p in enumerate(self.parameters) if p.grad is None]
        if missing:  # a parameter the step did not use: DDP (find_unused_parameters=False) refuses it too
            raise RuntimeError(f"parameter {missing[0]} (of shape {tuple(self.parameters[missing[0]].shape)}) got no "
                               f"gradient in the step; every parameter the gradient average holds must")
        torch._foreach_copy_(self._grads, [p.grad for p in self.parameters])
        if values:
            self.values.copy_(torch.stack([v.detach().to(self.flat.dtype) for v in values]))

    def all_reduce(self) -> None:
        """The sum over the ranks, in place: one collective issued by the host (on a GPU it reads nothing back)."""
        dist.all_reduce(self.flat)

    def unpack(self) -> None:
        """The summed gradients divided by the world size, installed as the parameters' ``.grad``."""
        if self.world_size > 1:
            self.flat[:self._numel].div_(self.world_size)
        for p, grad in zip(self.parameters, self._grads):
            p.grad = grad


# --- capture ---------------------------------------------------------------------------------------------------------


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    """``ctx.autocast()`` without the cast cache: a captured graph must not keep casts of one replay for the next."""
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp_dtype is not None,
                          cache_enabled=False)


class _DeviceLearningRates:
    """The SGD learning rates as device tensors while a step is captured, refreshed from the schedule (which writes
    floats into the param groups) before each replay, so a replay steps with the current rate."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], device: torch.device) -> None:
        self.groups = [g for o in optimizers if isinstance(o, torch.optim.SGD) for g in o.param_groups]
        unfused = [g for g in self.groups if not g.get("fused")]
        if unfused:
            raise RuntimeError("an SGD param group is not fused; only the fused SGD reads its learning rate from the "
                               "device")
        self.tensors = [torch.zeros((), dtype=torch.float32, device=device) for _ in self.groups]

    def refresh(self) -> None:
        for tensor, group in zip(self.tensors, self.groups):
            tensor.fill_(float(group["lr"]))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        values = [g["lr"] for g in self.groups]
        for tensor, group in zip(self.tensors, self.groups):
            group["lr"] = tensor
        try:
            yield
        finally:
            for value, group in zip(values, self.groups):
                group["lr"] = value


class StepGraph:
    """Runs a step body eagerly, or (``capture``) as CUDA graphs captured after ``warmup`` eager steps: one graph, or
    under torchrun two (the halves before and after the gradient average, the collective between them issued by the
    host: :class:`GradientAverage`).

    Args:
        body: The step: a function of ``(images, labels)`` (device work only: no host read, no host-side state that a
            replay would skip). A body with an ``average`` (a :class:`StaticStep` under torchrun) runs in two halves,
            ``body.forward_backward(images, labels)`` and ``body.update()``, with ``average.all_reduce()`` between
            them.
        name: The step kind, for messages.
        device: Where it runs.
        capture: Capture it (CUDA only); else every call runs ``body`` directly.
        batch_size: The batch size the graph is captured for; other sizes run eagerly.
        optimizers: The optimizers ``body`` steps (their SGD learning rates go to the device while captured).
        strict: A failed capture raises (``cuda_graphs: true``) rather than falling back to eager steps.
        warmup: Eager steps on a side stream before the capture.
        fallback: A simpler body to capture instead if capturing ``body`` fails (tried first, before giving up).
    """

    def __init__(self, body: Callable[[Tensor, Tensor], None], name: str, device: torch.device, capture: bool,
                 batch_size: int, optimizers: list[torch.optim.Optimizer], strict: bool = False,
                 warmup: int = WARMUP_STEPS,
                 fallback: Callable[[], Callable[[Tensor, Tensor], None]] | None = None) -> None:
        self.body, self.name, self.device, self.fallback = body, name, device, fallback
        self.capture = capture and device.type == "cuda"
        self.batch_size, self.strict, self.warmup = batch_size, strict, warmup
        self.graphs: list[torch.cuda.CUDAGraph] = []  # the captured step: one graph, or its two halves
        self.captures = 0
        self.overhead_s = 0.0  # wall seconds of the eager warm-up steps and the capture (synchronised around them)
        self._inputs: tuple[Tensor, Tensor] | None = None
        self._warm = 0
        self._learning_rates: _DeviceLearningRates | None = None
        if self.capture:
            try:
                self._learning_rates = _DeviceLearningRates(optimizers, device)
            except RuntimeError as err:
                self._give_up(err, try_fallback=False)

    def _give_up(self, err: BaseException, try_fallback: bool = True) -> None:
        if try_fallback and self.fallback is not None:  # capture the simpler body next; this step runs it eagerly
            self.body, self.fallback, self._warm = self.fallback(), None, 0  # warmed up again before the capture
            logger.warning("the %s step could not be captured as a CUDA graph (%s: %s); capturing its simpler form "
                           "instead", self.name, type(err).__name__, err)
            return
        message = f"the {self.name} step cannot be captured as a CUDA graph ({type(err).__name__}: {err})"
        if self.strict:
            raise RuntimeError(f"{message}; set cuda_graphs=auto to fall back to eager steps, or false") from err
        logger.warning("%s; it runs eagerly", message)
        self.capture, self.graphs = False, []

    def _parts(self, images: Tensor, labels: Tensor) -> list[Callable[[], None]]:
        """The step as the pieces captured one graph each, in order; the gradient average runs after the first."""
        average = getattr(self.body, "average", None)
        if average is None:
            return [lambda: self.body(images, labels)]
        return [lambda: self.body.forward_backward(images, labels), self.body.update]

    def _between(self, part: int) -> None:
        """Host work after part ``part`` of the step (the ranks' collective after the first half, under torchrun)."""
        average = getattr(self.body, "average", None)
        if average is not None and part == 0:
            average.all_reduce()

    def _run(self, images: Tensor, labels: Tensor, start: int = 0) -> None:
        """The step's parts from ``start`` on, eagerly."""
        for i, part in enumerate(self._parts(images, labels)):
            if i >= start:
                part()
                self._between(i)

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        if not self.capture or images.shape[0] != self.batch_size:
            self._run(images, labels)
            return
        if self._inputs is None:
            self._inputs = (torch.empty_like(images), torch.empty_like(labels))
        static_images, static_labels = self._inputs
        if static_images.shape != images.shape or static_images.stride() != images.stride():
            self._run(images, labels)
            return
        static_images.copy_(images, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)
        if self.graphs:
            self._learning_rates.refresh()
            for i, graph in enumerate(self.graphs):
                graph.replay()
                self._between(i)
            return
        # The window's first steps: timed whole (they synchronise, once per window), for the run summary.
        torch.cuda.synchronize(self.device)
        started = perf_counter()
        try:
            self._warm_up_or_capture(static_images, static_labels)
        finally:
            torch.cuda.synchronize(self.device)
            self.overhead_s += perf_counter() - started

    def _warm_up_or_capture(self, static_images: Tensor, static_labels: Tensor) -> None:
        if self._warm < self.warmup:  # real steps, on a side stream as capture wants its warm-up
            self._warm += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._run(static_images, static_labels)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        graphs: list[torch.cuda.CUDAGraph] = []
        self._learning_rates.refresh()
        ambient = torch.cuda.current_stream(self.device)
        with self._learning_rates.installed():
            for i, part in enumerate(self._parts(static_images, static_labels)):
                graph = torch.cuda.CUDAGraph()
                try:  # the halves share one memory pool: the second reads what the first left (replayed in order)
                    # thread_local: only this thread's unsafe calls break the capture, not those of the loader's
                    # pin-memory thread (pinned buffers for the next batches) or of NCCL's watchdog under torchrun
                    with torch.cuda.graph(graph, pool=graphs[0].pool() if graphs else None,
                                          capture_error_mode="thread_local"):
                        part()
                except Exception as err:  # noqa: BLE001 - any capture failure: eager steps (auto) or one clear error
                    # A failed capture leaves the capture stream current (torch's graph context ends the capture
                    # first, and that raises before it restores the stream): the rest of the run goes back to ours.
                    torch.cuda.set_stream(ambient)
                    torch.cuda.synchronize(self.device)
                    self._give_up(err)
                    self._run(static_images, static_labels, start=i)  # the rest of the step, run for real
                    return
                graphs.append(graph)
                graph.replay()  # capture records without running: this replay is the step's part
                self._between(i)
        self.graphs = graphs
        self.captures += 1


# --- the step kinds --------------------------------------------------------------------------------------------------


class StaticStep:
    """A static step in two halves around the gradient average: :meth:`forward_backward` (to the backward, leaving
    what the rest needs) and :meth:`update` (the optimizer steps and the meter). Called, it runs both, with
    ``average``'s collective between them under torchrun; :class:`StepGraph` captures the whole call as one graph, or
    under torchrun each half as one."""

    average: GradientAverage | None = None

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        self.forward_backward(images, labels)
        if self.average is not None:
            self.average.all_reduce()
        self.update()

    def forward_backward(self, images: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def batches_counted_at_once(model: nn.Module) -> Iterator[None]:
    """Inside the block, the training forwards of ``model``'s BatchNorm layers leave their ``num_batches_tracked``
    alone (torch's layers add one to it each, one launch per layer on a GPU); once the block ends without an error,
    one multi-tensor add counts one batch in all of them: the counts torch's layers give for one forward, at one launch
    instead of one per layer. For layers with a momentum (with ``momentum=None`` the count sets the average and the
    layer keeps it) and without a process group (``sync_bn``, whose layers count in their own collective function;
    torch's ``nn.SyncBatchNorm`` likewise)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats and m.momentum is not None and m.num_batches_tracked is not None
             and getattr(m, "process_group", None) is None and not isinstance(m, nn.SyncBatchNorm)]
    counters = [m.num_batches_tracked for m in norms]
    for m in norms:
        m.num_batches_tracked = None  # torch's BatchNorm then takes its momentum and counts nothing
    try:
        yield
    finally:
        for m, counter in zip(norms, counters):
            m.num_batches_tracked = counter
    if counters:
        torch._foreach_add_(counters, 1)


class DenseStep(StaticStep):
    """One SGD step of a plain (or narrow) model: ``subnet_step`` without a mask, as a static body.

    Args:
        model: The model (train mode; not a DDP wrapper: under torchrun ``average`` averages the gradients).
        optimizer: Its optimizer.
        ctx: The run's step settings.
        meter: Where the step's statistics accumulate.
        before: Host work before each step (the narrow model copies the schedule's hyperparameters).
        average: Under torchrun, the gradient average between :meth:`forward_backward` and :meth:`update`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: StepContext, meter: DeviceMeter,
                 before: Callable[[], None] | None = None, average: GradientAverage | None = None) -> None:
        self.model, self.optimizer, self.ctx, self.meter, self.before = model, optimizer, ctx, meter, before
        self.average = average
        self._pass: tuple[Tensor, ...] = ()  # what the first half leaves the second (the same tensors in a graph)

    def subnetwork(self) -> contextlib.AbstractContextManager:
        """The subnetwork the step's forward runs: the whole model here, its BatchNorm layers counting the batch with
        one multi-tensor add (:func:`batches_counted_at_once`)."""
        return batches_counted_at_once(self.model)

    def forward_backward(self, images: Tensor, labels: Tensor) -> None:
        """The step's first half: forward, loss, backward (under torchrun, the gradients packed for the average)."""
        ctx = self.ctx
        # The backward's gradient tensors become the .grad (in the graph's memory when captured, rewritten by every
        # replay) instead of being added into zeroed ones: one launch per parameter fewer, as torch's whole-network
        # capture does it. Nothing outside the step reads .grad.
        self.optimizer.zero_grad(set_to_none=True)
        with self.subnetwork(), _autocast(ctx):
            logits = self.model(images)
            loss = ctx.criterion(logits.float(), labels)
        loss.backward()
        if self.average is not None:
            self.average.pack()
        self._pass = (loss.detach(), logits.detach(), labels)

    def update(self) -> None:
        """The step's second half: (the averaged gradients installed,) gradient norm, clipping, SGD, the meter."""
        if self.average is not None:
            self.average.unpack()
        loss, logits, labels = self._pass
        grad_norm = _grad_norm(self.model)
        _clip(self.ctx, self.model.parameters())
        self.optimizer.step()
        self.meter.add(loss, None, logits, labels, grad_norm)


class FixedMaskStep(DenseStep):
    """One SGD step of a fixed subnetwork through the full model at static capacities: the aligned kept counts
    (``mask_capacities``), so the mask never overflows; its buffers are written once.

    Args:
        model: The full model (train mode).
        optimizer: Its optimizer.
        mask: The subnetwork, ``{group: bool tensor}`` (any device).
        ctx: The run's step settings.
        meter: Where the step's statistics accumulate.
        average: Under torchrun, the gradient average between the step's halves.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mask: Mapping[str, Tensor],
                 ctx: StepContext, meter: DeviceMeter, average: GradientAverage | None = None) -> None:
        super().__init__(model, optimizer, ctx, meter, average=average)
        layout = StaticLayout(model, mask_capacities(mask, ctx.align), ctx.align)
        self.state = StaticExecutionState(layout)
        self.state.update(torch.cat([mask[g].reshape(-1) for g in layout.groups]).to(layout.device))
        self.kept_ratio = kept_ratio(dict(mask), layout.groups)

    @property
    def widths(self) -> dict[str, int]:
        return self.state.widths

    def subnetwork(self) -> contextlib.AbstractContextManager:
        return use_static(self.state)


class SearchStep(StaticStep):
    """One VR-PGE step at static capacities (``vrpge_step``'s math on the masks actually used; module docstring).

    Args:
        model: The full model (train mode; not a DDP wrapper).
        scores: Its keep probabilities, on the model's device.
        optimizers: ``(weight SGD, score Adam)``.
        sparsity: Estimator, ``alpha`` and ``weight_grad``.
        ctx: The run's step settings.
        capacities: ``{group: capacity}`` of this window.
        meter: Where the step's statistics accumulate.
        overlap: On CUDA, run the branch of ``m'`` on a side stream (with ``weight_grad: first``): its mask update
            and no-grad forward beside the forward of ``m`` (:attr:`m2_first`), then, once the forward of ``m`` is
            done, the commit of its BatchNorm statistics, the score update and the next step's ``m`` (when neither
            gradient clipping nor the sum over the ranks ties them to the backward: :meth:`_side_branch`,
            ``m_ahead``) beside the backward of ``m``. Neither branch
            reads what the other writes while both run (``m'`` defers its BatchNorm statistics and batch counts,
            which are added to the model's after ``m``'s: :attr:`StaticExecutionState.defers_statistics`), so the
            results are those of running them in turn, ``m`` first; at CIFAR scale their kernels are too small to
            fill the GPU, and a captured graph runs the two branches at once. ``False``: one stream, in the same
            order.
        average: Under torchrun, the gradient average between :meth:`forward_backward` and :meth:`update`, which also
            sums ``L(m) n``, ``L(m') n`` and ``n``: the score update reads the losses of the global batch.
        m2_first: Run the forward of ``m'`` first where the step can (:attr:`m2_first`); ``False``: after the forward
            of ``m`` (the schedule before deferred statistics, for comparison: ``tools/bench_graphs.py``).
        m_ahead: Each step prepares the next step's ``m`` (:attr:`state_next`) right after its projection of the
            scores, from which that mask is drawn: on CUDA at the end of the side stream, beside the backward, so
            that the main stream starts the next forward at once (a copy of the buffers,
            :meth:`StaticExecutionState.take`) instead of after a mask update of some forty kernels. The same masks
            as drawing ``m`` at the start of its step, which ``False`` does (for comparison: ``tools/bench_graphs.py``)
            and which the step does where its score update follows the backward (gradient clipping, torchrun,
            ``weight_grad: both``: :attr:`m_ahead`).
        next_uniforms: With ``m_ahead``, the uniforms of the first step's ``m`` (drawn for it by the window before, or
            kept in a checkpoint); ``None``: :meth:`prepare` draws them before the first step.

    Attributes:
        uniforms: ``(2, channels)`` buffer of the uniforms the masks are drawn from, :attr:`m_row` those of ``m``
            (with ``m_ahead`` the next step's), the other row those of this step's ``m'``; :meth:`prepare` refills it
            before each step (outside a captured graph). Between steps the row of ``m`` holds the uniforms of the
            ``m`` :attr:`state_next` holds (:attr:`next_uniforms`). Each mask's uniforms are one draw of their own from
            the generator, in the order the masks are used, so that every mask gets the same uniforms in both
            schedules, on any device (a CUDA generator's draws depend on how they are split into calls): with
            ``m_ahead`` those of the first ``m`` are drawn alone, and each step then draws those of its ``m'`` (row
            0) and of the next ``m`` (row 1); without, those of its ``m`` (row 0) and of its ``m'`` (row 1).
        m_row: The row of :attr:`uniforms` that ``m`` is drawn from: 1 with ``m_ahead``, else 0.
        budget: The budget the step projects its updated scores onto (a device scalar :meth:`prepare` writes the
            scores' current budget into: an annealed budget changes every step).
        state_m, state_m2: The static execution states of ``m`` and ``m'`` (one layout).
        state_next: With ``m_ahead``, the next step's ``m``, prepared by this step (the same layout).
        m_ahead: Whether this step prepares the next one's ``m``: the argument, where the score update runs beside the
            backward.
        m2_first: Whether the forward of ``m'`` runs before (on CUDA: beside) that of ``m``, its BatchNorm statistics
            deferred. Not with ``weight_grad: both`` (each mask's backward in turn), ``sync_bn`` (whose layers move
            their statistics inside their collectives), or BatchNorm layers the layout cannot defer (momenta that
            differ or are ``None``: :attr:`StaticLayout.can_defer_statistics`); then ``m'`` follows ``m``'s forward.
    """

    def __init__(self, model: nn.Module, scores: ChannelScores,
                 optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], sparsity: SparsityConfig,
                 ctx: StepContext, capacities: Mapping[str, int], meter: DeviceMeter, overlap: bool = True,
                 average: GradientAverage | None = None, *, m2_first: bool = True, m_ahead: bool = True,
                 next_uniforms: Tensor | None = None) -> None:
        self.model, self.scores, self.optimizers, self.sparsity, self.ctx, self.meter = (
            model, scores, optimizers, sparsity, ctx, meter)
        self.average = average
        # Without gradient clipping (which takes one norm over the weights' and the scores' gradients) the score
        # update reads the two losses and masks only: it runs beside m's backward, after the forward of m'. Under
        # torchrun it reads the losses of the global batch, summed with the gradients after the backward.
        self.scores_apart = (sparsity.weight_grad == "first" and ctx.clip_grad_norm is None and average is None)
        self._pass: tuple[Tensor, ...] = ()  # what the first half leaves the second (the same tensors in a graph)
        layout = StaticLayout(model, capacities, ctx.align)
        overlap = overlap and layout.device.type == "cuda" and sparsity.weight_grad == "first"
        self.side_stream = torch.cuda.Stream(layout.device) if overlap else None
        if layout.device != scores.scores.device:
            raise ValueError(f"the scores are on {scores.scores.device}, the model on {layout.device}; a static search "
                             f"step samples on the model's device")
        self.state_m, self.state_m2, self.state_next = (StaticExecutionState(layout) for _ in range(3))
        # m' first (class docstring): its forward does not wait for m's, whose BatchNorm statistics it would otherwise
        # have to follow; its own are added after m's (deferred).
        synchronised = any(getattr(m, "process_group", None) is not None for m in model.modules())
        self.m2_first = (m2_first and sparsity.weight_grad == "first" and layout.can_defer_statistics
                         and not synchronised)
        self.state_m2.defers_statistics = self.m2_first
        s = scores.scores
        self.uniforms = torch.zeros(2, s.numel(), dtype=s.dtype, device=s.device)
        self.budget = torch.zeros((), dtype=s.dtype, device=s.device)
        # The next m prepared beside the backward where the score update is (without clipping or ranks); elsewhere it
        # would follow the backward on the main stream anyway, one copy of the buffers later.
        self.m_ahead = m_ahead and self.scores_apart
        self.m_row = 1 if self.m_ahead else 0
        self._first_uniforms = next_uniforms
        self._started = not self.m_ahead
        if s.grad is None:  # written in place by every step (a captured graph writes the same tensor)
            s.grad = torch.zeros_like(s)

    @property
    def widths(self) -> dict[str, int]:
        return self.state_m.widths

    def prepare(self, generator: torch.Generator) -> None:
        """Before each step, outside a captured graph: draw its uniforms into :attr:`uniforms` (a draw for each row)
        and write the scores' budget into :attr:`budget` (three launches, on the device, no host read). Before the
        first step, also prepare its ``m`` from the uniforms given for it (``next_uniforms``), else from new ones."""
        if not self._started:
            if self._first_uniforms is None:
                self.uniforms[self.m_row].uniform_(generator=generator)
            else:
                self.uniforms[self.m_row].copy_(self._first_uniforms)
            self._prepare_next()
            self._started = True
        for row in self.uniforms:
            row.uniform_(generator=generator)
        self.budget.fill_(self.scores.budget)

    @property
    def next_uniforms(self) -> Tensor | None:
        """Between steps, the uniforms of the next step's ``m`` (a view of :attr:`uniforms`; ``None`` before the first
        step when none were given, or without ``m_ahead``): what a later window or a resumed run prepares it from."""
        if not self.m_ahead:
            return None
        return self.uniforms[self.m_row] if self._started else self._first_uniforms

    def _prepare_next(self) -> None:
        """The next step's ``m`` from the current scores and its row of :attr:`uniforms`, into
        :attr:`state_next` (its overflow counted when a step takes it)."""
        u = self.uniforms[self.m_row]
        self.state_next.update(self.scores.mask_from_uniforms(u), u)

    def forward_backward(self, images: Tensor, labels: Tensor) -> None:
        """The step's first half: ``m`` taken from :attr:`state_next` (with ``m_ahead``; else drawn) and ``m'`` drawn
        into their buffers, the forward of ``m'`` and the forward and backward of ``m`` (and, apart from the backward,
        the score update and the next ``m``); under torchrun the gradients and losses packed for the average."""
        if self.m_ahead:
            self.state_m.take(self.state_next)  # m, prepared by the step before (before the side stream forks)
        if self.sparsity.weight_grad == "both":  # the official code's cost: a backward of each mask, in turn
            logits, loss_m = self._forward_m(images, labels)
            (loss_m * 0.5).backward()
            loss_m2 = self._forward_m2(images, labels, grad=True)
            (loss_m2 * 0.5).backward()
        else:  # m' (no grad) on the side stream, if any, beside m's forward (m' first) and backward on this one
            main = torch.cuda.current_stream(images.device) if self.side_stream is not None else None
            if main is not None:
                self.side_stream.wait_stream(main)
            loss_m2 = None
            if self.m2_first:
                self.state_m2.discard_statistics()  # left pending only by a step that failed (a capture that raised)
                with self._on_side():
                    loss_m2 = self._forward_m2(images, labels, grad=False)
            logits, loss_m = self._forward_m(images, labels)
            if main is not None:
                self.side_stream.wait_stream(main)  # after m's forward: its statistics written back, L(m) computed
            with self._on_side():
                loss_m2 = self._side_branch(images, labels, loss_m, loss_m2)
            loss_m.backward()
            if main is not None:
                main.wait_stream(self.side_stream)
        loss_m, loss_m2 = loss_m.detach(), loss_m2.detach()
        if self.average is not None:
            n = labels.shape[0]
            self.average.pack([loss_m * n, loss_m2 * n, loss_m.new_full((), n)])
        self._pass = (loss_m, loss_m2, logits.detach(), labels)

    def update(self) -> None:
        """The step's second half: (the averaged gradients installed,) gradient norm, the score gradient and
        clipping, SGD on the weights, Adam on the scores and their projection (unless done apart), the meter."""
        loss_m, loss_m2, logits, labels = self._pass
        gap = None
        if self.average is not None:  # L(m) and L(m') of the global batch
            self.average.unpack()
            summed = self.average.values
            pair = (summed[0] / summed[2], summed[1] / summed[2])
            gap = (pair[0] - pair[1]).abs()
        else:
            pair = (loss_m, loss_m2)
        grad_norm = _grad_norm(self.model)
        if not self.scores_apart:
            self._score_gradient(*pair)
            _clip(self.ctx, [*self.model.parameters(), self.scores.scores])
        self.optimizers[0].step()
        if not self.scores_apart:
            self._score_update()
        used_m = self.state_m.mask_used
        self.meter.add(loss_m, loss_m2, logits, labels, grad_norm, used_m.sum() / used_m.numel(), gap)

    def _on_side(self) -> contextlib.AbstractContextManager:
        """Where the branch of ``m'`` runs: the side stream, if any."""
        return torch.cuda.stream(self.side_stream) if self.side_stream is not None else contextlib.nullcontext()

    def _side_branch(self, images: Tensor, labels: Tensor, loss_m: Tensor, loss_m2: Tensor | None) -> Tensor:
        """What runs beside the backward of ``m`` (on the side stream on CUDA), after the forward of ``m``: the
        forward of ``m'`` unless it ran already (``loss_m2``; then its statistics are added to the model's now), then,
        unless gradient clipping or the sum over the ranks ties them to the backward, the scores' gradient, Adam step
        and projection. Returns ``L(m')``."""
        if loss_m2 is None:
            loss_m2 = self._forward_m2(images, labels, grad=False)
        self.state_m2.commit_statistics()
        if self.scores_apart:
            self._score_gradient(loss_m, loss_m2)
            self._score_update()
        return loss_m2

    def _score_gradient(self, loss_m: Tensor, loss_m2: Tensor) -> None:
        """Supplement eq. (12) on the masks actually used (an overflow cut is part of the sampled subnetwork), into
        the scores' ``.grad``."""
        s = self.scores.scores
        with torch.no_grad():
            s.grad.copy_(score_grad(self.sparsity.estimator, loss_m.detach(), loss_m2.detach(),
                                    self.state_m.mask_used, self.state_m2.mask_used, s.detach(),
                                    alpha=self.sparsity.alpha))

    def _score_update(self) -> None:
        """Adam on the scores, then their projection onto the next step's budget (as ``vrpge_step``), and the next
        step's ``m`` drawn from them."""
        self.optimizers[1].step()
        self.scores.project_(self.budget)
        if self.m_ahead:
            self._prepare_next()

    def one_stream(self) -> SearchStep:
        """This step with its side branch (the mask update and forward of ``m'``, the commit of its statistics, the
        score update, the next ``m``) back on the main stream, in the same order (if capturing two streams fails)."""
        self.side_stream = None
        return self

    def _forward_m(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The weights' gradients set to ``None`` (as :class:`DenseStep`: the backward's gradients become the
        ``.grad``), and the forward of ``m`` (written into its buffers first without ``m_ahead``): ``(logits,
        L(m))``."""
        if not self.m_ahead:
            u_m = self.uniforms[self.m_row]
            self.state_m.update(self.scores.mask_from_uniforms(u_m), u_m)
        self.optimizers[0].zero_grad(set_to_none=True)
        with use_static(self.state_m), _autocast(self.ctx):
            logits = self.model(images)
            return logits, self.ctx.criterion(logits.float(), labels)

    def _forward_m2(self, images: Tensor, labels: Tensor, grad: bool) -> Tensor:
        """L(m'): the second mask written into its buffers, then its forward."""
        u_m2 = self.uniforms[1 - self.m_row]
        self.state_m2.update(self.scores.mask_from_uniforms(u_m2), u_m2)
        with torch.set_grad_enabled(grad), use_static(self.state_m2), _autocast(self.ctx):
            return self.ctx.criterion(self.model(images).float(), labels)


# --- the run's steps -------------------------------------------------------------------------------------------------


@dataclass
class StaticStepResult:
    """What the host knows of one static step without reading the device.

    Attributes:
        count: Examples in the batch (the global batch under torchrun).
        flops: Train FLOPs the step cost (supplement C.1) at the widths computed (the capacities).
        dense_flops: Train FLOPs of a dense step on the same batch.
    """

    count: int
    flops: int
    dense_flops: int


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool = True) -> None:
    """Make an Adam (the scores') capturable in place, its step counts on the parameters' device, or (``False``) not,
    its step counts on the host as torch keeps them. Capturable only for parameters on CUDA (torch refuses it
    elsewhere; nothing is captured there); fused there, captured or not: one kernel for the step (and one for the step
    count), where the capturable multi-tensor Adam launches about fifteen, on the side stream's path beside the
    backward. Called after every load too: a checkpoint's param groups bring the flags of the run that saved it, and
    a run captured on a GPU may resume where nothing is captured."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            continue
        on_cuda = all(p.device.type == "cuda" for p in group["params"])
        group["capturable"] = capturable and on_cuda
        if "fused" in group:  # Adam: fused on CUDA (its kernel reads no host value, so it may be captured)
            group["fused"] = on_cuda
        for param in group["params"]:  # step counts on the device where capturable or fused, else on the host
            step = optimizer.state.get(param, {}).get("step")
            device = param.device if on_cuda and (group["capturable"] or group.get("fused")) else torch.device("cpu")
            if isinstance(step, Tensor) and step.device != device:
                optimizer.state[param]["step"] = step.to(device, torch.float32)


class StaticSteps:
    """The run's static steps: one per kind and window, each a :class:`StepGraph`, the device meter, the sampling
    generator and the capacity windows of the search. The steps take the models themselves, never a DDP wrapper:
    under torchrun they average the gradients over the ranks themselves (:class:`GradientAverage`).

    Args:
        cfg: The run configuration.
        ctx: The run's step settings (with ``reduce_stats`` under torchrun).
        choice: From :func:`resolve_cuda_graphs` (``capture=False``: the same steps, eagerly).
        seed: Seeds the device generator the search's uniforms come from.
        overlap: Search steps run the branch of ``m'`` on a side stream on CUDA (:class:`SearchStep`).
        m2_first: Search steps run the forward of ``m'`` first where they can (:class:`SearchStep`).
        m_ahead: Search steps prepare the next step's ``m`` beside their backward (:class:`SearchStep`).
        world_size: Processes under torchrun, each with an equal share of the global batch (train FLOPs count the
            global batch, as the eager steps do).
    """

    def __init__(self, cfg: Config, ctx: StepContext, choice: GraphsChoice, seed: int, overlap: bool = True,
                 world_size: int = 1, m2_first: bool = True, m_ahead: bool = True) -> None:
        self.cfg, self.ctx, self.choice, self.overlap, self.world_size = cfg, ctx, choice, overlap, world_size
        self.m2_first, self.m_ahead = m2_first, m_ahead
        self.generator = torch.Generator(device=ctx.device).manual_seed(seed)
        self.meter = DeviceMeter(ctx.device, ctx.reduce_stats)
        self.capacities: dict[str, int] | None = None
        self.windows = 0
        self.shapes: set[tuple[int, ...]] = set()
        self.overflow_steps = 0
        self.overflow_channels: dict[str, int] = {}
        self.captures = 0
        self.overhead_s = 0.0
        self._search: tuple[SearchStep, StepGraph] | None = None
        self._search_captured = False  # a search step was captured in this process (later windows warm up less)
        self._next_uniforms: Tensor | None = None  # those of the next search step's m, from an ended window
        self._other: tuple[tuple, Any, StepGraph] | None = None
        self._flops: dict[tuple, int] = {}

    # --- steps

    @property
    def batch_size(self) -> int:
        """The examples of this process's steps: its share of the global batch (the size a graph is captured for)."""
        return self.cfg.data.batch_size // self.world_size

    def _graph(self, body: Callable[[Tensor, Tensor], None], name: str, optimizers: list[torch.optim.Optimizer],
               fallback: Callable[[], Callable[[Tensor, Tensor], None]] | None = None,
               warmup: int = WARMUP_STEPS) -> StepGraph:
        return StepGraph(body, name, self.ctx.device, self.choice.capture, self.batch_size, optimizers,
                         self.choice.strict, warmup, fallback)

    def _average(self, model: nn.Module, values: int) -> GradientAverage | None:
        """Under torchrun (the step statistics are summed over the ranks), the gradient average of ``model``'s
        steps."""
        if isinstance(model, nn.parallel.DistributedDataParallel):  # its backward would average them a second time
            raise TypeError("the static steps average the ranks' gradients themselves; pass the model, not its DDP "
                            "wrapper")
        if self.ctx.reduce_stats is None:
            return None
        return GradientAverage(model.parameters(), values, self.world_size)

    def _retire(self, graph: StepGraph | None) -> None:
        if graph is not None:
            self.captures += graph.captures
            self.overhead_s += graph.overhead_s

    def search(self, model: nn.Module, scores: ChannelScores,
               optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer], batch: tuple[Tensor, Tensor]
               ) -> StaticStepResult:
        """One search step (the scores projected in it onto their current budget)."""
        if self._search is None:
            if self.capacities is None:
                self.capacities = choose_capacities(scores, self.ctx.align, self.cfg.sparsity.capacity_quantile)
            body = SearchStep(model, scores, optimizers, self.cfg.sparsity, self.ctx, self.capacities, self.meter,
                              self.overlap, self._average(model, 3), m2_first=self.m2_first,
                              m_ahead=self.m_ahead, next_uniforms=self._next_uniforms)

            def one_stream() -> SearchStep:  # capturing two streams failed: one stream, in later windows too
                self.overlap = False
                return body.one_stream()

            fallback = one_stream if body.side_stream is not None else None
            warmup = NEW_WINDOW_WARMUP_STEPS if self._search_captured else WARMUP_STEPS
            self._search = (body, self._graph(body, "search", list(optimizers), fallback, warmup))
            self.windows += 1
            self.shapes.add(tuple(self.capacities.values()))
        body, graph = self._search
        body.prepare(self.generator)
        graph(*batch)
        self.meter.add_host(batch[1].shape[0], pair=True, kept=None)
        n = batch[1].shape[0] * self.world_size
        key = ("search", n, *body.widths.values())
        if key not in self._flops:
            f = self.ctx.cost.flops(body.widths, n)
            self._flops[key] = int(vrpge_step_flops(f, f, self.cfg.sparsity.weight_grad))
        return StaticStepResult(n, self._flops[key], self._dense_flops(n))

    def plain(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor],
              mask: Mapping[str, Tensor] | None = None, narrow: Any = None) -> StaticStepResult:
        """One step of the dense model (``mask`` and ``narrow`` ``None``), of a narrow model (``narrow``: its
        :class:`~maskprop.train.narrow.NarrowSubnetwork`; ``model`` and ``optimizer`` are its), or of the fixed
        subnetwork ``mask`` through the full model."""
        key = (id(model), id(optimizer), None if mask is None else id(mask))
        if self._other is None or self._other[0] != key:
            if self._other is not None:
                self._retire(self._other[2])
            if mask is not None:
                body: Any = FixedMaskStep(model, optimizer, mask, self.ctx, self.meter, self._average(model, 0))
                name = "fixed-mask"
            else:
                body = DenseStep(model, optimizer, self.ctx, self.meter,
                                 None if narrow is None else narrow.sync_hyperparameters, self._average(model, 0))
                name = "narrow" if narrow is not None else "dense"
            self._other = (key, body, self._graph(body, name, [optimizer]))
        _, body, graph = self._other
        if getattr(body, "before", None) is not None:
            body.before()
        graph(*batch)
        n = batch[1].shape[0] * self.world_size
        if mask is not None:
            kept, f = body.kept_ratio, self.ctx.cost.flops(body.widths, n)
        elif narrow is not None:
            kept, f = narrow.kept_ratio(), self.ctx.cost.flops(narrow.widths, n)
        else:
            kept, f = 1.0, self.ctx.cost.flops(None, n)
        self.meter.add_host(batch[1].shape[0], pair=False, kept=kept)
        return StaticStepResult(n, int(dense_step_flops(f)), self._dense_flops(n))

    def _dense_flops(self, n: int) -> int:
        key = ("dense", n)
        if key not in self._flops:
            self._flops[key] = int(dense_step_flops(self.ctx.cost.flops(None, n)))
        return self._flops[key]

    def end_search(self) -> None:
        """Drop the search step and its graph (the window or the phase is over: its memory goes back), keeping the
        uniforms its next ``m`` was drawn from for the next window. Its overflow counters go with it: :meth:`read`
        first (as :meth:`read` itself does at a window change, and the trainer at the end of each epoch)."""
        if self._search is not None:
            self._next_uniforms = self._pending_uniforms()
            self._retire(self._search[1])
            self._search_captured = self._search_captured or self._search[1].captures > 0
        self._search = None

    def _pending_uniforms(self) -> Tensor | None:
        """The uniforms of the next search step's ``m`` (a copy), if drawn."""
        live = self._next_uniforms if self._search is None else self._search[0].next_uniforms
        return None if live is None else live.clone()

    # --- reads (every N steps, outside the steps)

    def read(self, scores: ChannelScores | None = None) -> MeterWindow:
        """The statistics since the last read, with the overflow counters, in one transfer; then, with ``scores``
        during a search, the capacities re-chosen (one read of the scores): a change starts a new window."""
        states = [] if self._search is None else [self._search[0].state_m, self._search[0].state_m2]
        extra = [t for state in states for t in (state.overflow_steps, state.overflow_channels)]
        window, values = self.meter.read(extra)
        if states:
            groups = list(states[0].layout.groups)
            per_state = 1 + len(groups)
            for i, state in enumerate(states):
                chunk = values[i * per_state:(i + 1) * per_state]
                window.overflow_steps += int(chunk[0])
                for g, cut in zip(groups, chunk[1:]):
                    window.overflow_channels[g] = window.overflow_channels.get(g, 0) + int(cut)
                state.overflow_steps.zero_()
                state.overflow_channels.zero_()
        self.overflow_steps += window.overflow_steps
        for g, cut in window.overflow_channels.items():
            self.overflow_channels[g] = self.overflow_channels.get(g, 0) + cut
        if scores is not None and self.capacities is not None:
            update = rechoose_capacities(self.capacities, scores, self.ctx.align,
                                          self.cfg.sparsity.capacity_quantile)
            if update.changed:
                self.capacities = update.capacities
                self.end_search()  # the next search step builds the new window
        return window

    def _totals(self) -> tuple[int, float]:
        """Graph captures and seconds of window warm-up and capture so far, the live graphs' included."""
        live = [g for g in (None if self._search is None else self._search[1],
                            None if self._other is None else self._other[2]) if g is not None]
        return (self.captures + sum(g.captures for g in live),
                self.overhead_s + sum(g.overhead_s for g in live))

    def report(self) -> dict[str, Any]:
        """For the run summary: how the steps ran (and why not captured, where ``cuda_graphs: auto`` could not), the
        capacity windows met, the overflows, and the wall seconds of the windows' eager warm-up steps and captures
        (``warmup_capture_s``; the measured speedup compares replayed steps and leaves them out)."""
        captures, overhead_s = self._totals()
        return {"captured": self.choice.capture, "not_captured_because": self.choice.reason or None,
                "graph_captures": captures, "search_windows": self.windows,
                "search_shapes": len(self.shapes), "overflow_steps": self.overflow_steps,
                "overflow_channels": sum(self.overflow_channels.values()),
                "warmup_capture_s": round(overhead_s, 3),
                "capacities": None if self.capacities is None else dict(self.capacities)}

    # --- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: the generator, the uniforms drawn for the next search step's
        ``m``, the current capacities (re-choices have hysteresis) and the counts of the report."""
        captures, overhead_s = self._totals()
        pending = self._pending_uniforms()
        return {"generator": self.generator.get_state(), "next_uniforms": None if pending is None else pending.cpu(),
                "capacities": self.capacities, "windows": self.windows,
                "shapes": [list(s) for s in sorted(self.shapes)], "overflow_steps": self.overflow_steps,
                "overflow_channels": dict(self.overflow_channels), "captures": captures, "overhead_s": overhead_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        pending = state.get("next_uniforms")  # (not in the checkpoints of earlier versions: drawn anew)
        self._next_uniforms = None if pending is None else pending.to(self.ctx.device)
        self.capacities = None if state["capacities"] is None else dict(state["capacities"])
        self.windows = int(state["windows"])
        self.shapes = {tuple(s) for s in state["shapes"]}
        self.overflow_steps = int(state["overflow_steps"])
        self.overflow_channels = dict(state["overflow_channels"])
        self.captures = int(state.get("captures", 0))
        self.overhead_s = float(state.get("overhead_s", 0.0))
        self._search = self._other = None


class GraphedDenseReference(DenseReference):
    """The dense reference steps (``timing.py``) as a captured dense step, so that the measured speedup compares
    graphed steps with graphed steps. The first call runs the warm-up and the capture untimed."""

    def __init__(self, *args: Any, strict: bool = False, batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._meter = DeviceMeter(self.ctx.device)  # never read: the reference's statistics are not the run's
        self._step = StepGraph(DenseStep(self._model, self._optimizer, self.ctx, self._meter), "dense reference",
                               self.ctx.device, True, batch_size, [self._optimizer], strict)

    def time_step(self, batch: tuple[Tensor, Tensor], times: Any) -> float:
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        started = perf_counter()
        with torch.random.fork_rng(devices=devices):
            if not self._warm:
                self._warm = True
                for _ in range(self._step.warmup + 1):
                    self._step(*batch)
            synchronize(self.ctx.device)
            start = perf_counter()
            self._step(*batch)
            synchronize(self.ctx.device)
            seconds = perf_counter() - start
        times.overhead_s += perf_counter() - started
        return seconds
