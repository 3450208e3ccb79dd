"""Gradient estimation angle of SBP and MSBP against k (the MSBP paper's Figure 5), through ``maskprop.fit``.

For each keep ratio r and each method (``sbp``: no memory; ``msbp``: memory gamma), trains the papers' MLP
(in-h-h-10 with h = 500 or 5000, Adam 1e-3, batch 32) and reports the mean angle between the sparse and the true
gradient over the last epoch (measured every ``--angle-every`` steps on the step's own graph) and the final accuracy.
The paper finds the angle smaller with memory at every k.

Data: MNIST from ``--mnist-root`` (``MNIST/raw/*-ubyte`` under it), or by default a synthetic 10-class task of 16x16
images (a class template shifted by up to 2 pixels, random contrast, noise), generated from a seed.

Usage:
    python tools/angle_study.py --ratios 0.01 0.02 0.04 --epochs 3 --threads 2
    python tools/angle_study.py --mnist-root /path/to/data --epochs 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import maskprop
from maskprop import enlarge_onednn_primitive_cache, keep_freed_host_memory


class ShiftedTemplates(Dataset):
    """10 classes of 1x16x16 images: a smooth class template shifted by up to 2 pixels, random contrast, noise."""

    num_classes = 10

    def __init__(self, size: int, seed: int) -> None:
        templates = F.interpolate(torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(123)),
                                  size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
        generator = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 10, (size,), generator=generator)
        dy, dx = torch.randint(0, 5, (2, size), generator=generator)
        images = torch.stack([templates[c, y:y + 16, x:x + 16] for c, y, x in zip(self.targets, dy, dx)])
        contrast = 0.5 + torch.rand(size, 1, 1, generator=generator)
        self.images = (images * contrast + 0.8 * torch.randn(size, 16, 16, generator=generator)).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--memory", type=float, default=0.8, help="MSBP memory ratio gamma")
    parser.add_argument("--hidden", type=int, default=500, help="width of the two hidden layers")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--angle-every", type=int, default=20)
    parser.add_argument("--mnist-root", default=None)
    parser.add_argument("--train-size", type=int, default=6000, help="synthetic training images")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_host_memory()  # as maskprop train / bench do: no page faults penalising the larger steps
    enlarge_onednn_primitive_cache()  # oneDNN keeps the kernels of the widths it meets
    torch.set_num_threads(args.threads)
    if args.mnist_root is None:
        datasets = (ShiftedTemplates(args.train_size, seed=0), ShiftedTemplates(2000, seed=1))
        data = {"batch_size": 32, "workers": 0}
        source = f"synthetic shifted templates ({args.train_size} train, 2000 val)"
    else:
        datasets = (None, None)
        data = {"dataset": "mnist", "root": args.mnist_root, "batch_size": 32, "workers": 0}
        source = f"MNIST from {args.mnist_root}"
    print(f"MLP in-{args.hidden}-{args.hidden}-10, memory {args.memory:g}, Adam 1e-3, batch 32, {args.epochs} epochs, "
          f"{source}; angle: mean over the last epoch, measured every {args.angle_every} steps")
    print(f"| r = k / n | k of {args.hidden} | SBP angle (deg) | MSBP angle (deg) | SBP accuracy (%) "
          f"| MSBP accuracy (%) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for ratio in args.ratios:
        angles, accuracies = {}, {}
        for method in ("sbp", "msbp"):
            config = {"method": method, "seed": 0, "log_every": 10**9, "eval_every": 0,
                      "model": {"name": "mlp", "kwargs": {"hidden": [args.hidden, args.hidden]}}, "data": data,
                      "optim": {"epochs": args.epochs, "schedule": "constant"},
                      "sbp": {"ratio": ratio, "memory": args.memory, "angle_every": args.angle_every}}
            with tempfile.TemporaryDirectory() as out:
                summary = maskprop.fit(config, *datasets, out=Path(out) / "run")
                records = (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()
            last = json.loads(records[-1])
            if "angle_overall" not in last:
                raise SystemExit(f"no angle measured in the last epoch: it has fewer than --angle-every "
                                 f"{args.angle_every} steps (lower it, or raise --train-size)")
            angles[method] = last["angle_overall"]
            accuracies[method] = summary["accuracy"]
        print(f"| {ratio:g} | {max(1, round(ratio * args.hidden))} | {angles['sbp']:.1f} | {angles['msbp']:.1f} "
              f"| {accuracies['sbp']:.2f} | {accuracies['msbp']:.2f} |")


if __name__ == "__main__":
    main()
