"""What starting the DataLoader's workers anew every epoch costs against persistent workers (CPU).

``maskprop.train.loaders.build_loader`` starts its workers anew every epoch, seeded from the run's loader generator,
so that a resumed run draws what an uninterrupted one draws. This times whole epochs of a CIFAR-10 stand-in through
that loader and through torch's DataLoader with persistent workers over the same batches, alternated, and prints the
medians and the median of the paired ratios.

Usage:
    python tools/bench_worker_start.py --images 2000 --workers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def _bench_data():
    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).with_name("bench_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _epoch(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers}: expected 1 or more (worker processes are what is timed)")
    from maskprop.train.config import DataConfig
    from maskprop.train.data import build_datasets, build_loader

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        _bench_data()._cifar_standin(Path(tmp), args.images)
        train_set, _, _, _ = build_datasets(DataConfig(dataset="cifar10", root=tmp))
        fresh = build_loader(train_set, args.batch_size, train=True, workers=args.workers, seed=0, world=(0, 1))
        persistent = DataLoader(train_set, batch_sampler=fresh.batch_sampler, num_workers=args.workers,
                                persistent_workers=True, generator=fresh.generator)
        _epoch(persistent)  # its workers started once, before the timed epochs
        times: dict[str, list[float]] = {"fresh": [], "persistent": []}
        for _ in range(args.repeats):
            times["fresh"].append(_epoch(fresh))
            times["persistent"].append(_epoch(persistent))
    ratio = statistics.median(f / p for f, p in zip(times["fresh"], times["persistent"]))
    fresh_s, persistent_s = statistics.median(times["fresh"]), statistics.median(times["persistent"])
    print(f"torch {torch.__version__}; CIFAR-10 stand-in of {args.images:,} images, {len(fresh)} batches of "
          f"{args.batch_size}, {args.workers} workers, {args.repeats} alternated epochs each")
    print(f"epoch, workers started anew: {fresh_s:.3f} s; persistent workers: {persistent_s:.3f} s; "
          f"difference {fresh_s - persistent_s:+.3f} s an epoch; paired ratio {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
