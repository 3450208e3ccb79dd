"""The budget of a search over time: dense warm-up steps, an anneal from every channel down to the budget, then the
budget (docs/methods.md, "Warm-up and budget anneal").

With ``N`` prunable channels, the final budget ``K = keep_ratio x N``, ``W`` warm-up steps and ``A`` anneal steps, the
budget of search step ``t`` (0-based, counted over the whole search) is

    K(t) = N                                   for t < W                (dense steps: every channel kept)
    K(t) = K + (N - K) (1 - u)^p,  u = (t - W) / A    for W <= t < W + A    (the anneal)
    K(t) = K                                   for t >= W + A,

with ``p = 3`` (``cubic``) or ``p = 1`` (``linear``). The cubic form is the gradual-pruning schedule of "To prune, or
not to prune: exploring the efficacy of pruning for model compression" (arXiv 2017, ICLR 2018 workshop track),
eq. (1), written for the kept channels rather than the pruned fraction: it removes channels fast while many remain
and slowly near the end. ``A = 0`` is the paper's search, at the budget ``K`` from its first step.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

__all__ = ["BUDGET_SCHEDULES", "BudgetSchedule", "budget_at"]

BUDGET_SCHEDULES = {"cubic": 3, "linear": 1}
"""Anneal shape -> the exponent ``p`` of ``(1 - u)^p``."""


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def budget_at(step: int, num_channels: int, keep_ratio: float, warmup_steps: int = 0, anneal_steps: int = 0,
              schedule: str = "cubic") -> float:
    """The budget ``K(t)`` of search step ``step`` (see the module docstring): expected kept channels at most.

    Args:
        step: The search step ``t``, 0-based.
        num_channels: ``N``, all prunable channels.
        keep_ratio: The final budget as a fraction of ``N``, in ``(0, 1]``.
        warmup_steps: ``W``, dense steps at the start (budget ``N``).
        anneal_steps: ``A``, steps over which the budget falls from ``N`` to ``keep_ratio x N``; 0: no anneal.
        schedule: ``cubic`` or ``linear``.

    Returns:
        ``K(t)``; exactly ``keep_ratio * num_channels`` (the float ``ChannelScores`` computes) once the anneal is over.

    Raises:
        ValueError: A negative step or count, a keep ratio outside ``(0, 1]``, or an unknown schedule.
    """
    step, warmup_steps, anneal_steps = (_check_count(name, value) for name, value in
                                        (("step", step), ("warmup_steps", warmup_steps),
                                         ("anneal_steps", anneal_steps)))
    if _check_count("num_channels", num_channels) < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels!r}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if schedule not in BUDGET_SCHEDULES:
        raise ValueError(f"unknown budget schedule {schedule!r}; expected one of {', '.join(BUDGET_SCHEDULES)}")
    final = float(keep_ratio) * num_channels
    if step < warmup_steps:
        return float(num_channels)
    if step >= warmup_steps + anneal_steps:
        return final
    u = (step - warmup_steps) / anneal_steps
    return final + (num_channels - final) * (1.0 - u) ** BUDGET_SCHEDULES[schedule]


@dataclass(frozen=True)
class BudgetSchedule:
    """The budget of every step of one search, and what kind of step each is (see the module docstring).

    Attributes:
        num_channels: ``N``.
        keep_ratio: The final budget as a fraction of ``N``.
        warmup_steps: Dense steps at the start.
        anneal_steps: Steps of the anneal after them.
        schedule: ``cubic`` or ``linear``.
    """

    num_channels: int
    keep_ratio: float
    warmup_steps: int = 0
    anneal_steps: int = 0
    schedule: str = "cubic"

    def __post_init__(self) -> None:
        self.at(0)  # checks every field

    @property
    def final(self) -> float:
        """``K = keep_ratio x N``, the budget after the anneal."""
        return self.at(self.warmup_steps + self.anneal_steps)

    def at(self, step: int) -> float:
        """``K(step)``."""
        return budget_at(step, self.num_channels, self.keep_ratio, self.warmup_steps, self.anneal_steps,
                         self.schedule)

    def kind(self, step: int) -> str:
        """``warmup`` (a dense step), ``anneal`` (a sampling step whose budget is still falling) or ``search``."""
        if step < self.warmup_steps:
            return "warmup"
        return "anneal" if step < self.warmup_steps + self.anneal_steps else "search"

    def sampling_budget(self, step: int) -> float:
        """The budget the scores are feasible for when step ``step`` begins: that of the first sampling step from there
        on, ``K(max(step, W))`` (the warm-up's dense steps leave the scores as they start: ``N`` with an anneal, ``K``
        without)."""
        return self.at(max(step, self.warmup_steps))

    def counts(self, steps: int) -> dict[str, int]:
        """How many of the first ``steps`` search steps were of each kind (``warmup``, ``anneal``, ``search``)."""
        warmup = min(steps, self.warmup_steps)
        anneal = min(steps - warmup, self.anneal_steps)
        return {"warmup": warmup, "anneal": anneal, "search": steps - warmup - anneal}
