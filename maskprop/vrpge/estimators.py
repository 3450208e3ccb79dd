"""Score-gradient estimators of VR-PGE (docs/methods.md, "The score gradient"), as pure tensor functions.

All functions work on flat tensors, one entry per channel of the whole network (see
:meth:`maskprop.vrpge.ChannelScores.flatten`), so one call serves every group. They broadcast: a batch of ``B``
sample pairs is ``mask`` of shape ``(B, C)`` with losses of shape ``(B, 1)``. Results carry no autograd history (they
are meant to be written into ``scores.grad``); device and dtype follow ``s``.

Notation: ``h_j = s_j (1 - s_j)``, guarded below by ``eps``; ``H^alpha(s) = diag(h^alpha)``;
``grad_s ln p(m|s)_j = (m_j - s_j) / h_j`` for independent ``m_j ~ Bernoulli(s_j)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

DEFAULT_EPS = 1e-6
"""Lower guard on ``s (1 - s)``: keeps the estimators finite at ``s = 0`` or ``s = 1``."""


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float if it lies in ``[0, 1)`` (supplement A.2 bounds the variance for ``[1/2, 1)``).

    Raises:
        ValueError: otherwise, naming the value and the valid range.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha < 1.0:  # rejects NaN
        raise ValueError(f"alpha must be in [0, 1), got {alpha!r}")
    return float(alpha)


def _check_eps(eps: float) -> float:
    value = float(eps)
    if not (math.isfinite(value) and 0.0 < value <= 0.25):
        raise ValueError(f"eps must be in (0, 0.25] (it guards s(1-s) <= 1/4), got {eps!r}")
    return value


def _as_mask(mask: Tensor, s: Tensor, name: str) -> Tensor:
    if isinstance(mask, Mapping):
        raise TypeError(f"{name} is a dict of groups; expected one flat tensor of every channel, in the scores' order "
                        f"(ChannelScores.flatten(mask), or the mask ChannelScores.sample_flat draws)")
    if mask.shape[-1:] != s.shape[-1:]:
        raise ValueError(f"{name} has {tuple(mask.shape)[-1:]} channels in its last dimension, scores have "
                         f"{tuple(s.shape)[-1:]}; pass flat tensors of the same length")
    return mask.detach().to(device=s.device, dtype=s.dtype)


def _loss_gap(loss_m: Tensor | float, loss_m2: Tensor | float, s: Tensor) -> Tensor:
    gap = torch.as_tensor(loss_m, device=s.device) - torch.as_tensor(loss_m2, device=s.device)
    if gap.dim() and gap.shape[-1] != 1:  # one loss per example (reduction="none"): the estimator takes the batch's
        raise ValueError(f"the losses have shape {tuple(gap.shape)}; expected each mask's loss on the batch (a number, "
                         f"or one per mask as (k, 1) for k masks): take the mean over the examples")
    return gap.detach().to(s.dtype)


def _h_power(s: Tensor, exponent: float, eps: float) -> Tensor:
    """``(s (1 - s))^exponent`` with ``s (1 - s)`` clamped below at ``eps``."""
    return (s * (1 - s)).clamp_min(eps).pow(exponent)


def log_prob_grad(mask: Tensor, s: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Score function of independent Bernoulli channels: ``grad_s ln p(m|s) = (m - s) / (s (1 - s))``.

    Args:
        mask: the sampled mask ``m`` (bool or 0/1), broadcastable to ``s``.
        s: keep probabilities.
        eps: lower guard on ``s (1 - s)``.
    """
    s = s.detach()
    m = _as_mask(mask, s, "mask")
    return (m - s) / _h_power(s, 1.0, _check_eps(eps))


