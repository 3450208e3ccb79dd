"""How many units each sparse-backward layer keeps: a fixed ratio per layer, or one global budget.

**Fixed ratio.** Every layer keeps ``round(ratio * units)`` (MSBP paper: sparse ratio r = k / n).

**Global budget with balanced thresholds** (docs/methods.md, section 6, after the appendix of a paper on layer-wise
top-k gradient sparsification). ``total`` kept units are shared by all layers. A layer's
allocation ``k_l`` corresponds to a top-k threshold: it keeps its ``k_l`` largest (scaled) unit scores. The
allocation is balanced when one common threshold separates kept from dropped entries in every layer, i.e. when
no layer drops an entry larger than an entry some other layer keeps. We measure the imbalance as

    spread = max over layers of the largest dropped score - min over layers of the smallest kept score

(clipped at 0; 0 means a common threshold exists). One adjustment step (the appendix's Property 2 / Algorithm 2,
``OneStepAdjustment``) bisects the bracket [smallest kept, largest dropped], which contains the common threshold:
with ``mid`` its midpoint, if at least ``total`` entries score ``>= mid`` the threshold lies in the upper half,
otherwise in the lower half. Every layer keeps what lies above that half, and the entries still missing to reach
``total`` exactly are taken from inside the half, shared among the layers in proportion to how many entries each
has there (each layer taking its largest). All kept entries then lie at or above the half's lower end and all
dropped ones at or below its upper end, so each step keeps the total fixed and at least halves the spread; after
finitely many steps one threshold is common to all layers (its Property 1).

**Comparable magnitudes** (the appendix's eqs. (8)-(9)). Gradient variance changes from layer l-1 to layer l by
``(k_l^2 c_l) / (k_{l-1}^2 d_l)`` for convolutions (kernel size k, input channels c, output channels d) and by
``c_l / d_l`` for fully connected layers. With ``scale="variance"`` each layer's scores are divided by the square
root of its variance relative to the first layer before balancing; ``scale="rms"`` divides by the root mean square
of the layer's own scores instead. The paper derives the ratio for weight gradients under i.i.d./ReLU
assumptions; here it is applied to the unit scores that choose the kept rows of those weight gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from maskprop.sbp.convert import sparse_layers
from maskprop.sbp.layers import SparseBackwardConv2d, SparseBackwardMixin, keep_count

SCALES = ("none", "variance", "rms")


def fixed_allocation(sizes: Sequence[int], ratio: float) -> list[int]:
    """Units kept per layer at a fixed ratio: ``max(1, round(ratio * n))`` for each layer size ``n``.

    Raises:
        ValueError: ``ratio`` is outside (0, 1].
    """
    return [keep_count(n, ratio) for n in sizes]


def _largest_remainder(amount: int, weights: Sequence[int]) -> list[int]:
    """Split ``amount`` into integer shares proportional to ``weights`` (ties: the earlier entry gets the extra)."""
    weight_sum = sum(weights)
    if amount == 0 or weight_sum == 0:
        return [0] * len(weights)
    quotas = [amount * w / weight_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[: amount - sum(shares)]:
        shares[i] += 1
    return shares


def _check_total(total: int, sizes: Sequence[int], min_k: int) -> None:
    if isinstance(min_k, bool) or not isinstance(min_k, int) or not 0 <= min_k <= min(sizes, default=0):
        raise ValueError(f"min_k={min_k!r} is invalid for layers of sizes {list(sizes)}; "
                         "expected an int between 0 and the smallest layer size")
    low, high = min_k * len(sizes), sum(sizes)
    if isinstance(total, bool) or not isinstance(total, int) or not low <= total <= high:
        raise ValueError(f"total={total!r} kept units is out of range for {len(sizes)} layers of sizes {list(sizes)}; "
                         f"expected an int with {low} <= total <= {high}")


def proportional_allocation(sizes: Sequence[int], total: int, min_k: int = 1) -> list[int]:
    """Split ``total`` kept units over layers in proportion to their sizes, each layer keeping at least ``min_k``.

    Raises:
        ValueError: ``total`` is below ``min_k`` per layer or above the number of units.
    """
    _check_total(total, sizes, min_k)
    extra = _largest_remainder(total - min_k * len(sizes), [n - min_k for n in sizes])
    return [min_k + e for e in extra]


def _sorted_free(scores: Sequence[Tensor], min_k: int) -> list[Tensor]:
    """Each layer's scores sorted descending, float64 on the CPU, without the ``min_k`` entries always kept."""
    return [torch.sort(s.detach().reshape(-1).double().cpu(), descending=True).values[min_k:] for s in scores]


