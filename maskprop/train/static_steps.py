"""The bodies of the static-shape steps that ``maskprop.train.graphs`` captures as CUDA graphs and replays: the dense
step (:class:`DenseStep`: dense runs, the search's warm-up, the narrow finetune model, the dense reference steps), a
fixed subnetwork's step through the full model (:class:`FixedMaskStep`) and the VR-PGE search step
(:class:`SearchStep`), each in pieces around the ranks' collectives under torchrun (:class:`GradientAverage`). Each
issues a fixed sequence of device operations, with no host read and no output shape that depends on the data
(``tests/test_graphs.py`` checks), on buffers whose addresses stay fixed, so that it can be recorded once and replayed;
``maskprop.train.graphs`` tells how a step runs on a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..sparse import kept_ratio
from ..sparse.gather import add_batches
from ..sparse.static import StaticExecutionState, StaticLayout, StaticStates, mask_capacities, use_static
from ..vrpge import ChannelScores, score_grad
from .config import SparsityConfig
from .meter import DeviceMeter
from .steps import StepContext, _clip, _grad_norm

__all__ = ["DenseStep", "FixedMaskStep", "GradientAverage", "SearchStep", "StaticStep", "batches_counted_at_once"]


# --- the ranks' gradients --------------------------------------------------------------------------------------------


class GradientAverage:
    """Under torchrun: the weight gradients of a static step averaged over the ranks between the step's pieces, with
    a few of the step's values summed alongside (``maskprop.train.graphs``' docstring).

    One flat buffer holds every parameter's gradient and then the values: :meth:`pack` (after the backward, on the
    device) writes this rank's into it, :meth:`all_reduce` (on the host, between two pieces) sums it over the ranks in
    place with one collective, and :meth:`unpack` (the start of the last piece) divides the gradients by the world size
    and installs views of the buffer as the parameters' ``.grad``, which the clipping and the optimizer then read. A
    search step whose score update runs beside its backward packs and sums its values first (:meth:`pack_values`,
    ``all_reduce("values")`` after the forwards), then the gradients. Each view has its parameter's strides (a
    channels_last weight gets a channels_last gradient, as autograd gives it, and as the fused optimizers require). The
    buffer never moves, so every piece can be captured as a graph, and the collectives stay outside them.

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
        numel = sum(p.numel() for p in self.parameters)
        self.flat = torch.zeros(numel + values, dtype=dtypes.pop(), device=self.parameters[0].device)
        self._gradients = self.flat[:numel]  # every parameter's gradient, then the values
        # Each gradient's slice laid out as its parameter (dense strides in the parameter's memory format).
        pieces = self._gradients.split([p.numel() for p in self.parameters])
        self._grads = [piece.as_strided(p.shape, torch.empty_like(p, device="meta").stride())
                       for piece, p in zip(pieces, self.parameters)]
        self.values = self.flat[numel:]
        """The values of the last :meth:`all_reduce`, summed over the ranks."""

    def pack(self, values: list[Tensor] = ()) -> None:
        """This rank's gradients (after the backward) and ``values`` (scalars) into the buffer: a multi-tensor copy."""
        missing = [i for i, p in enumerate(self.parameters) if p.grad is None]
        if missing:  # a parameter the step did not use: DDP (find_unused_parameters=False) refuses it too
            raise RuntimeError(f"parameter {missing[0]} (of shape {tuple(self.parameters[missing[0]].shape)}) got no "
                               f"gradient in the step; every parameter the gradient average holds must")
        torch._foreach_copy_(self._grads, [p.grad for p in self.parameters])
        if values:
            self.pack_values(values)

    def pack_values(self, values: list[Tensor]) -> None:
        """This rank's ``values`` (scalars) alone into the buffer (one stack and copy)."""
        self.values.copy_(torch.stack([v.detach().to(self.flat.dtype) for v in values]))

    def all_reduce(self, part: str = "all") -> None:
        """The sum over the ranks, in place: one collective issued by the host (on a GPU it reads nothing back), of
        the whole buffer, or of its ``"values"`` or ``"gradients"`` alone (a step whose values are needed before its
        backward sums them first, then its gradients after it)."""
        dist.all_reduce({"all": self.flat, "values": self.values, "gradients": self._gradients}[part])

    def unpack(self) -> None:
        """The summed gradients divided by the world size, installed as the parameters' ``.grad``."""
        if self.world_size > 1:
            self._gradients.div_(self.world_size)
        for p, grad in zip(self.parameters, self._grads):
            p.grad = grad


