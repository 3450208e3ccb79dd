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

:func:`enable` turns it on for the process (the trainer does so for the run, under DDP with ``sync_bn: true``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .modules import SparseBatchNorm2d

__all__ = ["active_group", "disable", "enable", "sync_batch_norm"]

_ACTIVE: dict[str, Any] = {"group": None}


def enable(group: Any = None) -> None:
    """Synchronise the statistics of training-mode BatchNorm over ``group`` (default: the default process group)."""
    _ACTIVE["group"] = group if group is not None else dist.group.WORLD


def disable() -> None:
    """Back to each process's own batch statistics."""
    _ACTIVE["group"] = None


def active_group() -> Any:
    """The process group BatchNorm synchronises over, or ``None``."""
    return _ACTIVE["group"]


def _channel_dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


class _SyncBatchNormCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,  # type: ignore[override]
                running_var: Tensor | None, eps: float, momentum: float, group: Any, world_size: int) -> Tensor:
        dims, channels = _channel_dims(x), x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        xf = x.float()
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
            y = y * weight.float().view(shape)
        if bias is not None:
            y = y + bias.float().view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.group, ctx.total, ctx.shape = group, float(total), shape
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = _channel_dims(xhat), ctx.shape
        dy = grad_y.float()
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(combined, group=ctx.group)
            global_dy, global_dy_xhat = combined.chunk(2)
            k = invstd if weight is None else weight.float() * invstd
            grad_x = (dy - (global_dy / ctx.total).view(shape) - xhat * (global_dy_xhat / ctx.total).view(shape))
            grad_x = (grad_x * k.view(shape)).to(grad_y.dtype)
        grad_w = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy.to(grad_y.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def sync_batch_norm(layer: SparseBatchNorm2d, x: Tensor, index: Tensor | None, group: Any) -> Tensor:
    """Training-mode forward of ``layer`` on the channels ``index`` (all for ``None``) with statistics over ``group``.

    The running statistics of the kept channels move (as ``nn.BatchNorm2d`` with ``momentum``, or the cumulative
    average for ``momentum=None``); dropped channels' statistics stay as they are.
    """
    factor, _ = layer._momentum()  # counts the step, as nn.BatchNorm2d.forward
    gather = (lambda t: t) if index is None else (lambda t: None if t is None else t.index_select(0, index))
    weight, bias = gather(layer.weight), gather(layer.bias)
    mean, var = gather(layer.running_mean), gather(layer.running_var)
    world_size = dist.get_world_size(group)
    if x.is_cuda:
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBatchNorm

        y = TorchSyncBatchNorm.apply(x, weight, bias, mean, var, layer.eps, factor, group, world_size)
    else:
        y = _SyncBatchNormCPU.apply(x, weight, bias, mean, var, layer.eps, factor, group, world_size)
    if index is not None and mean is not None:
        layer.running_mean.index_copy_(0, index, mean)
        layer.running_var.index_copy_(0, index, var)
    return y