def _bounds(free: Sequence[Tensor], kept: Sequence[int]) -> tuple[float, float]:
    """(smallest kept score, largest dropped score) over all layers; +inf / -inf when there is none."""
    smallest_kept = min((f[j - 1].item() for f, j in zip(free, kept) if j >= 1), default=math.inf)
    largest_dropped = max((f[j].item() for f, j in zip(free, kept) if j < len(f)), default=-math.inf)
    return smallest_kept, largest_dropped


def _spread_of(free: Sequence[Tensor], kept: Sequence[int]) -> float:
    smallest_kept, largest_dropped = _bounds(free, kept)
    return max(0.0, largest_dropped - smallest_kept)


def _exact_band(free: Sequence[Tensor], base: Sequence[int], lo: float, need: int) -> list[int]:
    """Take the ``need`` globally largest entries ``>= lo`` beyond each layer's first ``base`` (ties: lower layer)."""
    values, owners = [], []
    for layer, (f, b) in enumerate(zip(free, base)):
        band = f[b:][f[b:] >= lo]
        values.append(band)
        owners.append(torch.full((len(band),), layer))
    order = torch.sort(torch.cat(values), descending=True, stable=True).indices[:need]
    taken = torch.bincount(torch.cat(owners)[order], minlength=len(free)).tolist()
    return [b + t for b, t in zip(base, taken)]


def _step(free: Sequence[Tensor], kept: Sequence[int]) -> list[int]:
    """One adjustment on the free parts; assumes the spread is positive."""
    total = sum(kept)
    lo, hi = _bounds(free, kept)
    mid = 0.5 * (lo + hi)
    if not lo < mid < hi:  # the bracket is down to adjacent floats: settle it exactly
        base = [int((f > hi).sum()) for f in free]
        return _exact_band(free, base, lo, total - sum(base))
    at_least_mid = [int((f >= mid).sum()) for f in free]
    if sum(at_least_mid) >= total:  # the common threshold is in [mid, hi]
        base = [int((f > hi).sum()) for f in free]
        room = [a - b for a, b in zip(at_least_mid, base)]
    else:  # it is in [lo, mid)
        base = at_least_mid
        room = [int((f >= lo).sum()) - b for f, b in zip(free, base)]
    shares = _largest_remainder(total - sum(base), room)
    return [b + s for b, s in zip(base, shares)]


def balance_step(scores: Sequence[Tensor], ks: Sequence[int], min_k: int = 1) -> list[int]:
    """One threshold adjustment (the appendix's ``OneStepAdjustment``): same total, spread at least halved.

    Args:
        scores: per-layer unit scores (already scaled to be comparable).
        ks: current allocation, each ``min_k <= k_l <= len(scores[l])``.
        min_k: units every layer keeps regardless of its scores.

    Returns:
        The new allocation, with ``sum`` equal to ``sum(ks)``.
    """
    free = _sorted_free(scores, min_k)
    kept = [k - min_k for k in ks]
    if _spread_of(free, kept) <= 0.0:
        return list(ks)
    return [k + min_k for k in _step(free, kept)]


def threshold_spread(scores: Sequence[Tensor], ks: Sequence[int], min_k: int = 1) -> float:
    """Largest dropped score minus smallest kept score over all layers, clipped at 0 (0: one common threshold)."""
    return _spread_of(_sorted_free(scores, min_k), [k - min_k for k in ks])