# --- the step kinds --------------------------------------------------------------------------------------------------


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    """``ctx.autocast()`` without the cast cache: a captured graph must not keep casts of one replay for the next."""
    return torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.bfloat16, enabled=ctx.amp_dtype is not None,
                          cache_enabled=False)


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class StaticStep:
    """A static step in pieces around the ranks' collectives (:meth:`pieces`, :meth:`between`): by default two halves
    around the gradient average, :meth:`forward_backward` (to the backward, leaving what the rest needs) and
    :meth:`update` (the optimizer steps and the meter). Called, it runs them in turn, with the collectives between
    them under torchrun; ``maskprop.train.graphs.StepGraph`` captures the whole call as one graph, or under torchrun
    each piece as one."""

    average: GradientAverage | None = None

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        for i, piece in enumerate(self.pieces(images, labels)):
            piece()
            self.between(i)

    def pieces(self, images: Tensor, labels: Tensor) -> list[Callable[[], None]]:
        """The step as pieces run in turn, with :meth:`between` after each: under torchrun, one captured graph each."""
        return [lambda: self.forward_backward(images, labels), self.update]

    def between(self, piece: int) -> None:
        """Host work after piece ``piece``: under torchrun, the gradient average's collective after the first."""
        if self.average is not None and piece == 0:
            self.average.all_reduce()

    def retry(self, piece: int) -> None:
        """Before piece ``piece`` runs again eagerly because its capture failed (its host-side code ran, none of its
        kernels did): put back the host-side state it consumed. The halves consume none."""

    def forward_backward(self, images: Tensor, labels: Tensor) -> None:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def batches_counted_at_once(model: nn.Module) -> Iterator[None]:
    """Inside the block, the training forwards of ``model``'s BatchNorm layers leave their ``num_batches_tracked``
    alone (torch's layers add one to it each, one launch per layer on a GPU); once the block ends without an error,
    one multi-tensor add counts their batches (one per call, as torch's layers count them) at one launch instead of one
    per layer. For layers with a momentum (with ``momentum=None`` the count sets the average and the
    layer keeps it) and without a process group (``sync_bn``, whose layers count in their own collective function;
    torch's ``nn.SyncBatchNorm`` likewise)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
             and m.track_running_stats and m.momentum is not None and m.num_batches_tracked is not None
             and getattr(m, "process_group", None) is None and not isinstance(m, nn.SyncBatchNorm)]
    counters = [m.num_batches_tracked for m in norms]
    calls = [0] * len(norms)  # training calls of each layer in the block (a layer may run twice, or not at all)

    def count(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            calls[i] += 1
        return hook

    hooks = [m.register_forward_pre_hook(count(i)) for i, m in enumerate(norms)]
    for m in norms:
        m.num_batches_tracked = None  # torch's BatchNorm then takes its momentum and counts nothing
    try:
        yield
    finally:
        for m, counter, hook in zip(norms, counters, hooks):
            m.num_batches_tracked = counter
            hook.remove()
    add_batches(counters, calls)


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
    """One VR-PGE step at static capacities (``vrpge_step``'s math on the masks actually used).

    Args:
        model: The full model (train mode; not a DDP wrapper).
        scores: Its keep probabilities, on the model's device.
        optimizers: ``(weight SGD, score Adam)``.
        sparsity: Estimator, ``alpha`` and ``weight_grad``.
        ctx: The run's step settings.
        capacities: ``{group: capacity}`` of this window.
        meter: Where the step's statistics accumulate.
        overlap: On CUDA, run the branch of ``m'`` on a side stream (with ``weight_grad: first``): its no-grad forward
            beside the forward of ``m`` (:attr:`m2_first`), then, once the forward of ``m`` is done, the commit of its
            BatchNorm statistics, the score update and the next step's masks (unless gradient clipping ties them to the
            backward: :meth:`_side_branch`, ``m_ahead``; under torchrun :meth:`backward`) beside the backward of ``m``.
            Neither branch reads what the other writes while both run (``m'`` defers its BatchNorm statistics and batch
            counts, which are added to the model's after ``m``'s: :attr:`StaticExecutionState.defers_statistics`), so
            the results are those of running them in turn, ``m`` first; at CIFAR scale their kernels are too small to
            fill the GPU, and a captured graph runs the two branches at once. ``False``: one stream, in the same order.
        average: Under torchrun, the gradient average, which also sums ``L(m) n``, ``L(m') n`` and ``n``: the score
            update reads the losses of the global batch (summed after the forwards, :meth:`pieces`).
        m2_first: Run the forward of ``m'`` first where the step can (:attr:`m2_first`); ``False``: after the forward
            of ``m`` (the schedule before deferred statistics, for comparison: ``tools/bench_graphs.py``).
        m_ahead: Each step prepares the next step's ``m`` and ``m'`` (:attr:`next_masks`, one mask update for both)
            right after its projection of the scores, from which they are drawn: on CUDA at the end of the side
            stream, beside the backward, so that the next step starts its forwards at once (a copy of the buffers,
            :meth:`StaticStates.take`, five launches) instead of after a mask update of some forty kernels. The same
            masks as drawing them at the start of their step, which ``False`` does (for comparison:
            ``tools/bench_graphs.py``) and which the step does where its score update follows the backward (gradient
            clipping, ``weight_grad: both``: :attr:`m_ahead`).
        next_uniforms: With ``m_ahead``, the uniforms of the first step's ``m`` and ``m'`` (``(2, channels)``, drawn
            for them by the window before, or kept in a checkpoint; a checkpoint of an earlier version kept ``m``'s
            alone, ``(channels,)``: ``m'``'s are then drawn); ``None``: :meth:`prepare` draws them before the first
            step.

    Attributes:
        uniforms: ``(2, channels)`` buffer of the uniforms the masks are drawn from: row 0 those of ``m``, row 1
            those of ``m'`` (with ``m_ahead`` the next step's, else this step's); :meth:`prepare` refills it before
            each step (outside a captured graph). With ``m_ahead`` it holds between steps the uniforms of the masks
            :attr:`next_masks` holds (:attr:`next_uniforms`). Each mask's uniforms are one draw of their own from the
            generator, in the order the masks are used (``m``, ``m'``, the next ``m``, ...), so that every mask gets
            the same uniforms in both schedules, on any device (a CUDA generator's draws depend on how they are split
            into calls).
        budget: The budget the step projects its updated scores onto (a device scalar :meth:`prepare` writes the
            scores' current budget into: an annealed budget changes every step).
        masks: The static execution states of ``m`` and ``m'`` (:class:`StaticStates`, one layout), also as
            ``state_m`` and ``state_m2``.
        next_masks: With ``m_ahead``, the next step's ``m`` and ``m'``, prepared by this step (the same layout).
        m_ahead: Whether this step prepares the next one's masks: the argument, where the score update runs beside
            the backward.
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
        # torchrun it reads the losses of the global batch: the step then runs in three pieces (pieces()), the loss
        # sums all-reduced after the forward, the gradients after the backward.
        self.scores_apart = sparsity.weight_grad == "first" and ctx.clip_grad_norm is None
        self._pass: tuple[Tensor, ...] = ()  # what a piece leaves the next (the same tensors in a graph)
        self._loss_m: Tensor | None = None  # L(m) with its graph, from the forward piece to the backward piece
        self._m2_statistics = None  # the pass of m' the backward piece commits (put back if it runs again)
        layout = StaticLayout(model, capacities, ctx.align)
        overlap = overlap and layout.device.type == "cuda" and sparsity.weight_grad == "first"
        self.side_stream = torch.cuda.Stream(layout.device) if overlap else None
        if layout.device != scores.scores.device:
            raise ValueError(f"the scores are on {scores.scores.device}, the model on {layout.device}; a static search "
                             f"step samples on the model's device")
        self.masks = StaticStates(layout, 2)  # this step's m and m', written together
        self.state_m, self.state_m2 = self.masks
        # m' first (class docstring): its forward does not wait for m's, whose BatchNorm statistics it would otherwise
        # have to follow; its own are added after m's (deferred).
        synchronised = any(getattr(m, "process_group", None) is not None for m in model.modules())
        self.m2_first = (m2_first and sparsity.weight_grad == "first" and layout.can_defer_statistics
                         and not synchronised)
        self.state_m2.defers_statistics = self.m2_first
        s = scores.scores
        self.uniforms = torch.zeros(2, s.numel(), dtype=s.dtype, device=s.device)
        self.budget = torch.zeros((), dtype=s.dtype, device=s.device)
        # The next masks prepared beside the backward where the score update is (without clipping); elsewhere they
        # would follow the backward on the main stream anyway, one copy of the buffers later.
        self.m_ahead = m_ahead and self.scores_apart
        self.next_masks = StaticStates(layout, 2) if self.m_ahead else None
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
        first step (with ``m_ahead``), also prepare its ``m`` and ``m'`` from the uniforms given for them
        (``next_uniforms``), else from new ones."""
        if not self._started:
            first = self._first_uniforms
            if first is None:
                for row in self.uniforms:
                    row.uniform_(generator=generator)
            elif first.dim() == 1:  # from a checkpoint of an earlier version: m's alone, m''s drawn after them then
                self.uniforms[0].copy_(first)
                self.uniforms[1].uniform_(generator=generator)
            else:
                self.uniforms.copy_(first)
            self._prepare_next()
            self._started = True
        for row in self.uniforms:
            row.uniform_(generator=generator)
        self.budget.fill_(self.scores.budget)

    @property
    def next_uniforms(self) -> Tensor | None:
        """Between steps, the uniforms of the next step's ``m`` and ``m'`` (:attr:`uniforms` itself; ``None`` before
        the first step when none were given, or without ``m_ahead``): what a later window or a resumed run prepares
        them from."""
        if not self.m_ahead:
            return None
        return self.uniforms if self._started else self._first_uniforms

    def _draw(self, states: StaticStates) -> None:
        """``m`` and ``m'`` drawn from the current scores and :attr:`uniforms` into ``states``, with one mask
        update."""
        states.update(self.scores.mask_from_uniforms(self.uniforms), self.uniforms)

    def _prepare_next(self) -> None:
        """The next step's ``m`` and ``m'`` into :attr:`next_masks` (their overflow counted when a step takes them)."""
        self._draw(self.next_masks)

    def _masks_for_step(self) -> None:
        """This step's ``m`` and ``m'`` into :attr:`masks`, before the side stream forks: those the step before
        prepared (``m_ahead``: a copy, five launches), else drawn now from :attr:`uniforms` (one mask update for
        both)."""
        if self.m_ahead:
            self.masks.take(self.next_masks)
        else:
            self._draw(self.masks)

    def pieces(self, images: Tensor, labels: Tensor) -> list[Callable[[], None]]:
        """Under torchrun without clipping, three pieces: :meth:`forward`, :meth:`backward` (the score update, from the
        losses of the global batch, beside it) and :meth:`update`; else the two halves of :class:`StaticStep`."""
        if self.average is None or not self.scores_apart:
            return super().pieces(images, labels)
        return [lambda: self.forward(images, labels), self.backward, self.update]

    def between(self, piece: int) -> None:
        """Under torchrun in three pieces: the sum of the loss sums over the ranks after the forward (a collective of
        three numbers), the gradients' after the backward; else as :class:`StaticStep`."""
        if self.average is None or not self.scores_apart:
            super().between(piece)
        elif piece < 2:
            self.average.all_reduce("values" if piece == 0 else "gradients")

    def forward(self, images: Tensor, labels: Tensor) -> None:
        """The first of three pieces under torchrun: ``m`` and ``m'`` taken from :attr:`next_masks` (with ``m_ahead``),
        the forwards of ``m'`` (on the side stream, beside that of ``m`` where it goes first) and ``m``, both
        done, and ``L(m) n``, ``L(m') n`` and ``n`` packed for their sum over the ranks."""
        self._masks_for_step()
        main, logits, loss_m, loss_m2 = self._forwards(images, labels)
        if loss_m2 is None:  # m' after m's forward (statistics it cannot defer)
            if main is not None:
                self.side_stream.wait_stream(main)
            with self._on_side():
                loss_m2 = self._forward_m2(images, labels, grad=False)
        if main is not None:
            main.wait_stream(self.side_stream)
        n = labels.shape[0]
        self.average.pack_values([loss_m * n, loss_m2 * n, loss_m.new_full((), n)])
        self._loss_m = loss_m
        self._pass = (loss_m.detach(), loss_m2.detach(), logits.detach(), labels)

    def backward(self) -> None:
        """The second piece: the backward of ``m`` and, beside it on the side stream, the commit of the statistics of
        ``m'``, the score update from ``L(m)`` and ``L(m')`` of the global batch and the next ``m`` and ``m'``; the
        gradients packed for their sum over the ranks. While captured, the forward's graph is kept (``retain_graph``)
        and :meth:`retry` can run the piece again should the capture fail; :meth:`update` lets the graph go."""
        device = self._pass[0].device
        main = self._fork(device)
        summed = self.average.values
        self._m2_statistics = self.state_m2.deferred
        with self._on_side():
            self.state_m2.commit_statistics()
            self._score_gradient(summed[0] / summed[2], summed[1] / summed[2])
            self._score_update()
        self._loss_m.backward(retain_graph=_capturing(device))
        if main is not None:
            main.wait_stream(self.side_stream)
        self.average.pack()

    def retry(self, piece: int) -> None:
        """Before a piece of the step under torchrun runs again eagerly after its capture failed: for the backward,
        the statistics of ``m'`` pending again and the weights' gradients dropped (the failed capture's backward made
        ``.grad`` tensors no kernel wrote). The forward discards a pending pass itself; the update consumes nothing."""
        if self.average is not None and self.scores_apart and piece == 1:  # the three pieces' backward
            self.state_m2.deferred = self._m2_statistics
            self.optimizers[0].zero_grad(set_to_none=True)

    def _forwards(self, images: Tensor, labels: Tensor) -> tuple[torch.cuda.Stream | None, Tensor, Tensor,
                                                                   Tensor | None]:
        """The side stream forked, the no-grad forward of ``m'`` on it where it goes first (:attr:`m2_first`), and the
        forward of ``m``: ``(the main stream or None, logits, L(m), L(m') or None)``."""
        main = self._fork(images.device)
        loss_m2 = None
        if self.m2_first:
            self.state_m2.discard_statistics()  # left pending only by a step that failed (a capture that raised)
            with self._on_side():
                loss_m2 = self._forward_m2(images, labels, grad=False)
        logits, loss_m = self._forward_m(images, labels)
        return main, logits, loss_m, loss_m2

    def _fork(self, device: torch.device) -> torch.cuda.Stream | None:
        """The main stream, after the side stream (if any) was made to wait for it."""
        if self.side_stream is None:
            return None
        main = torch.cuda.current_stream(device)
        self.side_stream.wait_stream(main)
        return main

    def forward_backward(self, images: Tensor, labels: Tensor) -> None:
        """The step's first half: ``m`` and ``m'`` taken from :attr:`next_masks` (with ``m_ahead``; else drawn) into
        their buffers, the forward of ``m'`` and the forward and backward of ``m`` (and, apart from the backward,
        the score update and the next masks); under torchrun (with clipping or ``weight_grad: both``) the gradients and
        losses packed for the average."""
        self._masks_for_step()
        if self.sparsity.weight_grad == "both":  # the official code's cost: a backward of each mask, in turn
            logits, loss_m = self._forward_m(images, labels)
            (loss_m * 0.5).backward()
            loss_m2 = self._forward_m2(images, labels, grad=True)
            (loss_m2 * 0.5).backward()
        else:  # m' (no grad) on the side stream, if any, beside m's forward (m' first) and backward on this one
            main, logits, loss_m, loss_m2 = self._forwards(images, labels)
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
        self._loss_m = self._m2_statistics = None  # the forward's graph, held for a backward piece that may run again
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
        unless gradient clipping ties them to the backward, the scores' gradient, Adam step and projection (under
        torchrun :meth:`backward` runs them). Returns ``L(m')``."""
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
        """Adam on the scores, then their projection onto the next step's budget (as ``vrpge_step``), and (with
        ``m_ahead``) the next step's ``m`` and ``m'`` drawn from them."""
        self.optimizers[1].step()
        self.scores.project_(self.budget)
        if self.m_ahead:
            self._prepare_next()

    def one_stream(self) -> SearchStep:
        """This step with its side branch (the forward of ``m'``, the commit of its statistics, the
        score update, the next masks) back on the main stream, in the same order (if capturing two streams fails)."""
        self.side_stream = None
        return self

    def _forward_m(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The weights' gradients set to ``None`` (as :class:`DenseStep`: the backward's gradients become the
        ``.grad``), and the forward of ``m``: ``(logits,
        L(m))``."""
        self.optimizers[0].zero_grad(set_to_none=True)
        with use_static(self.state_m), _autocast(self.ctx):
            logits = self.model(images)
            return logits, self.ctx.criterion(logits.float(), labels)

    def _forward_m2(self, images: Tensor, labels: Tensor, grad: bool) -> Tensor:
        """L(m'): the forward of the second mask."""
        with torch.set_grad_enabled(grad), use_static(self.state_m2), _autocast(self.ctx):
            return self.ctx.criterion(self.model(images).float(), labels)
