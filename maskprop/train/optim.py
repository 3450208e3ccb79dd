"""Optimizers and learning-rate schedules of a run: SGD (or Adam) on the weights, Adam on the scores, timm's per-step
schedules.

The weights use plain ``torch.optim.SGD`` (VR-PGE, dense) or ``torch.optim.Adam`` (the sparse-backward baselines, as in
the meProp and MSBP papers). Its weight decay and momentum act on every parameter, the dropped channels
of a step included: a dropped channel has a zero gradient, so it decays by ``lr x weight_decay`` and keeps moving
along its momentum buffer. The official VR-PGE code does the same (it multiplies weights by masks and steps a standard
SGD over all of them); channels that are rarely sampled therefore shrink slowly, which acts like the weight decay they
would get in a dense run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from .config import OptimConfig, Schedule

__all__ = ["build_schedule", "run_optimizer", "score_optimizer", "weight_optimizer"]


def _fused(params: list[nn.Parameter]) -> dict[str, bool]:
    """``fused=True`` where torch's fused kernels take every parameter (floating point, on the CPU or CUDA).

    The fused SGD and Adam compute what the per-tensor loops compute in one pass over each tensor; the per-tensor
    Adam of a 784-5000-5000-10 MLP cost more than its whole sparse backward (BENCHMARKS.md, "Implementation choices").
    """
    supported = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if supported else {}


def weight_optimizer(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
                     nesterov: bool = False) -> torch.optim.SGD:
    """SGD on the weights (supplement B: lr 0.1, momentum 0.9, weight decay 5e-4 on CIFAR), fused where supported.

    Weight decay and momentum apply to dropped channels too (see the module docstring).
    """
    params = list(params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0, **_fused(params))


def run_optimizer(params: Iterable[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """The weight optimizer an ``optim`` section describes (its null fields resolved): SGD or Adam.

    Adam uses ``optim.lr`` and L2 ``optim.weight_decay`` (added to the gradient, as ``torch.optim.Adam`` does) with its
    default betas, fused where supported; SGD as :func:`weight_optimizer`.
    """
    if optim.optimizer == "adam":
        params = list(params)
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay, **_fused(params))
    return weight_optimizer(params, optim.lr, optim.momentum, optim.weight_decay, optim.nesterov)


def score_optimizer(scores: nn.Parameter, lr: float) -> torch.optim.Adam:
    """Adam on the keep probabilities, no weight decay (supplement B: lr 12e-3, the only grid-searched value)."""
    return torch.optim.Adam([scores], lr=lr, weight_decay=0.0)


def _cosine(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> Scheduler:
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0, warmup_t=warmup, t_in_epochs=False)


def _step(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> Scheduler:
    # timm applies a milestone m from update m - 1 on, and by default counts the milestones after the warmup: the
    # decays at updates total // 2 and 3 total // 4 of the phase, warmup included, as build_schedule says.
    return MultiStepLRScheduler(optimizer, decay_t=[total // 2 + 1, (3 * total) // 4 + 1], decay_rate=0.1,
                                warmup_t=warmup, warmup_prefix=False, t_in_epochs=False)


def _constant(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> Scheduler:
    return MultiStepLRScheduler(optimizer, decay_t=[], warmup_t=warmup, t_in_epochs=False)  # no decay point


_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int, int], Scheduler]] = {
    "cosine": _cosine,
    "step": _step,
    "constant": _constant,
}


def build_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, total_steps: int,
                   warmup_steps: int = 0) -> Scheduler:
    """A timm scheduler stepped once per optimizer update (``scheduler.step_update(updates_done)``).

    Args:
        optimizer: The optimizer whose learning rate it drives; its current ``lr`` is the peak.
        schedule: ``cosine`` (to 0 at ``total_steps``), ``step`` (x0.1 at 50% and 75%) or ``constant``.
        total_steps: Optimizer updates of the phase.
        warmup_steps: Linear warmup from 0, counted inside ``total_steps``.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(_SCHEDULES)}")
    if total_steps <= 1:  # a one-step phase: every schedule gives its peak there (and timm's cosine warns that it has
        schedule = "constant"  # no effect, a line the user can do nothing about)
    return _SCHEDULES[schedule](optimizer, max(total_steps, 1), warmup_steps)
