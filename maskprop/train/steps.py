"""One training step of each kind: the VR-PGE search step, a plain step on a fixed subnetwork (or dense), and the step
of the sparse-backward baselines (meProp, SBP, MSBP).

Each step is one function that shows the whole step (docs/methods.md, "One search step"), returns what it measured
and the FLOPs it cost by supplement C.1 (a backward costs twice its forward), and leaves the bookkeeping (counters,
logs, timing) to the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..cost import CostModel, dense_step_flops, sbp_step_flops, vrpge_step_flops
from ..sbp import GlobalBudget, gradient_angles, sparse_layers
from ..sparse import kept_ratio, prepare_mask, use_mask
from ..vrpge import ChannelScores, score_grad
from .config import SparsityConfig

__all__ = ["StepContext", "StepResult", "sbp_step", "subnet_step", "vrpge_step"]


@dataclass
class StepContext:
    """What every step of a run uses and never changes.

    Attributes:
        criterion: Training loss (cross entropy, with label smoothing where configured).
        device: Where the model runs.
        cost: FLOPs of the model for any mask, for one example.
        amp_dtype: Autocast dtype (``torch.bfloat16``) or ``None``.
        channels_last: Carry the inputs (hence the activations) in channels_last memory format.
        clip_grad_norm: Clip the joint gradient norm of weights and scores at this value, or ``None``.
        align: Compact steps pad every group's kept width up to a multiple of this (``sparsity.align`` resolved: 8
            on CUDA, 1 on the CPU); exact, and counted in the train FLOPs, which count what is computed.
        reduce_stats: Sums the step-statistics tensor over ranks under DDP; ``None``: single process.
        num_classes: The classes the model predicts: :meth:`inputs` checks every batch's labels against them on the
            host, where the loader leaves them (a label out of range would otherwise fail inside the loss: on a GPU
            as a device-side assert that ends the process's CUDA context); ``None``: unchecked.
    """

    criterion: nn.Module
    device: torch.device
    cost: CostModel
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    clip_grad_norm: float | None = None
    align: int = 1
    reduce_stats: Callable[[Tensor], Tensor] | None = None
    num_classes: int | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def inputs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """A batch moved to the device, images in the configured memory format, labels as int64 (what the loss takes;
        a dataset may hold them in a narrower integer type), after checking that they index the model's classes
        (labels on the host; one line naming the range found, as the datasets' check before a run does for labels it
        can read up front)."""
        if self.num_classes is not None and labels.device.type == "cpu" and labels.numel():
            low, high = (int(v) for v in torch.aminmax(labels))
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"a batch has labels from {low} to {high}, the model {self.num_classes} classes; "
                                 f"expected labels in [0, {self.num_classes - 1}] (or set model.kwargs.num_classes)")
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, torch.long, non_blocking=True)


@dataclass
class StepResult:
    """What one step measured.

    Attributes:
        loss: Training loss of the back-propagated subnetwork (L(m) in a search step).
        loss2: L(m') of the second sample (search steps only).
        correct: Correctly classified examples of the back-propagated pass.
        count: Examples in the batch.
        kept_ratio: Kept fraction of the prunable channels in the mask(s) used.
        flops: Train FLOPs the step cost (supplement C.1).
        dense_flops: Train FLOPs of a dense step on the same batch, 3 f_D.
        mask: The mask ``m`` used (search steps), on the CPU.
        mask2: The mask ``m'`` used (search steps), on the CPU.
        diagnostics: Gradient estimation angles in degrees (sparse-backward steps that measured them).
        grad_norm: Global L2 norm of the weight gradients after the backward, before clipping (every step kind;
            read with the step's other statistics, no extra host sync).
    """

    loss: float
    loss2: float | None
    correct: int
    count: int
    kept_ratio: float
    flops: int
    dense_flops: int
    mask: dict[str, Tensor] | None = None
    mask2: dict[str, Tensor] | None = None
    diagnostics: dict[str, float] | None = None
    grad_norm: float | None = None


def _grad_norm(model: nn.Module) -> Tensor:
    """Global L2 norm of the model's parameter gradients, as a tensor on their device (no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def _read_stats(ctx: StepContext, losses: list[Tensor], logits: Tensor, labels: Tensor) -> tuple[list[float], int,
                                                                                               int]:
    """The step's losses (batch means), correct count and example count, read in one device-to-host transfer.

    They travel as one float64 tensor of sums ``[loss * n, ..., correct, n]`` (exact: a float32 loss times a batch
    size fits float64's mantissa), summed over ranks by ``ctx.reduce_stats`` under DDP; the losses come back as
    sums / count, so a single process reads exactly the losses it computed. Any other per-step value rides along as a
    "loss" (the gradient norm: the same on every rank after DDP's all-reduce, so its example-weighted mean is itself).
    """
    n = labels.shape[0]
    dtype = torch.float32 if labels.device.type == "mps" else torch.float64  # MPS has no float64
    parts = [loss.detach().to(dtype) * n for loss in losses]
    parts += [(logits.argmax(1) == labels).sum().to(dtype), torch.full((), n, dtype=dtype, device=labels.device)]
    stats = torch.stack(parts)
    if ctx.reduce_stats is not None:
        stats = ctx.reduce_stats(stats)
    *sums, correct, count = stats.tolist()  # the one host sync of a step
    return [total / count for total in sums], int(correct), int(count)


def _clip(ctx: StepContext, params: Iterator[Tensor] | list[Tensor]) -> None:
    if ctx.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params), ctx.clip_grad_norm)


