"""Static-shape training steps, each captured as one CUDA graph (two or three under torchrun) and replayed
(``cuda_graphs``).

How a step runs on a GPU. The eager steps of ``steps.py`` give every search step the widths of its own masks: new
shapes, index sets built on the host and a read of every mask and loss, so a GPU spends most of a step waiting for the
host to launch its thousands of small kernels. With ``cuda_graphs`` on, every step kind runs with shapes fixed in
advance instead, and is recorded once as a CUDA graph that the GPU then replays with one launch per step:

* a **search step** (:class:`SearchStep`) computes each group at a *capacity* (:mod:`maskprop.sparse.static`), chosen
  from the keep probabilities for a window of steps. Before each replay the host asks the device for fresh uniforms
  ``u`` (from the run's device generator into a fixed buffer, one draw a mask: the next step's ``m`` and ``m'``, or
  where the score update follows the backward, this step's) and writes the step's budget into a device scalar (an
  annealed budget changes every step); inside the graph the masks are ``m = u < s`` (with
  :class:`~maskprop.vrpge.ChannelScores`'s empty-group rule, all on the device), both written into the static execution
  states in place with one mask update, then come the no-grad forward of ``m'``, the forward and backward of ``m``, the
  VR-PGE score gradient from the loss difference as a device tensor and the masks actually used, gradient clipping, SGD
  on the weights, Adam (``capturable``, fused) on the scores and their projection onto the budget (exact, with a fixed
  sequence of kernels: :func:`~maskprop.vrpge.project_scores`). On CUDA, with ``weight_grad: first``, the branch of
  ``m'`` runs on a second stream: its forward beside the forward of ``m``, then (once ``m``'s forward is done) its
  BatchNorm statistics, the score update and the next step's ``m`` and ``m'`` (drawn from the projected scores with
  uniforms the host drew for them one step early) beside ``m``'s backward, so that a replay runs the two at once and the
  next replay starts its forwards after one copy of those masks' buffers (:class:`SearchStep`).
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
optimizers create their state), then the next step is captured and replayed, and every later step is a replay; a later
window of the search needs only ``NEW_WINDOW_WARMUP_STEPS`` eager step (new widths, nothing else new). Each batch is
copied into fixed input buffers first; a batch of another size runs eagerly (the trainer's loaders drop an epoch's
partial last batch: none occurs in a run). Gradients are set to ``None`` before each backward (its gradient tensors
become the ``.grad``, in the graph's memory, as in torch's whole-network capture), autocast runs without its cache, the
weight SGD is fused with its learning rate in a device tensor refreshed from the schedule before each replay, and the
score Adam is ``capturable`` and fused. A capture restricts this thread alone (``capture_error_mode="thread_local"``):
the data loader's pin-memory thread, which pins the next batches while a step is captured, and NCCL's watchdog under
torchrun go on as usual (in torch's default mode their CUDA calls would break the capture). With ``cuda_graphs: auto`` a
step whose capture fails runs eagerly from then on (one warning; the stream the capture left current is given back);
with ``true`` the failure is an error. Under torchrun every rank replays the same steps on its share of the global
batch, and the ranks' gradients are averaged between pieces of each step, each piece captured as a graph of its own
(:class:`~maskprop.train.static_steps.GradientAverage`). A search step is three pieces: the first (masks, both forwards)
ends by packing ``L(m) n``, ``L(m') n`` and ``n`` into a flat buffer, which the host sums over the ranks with one
``all_reduce`` (NCCL on GPUs, a launch that reads nothing back); the second runs the backward and, beside it on the side
stream as in one process, the score update from the global batch's losses and the next masks, and packs this rank's
weight gradients into the same buffer, summed by a second ``all_reduce``; the third (the average installed as the
gradients, gradient norm, SGD, the meter) follows. The plain steps, and a search step whose score update needs the
gradients (clipping) or runs after both backwards, are two halves around one ``all_reduce`` of the gradients (and a
search step's losses: :meth:`~maskprop.train.static_steps.StaticStep.pieces`). So no collective is recorded in a graph,
and a rank whose capture failed still issues the same collectives as the others. The meter's reads sum the ranks'
losses, correct counts and examples (one all-reduce per read). The static steps bypass the run's DDP wrapper (whose
all-reduces are issued from the host inside the backward).

Where a run cannot be captured but the steps can still have static shapes (``sync_bn``, whose BatchNorm layers
all-gather statistics inside the forward; Adam on the weights; a BatchNorm with ``momentum=None``),
``cuda_graphs: auto`` runs these same steps eagerly (:func:`resolve_cuda_graphs`): fixed widths, so cuDNN keeps its
plans, and no host read inside a step.

Everything here also runs eagerly on any device (the CPU tests run it): ``capture=False`` calls the same step bodies
directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import dense_step_flops, vrpge_step_flops
from ..sparse.static import choose_capacities, rechoose_capacities
from ..vrpge import ChannelScores
from .config import SPARSE_BACKWARD_METHODS, Config
from .meter import DeviceMeter, MeterWindow
from .static_steps import DenseStep, FixedMaskStep, GradientAverage, SearchStep
from .steps import StepContext
from .timing import DenseReference, synchronize

__all__ = ["NEW_WINDOW_WARMUP_STEPS", "WARMUP_STEPS", "GraphedDenseReference", "GraphsChoice", "StaticStepResult",
           "StaticSteps", "StepGraph", "resolve_cuda_graphs", "set_capturable"]

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


# --- capture ---------------------------------------------------------------------------------------------------------


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


def _reason(err: BaseException) -> str:
    """What made a capture fail: ``err``, and the error it was raised in the handling of, where there is one (a step
    that raises inside the capture makes torch's end of the capture raise too, with a message of its own)."""
    first = err.__context__ if err.__context__ is not None and err.__context__ is not err else None
    text = f"{type(err).__name__}: {err}"
    return text if first is None else f"{text}; first {type(first).__name__}: {first}"


class StepGraph:
    """Runs a step body eagerly, or (``capture``) as CUDA graphs captured after ``warmup`` eager steps: one graph, or
    under torchrun one per piece of the step (the ranks' collectives between them issued by the host:
    :class:`~maskprop.train.static_steps.GradientAverage`).

    Args:
        body: The step: a function of ``(images, labels)`` (device work only: no host read, no host-side state that a
            replay would skip). A body with an ``average`` (a :class:`~maskprop.train.static_steps.StaticStep` under
            torchrun) runs in its pieces, ``body.pieces(images, labels)``, with ``body.between(i)`` after each.
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
        self.graphs: list[torch.cuda.CUDAGraph] = []  # the captured step: one graph, or one a piece
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
        reason = _reason(err)
        if try_fallback and self.fallback is not None:  # capture the simpler body next; this step runs it eagerly
            self.body, self.fallback, self._warm = self.fallback(), None, 0  # warmed up again before the capture
            logger.warning("the %s step could not be captured as a CUDA graph (%s); capturing its simpler form "
                           "instead", self.name, reason)
            return
        message = f"the {self.name} step cannot be captured as a CUDA graph ({reason})"
        if self.strict:
            raise RuntimeError(f"{message}; set cuda_graphs=auto to fall back to eager steps, or false") from err
        logger.warning("%s; it runs eagerly", message)
        self.capture, self.graphs = False, []

    def _parts(self, images: Tensor, labels: Tensor) -> list[Callable[[], None]]:
        """The step as the pieces captured one graph each, in order: the whole step, or under torchrun the body's
        pieces (:meth:`~maskprop.train.static_steps.StaticStep.pieces`), the ranks' collectives between them."""
        if getattr(self.body, "average", None) is None:
            return [lambda: self.body(images, labels)]
        return self.body.pieces(images, labels)

    def _between(self, part: int) -> None:
        """Host work after part ``part`` of the step: under torchrun, the body's collective there (if any)."""
        if getattr(self.body, "average", None) is not None:
            self.body.between(part)

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
                try:  # the pieces share one memory pool: each reads what the one before left (replayed in order)
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
                    retry = getattr(self.body, "retry", None)
                    if retry is not None:  # the piece's host-side code ran during the capture: undo what it consumed
                        retry(i)
                    self._run(static_images, static_labels, start=i)  # the rest of the step, run for real
                    return
                graphs.append(graph)
                graph.replay()  # capture records without running: this replay is the step's part
                self._between(i)
        self.graphs = graphs
        self.fallback = None  # captured: no simpler form needed (and its closure no longer keeps its owner alive)
        self.captures += 1


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
        m_ahead: Search steps prepare the next step's ``m`` and ``m'`` beside their backward (:class:`SearchStep`).
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
        self._next_uniforms: Tensor | None = None  # those of the next search step's masks, from an ended window
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
            if self._other is not None:  # the dense warm-up's step: a search never goes back to it, and its graph
                self._retire(self._other[2])  # and memory pool (a dense step's activations) go back now
                self._other = None
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
        uniforms its next masks were drawn from for the next window. Its overflow counters go with it: :meth:`read`
        first (as :meth:`read` itself does at a window change, and the trainer at the end of each epoch)."""
        if self._search is not None:
            self._next_uniforms = self._pending_uniforms()
            self._retire(self._search[1])
            self._search_captured = self._search_captured or self._search[1].captures > 0
        self._search = None

    def _pending_uniforms(self) -> Tensor | None:
        """The uniforms of the next search step's ``m`` and ``m'`` (a copy), if drawn."""
        live = self._next_uniforms if self._search is None else self._search[0].next_uniforms
        return None if live is None else live.clone()

    # --- reads (every N steps, outside the steps)

    def read(self, scores: ChannelScores | None = None) -> MeterWindow:
        """The statistics since the last read, with the overflow counters, in one transfer; then, with ``scores``
        during a search, the capacities re-chosen (one read of the scores): a change starts a new window."""
        states = [] if self._search is None else [self._search[0].state_m, self._search[0].state_m2]
        window, values = self.meter.read([t for state in states for t in state.overflow_counters()])
        for i, state in enumerate(states):
            per_state = 1 + len(state.layout.groups)
            report = state.overflow_report(values[i * per_state:(i + 1) * per_state])
            window.overflow_steps += report.steps
            for g, cut in report.channels.items():
                window.overflow_channels[g] = window.overflow_channels.get(g, 0) + cut
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
        ``m`` and ``m'``, the current capacities (re-choices have hysteresis) and the counts of the report."""
        captures, overhead_s = self._totals()
        pending = self._pending_uniforms()
        return {"generator": self.generator.get_state(), "next_uniforms": None if pending is None else pending.cpu(),
                "capacities": self.capacities, "windows": self.windows,
                "shapes": [list(s) for s in sorted(self.shapes)], "overflow_steps": self.overflow_steps,
                "overflow_channels": dict(self.overflow_channels), "captures": captures, "overhead_s": overhead_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        pending = state.get("next_uniforms")  # absent from the oldest checkpoints (drawn anew); m's alone in later ones
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
