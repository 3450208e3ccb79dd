"""Euclidean projection of the scores onto the feasible set {0 <= s <= 1, sum_j w_j s_j <= K}.

The derivation is in docs/methods.md, "Projection onto the budget".

With prices ``w_j > 0`` (all 1 for a budget counted in channels), the projection of s is
``clamp(s - v w, 0, 1)`` for the smallest ``v >= 0`` with ``f(v) = sum_j w_j clamp(s_j - v w_j, 0, 1) <= K`` (the KKT
conditions of the quadratic program: ``v`` is the multiplier of the budget constraint, zero when the budget is
slack). ``f`` is continuous, non-increasing and piecewise linear with breakpoints at ``s_j / w_j`` (channel j reaches
0) and ``(s_j - 1) / w_j`` (it leaves 1), so the exact ``v`` is found by evaluating ``f`` at every breakpoint (sorted
breakpoints and suffix sums), picking the segment where ``f`` crosses ``K`` and solving the linear equation on it. No
bisection, no Python loop over elements, no host synchronisation: it runs as a handful of tensor ops on any device.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def _check_budget(budget: float | Tensor, s: Tensor) -> float | Tensor:
    if isinstance(budget, Tensor):  # on the device: its value is not read (a CUDA graph replays this with new ones)
        if budget.numel() != 1 or not budget.is_floating_point() or budget.device != s.device:
            raise ValueError(f"a budget tensor must be one floating-point value on the scores' device {s.device}, "
                             f"got shape {tuple(budget.shape)} {budget.dtype} on {budget.device}")
        return budget.reshape(())
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    return float(budget)


def _suffix_sums(sorted_keys: Tensor, values: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sort ``values`` (rows: one quantity each) by ``sorted_keys``' order and return the keys sorted and, per row,
    the sums over entries ``i..n-1`` for every ``i`` in ``0..n`` (the last one 0). ``values=None``: the rows are
    ``[1, key]`` (unit prices), whose sums need no gather of the first row: ``n - i`` (exact in floating point)."""
    keys, order = torch.sort(sorted_keys)
    ordered = keys.unsqueeze(0) if values is None else values[:, order]
    total = ordered.sum(dim=1, keepdim=True)
    suffix = total - torch.cat([ordered.new_zeros(ordered.shape[0], 1), torch.cumsum(ordered, dim=1)], dim=1)
    if values is None:
        n = keys.numel()
        suffix = torch.cat([torch.arange(n, -1, -1, dtype=keys.dtype, device=keys.device).unsqueeze(0), suffix])
    return keys, suffix


def _budget_mass(shift: Tensor, x: Tensor, w: Tensor | None) -> Tensor:
    """``f(v) = sum_j w_j clamp(x_j - v w_j, 0, 1)`` at every entry of ``shift`` (``w=None``: every price 1).

    Channel j is full (contributes ``w_j``) for ``v <= a_j = (x_j - 1) / w_j``, partial (contributes
    ``w_j x_j - v w_j^2``) for ``a_j < v < b_j = x_j / w_j`` and zero from ``b_j`` on. As ``a_j < b_j``, the partial
    set is ``{b_j > v}`` less ``{a_j >= v}``, so every sum is a suffix sum over sorted ``a`` or sorted ``b``.
    """
    if w is None:  # a = b - 1 keeps b's order: one sort serves both (the training step's projection); w = w^2 = 1
        b_sorted, b_suffix = _suffix_sums(x, None)
        a_sorted, a_suffix = b_sorted - 1, b_suffix
    else:
        rows = torch.stack([w, w * x, w * w])
        b_sorted, b_suffix = _suffix_sums(x / w, rows)
        a_sorted, a_suffix = _suffix_sums((x - 1) / w, rows)
    at_a = a_suffix[:, torch.searchsorted(a_sorted, shift, right=False)]  # entries with a_j >= v
    at_b = b_suffix[:, torch.searchsorted(b_sorted, shift, right=True)]  # entries with b_j > v
    curvature = at_b[0] - at_a[0] if w is None else at_b[2] - at_a[2]  # sum of w^2 over the partial set
    partial = (at_b[1] - at_a[1]) - shift * curvature
    return at_a[0] + partial


