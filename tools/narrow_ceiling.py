"""How close the compact VR-PGE step comes to a physically narrower network: the ceiling of channel-sparse execution.

A mask that keeps the same fraction of every group of a CIFAR ResNet computes what a ResNet of proportionally smaller
width computes, on the same kernels. No channel-sparse engine can run faster than that narrow network does, so

    dense / physical   the best speedup any channel-sparse step can reach on this machine,
    dense / compact    what maskprop's compact step reaches (as in ``maskprop bench``),
    physical / compact the compact step's efficiency against that ceiling (gathers, BatchNorm bookkeeping, overhead).

The three steps run interleaved in one process: dense = forward + backward of the full model; compact = forward +
backward with a random mask m plus a forward without autograd with m' (keep ``--keep-ratio`` of every group);
physical = forward + backward plus a forward without autograd of the model built with ``width x keep``.

Usage:
    python tools/narrow_ceiling.py --model resnet32 --width 2 --keep-ratio 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import maskprop
from maskprop.sparse import random_mask, use_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32", choices=["resnet20", "resnet32", "resnet56"])
    parser.add_argument("--width", type=int, default=2, help="width multiplier of the full model")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    narrow_width = args.width * args.keep_ratio
    if not narrow_width.is_integer() or narrow_width < 1:
        parser.error(f"--width x --keep-ratio = {narrow_width:g} must be a whole number >= 1 (the narrow model's "
                     f"width multiplier)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = maskprop.create_model(args.model, num_classes=10, width=args.width).train()
    narrow = maskprop.create_model(args.model, num_classes=10, width=int(narrow_width)).train()
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    generator = torch.Generator().manual_seed(0)
    groups = full.channel_groups()
    m, m2 = random_mask(groups, args.keep_ratio, generator), random_mask(groups, args.keep_ratio, generator)
    assert {g: int(k.sum()) for g, k in m.items()} == narrow.channel_groups(), "the narrow model must match the mask"

    def dense() -> None:
        full.zero_grad(set_to_none=True)
        F.cross_entropy(full(x), y).backward()

    def compact() -> None:
        full.zero_grad(set_to_none=True)
        with use_mask(full, m, "compact"):
            F.cross_entropy(full(x), y).backward()
        with torch.no_grad(), use_mask(full, m2, "compact"):
            F.cross_entropy(full(x), y)

    def physical() -> None:
        narrow.zero_grad(set_to_none=True)
        F.cross_entropy(narrow(x), y).backward()
        with torch.no_grad():
            F.cross_entropy(narrow(x), y)

    steps = {"dense": dense, "compact": compact, "physical": physical}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(args.warmup + args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model} width {args.width}, keep {args.keep_ratio:g} (narrow width {int(narrow_width)}), "
          f"batch {args.batch_size}, {args.threads} threads, medians of {args.repeats}")
    print("| dense step (ms) | compact VR-PGE step (ms) | physical narrow step (ms) | dense / physical (ceiling) "
          "| dense / compact | compact efficiency vs physical |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {1e3 * med['dense']:.0f} | {1e3 * med['compact']:.0f} | {1e3 * med['physical']:.0f} "
          f"| {med['dense'] / med['physical']:.2f}x | {med['dense'] / med['compact']:.2f}x "
          f"| {med['physical'] / med['compact']:.0%} |")


if __name__ == "__main__":
    main()
