"""Euclidean projection of the scores onto the feasible set {0 <= s <= 1, sum s <= K}.

The derivation is in docs/methods.md, "Projection onto the budget".

The projection of s is ``clamp(s - v, 0, 1)`` for the smallest shift ``v >= 0`` with
``f(v) = sum_j clamp(s_j - v, 0, 1) <= K`` (the KKT conditions of the quadratic program: ``v`` is the multiplier of the
budget constraint, zero when the budget is slack). ``f`` is continuous, non-increasing and piecewise linear with
breakpoints at ``s_j`` and ``s_j - 1``, so the exact ``v`` is found by evaluating ``f`` at every breakpoint (sorted
scores and prefix sums), picking the segment where ``f`` crosses ``K`` and solving the linear equation on it. No
bisection, no Python loop over elements, no host synchronisation: it runs as a handful of tensor ops on any device.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _check_budget(budget: float) -> float:
    is_number = isinstance(budget, numbers.Real) and not isinstance(budget, bool)
    if isinstance(budget, Tensor) and budget.numel() == 1 and not budget.dtype == torch.bool:
        budget, is_number = float(budget), True
    if not is_number or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    return float(budget)


def _kept_mass(shift: Tensor, sorted_scores: Tensor, prefix: Tensor) -> Tensor:
    """``f(v) = sum_j clamp(s_j - v, 0, 1)`` at every entry of ``shift``, from the sorted scores and their prefix sums.

    Scores ``>= v + 1`` contribute 1, scores in ``(v, v + 1)`` contribute ``s_j - v``, the rest contribute 0.
    """
    n = sorted_scores.numel()
    n_full = n - torch.searchsorted(sorted_scores, shift + 1, right=False)  # s_j >= v + 1
    n_zero = torch.searchsorted(sorted_scores, shift, right=True)  # s_j <= v
    n_partial = n - n_full - n_zero
    partial_sum = prefix[n - n_full] - prefix[n_zero]
    return n_full.to(shift.dtype) + partial_sum - n_partial.to(shift.dtype) * shift


def project_scores(s: Tensor, budget: float) -> Tensor:
    """Exact Euclidean projection of ``s`` onto ``{x : 0 <= x <= 1, sum x <= budget}``.

    If ``sum clamp(s, 0, 1) <= budget`` the projection is the clamp; otherwise it is ``clamp(s - v, 0, 1)`` with the
    unique ``v > 0`` such that ``sum clamp(s - v, 0, 1) = budget`` (docs/methods.md, "Projection onto the budget").

    Args:
        s: scores of any shape; the budget applies to the sum over all entries. Floating point (half precision is
            computed in float32). The result carries no autograd history.
        budget: the budget ``K >= 0`` (``keep_ratio x number of channels``). ``K >= s.numel()`` means no budget.

    Returns:
        The projection, with the shape, dtype and device of ``s``.

    Raises:
        ValueError: if ``s`` is not floating point or ``budget`` is negative or not finite.
    """
    budget = _check_budget(budget)
    if not s.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got dtype {s.dtype}")
    if s.numel() == 0:
        return s.detach().clone()
    work_dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
    x = s.detach().reshape(-1).to(work_dtype)

    sorted_scores = torch.sort(x).values
    prefix = torch.cat([x.new_zeros(1), torch.cumsum(sorted_scores, 0)])
    # Candidate shifts: 0 and every breakpoint of f on v >= 0; f is linear between consecutive candidates.
    candidates = torch.cat([x.new_zeros(1), sorted_scores, sorted_scores - 1]).clamp_min(0)
    mass = _kept_mass(candidates, sorted_scores, prefix)
    # [v_lo, v_hi]: the consecutive candidates between which f crosses K. v_hi exists because f(max(s, 0)) = 0;
    # v_hi = 0 means the budget is slack (the projection is the clamp).
    v_hi = torch.where(mass <= budget, candidates, math.inf).min()
    v_lo = torch.minimum(torch.where(mass > budget, candidates, 0).max(), v_hi)
    # On [v_lo, v_hi] the sets "full" (s_j - v >= 1) and "partial" (0 < s_j - v < 1) are fixed; take them at the
    # midpoint and solve  n_full + sum_partial (s_j - v) = K  for v directly from s (no prefix-sum round-off).
    middle = 0.5 * (v_lo + v_hi)
    full = x - middle >= 1
    partial = (x - middle > 0) & ~full
    n_partial = partial.sum().to(work_dtype)
    numerator = full.sum().to(work_dtype) + torch.where(partial, x, 0).sum() - budget
    shift = torch.where(n_partial > 0, numerator / n_partial.clamp_min(1), v_hi)
    shift = torch.minimum(torch.maximum(shift, v_lo), v_hi)  # guards round-off; exact arithmetic lands inside
    return (x - shift).clamp(0, 1).to(s.dtype).reshape(s.shape)