@dataclass
class Allocation:
    """Result of :func:`balance`.

    Attributes:
        ks: units kept per layer; they sum to the total.
        spreads: the threshold spread before the first step and after every step (non-increasing, each at most
            half the previous one).
        threshold: a common threshold (midpoint between the largest dropped and the smallest kept score), or NaN
            when none is defined (every entry kept or every entry dropped).
    """

    ks: list[int]
    spreads: list[float] = field(default_factory=list)
    threshold: float = math.nan


def balance(
    scores: Sequence[Tensor], total: int, ks: Sequence[int] | None = None, min_k: int = 1, max_steps: int = 64
) -> Allocation:
    """Share ``total`` kept units among layers so that one threshold serves them all (the appendix's Algorithm 2).

    Args:
        scores: per-layer unit scores (already scaled to be comparable).
        total: kept units summed over all layers.
        ks: starting allocation (e.g. the previous step's); default: proportional to the layer sizes.
        min_k: units every layer keeps regardless of its scores.
        max_steps: adjustment steps before the remaining bracket is settled exactly.

    Raises:
        ValueError: ``total`` or ``ks`` do not fit the layer sizes.
    """
    sizes = [s.numel() for s in scores]
    _check_total(total, sizes, min_k)
    if ks is None:
        ks = proportional_allocation(sizes, total, min_k)
    elif len(ks) != len(sizes) or sum(ks) != total or any(not min_k <= k <= n for k, n in zip(ks, sizes)):
        raise ValueError(f"ks={list(ks)} does not fit; expected {len(sizes)} ints summing to {total}, each between "
                         f"min_k={min_k} and its layer size {sizes}")
    free = _sorted_free(scores, min_k)
    kept = [k - min_k for k in ks]
    spreads = [_spread_of(free, kept)]
    for _ in range(max_steps):
        if spreads[-1] <= 0.0:
            break
        kept = _step(free, kept)
        spreads.append(_spread_of(free, kept))
    if spreads[-1] > 0.0:  # not settled within max_steps: take the global top entries directly
        kept = _exact_band(free, [0] * len(free), -math.inf, total - min_k * len(free))
        spreads.append(_spread_of(free, kept))
    smallest_kept, largest_dropped = _bounds(free, kept)
    threshold = 0.5 * (smallest_kept + largest_dropped) if math.isfinite(smallest_kept + largest_dropped) else math.nan
    return Allocation(ks=[k + min_k for k in kept], spreads=spreads, threshold=threshold)


def layer_geometry(layer: nn.Module) -> tuple[int, int, int]:
    """``(input channels c, output channels d, kernel area k^2)`` of a linear or conv layer (k^2 = 1 for linear)."""
    if isinstance(layer, (nn.Conv2d, SparseBackwardConv2d)):
        return layer.in_channels, layer.out_channels, layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, 1
    raise ValueError(f"cannot take the geometry of a {type(layer).__name__}; expected an nn.Linear or nn.Conv2d")


def variance_scales(geometry: Sequence[tuple[int, int, int]]) -> list[float]:
    """Per-layer factors that make gradient magnitudes comparable (the appendix's eqs. (8)-(9)).

    With layers in forward order, the relative gradient variance is ``v_1 = 1`` and
    ``v_l = v_{l-1} * (k_l^2 c_l) / (k_{l-1}^2 d_l)`` (eq. (8); eq. (9) is the case k = 1). The factor is
    ``1 / sqrt(v_l)``, a multiplier for magnitudes.

    Args:
        geometry: ``(c, d, k^2)`` per layer, as returned by :func:`layer_geometry`.
    """
    scales, variance = [], 1.0
    for i, (c, d, area) in enumerate(geometry):
        if i > 0:
            variance *= (area * c) / (geometry[i - 1][2] * d)
        scales.append(1.0 / math.sqrt(variance))
    return scales


