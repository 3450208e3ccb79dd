"""How the time of one convolution follows its channel count on this machine (why sampled widths lose speed on CPUs).

Usage:
    python tools/conv_blocking.py --threads 2 --size 32 --channels 8 12 15 16 17 20 24 31 32 33 40 48

Times the forward and the backward (input and weight gradients) of a 3x3 convolution with ``c`` input and ``c``
output channels on a channels_last batch, for every ``c`` given, interleaved over the repetitions (the machine
drifts), and prints medians beside the FLOPs ratio to the first count. A kernel that works in blocks of channels
(16 floats per AVX-512 register in oneDNN's CPU kernels) costs about the same for every count inside one block, so a
channel-sparse step whose kept widths land just above a block boundary saves FLOPs but little time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 12, 15, 16, 17, 20, 24, 31, 32, 33, 40, 48])
    parser.add_argument("--size", type=int, default=32, help="height = width of the activations")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if min(args.channels) < 1:
        raise SystemExit(f"--channels {args.channels}: every channel count must be >= 1")
    keep_freed_host_memory()  # as maskprop bench does: no page faults penalising the larger tensors
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = (args.batch_size, args.size, args.size)
    inputs = {c: torch.randn(shape[0], c, *shape[1:]).contiguous(memory_format=torch.channels_last)
              for c in args.channels}
    weights = {c: torch.randn(c, c, 3, 3) * (2.0 / (9 * c)) ** 0.5 for c in args.channels}
    times: dict[int, list[tuple[float, float]]] = {c: [] for c in args.channels}
    for rep in range(args.warmup + args.repeats):
        for c in args.channels:
            x = inputs[c].detach().requires_grad_()
            w = weights[c].detach().requires_grad_()
            start = time.perf_counter()
            y = F.conv2d(x, w, padding=1)
            middle = time.perf_counter()
            y.backward(torch.ones_like(y))
            end = time.perf_counter()
            if rep >= args.warmup:
                times[c].append((middle - start, end - middle))

    first = args.channels[0]
    base = None
    print(f"3x3 conv, batch {args.batch_size}, {args.size}x{args.size}, channels_last, {torch.get_num_threads()} "
          f"threads, medians of {args.repeats}")
    print(f"| channels in = out | forward (ms) | backward (ms) | total (ms) | time / time at {first} "
          f"| FLOPs / FLOPs at {first} |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in args.channels:
        forward = statistics.median(f for f, _ in times[c]) * 1e3
        backward = statistics.median(b for _, b in times[c]) * 1e3
        total = forward + backward
        base = total if base is None else base
        print(f"| {c} | {forward:.2f} | {backward:.2f} | {total:.2f} | {total / base:.2f} | {(c / first) ** 2:.2f} |")


if __name__ == "__main__":
    main()
