"""LayerNorm over the last dimension whose features are the channels of a group.

A subnetwork of a network with LayerNorm is the physically narrow network: its LayerNorm normalises the kept channels
only, their mean and variance taken over the kept ones, and scales and shifts them by the kept entries of its weight
and bias. :class:`SparseLayerNorm` computes that in both modes:

* ``compact``: the input carries the kept channels (the layer before ran narrow); ``F.layer_norm`` over them with the
  gathered weight and bias. Where the width is padded (``align``, or a static step's capacity) the padding channels
  are not kept: the mean and variance are taken over the kept channels alone and the padding's outputs are exactly
  zero, as :func:`kept_layer_norm` computes (whatever the padding's gathered weight and bias hold).

  The weight and bias come from the execution state (``state.weight_and_bias(layer)``, as a linear layer's),
  gathered with every other weight of the forward pass as a linear layer's bias is: off the CPU they are pieces of
  the area-1 table, the one buffer that the linear weights and biases are gathered into with one ``index_select``
  (each piece at an aligned start), and their gradients go back with that table's one ``index_copy_``, so the
  LayerNorms add no gather or scatter of their own; on the CPU each is read by its group's index set
  (:mod:`maskprop.sparse.execution`).
* ``masked``: full width, the reference; the same statistics over the kept channels (:func:`kept_layer_norm` with the
  mask as ``keep``), whatever the dropped channels hold, and the dropped channels' outputs exactly zero.

The two agree on the output and every gradient; at a mask that keeps every channel both are ``nn.LayerNorm``. A
dropped channel gets no gradient (its output is zero whatever its weight and bias, and its input is not read), and
:func:`maskprop.materialize` gives the narrow model an ``nn.LayerNorm`` of the kept width holding the kept entries.

:func:`maskprop.make_prunable` puts it in place of an ``nn.LayerNorm`` (timm's ``LayerNorm`` too) over the last
dimension of a tensor whose last dimension is a channel space (an MLP's hidden units normalised before ``fc2``:
timm's ``Mlp`` and ``SwiGLU`` with a ``norm_layer``), and in an attention module's ``q_norm`` and ``k_norm`` (over
each head's features: the heads' group) and ``norm`` (over all heads' features before ``proj``: the concatenated
group that ``proj`` reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import SparseModule, _wiring_error

if TYPE_CHECKING:
    from .execution import ExecutionState

__all__ = ["SparseLayerNorm", "kept_layer_norm"]


def kept_layer_norm(x: Tensor, keep: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm of ``x`` over its last dimension taken over the channels where ``keep`` is 1 (0/1, one entry per
    channel, ``x``'s dtype): their mean and (biased) variance, as ``F.layer_norm`` of the kept channels alone computes
    them; the other channels' outputs are exactly zero, their inputs (any finite values: they are multiplied by 0)
    change nothing, and no gradient reaches them.

    In half or bfloat16 precision the statistics are taken in float32, as ``F.layer_norm`` takes them, and the output
    has the dtype ``F.layer_norm``'s has: the input's, or float32 under CUDA's autocast (which runs ``layer_norm`` in
    float32; the CPU's does not)."""
    dtype = x.dtype
    low = dtype in (torch.float16, torch.bfloat16)
    if low:
        x, keep = x.float(), keep.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    centred = (x - mean) * keep
    y = centred * torch.rsqrt(centred.square().sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    y = y if bias is None else y + bias * keep
    return y.to(dtype) if low and not (y.is_cuda and torch.is_autocast_enabled("cuda")) else y


class SparseLayerNorm(nn.LayerNorm, SparseModule):
    """``nn.LayerNorm`` over the last dimension, whose features are the channels of ``group`` (a group, or a
    concatenated group: an attention's heads' features side by side); the same parameters, the same state-dict keys.

    Args:
        normalized_shape: The features normalised (one dimension, the last).
        eps, elementwise_affine, bias: As ``nn.LayerNorm``'s.
        group: The group of the features (``None``: never pruned, ``nn.LayerNorm`` itself).
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, group: str | None = None, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, **kwargs)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"a LayerNorm over {tuple(self.normalized_shape)} cannot be channel-pruned; expected one "
                             f"dimension, the last (the channels of group {group!r})")
        self.group = group

    @property
    def num_features(self) -> int:
        """The features normalised: the group's channels."""
        return self.normalized_shape[0]

    def forward(self, x: Tensor) -> Tensor:
        state = self.execution_state
        if state is None or self.group is None:
            return super().forward(x)
        if state.mode == "masked":
            mask = state.masks.get(self.group)
            if mask is None:  # the group keeps every channel
                return super().forward(x)
            return kept_layer_norm(x, mask.to(x.dtype), self.weight, self.bias, self.eps)
        index = state.index(self.group)
        if index is None:  # computed whole
            return super().forward(x)
        if x.dim() == 0 or x.shape[-1] != index.numel():
            self._wrong_width(x, state, index.numel())
        weight, bias = state.weight_and_bias(self)  # gathered with all layers' weights, once per forward pass
        real = state.real(self.group)
        if real is None:  # every computed channel is kept
            return F.layer_norm(x, (index.numel(),), weight, bias, self.eps)
        return kept_layer_norm(x, real.to(x.dtype), weight, bias, self.eps)

    def _wrong_width(self, x: Tensor, state: ExecutionState, width: int) -> None:
        """Raise the one-line error of an input of another width than the channels this subnetwork computes."""
        got = x.shape[-1] if x.dim() else None
        wiring = _wiring_error(self, state, "group", self.group, got, self.num_features)
        if wiring is not None:
            raise wiring
        raise ValueError(f"layer {state.plan.name_of(self)!r} (SparseLayerNorm, group={self.group!r}) is given "
                         f"{got} features in its last dimension; expected the {width} its group computes in this "
                         f"subnetwork (of {self.num_features})")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group!r}"
