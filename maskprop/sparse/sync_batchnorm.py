"""BatchNorm with batch statistics over all processes (SyncBatchNorm's semantics), on the kept channels.

Under ``torch.distributed`` with ``sync_bn: true`` every :class:`~maskprop.sparse.modules.SparseBatchNorm2d` in
training mode normalises with the mean and variance of the kept channels over the whole global batch: each rank's
per-channel count, mean and sum of squared deviations are gathered and combined (the parallel form of the two-pass
variance), the running statistics move by the global mean and the unbiased global variance, and the backward sums
``dy`` and ``dy * xhat`` over all ranks. The weight and bias gradients stay the rank's own sums: DDP averages them,
which gives the gradient of the global mean loss. All ranks run the same mask, so their kept channels agree.

On CUDA the gathered parameters go through torch's own ``SyncBatchNorm`` autograd function (fused kernels); on the
CPU, where torch's function has no kernels (``batch_norm_stats`` is CUDA-only), through :class:`_SyncBatchNormCPU`,
which computes the same thing with plain tensor operations and ``torch.distributed`` collectives (gloo).

Which process group a layer synchronises over is the layer's own ``process_group`` attribute (``None``: its own
batch statistics), as in ``torch.nn.SyncBatchNorm``. :func:`enable` sets it on every BatchNorm layer of one model (the
trainer does so for the run's model, under DDP with ``sync_bn: true``) and :func:`disable` clears it. A process group
belongs to the process that joined it, so copies of a layer (``copy.deepcopy``, pickling) come without one: copies of
the model, such as the timing's private dense reference, keep their own statistics and make no collective calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from .modules import SparseBatchNorm2d

__all__ = ["disable", "enable", "sync_batch_norm"]


def _batch_norms(model: nn.Module) -> list[SparseBatchNorm2d]:
    from .modules import SparseBatchNorm2d

    return [m for m in model.modules() if isinstance(m, SparseBatchNorm2d)]


def enable(model: nn.Module, group: Any = None) -> nn.Module:
    """Synchronise the statistics of ``model``'s training-mode BatchNorm layers over ``group`` (default: the default
    process group): sets the ``process_group`` of each of its :class:`~maskprop.sparse.modules.SparseBatchNorm2d`.

    Returns:
        ``model``.
    """
    group = group if group is not None else dist.group.WORLD
    for layer in _batch_norms(model):
        layer.process_group = group
    return model


def disable(model: nn.Module) -> nn.Module:
    """Back to each process's own batch statistics for the BatchNorm layers of ``model``.

    Returns:
        ``model``.
    """
    for layer in _batch_norms(model):
        layer.process_group = None
    return model


def _channel_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


class _SyncBatchNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                running_mean: Tensor | None, running_var: Tensor | None, eps: float, momentum: float, group: Any,
                world_size: int) -> Tensor:
        dims, channels = _channel_dims(x), x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # low precision computes in float32
        xf = x.to(dtype)
        count = xf.numel() // channels
        local_mean = xf.mean(dims)
        local_m2 = (xf - local_mean.view(shape)).square().sum(dims)
        stats = torch.cat([local_mean.new_tensor([float(count)]), local_mean, local_m2])
        gathered = [torch.empty_like(stats) for _ in range(world_size)]
        dist.all_gather(gathered, stats, group=group)
        table = torch.stack(gathered)  # (world, 1 + 2C): count, mean, M2 of each rank
        counts, means, m2s = table[:, :1], table[:, 1:1 + channels], table[:, 1 + channels:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
        invstd = torch.rsqrt(m2 / total + eps)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((m2 / max(float(total) - 1.0, 1.0)).to(running_var.dtype), momentum)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(dtype).view(shape)
        if bias is not None:
            y = y + bias.to(dtype).view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.group, ctx.total, ctx.shape = group, float(total), shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = _channel_dims(xhat), ctx.shape
        dy = grad_y.to(xhat.dtype)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(combined, group=ctx.group)
            global_dy, global_dy_xhat = combined.chunk(2)
            k = invstd if weight is None else weight.to(xhat.dtype) * invstd
            grad_x = (dy - (global_dy / ctx.total).view(shape) - xhat * (global_dy_xhat / ctx.total).view(shape))
            grad_x = (grad_x * k.view(shape)).to(grad_y.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(grad_y.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sync_batch_norm(layer: SparseBatchNorm2d, x: Tensor, gathered: tuple[Tensor | None, ...] | None,
                    group: Any, count: bool = True) -> Tensor:
    """Training-mode forward of ``layer`` with batch statistics over ``group``.

    Args:
        layer: The BatchNorm layer (its momentum, eps and step count).
        x: Its input, the channels it computes.
        gathered: ``(running_mean, running_var, weight, bias)`` of the computed channels, as the execution state
            gathers them (the running statistics are updated in place, for the caller to write back), or ``None``
            for all channels (dense, or a fully kept group: the layer's own buffers move).
        group: The process group.
        count: Count the batch in ``layer.num_batches_tracked`` (false where the execution state counts it).

    Returns:
        The normalised output. The running statistics move as ``nn.BatchNorm2d``'s (``momentum``, or the cumulative
        average for ``momentum=None``), by the global mean and the unbiased global variance.
    """
    factor, _ = layer._momentum(count)  # counts the step, as nn.BatchNorm2d.forward
    if gathered is None:
        gathered = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
    mean, var, weight, bias = gathered
    world_size = dist.get_world_size(group)
    if x.is_cuda:
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNorm

        return TorchSyncBatchNorm.apply(x, weight, bias, mean, var, layer.eps, factor, group, world_size)
    return _SyncBatchNormCPU.apply(x, weight, bias, mean, var, layer.eps, factor, group, world_size)