def vrpge_step(model: nn.Module, scores: ChannelScores, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
               batch: tuple[Tensor, Tensor], generator: torch.Generator, sparsity: SparsityConfig,
               ctx: StepContext) -> StepResult:
    """One VR-PGE iteration (docs/methods.md, "One search step").

    1. Sample ``m`` and ``m'`` independently from ``p(.|s)`` with ``generator`` (in that order).
    2. Forward ``m`` (compact, with autograd), loss ``L(m)``, backward: gradients of the kept weights.
    3. Forward ``m'`` (compact, under ``no_grad``), loss ``L(m')``; with ``weight_grad: both`` it is back-propagated
       too and the weight gradient is the average of the two (the official code).
    4. ``scores.grad`` = the score gradient of ``sparsity.estimator`` (paper eq. (12) or its symmetric form).
    5. Clip the joint gradient norm (optional), SGD step on the weights, Adam step on the scores, then project the
       scores onto ``{0 <= s <= 1, sum s <= K}``.

    Both forwards run in train mode, so BatchNorm running statistics of the channels kept by either mask move.

    Args:
        model: A maskprop model in train mode.
        scores: Its keep probabilities.
        optimizers: ``(weight optimizer, score optimizer)``.
        batch: ``(images, labels)`` on the device.
        generator: The mask generator (on the scores' device).
        sparsity: Estimator, ``alpha`` and ``weight_grad``.
        ctx: The run's fixed step settings.
    """
    weight_opt, score_opt = optimizers
    images, labels = batch
    flat_m, flat_m2 = scores.sample_flat(generator), scores.sample_flat(generator)
    mask_m, mask_m2 = scores.split(flat_m.cpu()), scores.split(flat_m2.cpu())
    both = sparsity.weight_grad == "both"
    # Both masks' index sets are prepared (and on their way to the device) before the first forward.
    state_m = prepare_mask(model, mask_m, "compact", ctx.align)
    state_m2 = prepare_mask(model, mask_m2, "compact", ctx.align)

    weight_opt.zero_grad(set_to_none=True)
    score_opt.zero_grad(set_to_none=True)
    with use_mask(model, state_m), ctx.autocast():
        logits = model(images)
        loss_m = ctx.criterion(logits.float(), labels)
    (loss_m * 0.5 if both else loss_m).backward()
    with torch.set_grad_enabled(both), use_mask(model, state_m2), ctx.autocast():
        loss_m2 = ctx.criterion(model(images).float(), labels)
    if both:
        (loss_m2 * 0.5).backward()
    (value_m, value_m2, grad_norm), correct, count = _read_stats(ctx, [loss_m, loss_m2, _grad_norm(model)], logits,
                                                                 labels)

    # supplement eq. (12): g_s = (L(m) - L(m')) H^alpha(s) grad_s ln p(m|s)  (or its symmetric form)
    s = scores.scores
    s.grad = score_grad(sparsity.estimator, value_m, value_m2, flat_m, flat_m2, s.detach(), alpha=sparsity.alpha)
    _clip(ctx, [*model.parameters(), s])
    weight_opt.step()
    score_opt.step()
    scores.project_()

    # Train FLOPs count what is computed: the aligned widths, padding included, over the global batch (``count``
    # went through ``ctx.reduce_stats``: under torchrun it sums every rank's examples).
    batch_size = count
    f_m, f_m2 = ctx.cost.flops(state_m.widths, batch_size), ctx.cost.flops(state_m2.widths, batch_size)
    return StepResult(
        loss=value_m, loss2=value_m2, correct=correct, count=count,
        kept_ratio=kept_ratio(state_m.kept, state_m.plan.groups),
        flops=int(vrpge_step_flops(f_m, f_m2, sparsity.weight_grad)),
        dense_flops=int(dense_step_flops(ctx.cost.flops(None, batch_size))), mask=mask_m, mask2=mask_m2,
        grad_norm=grad_norm,
    )