class GlobalBudget:
    """One budget of kept units shared by the sparse-backward layers of a model, balanced by thresholds.

    The layers record the unit scores of each backward; :meth:`update`, called after ``loss.backward()``,
    re-balances the allocation from them (the appendix adjusts the thresholds between iterations in the same way)
    and sets every layer's ``k`` for the next step.

    Args:
        model: a converted model (its sparse-backward layers in registration order, taken as forward order), or
            a sequence of sparse-backward layers.
        total: kept units summed over the layers; give this or ``ratio``.
        ratio: ``total = round(ratio * all units)``.
        scale: ``"none"``, ``"variance"`` (eqs. (8)-(9)) or ``"rms"``.
        min_k: units every layer keeps.
        max_steps: adjustment steps per update.

    Raises:
        ValueError: no sparse-backward layers, both or neither of ``total``/``ratio``, out-of-range values, or an
            unknown ``scale``.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[SparseBackwardMixin],
        total: int | None = None,
        ratio: float | None = None,
        scale: str = "none",
        min_k: int = 1,
        max_steps: int = 64,
    ) -> None:
        layers = [layer for _, layer in sparse_layers(model)] if isinstance(model, nn.Module) else list(model)
        if not layers:
            raise ValueError("GlobalBudget got no sparse-backward layers; expected a model converted with "
                             "maskprop.sbp.convert or a list of SparseBackwardLinear/SparseBackwardConv2d")
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r} is unknown; expected one of {SCALES}")
        if (total is None) == (ratio is None):
            raise ValueError(f"got total={total!r} and ratio={ratio!r}; expected exactly one of them")
        sizes = [layer.num_units for layer in layers]
        if ratio is not None:
            total = max(min_k * len(sizes), keep_count(sum(sizes), ratio))
        self.layers = layers
        self.total = total
        self.scale = scale
        self.min_k = min_k
        self.max_steps = max_steps
        self.ks = proportional_allocation(sizes, total, min_k)
        self.spreads: list[float] = []
        self._variance_scales = variance_scales([layer_geometry(layer) for layer in layers])
        for layer, k in zip(layers, self.ks):
            layer.set_keep(k=k)
            layer.record_scores = True

    def _scaled_scores(self) -> list[Tensor]:
        raw = [layer.last_scores.detach().reshape(-1) for layer in self.layers]
        flat = torch.cat(raw).double().cpu()  # one device-to-host copy per update, not one per layer
        scores = []
        for i, s in enumerate(flat.split([r.numel() for r in raw])):
            if self.scale == "variance":
                s = s * self._variance_scales[i]
            elif self.scale == "rms":
                rms = s.square().mean().sqrt()
                s = s / rms if rms > 0 else s
            scores.append(s)
        return scores

    def update(self) -> list[int]:
        """Re-balance from the scores of the last backward and set each layer's ``k``; returns the allocation.

        Does nothing until every layer has recorded scores (i.e. before the first backward).
        """
        if any(layer.last_scores is None for layer in self.layers):
            return list(self.ks)
        allocation = balance(self._scaled_scores(), self.total, ks=self.ks, min_k=self.min_k,
                             max_steps=self.max_steps)
        self.ks, self.spreads = allocation.ks, allocation.spreads
        for layer, k in zip(self.layers, self.ks):
            layer.set_keep(k=k)
        return list(self.ks)

    def state_dict(self) -> dict[str, object]:
        """The allocation, for checkpoints."""
        return {"total": self.total, "ks": list(self.ks)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore an allocation saved by :meth:`state_dict`.

        Raises:
            ValueError: the saved allocation does not fit these layers.
        """
        ks = list(state["ks"])
        sizes = [layer.num_units for layer in self.layers]
        if len(ks) != len(sizes) or sum(ks) != state["total"] or any(not 1 <= k <= n for k, n in zip(ks, sizes)):
            raise ValueError(f"saved allocation {ks} (total {state['total']}) does not fit layers of sizes {sizes}; "
                             "expected one saved from the same model")
        self.total, self.ks = int(state["total"]), ks
        for layer, k in zip(self.layers, ks):
            layer.set_keep(k=k)
