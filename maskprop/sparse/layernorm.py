"""LayerNorm and RMSNorm over the last dimension whose features are the channels of a group.

A subnetwork of a network with LayerNorm (or RMSNorm) is the physically narrow network: its LayerNorm normalises the
kept channels only, their mean and variance taken over the kept ones, and scales and shifts them by the kept entries
of its weight and bias; its RMSNorm divides the kept channels by their root mean square over the kept ones and scales
them by the kept entries of its weight. :class:`SparseLayerNorm` and :class:`SparseRMSNorm` compute that in both
modes, with the same code (their base :class:`SparseLastDimNorm`, whose own base :class:`SparseChannelNorm` they share
with :class:`~maskprop.sparse.SparseGroupNorm`; each supplies its normalisation of the kept channels alone,
:func:`kept_layer_norm` and :func:`kept_rms_norm`):

* ``compact``: the input carries the kept channels (the layer before ran narrow); ``F.layer_norm`` (``F.rms_norm``)
  over them with the gathered weight (and bias). Where the width is padded (``align``, or a static step's capacity)
  the padding channels are not kept: the statistics are taken over the kept channels alone and the padding's outputs
  are exactly zero, as :func:`kept_layer_norm` (:func:`kept_rms_norm`) computes (whatever the padding's gathered
  weight and bias hold).

  The weight and bias come from the execution state (``state.weight_and_bias(layer)``, as a linear layer's),
  gathered with every other weight of the forward pass as a linear layer's bias is: off the CPU they are pieces of
  the area-1 table, the one buffer that the linear weights and biases are gathered into with one ``index_select``
  (each piece at an aligned start), and their gradients go back with that table's one ``index_copy_``, so the
  norms add no gather or scatter of their own; on the CPU each is read by its group's index set
  (:mod:`maskprop.sparse.execution`).
* ``masked``: full width, the reference; the same statistics over the kept channels (:func:`kept_layer_norm` or
  :func:`kept_rms_norm` with the mask as ``keep``), whatever the dropped channels hold, and the dropped channels'
  outputs exactly zero.

The two agree on the output and every gradient; at a mask that keeps every channel both are ``nn.LayerNorm``
(``nn.RMSNorm``). A dropped channel gets no gradient (its output is zero whatever its weight and bias, and its input is
not read), and :func:`maskprop.materialize` gives the narrow model an ``nn.LayerNorm`` (``nn.RMSNorm``) of the kept
width holding the kept entries.

:func:`maskprop.make_prunable` puts them in place of an ``nn.LayerNorm`` (timm's ``LayerNorm`` too) and an
``nn.RMSNorm`` (timm's ``RmsNorm`` too) over the last dimension of a tensor whose last dimension is a channel space (an
MLP's hidden units normalised before ``fc2``: timm's ``Mlp`` and ``SwiGLU`` with a ``norm_layer``), and in an
attention module's ``q_norm`` and ``k_norm`` (over each head's features: the heads' group) and ``norm`` (over all
heads' features before ``proj``: the concatenated group that ``proj`` reads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import SparseModule, _wiring_error

if TYPE_CHECKING:
    from .execution import ExecutionState

__all__ = [
    "SparseChannelNorm",
    "SparseLastDimNorm",
    "SparseLayerNorm",
    "SparseRMSNorm",
    "kept_layer_norm",
    "kept_rms_norm",
]

_LOW = (torch.float16, torch.bfloat16)


def _in_float32(*tensors: Tensor | None) -> list[Tensor | None]:
    """``tensors`` in float32 (``None`` stays ``None``): where half or bfloat16 statistics are taken."""
    return [None if t is None else t.float() for t in tensors]


def _as_torch_returns(y: Tensor, dtype: torch.dtype) -> Tensor:
    """``y`` (computed in float32 from an input of ``dtype``) in the dtype ``F.layer_norm`` and ``F.rms_norm`` return:
    the input's, or float32 under CUDA's autocast (which runs both in float32; the CPU's runs neither)."""
    return y if y.dtype == dtype or (y.is_cuda and torch.is_autocast_enabled("cuda")) else y.to(dtype)


def kept_layer_norm(x: Tensor, keep: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm of ``x`` over its last dimension taken over the channels where ``keep`` is 1 (0/1, one entry per
    channel, ``x``'s dtype): their mean and (biased) variance, as ``F.layer_norm`` of the kept channels alone computes
    them; the other channels' outputs are exactly zero, their inputs (any finite values: they are multiplied by 0)
    change nothing, and no gradient reaches them.

    In half or bfloat16 precision the statistics are taken in float32, as ``F.layer_norm`` takes them, and the output
    has the dtype ``F.layer_norm``'s has: the input's, or float32 under CUDA's autocast (which runs ``layer_norm`` in
    float32; the CPU's does not)."""
    dtype = x.dtype
    if dtype in _LOW:
        x, keep, weight, bias = _in_float32(x, keep, weight, bias)
    count = keep.sum()
    mean = (x * keep).sum(-1, keepdim=True) / count
    centred = (x - mean) * keep
    y = centred * torch.rsqrt(centred.square().sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    y = y if bias is None else y + bias * keep
    return _as_torch_returns(y, dtype)


def kept_rms_norm(x: Tensor, keep: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    """RMSNorm of ``x`` over its last dimension taken over the channels where ``keep`` is 1 (0/1, one entry per
    channel, ``x``'s dtype): the kept channels divided by their root mean square (the mean of their squares over the
    kept ones, plus ``eps``; ``None``: ``torch.finfo(x.dtype).eps``, as ``F.rms_norm`` takes it) and scaled by
    ``weight``, as ``F.rms_norm`` of the kept channels alone computes them; the other channels' outputs are exactly
    zero, their inputs (any finite values: they are multiplied by 0) change nothing, and no gradient reaches them.

    In half or bfloat16 precision the statistics are taken in float32, as ``F.rms_norm`` takes them, and the output has
    the dtype ``F.rms_norm``'s has (the input's, or float32 under CUDA's autocast)."""
    dtype = x.dtype
    eps = torch.finfo(dtype).eps if eps is None else eps
    if dtype in _LOW:
        x, keep, weight = _in_float32(x, keep, weight)
    kept = x * keep
    y = kept * torch.rsqrt(kept.square().sum(-1, keepdim=True) / keep.sum() + eps)
    return _as_torch_returns(y if weight is None else y * weight, dtype)


class SparseChannelNorm(SparseModule):
    """What maskprop's normalisations over a group's channels share (:class:`SparseLayerNorm`,
    :class:`SparseRMSNorm`, :class:`~maskprop.sparse.SparseGroupNorm`): statistics a subnetwork takes over its kept
    channels alone, run as the active subnetwork says (the module docstring); the same parameters, the same state-dict
    keys as the torch layer it derives from (listed after it among the bases).

    A subclass says where its channels are (``channel_dim``: -1, the last dimension, or 1), how it normalises
    (:meth:`_normalise`) and which plain layer the narrow model holds (:meth:`narrow_layer`); the execution states
    gather its ``weight`` and ``bias`` (either may be ``None``: one entry per channel of its group) as a linear layer's
    bias, :mod:`maskprop.surgery` slices them to the kept channels and the cost model counts them.
    """

    channel_dim: int = -1
    group: str | None
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    @classmethod
    def _torch_name(cls) -> str:
        return next(b for b in cls.__mro__ if b.__module__.startswith("torch.")).__name__

    @property
    def num_features(self) -> int:
        """The channels normalised: the group's."""
        raise NotImplementedError

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, keep: Tensor | None) -> Tensor:
        """``x`` normalised with ``weight`` and ``bias`` (of its channels' width): over every channel where ``keep`` is
        ``None``, else over the channels where ``keep`` (0/1, ``x``'s dtype) is 1 alone."""
        raise NotImplementedError

    def narrow_layer(self, width: int) -> nn.Module:
        """The plain torch layer of ``width`` channels that computes what this one computes on its kept channels (on
        ``meta``: its parameters are to be assigned)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        state = self.execution_state
        if state is None or self.group is None:
            return super().forward(x)  # the torch layer's
        if state.mode == "masked":
            mask = state.masks.get(self.group)
            if mask is None:  # the group keeps every channel
                return super().forward(x)
            return self._normalise(x, self.weight, self.bias, mask.to(x.dtype))
        index = state.index(self.group)
        if index is None:  # computed whole
            return super().forward(x)
        dim = self.channel_dim
        if x.dim() <= max(dim, 0) or x.shape[dim] != index.numel():
            self._wrong_width(x, state, index.numel())
        weight, bias = state.weight_and_bias(self)  # gathered with all layers' weights, once per forward pass
        real = state.real(self.group)  # None: every computed channel is kept
        return self._normalise(x, weight, bias, None if real is None else real.to(x.dtype))

    def _wrong_width(self, x: Tensor, state: ExecutionState, width: int) -> None:
        """Raise the one-line error of an input of another width than the channels this subnetwork computes."""
        dim = self.channel_dim
        got = x.shape[dim] if x.dim() > max(dim, 0) else None
        wiring = _wiring_error(self, state, "group", self.group, got, self.num_features)
        if wiring is not None:
            raise wiring
        where = "features in its last dimension" if dim == -1 else f"channels in dimension {dim}"
        raise ValueError(f"layer {state.plan.name_of(self)!r} ({type(self).__name__}, group={self.group!r}) is given "
                         f"{got} {where}; expected the {width} its group computes in this subnetwork (of "
                         f"{self.num_features})")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group!r}"


class SparseLastDimNorm(SparseChannelNorm):
    """What :class:`SparseLayerNorm` and :class:`SparseRMSNorm` share: a normalisation over the last dimension, whose
    features are the channels of ``group`` (:class:`SparseChannelNorm`)."""

    normalized_shape: tuple[int, ...]

    def _set_group(self, group: str | None) -> None:
        if len(self.normalized_shape) != 1:
            raise ValueError(f"a {self._torch_name()} over {tuple(self.normalized_shape)} cannot be channel-pruned; "
                             f"expected one dimension, the last (the channels of group {group!r})")
        self.group = group

    @property
    def num_features(self) -> int:
        """The features normalised: the group's channels."""
        return self.normalized_shape[0]


class SparseLayerNorm(SparseLastDimNorm, nn.LayerNorm):
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
        self._set_group(group)

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, keep: Tensor | None) -> Tensor:
        if keep is None:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        return kept_layer_norm(x, keep, weight, bias, self.eps)

    def narrow_layer(self, width: int) -> nn.LayerNorm:
        return nn.LayerNorm(width, eps=self.eps, elementwise_affine=self.elementwise_affine,
                            bias=self.bias is not None, device="meta")


class SparseRMSNorm(SparseLastDimNorm, nn.RMSNorm):
    """``nn.RMSNorm`` over the last dimension, whose features are the channels of ``group`` (a group, or a
    concatenated group); the same parameters, the same state-dict keys (``weight`` alone; its ``bias`` is ``None``,
    as an ``nn.LayerNorm``'s without one is).

    Args:
        normalized_shape: The features normalised (one dimension, the last).
        eps, elementwise_affine: As ``nn.RMSNorm``'s (``eps=None``: ``torch.finfo`` of the input's dtype).
        group: The group of the features (``None``: never pruned, ``nn.RMSNorm`` itself).
    """

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float | None = None,
                 elementwise_affine: bool = True, *, group: str | None = None, **kwargs) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, **kwargs)
        self.register_parameter("bias", None)
        self._set_group(group)

    def _normalise(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, keep: Tensor | None) -> Tensor:
        if keep is None:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return kept_rms_norm(x, keep, weight, self.eps)

    def narrow_layer(self, width: int) -> nn.RMSNorm:
        return nn.RMSNorm(width, eps=self.eps, elementwise_affine=self.elementwise_affine, device="meta")
