"""Loader throughput: images per second of the ImageNet training pipeline against the number of worker processes,
and of the CIFAR training batches from torch's DataLoader against those made on the device (``data.on_device``).

A training step is loader-bound when the loader delivers fewer images per second than the GPU consumes: compare the
figure here (per process, i.e. per GPU under torchrun) with ``batch / step time`` of ``maskprop bench --device cuda``.
The pipeline is the one ``maskprop train`` runs: torchvision's ImageFolder (PIL decoding) under timm's ImageNet
training transform (random resized crop, flip, colour jitter, normalisation) and ``maskprop.train.data.build_loader``.

    python tools/bench_data.py                         # a synthetic tree of JPEGs of ImageNet's typical size
    python tools/bench_data.py --root /path/to/imagenet --workers 0 4 8 16
    python tools/bench_data.py --decode cpu device --workers 0 2   # PIL in the workers against data.decode: device
    python tools/bench_data.py --decode cpu device --device cuda   # the same, decoded by nvjpeg on a GPU
    python tools/bench_data.py --cifar --workers 0 2   # CIFAR-10: the DataLoader against data.on_device (CPU)
    python tools/bench_data.py --cifar --device cuda   # the same on a GPU (the DataLoader's batches copied there)

Without ``--root`` it writes ``--images`` random JPEGs of ``--size`` (default 500x375, ImageNet's most common size)
to a temporary directory (random pixels compress worse than photographs, so decoding costs somewhat more than on
ImageNet). The first batch (worker start-up) is not timed; each figure is the median over ``--repeats`` passes.

``--decode cpu device`` times, interleaved in one process, the ImageNet pipeline of ``data.decode: cpu`` (PIL and
timm's transform in the workers, the batch then moved to ``--device``) and of ``data.decode: device`` (the workers read
the bytes and draw the augmentation; the main process decodes and augments on ``--device``:
``maskprop.train.decode``), with each of ``--workers``: one pass of ``--batches`` batches of each in turn, each
batch made ready for a step (on the device, channels_last). Its table gives each path's median images/s and the
median over the repeats of the device path's rate over the cpu path's with the same workers in the same repeat.

``--cifar`` writes a CIFAR-10 stand-in of ``--images`` random images (default 10,000) in the python pickle format (or
reads ``--root``) and times, interleaved in one process, one pass of ``--batches`` training batches (crop, flip,
normalisation, channels_last, on ``--device``) of each path in turn: the DataLoader with each of ``--workers``, then
the batches made on the device (:class:`maskprop.train.device_data.DeviceLoader`). Its table gives each path's median
images/s and the median over the repeats of the on-device path's rate over that path's in the same repeat (paired
ratios: on a machine shared with other work, only rates measured side by side compare).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def measure_decode(root: Path, workers: list[int], modes: list[str], batch_size: int, batches: int, crop_size: int,
                   repeats: int, device: torch.device) -> list[tuple[str, int, float, float | None]]:
    """``(decode, workers, median images/s, median paired ratio of the device path over the cpu path with the same
    workers)`` per path (the ratio ``None`` for the cpu path, or without both), the paths timed in turn within every
    repeat."""
    from maskprop.train.data import build_loader, imagenet_datasets
    from maskprop.train.decode import decode_loader

    loaders: dict[tuple[str, int], Any] = {}
    for mode in modes:
        train_set, _, _ = imagenet_datasets(root, augment=True, crop_size=crop_size, decode=mode)
        for w in workers:
            if mode == "device":
                loaders[mode, w] = decode_loader(train_set, batch_size, True, device, torch.channels_last,
                                                 workers=w, seed=0, world=(0, 1))
            else:
                loaders[mode, w] = build_loader(train_set, batch_size, train=True, workers=w, seed=0, world=(0, 1),
                                                pin_memory=device.type == "cuda")
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in loaders}
    for _ in range(repeats):
        for w in workers:
            for mode in modes:
                rates[mode, w].append(_pass(loaders[mode, w], batches, device))
    rows = []
    for (mode, w), got in rates.items():
        paired = mode == "device" and ("cpu", w) in rates
        ratio = statistics.median(d / c for d, c in zip(got, rates["cpu", w])) if paired else None
        rows.append((mode, w, statistics.median(got), ratio))
    return rows


def _cifar_standin(root: Path, images: int) -> None:
    """A CIFAR-10 of ``images`` random training images (and 1,000 test images) in the python pickle format."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per_batch = -(-images // 5)
    sizes = [min(per_batch, images - i * per_batch) for i in range(5)] + [1000]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, size in zip(names, sizes):
        entry = {"data": rng.integers(0, 256, (max(size, 0), 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, max(size, 0)).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{c}" for c in range(10)]}))


def _pass(loader: Any, batches: int, device: torch.device) -> float:
    """Images per second of ``batches`` batches of one pass (after one untimed batch), each made ready for a step:
    on ``device``, channels_last, as ``StepContext.inputs`` leaves them."""
    iterator = iter(loader)

    def ready(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        images, labels = batch
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels.to(device, non_blocking=True)
        return images.shape[0]

    ready(next(iterator))  # worker start-up, the first prefetch, the epoch's indices
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        try:
            count += ready(next(iterator))
        except StopIteration:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = count / (time.perf_counter() - start)
    del iterator
    return rate


def measure_cifar(root: Path, workers: list[int], batch_size: int, batches: int, repeats: int,
                  device: torch.device) -> list[tuple[str, float, float]]:
    """``(path, median images/s, median of the on-device path's paired ratios over it)`` per path, the DataLoader
    with each of ``workers`` then the on-device path, timed in turn within every repeat."""
    from maskprop.train.config import DataConfig
    from maskprop.train.data import build_datasets, build_loader
    from maskprop.train.device_data import DeviceLoader, augment_seed, image_tensors

    train_set, _, _, _ = build_datasets(DataConfig(dataset="cifar10", root=str(root)))
    loaders: dict[str, Any] = {
        f"DataLoader, workers {w}": build_loader(train_set, batch_size, train=True, workers=w, seed=0, world=(0, 1),
                                                 pin_memory=device.type == "cuda") for w in workers}
    data = image_tensors("cifar10", train_set, augment=True).to(device)
    on_device = f"on the device ({device})"
    loaders[on_device] = DeviceLoader(data, batch_size, train=True, seed=0, world=(0, 1),
                                      augment_generator=torch.Generator(device=device).manual_seed(augment_seed(0)),
                                      memory_format=torch.channels_last)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(_pass(loader, batches, device))
    return [(name, statistics.median(rates[name]),
             statistics.median(d / r for d, r in zip(rates[on_device], rates[name]))) for name in loaders]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="an ImageFolder root with train/ (default: a synthetic tree); "
                                                  "with --cifar, a CIFAR-10 root (default: a random stand-in)")
    parser.add_argument("--cifar", action="store_true", help="CIFAR-10 batches: the DataLoader against on-device")
    parser.add_argument("--images", type=int, help="images of the synthetic tree (default 640) or CIFAR stand-in "
                                                   "(default 10,000)")
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batch-size", type=int, help="per process (per GPU); default 64, with --cifar 256")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--device", default="cpu", help="with --cifar or --decode: where the batches go (cpu, cuda)")
    parser.add_argument("--decode", nargs="+", choices=["cpu", "device"],
                        help="ImageNet: time these data.decode paths interleaved, with paired ratios")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each DataLoader worker does; the main process only collates at workers > 0
    if args.cifar:
        return _cifar_main(args)
    args.images = 640 if args.images is None else args.images
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    if args.decode:
        return _decode_main(args)
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


def _decode_main(args: argparse.Namespace) -> int:
    import torchvision

    device = torch.device(args.device)
    modes = list(dict.fromkeys(args.decode))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            _synthetic_tree(root, args.images, tuple(args.size))
        print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"{torch.get_num_threads()} thread; {root if args.root else 'synthetic'} "
              f"({'x'.join(map(str, args.size)) + ' JPEG' if args.root is None else 'ImageFolder'}), batch "
              f"{args.batch_size}, crop {args.crop_size}, timm's train transform or its draws decoded on {device}; "
              f"medians of {args.repeats} interleaved passes of {args.batches} batches after an untimed first batch")
        print("| decode | workers | images/s | ms per image | device / cpu (paired) |")
        print("|---|---:|---:|---:|---:|")
        for mode, workers, rate, ratio in measure_decode(root, args.workers, modes, args.batch_size, args.batches,
                                                         args.crop_size, args.repeats, device):
            paired = "" if ratio is None else f"{ratio:.2f}x"
            print(f"| {mode} | {workers} | {rate:,.0f} | {1000.0 / rate:.2f} | {paired} |", flush=True)
    return 0


def _cifar_main(args: argparse.Namespace) -> int:
    images = 10_000 if args.images is None else args.images
    batch_size = 256 if args.batch_size is None else args.batch_size
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            _cifar_standin(root, images)
        print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread; "
              f"{root if args.root else f'CIFAR-10 stand-in of {images:,} random images'}, batch {batch_size}, "
              f"crop 32 (padding 4), flip, normalisation, channels_last on {device}; medians of {args.repeats} "
              f"interleaved passes of {args.batches} batches after an untimed first batch")
        print("| path | images/s | ms per batch | on-device / this (paired) |")
        print("|---|---:|---:|---:|")
        for name, rate, ratio in measure_cifar(root, args.workers, batch_size, args.batches, args.repeats, device):
            print(f"| {name} | {rate:,.0f} | {1000.0 * batch_size / rate:.1f} | {ratio:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
