"""How close the compact VR-PGE step comes to a physically narrower network: the ceiling of channel-sparse execution.

A mask that keeps the same fraction of every group of a CIFAR ResNet or VGG computes what the same network with
proportionally fewer channels in every layer computes, on the same kernels. No channel-sparse engine can run faster
than that narrow network does, so

    dense / physical   the best speedup any channel-sparse step can reach on this machine,
    dense / compact    what maskprop's compact step reaches (as in ``maskprop bench``),
    physical / compact the compact step's efficiency against that ceiling (gathers, BatchNorm bookkeeping, overhead).

The three steps run interleaved in one process (``maskprop.bench.training_steps``): dense = forward + backward of
the full model; compact = forward + backward with a random mask m plus a forward without autograd with m' (keep
``--keep-ratio`` of every group); physical = forward + backward plus a forward without autograd of the model built
with ``width x keep`` (ResNets) or with every conv's width times ``keep`` (VGGs).

Usage:
    python tools/narrow_ceiling.py --model resnet32 --width 2 --keep-ratio 0.5 --threads 2
    python tools/narrow_ceiling.py --model vgg19_bn --keep-ratio 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import torch

import maskprop
from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory
from maskprop.bench import interleaved_times, mask_pair, quartiles, random_batch, training_steps
from maskprop.models.vgg import CONFIGS, VGG

VGG_CONFIGS = {"vgg11_bn": "A", "vgg13_bn": "B", "vgg16_bn": "D", "vgg19_bn": "E"}


def models(name: str, width: int, keep: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The full model and the physically narrow one whose every group has ``round(keep x channels)`` channels."""
    if name in VGG_CONFIGS:
        config = CONFIGS[VGG_CONFIGS[name]]
        narrow = [v if v == "M" else max(1, round(keep * v)) for v in config]
        return VGG(config, num_classes=10), VGG(narrow, num_classes=10)
    narrow_width = width * keep
    if not narrow_width.is_integer() or narrow_width < 1:
        raise SystemExit(f"--width x --keep-ratio = {narrow_width:g} must be a whole number >= 1 (the narrow "
                         f"ResNet's width multiplier)")
    return (maskprop.create_model(name, num_classes=10, width=width),
            maskprop.create_model(name, num_classes=10, width=int(narrow_width)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32", choices=["resnet20", "resnet32", "resnet56", *VGG_CONFIGS])
    parser.add_argument("--width", type=int, default=2, help="width multiplier of the full ResNet")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    keep_freed_host_memory()  # as maskprop train / bench do: no page faults penalising the larger steps
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full, narrow = (model.train() for model in models(args.model, args.width, args.keep_ratio))
    x, y = random_batch(args.batch_size, 32)
    masks = mask_pair(maskprop.channel_groups(full), args.keep_ratio, torch.Generator().manual_seed(0))
    kept = {g: int(k.sum()) for g, k in masks["m"].items()}
    assert kept == maskprop.channel_groups(narrow), "the narrow model must match the mask"

    full_steps = training_steps(full, x, y, masks)
    steps = {"dense": full_steps["dense"], "compact": full_steps["compact"],
             "physical": training_steps(narrow, x, y, {"m": None, "m2": None})["compact"]}
    times = interleaved_times(steps, args.repeats, args.warmup)
    med = {name: statistics.median(values) for name, values in times.items()}

    def ratio(a: str, b: str) -> str:  # median and interquartile range of the per-repetition ratios a / b
        low, mid, high = quartiles([p / q for p, q in zip(times[a], times[b])])
        return f"{mid:.2f}x ({low:.2f}-{high:.2f})"

    width = "" if args.model in VGG_CONFIGS else f" width {args.width}"
    print(f"{args.model}{width}, keep {args.keep_ratio:g}, batch {args.batch_size}, {args.threads} threads, "
          f"medians of {args.repeats}; ratios: median (interquartile range) of the per-repetition ratios")
    print("| dense step (ms) | compact VR-PGE step (ms) | physical narrow step (ms) | dense / physical (ceiling) "
          "| dense / compact | compact efficiency vs physical |")
    print("|---:|---:|---:|---:|---:|---:|")
    efficiency = statistics.median(p / c for p, c in zip(times["physical"], times["compact"]))
    print(f"| {1e3 * med['dense']:.0f} | {1e3 * med['compact']:.0f} | {1e3 * med['physical']:.0f} "
          f"| {ratio('dense', 'physical')} | {ratio('dense', 'compact')} | {efficiency:.0%} |")


if __name__ == "__main__":
    main()
