"""Loader throughput: images per second of the ImageNet training pipeline against the number of worker processes.

A training step is loader-bound when the loader delivers fewer images per second than the GPU consumes: compare the
figure here (per process, i.e. per GPU under torchrun) with ``batch / step time`` of ``maskprop bench --device cuda``.
The pipeline is the one ``maskprop train`` runs: torchvision's ImageFolder (PIL decoding) under timm's ImageNet
training transform (random resized crop, flip, colour jitter, normalisation) and ``maskprop.train.data.build_loader``.

    python tools/bench_data.py                         # a synthetic tree of JPEGs of ImageNet's typical size
    python tools/bench_data.py --root /path/to/imagenet --workers 0 4 8 16

Without ``--root`` it writes ``--images`` random JPEGs of ``--size`` (default 500x375, ImageNet's most common size)
to a temporary directory (random pixels compress worse than photographs, so decoding costs somewhat more than on
ImageNet). The first batch (worker start-up) is not timed; each figure is the median over ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _synthetic_tree(root: Path, images: int, size: tuple[int, int], classes: int = 4) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(images):
        # Smooth random images (a coarse grid upsampled): closer to a photograph's JPEG size than white noise.
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        image.save(root / "train" / f"class{i % classes:03d}" / f"{i:06d}.JPEG", quality=90)
    for c in range(classes):  # ImageFolder wants an image in every class folder of val/ too
        Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(root / "val" / f"class{c:03d}" / "0.JPEG")


def measure(root: Path, workers: int, batch_size: int, batches: int, crop_size: int, repeats: int) -> float:
    """Median images per second of ``repeats`` passes of ``batches`` batches (after one untimed batch)."""
    from maskprop.train.data import build_loader, imagenet_datasets

    train_set, _, _ = imagenet_datasets(root, augment=True, crop_size=crop_size)
    loader = build_loader(train_set, batch_size, train=True, workers=workers, seed=0, world=(0, 1))
    rates = []
    for _ in range(repeats):
        iterator = iter(loader)
        next(iterator)  # worker start-up and the first prefetch
        start, count = time.perf_counter(), 0
        for _ in range(batches):
            try:
                images, _ = next(iterator)
            except StopIteration:
                break
            count += images.shape[0]
        rates.append(count / (time.perf_counter() - start))
        del iterator
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="an ImageFolder root with train/ (default: a synthetic tree)")
    parser.add_argument("--images", type=int, default=640, help="images of the synthetic tree")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=64, help="per process (per GPU)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each DataLoader worker does; the main process only collates at workers > 0
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            _synthetic_tree(root, args.images, tuple(args.size))
        needed = args.batch_size * (args.batches + 1)
        print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; {root if args.root else 'synthetic'} "
              f"({'x'.join(map(str, args.size)) + ' JPEG' if args.root is None else 'ImageFolder'}), batch "
              f"{args.batch_size}, crop {args.crop_size}, timm train transform; needs >= {needed} images")
        print("| workers | images/s | ms per image |")
        print("|---:|---:|---:|")
        for workers in args.workers:
            rate = measure(root, workers, args.batch_size, args.batches, args.crop_size, args.repeats)
            print(f"| {workers} | {rate:.0f} | {1000.0 / rate:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
