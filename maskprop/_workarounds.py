"""Work-arounds for bugs in the libraries maskprop runs on, each with the condition that triggers it."""

from __future__ import annotations

import torch
from torch import Tensor


def subsampled_pointwise_input(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                               padding: tuple[int, int]) -> Tensor | None:
    """The input of a strided 1x1 convolution subsampled by its stride, where the strided kernel would crash.

    The CPU weight gradient of a strided 1x1 convolution dies with a double free in torch 2.15's oneDNN for odd batch
    sizes and some channel counts on two threads (a scan of batches 2-66 x channels 3-40 crashed for odd batches
    only, e.g. batch 9 with 10 -> 19 channels); compact steps meet it with odd kept counts. ``conv(x[..., ::s, ::s])``
    with stride 1 gives the same output and gradients without that kernel. Even batches, the normal training case,
    keep the native kernel, which is faster there.

    Returns:
        The subsampled input, to convolve with stride 1 and no padding, or ``None`` where the native kernel is safe.
    """
    if (x.shape[0] % 2 and tuple(kernel_size) == (1, 1) and tuple(stride) != (1, 1) and tuple(padding) == (0, 0)
            and x.device.type == "cpu" and torch.is_grad_enabled()):
        return x[:, :, ::stride[0], ::stride[1]]
    return None
