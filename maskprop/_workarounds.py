"""Work-arounds for bugs and costly defaults of the libraries maskprop runs on, each with what triggers it."""

from __future__ import annotations

import torch
from torch import Tensor


def subsampled_pointwise_input(x: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int],
                               padding: tuple[int, int]) -> Tensor | None:
    """The input of a strided 1x1 convolution subsampled by its stride, where the strided kernel would crash.

    The CPU weight gradient of a strided 1x1 convolution corrupts the heap (a double free, "corrupted double-linked
    list", "corrupted size vs. prev_size", a segmentation fault) in oneDNN (torch 2.11, 2.14, 2.15) in two regions
    found so far: whenever the thread count does not divide the batch (an odd batch on two threads, a batch of 16 on
    three, 5 or 6, of 18 on four), and for channels_last inputs of 2 to 15 channels with maps of 56 x 56 or more, on
    any number of threads and any batch (a RegNet's first downsampling conv at 224 x 224 in a compact step that keeps
    a quarter of its channels); 16 channels and more, maps of 32 x 32 and less, and batches the threads divide never
    crashed (the scans: BENCHMARKS.md, "Implementation choices"). Compact steps meet both with the widths they keep,
    and ``--threads auto`` the first with whatever count the load leaves. ``conv(x[..., ::s, ::s])`` with stride 1
    (the subsampled input copied in ``x``'s memory format) gives the same output and gradients without that kernel,
    at up to 1.8 times its time on those convolutions; the other cases keep the native kernel.

    Returns:
        The subsampled input, to convolve with stride 1 and no padding, or ``None`` where the native kernel is safe.
    """
    # Every conv's forward asks: the shape tests first, the thread count (a call into torch) only for a strided 1x1.
    if (tuple(kernel_size) == (1, 1) and tuple(stride) != (1, 1) and tuple(padding) == (0, 0)
            and x.device.type == "cpu" and torch.is_grad_enabled()
            and (x.shape[1] < _WIDE_ENOUGH or x.shape[0] % torch.get_num_threads())):
        layout = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            else torch.contiguous_format
        return x[:, :, ::stride[0], ::stride[1]].contiguous(memory_format=layout)  # the layout a kernel expects
    return None


_WIDE_ENOUGH = 16  # input channels from which oneDNN's strided 1x1 weight gradient never crashed on a divided batch


def keep_freed_host_memory(top_pad: int = 256 << 20) -> bool:
    """Stop glibc's ``malloc`` from handing freed activation memory back to the kernel after every step.

    PyTorch's CPU allocator calls ``malloc``/``free`` for every tensor. With glibc's defaults, the megabyte-sized
    activations of a training step are released to the kernel when they are freed (heap trimming, and ``mmap`` above
    a threshold that moves with the sizes seen) and faulted back in, page by page, in the next step, which slows
    dense CPU steps markedly (the faults and times: BENCHMARKS.md, "Page faults flattered the earlier table").
    Smaller steps, such as compact ones, mostly fit in what the heap kept and fault far less, which flattered every
    speedup measured against dense. Fixing the ``mmap`` threshold at its largest value (32 MiB), never trimming, and
    growing the heap in ``top_pad`` steps brings the faults of later steps to about zero, as a caching allocator
    (jemalloc, tcmalloc, PyTorch's CUDA allocator) does. The cost: memory freed by the process stays with it.

    Process-wide, so it belongs to applications (``maskprop train`` and ``maskprop bench`` call it first), not to
    library code. Call it before the first large allocation.

    Returns:
        ``True`` where glibc accepted the settings, ``False`` elsewhere (other C libraries, macOS, Windows, or
        ``MALLOC_*`` environment variables or ``glibc.malloc`` tunables already set: the user's choice wins).
    """
    import ctypes
    import ctypes.util
    import os
    import sys

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user_set = any(k.startswith("MALLOC_") for k in os.environ) or "glibc.malloc." in tunables
    if not sys.platform.startswith("linux") or user_set:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    # The mmap threshold first: setting the trim threshold alone would freeze the dynamic mmap threshold at 128 KiB.
    return all(mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 62), (m_top_pad, top_pad)))


ONEDNN_PRIMITIVE_CACHE = 16384
"""Kernels (primitives) oneDNN keeps per process, where the user has not chosen: 16 times its default of 1024."""


def enlarge_onednn_primitive_cache(capacity: int = ONEDNN_PRIMITIVE_CACHE) -> bool:
    """Let oneDNN keep the kernels of many more convolution shapes than its default 1,024.

    oneDNN, which runs PyTorch's CPU convolutions, builds a kernel (a primitive) for each shape it meets and keeps the
    most recent 1,024. A compact step of a deep network meets new widths at every step, three kernels per convolution
    and mask (forward, input gradient, weight gradient): a VR-PGE step of DenseNet-121 makes about 700, so kernels are
    evicted and built again every step, the dense reference step's own among them. With 16,384 kept, that compact
    step ran 1.06x a dense step at keep 0.5 instead of 0.57x, and the dense step 372 ms instead of 541 (BENCHMARKS.md,
    "DenseNet-121"). The cost: the memory of the kernels kept.

    Process-wide, and read by oneDNN when it builds its first kernel, so it belongs to applications (``maskprop
    train`` and ``maskprop bench`` call it first), not to library code.

    Returns:
        ``True`` where it set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``; ``False`` where the user set it (or the older
        ``DNNL_PRIMITIVE_CACHE_CAPACITY``): their choice wins.
    """
    import os

    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ or "DNNL_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True
