"""Benchmark: a torchvision ResNet converted by ``maskprop.make_prunable`` against maskprop's own ResNet of the same
architecture, dense and compact training steps interleaved.

Usage:
    python tools/bench_converted.py --models resnet18 resnet50 --batch-size 16 --image-size 64 --threads 2

maskprop's ImageNet ResNets are torchvision's architecture with maskprop's layers; ``make_prunable`` gives
torchvision's own model the same layers and the same groups. Each repetition times one dense step (forward and
backward) of each model, then one compact step of each on a random mask keeping the same share of every group, in
turn; the table gives the medians of the paired ratios (converted / built-in), with their interquartile range, and
each model's compact speedup over its own dense step, with the ideal one (dense FLOPs over the mask's FLOPs). A
converted model should cost what the built-in one does.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import maskprop
from maskprop.bench import quartiles


def _step(model: torch.nn.Module, x: torch.Tensor, mask: dict | None) -> float:
    start = time.perf_counter()
    if mask is None:
        loss = model(x).float().logsumexp(1).mean()
    else:
        with maskprop.use_mask(model, mask, "compact"):
            loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"], choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    maskprop.keep_freed_host_memory()
    maskprop.enlarge_onednn_primitive_cache()
    torch.set_num_threads(args.threads)
    size = (3, args.image_size, args.image_size)
    x = torch.randn(args.batch_size, *size).contiguous(memory_format=torch.channels_last)
    print(f"batch {args.batch_size}, {args.image_size}x{args.image_size}, keep {args.keep}, {args.threads} threads, "
          f"float32, channels_last, medians of {args.repeats} paired ratios (interquartile range)")
    print("| model | groups (built-in / converted) | dense: converted / built-in | compact: converted / built-in "
          "| compact speedup, built-in | compact speedup, converted | ideal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        builtin = maskprop.create_model(name, num_classes=1000)
        converted = maskprop.make_prunable(getattr(torchvision.models, name)(num_classes=1000), size)
        models = [m.to(memory_format=torch.channels_last).train() for m in (builtin, converted)]
        masks = [maskprop.random_mask(maskprop.channel_groups(m), args.keep, torch.Generator().manual_seed(0))
                 for m in models]
        times: dict[tuple[int, bool], list[float]] = {(i, c): [] for i in range(2) for c in (False, True)}
        for repeat in range(args.warmup + args.repeats):
            for compact in (False, True):
                for i, model in enumerate(models):
                    elapsed = _step(model, x, masks[i] if compact else None)
                    if repeat >= args.warmup:
                        times[i, compact].append(elapsed)

        def ratio(num: tuple[int, bool], den: tuple[int, bool]) -> str:
            q1, median, q3 = quartiles([a / b for a, b in zip(times[num], times[den])])
            return f"{median:.2f}x ({q1:.2f}-{q3:.2f})"

        groups = [len(maskprop.channel_groups(m)) for m in models]
        print(f"| {name} | {groups[0]} / {groups[1]} | {ratio((1, False), (0, False))} | {ratio((1, True), (0, True))} "
              f"| {ratio((0, False), (0, True))} | {ratio((1, False), (1, True))} "
              f"| {maskprop.flops(builtin, size) / maskprop.flops(builtin, size, masks[0]):.2f}x |")


if __name__ == "__main__":
    main()
