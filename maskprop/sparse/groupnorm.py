"""GroupNorm over a group's channels, pruned by the features of its groups.

``GroupNorm(G, C)`` normalises each of its ``G`` groups of ``C / G`` consecutive channels (dimension 1) over those
channels and every position. A subnetwork is the physically narrow network only if every GroupNorm group keeps as many
of its channels as the others, ``k``: the narrow model then holds ``nn.GroupNorm(G, G * k)`` on the kept channels, in
their order. So the channels a GroupNorm reads are ``G`` copies of one group of ``C / G`` features side by side (a
concatenated group, as a grouped convolution's are: :func:`maskprop.make_prunable` declares it), and feature ``j`` of
every GroupNorm group is kept or dropped together. ``GroupNorm(1, C)`` (timm's ``GroupNorm1``, PoolFormer's) is a
LayerNorm over the channels and positions, its one copy the group itself.

:class:`SparseGroupNorm` computes that in both modes, with :class:`~maskprop.sparse.SparseLayerNorm`'s code (their
base :class:`~maskprop.sparse.layernorm.SparseChannelNorm`):

* ``compact``: the input carries the kept channels (``G * k``); ``F.group_norm`` with ``G`` groups on them and the
  gathered weight and bias (area-1 table pieces, gathered as a linear layer's bias is:
  :mod:`maskprop.sparse.execution`). Where the width is padded (``align``, or a static step's capacity: each copy
  padded alike) the padding channels are not kept: the statistics of each group are taken over its kept channels
  alone and the padding's outputs are exactly zero (:func:`kept_group_norm`).
* ``masked``: full width, the reference; each group's mean and (biased) variance over its kept channels and every
  position (:func:`kept_group_norm` with the mask as ``keep``), whatever the dropped channels hold, and the dropped
  channels' outputs exactly zero, with no gradient to them.

The two agree on the output and every gradient; at a mask that keeps every channel both are ``nn.GroupNorm``.
:func:`maskprop.materialize` gives the narrow model an ``nn.GroupNorm(G, G * k)`` holding the kept entries (a
:class:`GroupNormAct`, its activation kept, for a :class:`SparseGroupNormAct`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layernorm import _LOW, SparseChannelNorm, _as_torch_returns, _in_float32
from .modules import _ActivationAfter

__all__ = ["GroupNormAct", "SparseGroupNorm", "SparseGroupNormAct", "kept_group_norm"]


def kept_group_norm(x: Tensor, keep: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                    eps: float) -> Tensor:
    """GroupNorm of ``x`` (channels in dimension 1, ``num_groups`` groups of consecutive channels) taken over the
    channels where ``keep`` is 1 (0/1, one entry per channel, ``x``'s dtype): each group's mean and (biased) variance
    over its kept channels and every position, as ``F.group_norm`` of the kept channels alone computes them when every
    group keeps as many; the other channels' outputs are exactly zero, their inputs (any finite values: they are
    multiplied by 0) change nothing, and no gradient reaches them.

    In half or bfloat16 precision the statistics are taken in float32, as ``F.group_norm`` takes them, and the output
    has the dtype ``F.group_norm``'s has: the input's, or float32 under CUDA's autocast (which runs ``group_norm`` in
    float32; the CPU's does not)."""
    dtype, shape = x.dtype, x.shape
    if dtype in _LOW:
        x, keep, weight, bias = _in_float32(x, keep, weight, bias)
    grouped = x.reshape(shape[0], num_groups, shape[1] // num_groups, -1)  # (N, G, channels of a group, positions)
    keep = keep.view(num_groups, -1, 1)
    count = keep.sum((1, 2), keepdim=True).clamp_min(1) * grouped.shape[-1]  # a group keeping none: zeros, not NaN
    mean = (grouped * keep).sum((2, 3), keepdim=True) / count
    centred = (grouped - mean) * keep
    y = (centred * (centred.square().sum((2, 3), keepdim=True) / count + eps).rsqrt()).view(shape)
    per_channel = (-1,) + (1,) * (len(shape) - 2)
    if weight is not None:
        y = y * weight.view(per_channel)
    if bias is not None:
        y = y + (bias * keep.view(-1)).view(per_channel)
    return _as_torch_returns(y, dtype)


class SparseGroupNorm(SparseChannelNorm, nn.GroupNorm):
    """``nn.GroupNorm`` over the channels of ``group`` (dimension 1): a concatenated group of ``num_groups`` copies of
    one group of ``num_channels / num_groups`` features (or, with one group, any group), pruned feature by feature
    across its groups (the module docstring); the same parameters, the same state-dict keys.

    Args:
        num_groups, num_channels, eps, affine: As ``nn.GroupNorm``'s.
        group: The group of its channels (``None``: never pruned, ``nn.GroupNorm`` itself).
    """

    channel_dim = 1

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, *,
                 group: str | None = None, **kwargs) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)
        self.group = group

    @property
    def num_features(self) -> int:
        """The channels normalised: the group's (all copies)."""
        return self.num_channels

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, keep: Tensor | None) -> Tensor:
        if keep is None:
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return kept_group_norm(x, keep, self.num_groups, weight, bias, self.eps)

    def narrow_layer(self, width: int) -> nn.GroupNorm:
        return nn.GroupNorm(self.num_groups, width, eps=self.eps, affine=self.affine, device="meta")


class SparseGroupNormAct(_ActivationAfter, SparseGroupNorm):
    """:class:`SparseGroupNorm` followed by ``drop`` and ``act``: what :func:`maskprop.make_prunable` puts in place of
    timm's ``GroupNormAct`` and ``GroupNorm1Act`` (same state-dict keys). The dropped channels are zero after the
    GroupNorm, before ``act``."""

    def narrow_layer(self, width: int) -> GroupNormAct:
        return GroupNormAct(self.num_groups, width, eps=self.eps, affine=self.affine, device="meta")


class GroupNormAct(_ActivationAfter, nn.GroupNorm):
    """``nn.GroupNorm`` followed by ``drop`` and ``act`` in plain torch: the narrow model's layer where the full model
    has a :class:`SparseGroupNormAct`."""
