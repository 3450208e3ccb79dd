"""Conv, BatchNorm and Linear layers that can run as a channel subnetwork.

Each layer names the channel groups it reads and writes (``in_group``, ``out_group``; ``None`` = never pruned). With
no mask active they are exactly their ``torch.nn`` parents (same parameters, same state_dict keys, same forward).
Inside :func:`maskprop.use_mask` they run in one of two modes:

* ``compact``: activations carry only the kept channels. A conv runs on ``W[out_kept][:, in_kept]``; BatchNorm uses
  the gathered affine parameters and running statistics and writes back the statistics of the kept channels only.
  Gradients land in the full-size parameters, zero outside the kept channels.
* ``masked``: dense kernels; the mask multiplies the unit output after BatchNorm (or after the conv when no BatchNorm
  follows, ``mask_output=True``), and dropped channels' running statistics are left untouched. This is the reference
  semantics and the speed of the official VR-PGE code (which masks weights and runs dense kernels).

The two modes agree on the loss, every gradient and the BatchNorm statistics (tests/test_sparse.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._workarounds import subsampled_pointwise_input
from . import batchnorm, sync_batchnorm

if TYPE_CHECKING:
    from .execution import ExecutionState


class SparseModule:
    """Mixin marking a layer that follows the active :class:`~maskprop.sparse.execution.ExecutionState`."""

    _execution_state: ExecutionState | None = None

    @property
    def execution_state(self) -> ExecutionState | None:
        """The subnetwork this layer runs now (``None``: dense). Read-only: :func:`maskprop.use_mask` and
        :func:`maskprop.sparse.static.use_static` set it."""
        return self._execution_state


def set_execution_state(layers: Sequence[SparseModule], states: Sequence[ExecutionState | None]) -> None:
    """Give each layer its execution state (``installed``: what :func:`~maskprop.sparse.execution.use_mask` and
    :func:`~maskprop.sparse.static.use_static` do)."""
    for layer, state in zip(layers, states):
        layer._execution_state = state


def _grouped_forward(
    layer: SparseConv2d | SparseLinear,
    x: Tensor,
    dense: Callable[[Tensor], Tensor],
    apply: Callable[[Tensor, Tensor, Tensor | None], Tensor],
) -> Tensor:
    """Forward of a conv or linear layer under the active state: dense, masked, or on the gathered weight."""
    state = layer.execution_state
    if state is None:
        return dense(x)
    if state.mode == "masked":
        y = dense(x)  # a linear layer's output channels are the last dimension, a conv's dimension 1
        return state.apply_mask(layer.out_group, y, last=isinstance(layer, nn.Linear)) if layer.mask_output else y
    weight, bias = state.weight_and_bias(layer)
    try:
        if weight is layer.weight:  # neither side pruned by this mask
            return dense(x)
        return apply(x, weight, bias)
    except RuntimeError as err:  # an input of another width than the weight's: a wrong in_group, said in one line
        linear = isinstance(layer, nn.Linear)
        got = x.shape[-1] // layer.in_positions if linear else x.shape[1] if x.dim() > 1 else None
        wiring = _wiring_error(layer, state, "in_group", layer.in_group, got, layer.in_channels)
        if wiring is not None:
            raise wiring from err
        if linear and weight.dim() == 3 and x.shape[-1] % weight.shape[1] == 0:  # a flattened map of another size
            raise ValueError(f"layer {state.plan.name_of(layer)!r} ({type(layer).__name__}) reads {layer.in_positions} "
                             f"features per channel (a feature map of {layer.in_positions} positions, flattened), "
                             f"but is given {x.shape[-1] // weight.shape[1]} per channel of the {weight.shape[1]} "
                             f"kept: an input of another size than the model was built or made prunable for"
                             ) from err
        raise


class WiringError(ValueError):
    """A layer given, in a subnetwork, the channels of another group than the one it names (the message says which
    layer, which group and what to change)."""


def _wiring_error(layer: nn.Module, state: ExecutionState, side: str, group: str | None, got: int | None,
                  full: int) -> WiringError | None:
    """A layer given, in a subnetwork, the computed channels of a group other than the one it names (``side``: its
    ``in_group``, a BatchNorm's ``group``): a model-definition bug that only a subnetwork shows, since dense and
    masked runs are full width. ``None`` where no group of its full width computes ``got`` channels in this
    subnetwork (an input of another size altogether: torch's own error says it)."""
    from .groups import concatenated_counts

    plan = state.plan
    sizes = concatenated_counts(plan.groups, plan.concatenations)
    widths = concatenated_counts(state.widths, plan.concatenations)
    carried = [name for name, size in sizes.items()  # the pruned groups of its width (full ones: too many to say)
               if size == full and widths.get(name, size) == got != size and name != group]
    if not carried:
        return None
    which = " or ".join(repr(name) for name in carried[:3])
    return WiringError(f"layer {plan.name_of(layer)!r} ({type(layer).__name__}, {side}={group!r}) is given {got} of "
                       f"its {full} channels in this subnetwork, as many as {which} computes here: its {side} must "
                       f"name the group (or concatenated group) of the channels it reads (None: channels never "
                       f"pruned)")


class SparseConv2d(nn.Conv2d, SparseModule):
    """``nn.Conv2d`` whose input and output channels belong to channel groups.

    A depthwise convolution (``groups = in_channels = out_channels``, as in MobileNets) reads and writes one group
    (``in_group = out_group``): output channel ``j`` reads input channel ``j`` alone, so a subnetwork keeps the rows
    of the kept channels and runs with ``groups`` equal to its width.

    Another grouped convolution (``groups = g``: ResNeXt, RegNet) is pruned feature by feature across its ``g``
    convolution groups, as attention is across heads: its input is ``g`` copies of one group side by side
    (``in_group`` a concatenated group of ``g`` parts, each ``weight_in_group``, the ``in_channels / g`` features
    every convolution group reads) and its output likewise (``out_group`` a concatenated group of ``g`` parts of one
    group). Feature ``j`` of every convolution group is kept or dropped together, so each keeps as many features as
    the others and a subnetwork is again one convolution of ``g`` groups, on the gathered weight
    ``W[out_kept][:, features_kept]`` (:func:`maskprop.sparse.channel_groups` checks the parts).

    Args:
        in_group: group of the input channels (``None``: the input is never pruned, e.g. the image).
        out_group: group of the output channels (``None``: never pruned).
        mask_output: in ``masked`` mode, multiply the output by the mask. Set it when no grouped BatchNorm follows
            (e.g. a pre-activation residual branch); a conv-BN unit leaves it to the BatchNorm.
        weight_in_group: for a grouped convolution that is not depthwise, the group of the features each convolution
            group reads (the part ``in_group`` repeats ``groups`` times); ``None`` with ``in_group`` ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = False,
        *,
        in_group: str | None = None,
        out_group: str | None = None,
        mask_output: bool = False,
        weight_in_group: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, **kwargs)
        self.depthwise = self.groups > 1 and self.groups == in_channels == out_channels
        grouped = self.groups > 1 and not self.depthwise
        if self.depthwise and in_group != out_group or (weight_in_group is None) != (in_group is None or not grouped):
            raise ValueError(f"a grouped convolution (groups={self.groups}, {in_channels} -> {out_channels} channels, "
                             f"in_group={in_group!r}, out_group={out_group!r}, weight_in_group={weight_in_group!r}) "
                             f"cannot be channel-pruned so; expected in_group = out_group for a depthwise one (groups "
                             f"= in_channels = out_channels), weight_in_group (the features each of the groups reads) "
                             f"exactly where another grouped one reads a group")
        self.in_group = in_group
        self.out_group = out_group
        self.mask_output = mask_output
        self._weight_in_group = weight_in_group

    def forward(self, x: Tensor) -> Tensor:
        return _grouped_forward(self, x, super().forward, self._conv_forward)

    @property
    def weight_in_group(self) -> str | None:
        """The group that indexes the weight's input dimension: ``in_group``, ``None`` for a depthwise conv (its
        weight has one input channel per output channel, and the rows already follow the group), or the features
        each convolution group reads for another grouped one."""
        return None if self.depthwise else self._weight_in_group if self.groups > 1 else self.in_group

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        groups = weight.shape[0] if self.depthwise else self.groups  # a depthwise conv of the gathered width
        subsampled = subsampled_pointwise_input(x, self.kernel_size, self.stride, self.padding)
        if subsampled is not None:  # a oneDNN crash (see maskprop._workarounds)
            return F.conv2d(subsampled, weight, bias, 1, 0, self.dilation, groups)
        if groups == self.groups:
            return super()._conv_forward(x, weight, bias)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self) -> str:
        features = f", weight_in_group={self._weight_in_group!r}" if self._weight_in_group is not None else ""
        return f"{super().extra_repr()}, in_group={self.in_group!r}, out_group={self.out_group!r}{features}"


class SparseLinear(nn.Linear, SparseModule):
    """``nn.Linear`` whose input features (and optionally outputs) belong to channel groups.

    The classifier of every model is a ``SparseLinear`` with ``out_group=None``: it reads only the kept features and
    its outputs are never pruned.

    A linear layer on a flattened feature map (a classic VGG or LeNet head: ``x.flatten(1)`` of ``C x H x W``) reads
    ``in_positions = H x W`` features per channel of its ``in_group``, channel by channel, as ``flatten`` lays them
    out: ``in_features = C x in_positions``. A subnetwork keeps the ``in_positions`` columns of each kept channel.

    On an input of more than two dimensions (a transformer's tokens ``(N, L, C)``, a ConvNeXt block's
    channels-last map ``(N, H, W, C)``) the layer reads and writes the last dimension, as ``nn.Linear`` does: its
    groups' channels are that dimension's (``in_positions = 1``), in compact form as in masked mode.

    Args:
        in_group: group of the input channels (``None``: never pruned).
        out_group: group of the outputs (``None``: never pruned, as a classifier's).
        mask_output: in ``masked`` mode, multiply the output by the mask (no BatchNorm follows a linear layer).
        in_positions: input features per channel of ``in_group`` (1: a pooled or vector input).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_group: str | None = None,
        out_group: str | None = None,
        mask_output: bool = False,
        in_positions: int = 1,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if isinstance(in_positions, bool) or not isinstance(in_positions, int) or in_positions < 1 \
                or in_features % in_positions:
            raise ValueError(f"in_positions={in_positions!r} must be a positive integer dividing in_features="
                             f"{in_features} (the features of one input channel: H x W of a flattened feature map)")
        self.in_group = in_group
        self.out_group = out_group
        self.mask_output = mask_output
        self.in_positions = in_positions

    @property
    def in_channels(self) -> int:
        """Input channels: ``in_features / in_positions``."""
        return self.in_features // self.in_positions

    @property
    def weight_in_group(self) -> str | None:
        """The group that indexes the weight's input dimension: ``in_group`` (its columns, ``in_positions`` each)."""
        return self.in_group

    def forward(self, x: Tensor) -> Tensor:
        return _grouped_forward(self, x, super().forward, self._linear)

    @staticmethod
    def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # A gathered weight of a flattened feature map is (outputs, channels, positions): flatten's order.
        return F.linear(x, weight.flatten(1) if weight.dim() == 3 else weight, bias)

    def extra_repr(self) -> str:
        positions = f", in_positions={self.in_positions}" if self.in_positions != 1 else ""
        return f"{super().extra_repr()}, in_group={self.in_group!r}, out_group={self.out_group!r}{positions}"


class SparseBatchNorm2d(nn.BatchNorm2d, SparseModule):
    """``nn.BatchNorm2d`` over the channels of one group; the mask is applied after it.

    A dropped channel does not exist for the step: its output is exactly zero, it gets no gradient, and its running
    statistics are not updated (``num_batches_tracked`` counts steps, as in ``nn.BatchNorm2d``).

    Attributes:
        process_group: The process group whose global batch the training-mode statistics are taken over, or ``None``
            for this process's batch (set by :func:`maskprop.sparse.sync_batchnorm.enable`). Copies and pickles of
            the layer come without it: a process group belongs to the process that joined it.
    """

    process_group: Any = None

    def __init__(self, num_features: int, *, group: str | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group = group
        self.process_group = None

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "process_group": None}

    def _momentum(self, count: bool = True) -> tuple[float, bool]:
        # Same bookkeeping as nn.BatchNorm2d.forward: the average factor, and whether batch statistics are used.
        # ``count=False``: the execution state counts the batch for all layers at once (StaticExecutionState).
        factor = 0.0 if self.momentum is None else self.momentum
        if count and self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        return factor, use_batch_stats

    def forward(self, x: Tensor) -> Tensor:
        state = self.execution_state
        group = self.process_group if self.training else None  # sync_bn under torchrun
        if state is None:
            return super().forward(x) if group is None else sync_batchnorm.sync_batch_norm(self, x, None, group)
        if state.mode == "masked":
            return self._masked_forward(x, state)
        self._check_input_dim(x)  # nn.BatchNorm2d's one line for an input that is not (N, C, H, W), as dense runs say
        try:
            return self._compact_forward(x, state, group)
        except RuntimeError as err:  # an input of another width than the channels normalised: a wrong group
            got = x.shape[1] if x.dim() > 1 else None
            wiring = _wiring_error(self, state, "group", self.group, got, self.num_features)
            if wiring is None:
                raise
            raise wiring from err

    def _compact_forward(self, x: Tensor, state: ExecutionState, group: Any) -> Tensor:
        """The BatchNorm of the computed channels (``group``: the process group of synchronised statistics)."""
        gathered = state.batch_norm(self)  # running mean, running var, weight, bias of the computed channels
        if gathered is None:  # a fully kept group: exactly nn.BatchNorm2d
            return super().forward(x) if group is None else sync_batchnorm.sync_batch_norm(self, x, None, group)
        if group is not None:  # statistics of the computed channels over all ranks (SyncBatchNorm's semantics)
            y = sync_batchnorm.sync_batch_norm(self, x, gathered, group, count=state.layers_count_batches)
            state.batch_norm_done(self, gathered[0] is not None)
            return self._zero_padding(y, state)
        mean, var, weight, bias = gathered
        factor, use_batch_stats = self._momentum(count=state.layers_count_batches)
        updates_stats = use_batch_stats and mean is not None
        if use_batch_stats and batchnorm.eligible(x):  # kept counts the native channels_last kernel is slow for
            y, batch_mean, batch_var = batchnorm.batch_norm_nhwc(x, weight, bias, self.eps)
            if updates_stats:  # as F.batch_norm: the running variance takes the unbiased batch variance
                n = x.numel() // x.shape[1]
                mean.lerp_(batch_mean, factor)
                var.lerp_(batch_var * (n / max(n - 1, 1)), factor)
        else:
            y = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, self.eps)
        state.batch_norm_done(self, updates_stats)  # the kept channels' statistics go back into the model
        return self._zero_padding(y, state)

    def _zero_padding(self, y: Tensor, state: ExecutionState) -> Tensor:
        """``y`` with its padded channels zeroed, for a layer without affine parameters (one with them zeroes its
        padded outputs through its gathered weight and bias; the layer before leaves that to this one)."""
        factor = None if self.affine else state.padding_factor(self)
        return y if factor is None else y * factor.to(y.dtype).view(1, -1, *([1] * (y.dim() - 2)))

    def _masked_forward(self, x: Tensor, state: ExecutionState) -> Tensor:
        """Dense kernels, dropped channels' running statistics restored, the unit output masked."""
        mask = state.masks.get(self.group) if self.group is not None else None
        if mask is None:
            return super().forward(x)
        factor, use_batch_stats = self._momentum()
        updates_stats = use_batch_stats and self.running_mean is not None
        mean = self.running_mean.clone() if updates_stats else self.running_mean
        var = self.running_var.clone() if updates_stats else self.running_var
        y = F.batch_norm(x, mean, var, self.weight, self.bias, use_batch_stats, factor, self.eps)
        if updates_stats:
            self.running_mean.copy_(torch.where(mask, mean, self.running_mean))
            self.running_var.copy_(torch.where(mask, var, self.running_var))
        return state.apply_mask(self.group, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group!r}"


class _ActivationAfter:
    """A BatchNorm layer followed by ``drop`` and ``act`` in one module, with the BatchNorm's state_dict keys (and
    ``drop.*`` / ``act.*`` for theirs, if any): timm's ``BatchNormAct2d``, which fuses them so."""

    def __init__(self, *args, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


class SparseBatchNormAct2d(_ActivationAfter, SparseBatchNorm2d):
    """:class:`SparseBatchNorm2d` followed by ``drop`` and ``act``: what :func:`maskprop.make_prunable` puts in place
    of timm's ``BatchNormAct2d`` (same state_dict keys). The mask applies after the BatchNorm, before ``act``."""


class BatchNormAct2d(_ActivationAfter, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``drop`` and ``act`` in plain torch: the narrow model's layer where the full model
    has a :class:`SparseBatchNormAct2d`."""
