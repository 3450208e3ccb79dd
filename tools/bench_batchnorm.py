"""Benchmark: training-mode BatchNorm of channels_last activations, PyTorch's kernel vs ``maskprop.sparse.batchnorm``.

Usage:
    python tools/bench_batchnorm.py --threads 2
    python tools/bench_batchnorm.py --cases 127:16 253:8 509:4 --batch-size 32   # channels:side pairs of one's own

For each channel count (the widths compact steps produce) and spatial size, times the forward and the backward
(input, weight and bias gradients) of both implementations on the same channels_last batch, interleaved, and checks
that their outputs agree. Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory
from maskprop.sparse.batchnorm import batch_norm_nhwc

CASES = [(8, 32), (12, 32), (16, 32), (17, 32), (24, 16), (32, 16), (33, 16), (61, 8), (64, 8), (100, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", nargs="+", default=None, metavar="C:S",
                        help="channels:side pairs (default: the widths below 100 that compact steps produce)")
    args = parser.parse_args()
    cases = CASES if args.cases is None else [tuple(int(v) for v in case.split(":")) for case in args.cases]
    keep_freed_host_memory()
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"batch {args.batch_size}, {args.threads} threads, float32, channels_last, medians of {args.repeats}")
    print("| channels | H = W | native forward (ms) | native backward (ms) | maskprop forward (ms) "
          "| maskprop backward (ms) | forward + backward speedup |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for channels, size in cases:
        x = torch.randn(args.batch_size, channels, size, size).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = torch.ones(channels, requires_grad=True)
        bias = torch.zeros(channels, requires_grad=True)
        grad = torch.randn_like(x)
        steps = {
            "native": lambda x=x, w=weight, b=bias: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5),
            "maskprop": lambda x=x, w=weight, b=bias: batch_norm_nhwc(x, w, b, 1e-5)[0],
        }
        torch.testing.assert_close(steps["maskprop"](), steps["native"](), rtol=1e-4, atol=1e-4)
        times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats + 2):
            for name, forward in steps.items():
                start = time.perf_counter()
                y = forward()
                middle = time.perf_counter()
                torch.autograd.grad(y, (x, weight, bias), grad)
                end = time.perf_counter()
                if rep >= 2:
                    times.setdefault((name, "fwd"), []).append(middle - start)
                    times.setdefault((name, "bwd"), []).append(end - middle)
        med = {key: 1e3 * statistics.median(values) for key, values in times.items()}
        total = {name: med[(name, "fwd")] + med[(name, "bwd")] for name in steps}
        print(f"| {channels} | {size} | {med[('native', 'fwd')]:.2f} | {med[('native', 'bwd')]:.2f} "
              f"| {med[('maskprop', 'fwd')]:.2f} | {med[('maskprop', 'bwd')]:.2f} "
              f"| {total['native'] / total['maskprop']:.2f}x |")


if __name__ == "__main__":
    main()