def vrpge(
    loss_m: Tensor | float,
    loss_m2: Tensor | float,
    mask_m: Tensor,
    s: Tensor,
    alpha: float = 0.5,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """VR-PGE score gradient of the paper: ``(L(m) - L(m')) H^alpha(s) grad_s ln p(m|s)``.

    Unbiased for ``H^alpha(s) grad_s E_m[L(m)]`` (supplement A.3) when ``m`` and ``m'`` are independent samples.

    Args:
        loss_m: loss of the subnetwork ``m`` (the one back-propagated).
        loss_m2: loss of the independent subnetwork ``m'`` (forward only); only its value matters.
        mask_m: the mask ``m`` actually used in the forward pass.
        s: keep probabilities (flat).
        alpha: preconditioning exponent in ``[0, 1)``; ``0`` is the plain policy gradient with a baseline.
        eps: lower guard on ``s (1 - s)``.

    Returns:
        ``g_j = (L(m) - L(m')) (m_j - s_j) (s_j (1 - s_j))^(alpha - 1)``, shaped like ``mask_m`` broadcast with ``s``.
    """
    alpha = check_alpha(alpha)
    s = s.detach()
    m = _as_mask(mask_m, s, "mask_m")
    # supplement eq. (12): H^alpha(s) grad ln p(m|s) = (m - s) h^alpha / h = (m - s) h^(alpha - 1)
    return _loss_gap(loss_m, loss_m2, s) * (m - s) * _h_power(s, alpha - 1.0, _check_eps(eps))


def vrpge_sym(
    loss_m: Tensor | float,
    loss_m2: Tensor | float,
    mask_m: Tensor,
    mask_m2: Tensor,
    s: Tensor,
    alpha: float = 0.5,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Symmetric VR-PGE of the official code: ``1/2 (L(m) - L(m')) (d(m) - d(m'))``, ``d = H^alpha grad ln p``.

    The average of eq. (12) and eq. (12) with ``m`` and ``m'`` swapped, so it is unbiased for the same target
    ``H^alpha(s) grad_s E_m[L(m)]`` and uses both samples' masks at no extra cost.

    Args:
        loss_m: loss of the subnetwork ``m``.
        loss_m2: loss of the independent subnetwork ``m'``.
        mask_m: the mask ``m`` actually used.
        mask_m2: the mask ``m'`` actually used.
        s: keep probabilities (flat).
        alpha: preconditioning exponent in ``[0, 1)``.
        eps: lower guard on ``s (1 - s)``.

    Returns:
        ``g_j = 1/2 (L(m) - L(m')) (m_j - m'_j) (s_j (1 - s_j))^(alpha - 1)``.
    """
    alpha = check_alpha(alpha)
    s = s.detach()
    m = _as_mask(mask_m, s, "mask_m")
    m2 = _as_mask(mask_m2, s, "mask_m2")
    # supplement eq. (12), symmetrised: d(m) - d(m') = ((m - s) - (m' - s)) h^(alpha - 1) = (m - m') h^(alpha - 1)
    return 0.5 * _loss_gap(loss_m, loss_m2, s) * (m - m2) * _h_power(s, alpha - 1.0, _check_eps(eps))


ESTIMATORS: dict[str, Callable[..., Tensor]] = {"vrpge": vrpge, "vrpge_sym": vrpge_sym}
"""Estimator name -> function. ``vrpge`` (paper eq. (12)) is the default; ``vrpge_sym`` is the official code's form."""


def get_estimator(name: str) -> Callable[..., Tensor]:
    """The estimator function registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the valid choices.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid choices: {', '.join(repr(k) for k in ESTIMATORS)}")
    return ESTIMATORS[name]


def score_grad(
    estimator: str,
    loss_m: Tensor | float,
    loss_m2: Tensor | float,
    mask_m: Tensor,
    mask_m2: Tensor,
    s: Tensor,
    alpha: float = 0.5,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """Call the estimator named ``estimator`` with one calling convention for all of them (both masks are passed;
    ``vrpge`` ignores ``mask_m2``).

    Raises:
        ValueError: for an unknown estimator name or ``alpha`` outside ``[0, 1)``.
    """
    fn = get_estimator(estimator)
    if fn is vrpge:
        return vrpge(loss_m, loss_m2, mask_m, s, alpha=alpha, eps=eps)
    return fn(loss_m, loss_m2, mask_m, mask_m2, s, alpha=alpha, eps=eps)