def subnet_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor],
                mask: Mapping[str, Tensor] | None, ctx: StepContext) -> StepResult:
    """One SGD step of the subnetwork ``mask`` in compact mode, or of the dense model (``None``): dense training, the
    dense reference steps, a narrow model's finetune steps (``narrow.py``), and compact finetuning
    (``finetune.narrow: false``).

    Costs 3 f(mask) train FLOPs (supplement C.1), f at the aligned widths computed.
    """
    images, labels = batch
    state = None if mask is None else prepare_mask(model, mask, "compact", ctx.align)
    optimizer.zero_grad(set_to_none=True)
    with use_mask(model, state), ctx.autocast():
        logits = model(images)
        loss = ctx.criterion(logits.float(), labels)
    loss.backward()
    grad_norm = _grad_norm(model)  # before clipping changes the gradients
    _clip(ctx, model.parameters())
    optimizer.step()
    (value, grad_norm), correct, count = _read_stats(ctx, [loss, grad_norm], logits, labels)
    batch_size = count  # the global batch under torchrun, as in vrpge_step
    return StepResult(
        loss=value, loss2=None, correct=correct, count=count,
        kept_ratio=1.0 if state is None else kept_ratio(state.kept, state.plan.groups),
        flops=int(dense_step_flops(ctx.cost.flops(None if state is None else state.widths, batch_size))),
        dense_flops=int(dense_step_flops(ctx.cost.flops(None, batch_size))), grad_norm=grad_norm,
    )


def sbp_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, Tensor], ctx: StepContext,
             budget: GlobalBudget | None = None, measure_angles: bool = False) -> StepResult:
    """One step of a sparse-backward baseline (docs/methods.md, sections 4-6) on a model converted by ``maskprop.sbp``.

    The forward is the dense one; in ``loss.backward()`` each converted layer propagates ``k`` of its output units
    (with the MSBP memory where configured). With ``measure_angles`` the gradient estimation angles (MSBP paper
    Figure 5) are measured first on the same graph, which changes nothing of the step. A global ``budget`` re-balances
    every layer's ``k`` from this backward's scores for the next step.

    Costs ``sum_l f_l (1 + 2 k_l / n_l)`` train FLOPs (``maskprop.cost.sbp_step_flops``) with the ``k`` of this step,
    plus three times the FLOPs outside the layers (attention's products: a dense forward and backward).
    """
    images, labels = batch
    optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        logits = model(images)
        loss = ctx.criterion(logits.float(), labels)
    diagnostics = gradient_angles(model, loss) if measure_angles else None
    fractions = {name: layer.k / layer.num_units for name, layer in sparse_layers(model)}
    loss.backward()
    if budget is not None:
        budget.update()
    grad_norm = _grad_norm(model)  # before clipping changes the gradients, as in subnet_step
    _clip(ctx, model.parameters())
    optimizer.step()
    (value, grad_norm), correct, batch_size = _read_stats(ctx, [loss, grad_norm], logits, labels)
    layer_flops = {name: batch_size * f for name, f in ctx.cost.by_layer().items()}
    return StepResult(
        loss=value, loss2=None, correct=correct, count=batch_size, kept_ratio=1.0,
        flops=int(sbp_step_flops(layer_flops, fractions) + dense_step_flops(batch_size * ctx.cost.other_flops)),
        dense_flops=int(dense_step_flops(ctx.cost.flops(None, batch_size))), diagnostics=diagnostics,
        grad_norm=grad_norm,
    )