def project_scores(s: Tensor, budget: float | Tensor, prices: Tensor | None = None) -> Tensor:
    """Exact Euclidean projection of ``s`` onto ``{x : 0 <= x <= 1, sum_j w_j x_j <= budget}``.

    If ``sum w clamp(s, 0, 1) <= budget`` the projection is the clamp; otherwise it is ``clamp(s - v w, 0, 1)`` with
    the unique ``v > 0`` such that ``sum w clamp(s - v w, 0, 1) = budget`` (docs/methods.md, "Projection onto the
    budget").

    Args:
        s: scores of any shape; the budget applies to the sum over all entries. Floating point (half precision is
            computed in float32). The result carries no autograd history.
        budget: the budget ``K >= 0`` (``keep_ratio x number of channels`` when every price is 1). ``K >= sum w``
            means no budget. A one-element tensor on the device of ``s`` is used without reading it to the host (the
            projection inside a captured CUDA graph, whose budget is rewritten before each replay): its value is the
            caller's to check.
        prices: ``w``, positive and finite, the shape of ``s``, one price per entry; None: every price 1 (a budget
            counted in channels).

    Returns:
        The projection, with the shape, dtype and device of ``s``.

    Raises:
        ValueError: if ``s`` is not floating point, ``budget`` is negative or not finite, or ``prices`` has another
            shape than ``s``.
    """
    budget = _check_budget(budget, s)
    if not s.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got dtype {s.dtype}")
    if prices is not None and prices.shape != s.shape:
        raise ValueError(f"prices must have the shape of the scores {tuple(s.shape)}, got {tuple(prices.shape)}")
    if s.numel() == 0:
        return s.detach().clone()
    work_dtype = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
    x = s.detach().reshape(-1).to(work_dtype)
    # Every price 1 (w=None) skips the multiplications by 1 of the priced formulas: the same numbers, fewer kernels.
    w = None if prices is None else prices.detach().reshape(-1).to(device=x.device, dtype=work_dtype)
    if isinstance(budget, Tensor):
        budget = budget.to(work_dtype)

    # Candidate shifts: 0 and every breakpoint of f on v >= 0; f is linear between consecutive candidates.
    breakpoints = [x, x - 1] if w is None else [x / w, (x - 1) / w]
    candidates = torch.cat([x.new_zeros(1), *breakpoints]).clamp_min(0)
    mass = _budget_mass(candidates, x, w)
    # [v_lo, v_hi]: the consecutive candidates between which f crosses K. v_hi exists because f(max(s / w, 0)) = 0;
    # v_hi = 0 means the budget is slack (the projection is the clamp).
    over = mass > budget
    v_hi = candidates.masked_fill(over, math.inf).min()
    v_lo = torch.minimum((candidates * over).max(), v_hi)  # candidates >= 0: those not over count as 0
    # On [v_lo, v_hi] the sets "full" (x_j - v w_j >= 1) and "partial" (0 < x_j - v w_j < 1) are fixed; take them at
    # the midpoint and solve  sum_full w + sum_partial w (x - v w) = K  for v directly (no suffix-sum round-off).
    middle = 0.5 * (v_lo + v_hi)
    left = x - (middle if w is None else middle * w)
    full = left >= 1
    partial = (left > 0) ^ full  # full is part of left > 0
    if w is None:
        curvature = partial.sum(dtype=x.dtype)  # a count: 0 or at least 1
        numerator = full.sum(dtype=x.dtype) + (x * partial).sum() - budget
        ratio = numerator / curvature.clamp_min(1)
    else:
        curvature = (w * w * partial).sum()
        numerator = (w * full).sum() + (w * x * partial).sum() - budget
        ratio = numerator / torch.where(curvature > 0, curvature, 1)
    shift = torch.where(curvature > 0, ratio, v_hi)
    shift = torch.minimum(torch.maximum(shift, v_lo), v_hi)  # guards round-off; exact arithmetic lands inside
    return (x - (shift if w is None else shift * w)).clamp(0, 1).to(s.dtype).reshape(s.shape)
