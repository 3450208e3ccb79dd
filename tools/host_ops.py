"""Host-side cost of a training step: operator calls per step, and step times where the arithmetic is negligible.

Usage:
    python tools/host_ops.py --models resnet32 vgg19_bn --keep-ratio 0.5

On a GPU every operator call is a kernel launch paid on the host (Python, dispatcher, launch), so a step whose kernels
are short is bound by how many operators it calls, not by its FLOPs. This counts the top-level ATen operator calls
(an operator called by another operator is not counted again) of the three steps of ``maskprop bench`` (dense,
official-style masked VR-PGE, maskprop's compact VR-PGE), and times them on a tiny batch on one CPU thread, where
the step time is almost all host overhead. Calls on CPU tensors that a CUDA step would also make on the host (the
index arithmetic of ``use_mask``) are counted too: the count is an upper bound on launches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import maskprop
from maskprop.bench import _steps
from maskprop.sparse import random_mask

def top_level_ops(fn) -> Counter:
    """Names of the ATen operators ``fn`` calls, counting only calls not made from inside another ATen operator."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            calls[event.name] += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet32", "vgg19_bn"])
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=0,
                        help="0: the smallest each model takes (32 for VGGs, whose five poolings need it; 4 otherwise)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top", type=int, default=6, help="most frequent operators listed per step")
    parser.add_argument("--align", type=int, default=1, help="pad kept widths to multiples of this (compact step)")
    args = parser.parse_args()
    if args.batch_size < 2:
        raise SystemExit(f"--batch-size {args.batch_size}: BatchNorm in training needs a batch of at least 2")
    if args.image_size and args.image_size < 32 and any(name.startswith("vgg") for name in args.models):
        raise SystemExit(f"--image-size {args.image_size}: the VGGs' five poolings need at least 32 (0 picks it)")
    torch.set_num_threads(1)  # the host's own work, not parallel arithmetic

    print(f"batch {args.batch_size}, keep {args.keep_ratio:g}, 1 thread, medians of {args.repeats}")
    print("| model | image | step | top-level operator calls | calls / dense | time (ms) | time / dense | most frequent |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = maskprop.create_model(name).train()
        size = args.image_size or (32 if name.startswith("vgg") else 4)
        x = torch.randn(args.batch_size, 3, size, size)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,))
        generator = torch.Generator().manual_seed(0)
        groups = model.channel_groups()
        masks = {"m": random_mask(groups, args.keep_ratio, generator), "m2": random_mask(groups, args.keep_ratio,
                                                                                          generator)}
        steps = _steps(model, x, y, masks, None, args.align)
        for fn in steps.values():
            fn()  # warm-up
        counts = {step: top_level_ops(fn) for step, fn in steps.items()}
        times: dict[str, list[float]] = {step: [] for step in steps}
        for _ in range(args.repeats):
            for step, fn in steps.items():
                start = time.perf_counter()
                fn()
                times[step].append(time.perf_counter() - start)
        dense_calls = sum(counts["dense"].values())
        dense_time = statistics.median(times["dense"])
        for step in steps:
            calls = sum(counts[step].values())
            median = statistics.median(times[step])
            frequent = ", ".join(f"{op.removeprefix('aten::')} {n}" for op, n in counts[step].most_common(args.top))
            print(f"| {name} | {size} | {step} | {calls} | {calls / dense_calls:.2f} | {1e3 * median:.1f} "
                  f"| {median / dense_time:.2f} | {frequent} |")


if __name__ == "__main__":
    main()
