"""Loaders whose batches follow one explicit generator and are the same global batches in any number of processes.

``data.batch_size`` is the global batch. :class:`GlobalBatchSampler` draws one order of the whole dataset per epoch
from the run's loader generator (seeded alike on every rank), cuts it into global batches, and gives each rank its
contiguous slice of every global batch: the sequence of global batches does not depend on the world size, and in one
process the sampler draws from the generator exactly as torch's ``RandomSampler`` + ``BatchSampler`` did before it
(one permutation per epoch and one more that is discarded, after the worker base seed), so a run's data order is
unchanged by it. Evaluation loaders give each rank a contiguous share of the dataset in order, without padding or
repetition, so that counts summed over the ranks are exactly those of one process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import current

__all__ = ["GlobalBatchSampler", "build_loader", "build_sampler"]


class GlobalBatchSampler(Sampler[list[int]]):
    """Index batches for one rank: its slice of each global batch of one shared order.

    Args:
        size: Examples in the dataset.
        batch_size: The global batch; a multiple of ``world_size``.
        shuffle: Draw a new permutation from ``generator`` every epoch (else the dataset order).
        drop_last: Drop the last incomplete global batch.
        generator: Source of the permutations (the same state on every rank).
        rank: This process's rank.
        world_size: Number of processes.
        shard: Instead of slicing global batches, give each rank a contiguous share of the (unshuffled) dataset in
            batches of ``batch_size / world_size``, no example repeated or left out (evaluation).

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size``, or several ranks would train on a last
            global batch they cannot share evenly (``drop_last=False``).
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, drop_last: bool,
                 generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                 shard: bool = False) -> None:
        if batch_size % world_size:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by the world size {world_size}; "
                             f"expected a multiple of {world_size} (the global batch is split evenly over the ranks)")
        if shuffle and generator is None:
            raise ValueError("a shuffling GlobalBatchSampler needs a generator")
        if world_size > 1 and not shard and not drop_last and size % batch_size:
            raise ValueError(f"{size} examples leave a last global batch of {size % batch_size} that "
                             f"{world_size} ranks cannot share evenly; expected drop_last=True")
        self.size, self.batch_size, self.shuffle, self.drop_last = size, batch_size, shuffle, drop_last
        self.generator, self.rank, self.world_size, self.shard = generator, rank, world_size, shard
        self.local_batch = batch_size // world_size

    def _shard_range(self) -> range:
        per_rank, extra = divmod(self.size, self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return range(start, start + per_rank + (self.rank < extra))

    def __len__(self) -> int:
        if self.shard:
            return math.ceil(len(self._shard_range()) / self.local_batch)
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shard:
            indices = list(self._shard_range())
            for start in range(0, len(indices), self.local_batch):
                yield indices[start:start + self.local_batch]
            return
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for start in range(0, self.size, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.batch_size:
                if self.drop_last:
                    break
                lo, hi = 0, len(batch)  # one process (checked in __init__)
            yield batch[lo:hi].tolist()
        if self.shuffle:  # torch's RandomSampler draws one more permutation when a BatchSampler exhausts it
            torch.randperm(self.size, generator=self.generator)


class _ReseedWorker:
    """Worker init of ranks > 0: mixes the rank into the worker's seeds, so that ranks draw independent augmentations
    (the loader generator, hence the base seed, is the same on every rank). Picklable for spawned workers."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        seed = (torch.initial_seed() + 0x9E3779B97F4A7C15 * self.rank) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed % 2**32)
        except ImportError:
            pass


def build_sampler(size: int, batch_size: int, train: bool, seed: int = 0, generator: torch.Generator | None = None,
                  drop_last: bool | None = None, world: tuple[int, int] | None = None) -> GlobalBatchSampler:
    """The index batches :func:`build_loader` loads, for a dataset of ``size`` examples (its arguments of the same
    names): this rank's slices of the global batches of one order drawn from ``generator`` (training), or its
    contiguous share of the dataset in order (``train=False``). Without ``generator``, one seeded with ``seed``.

    Raises:
        ValueError: ``batch_size`` < 1, or a training set smaller than one batch (with ``drop_last``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    rank, world_size = world if world is not None else (current().rank, current().world_size)
    drop_last = train if drop_last is None else drop_last
    if drop_last and size < batch_size:
        raise ValueError(f"a training set of {size} examples gives no full batch of {batch_size} (an epoch drops its "
                         f"partial last batch); expected data.batch_size <= {size}, or more training examples "
                         f"(for the shapes dataset, data.train_size)")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return GlobalBatchSampler(size, batch_size, shuffle=train, drop_last=drop_last, generator=generator, rank=rank,
                              world_size=world_size, shard=not train)


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 generator: torch.Generator | None = None, drop_last: bool | None = None,
                 pin_memory: bool = False, world: tuple[int, int] | None = None) -> DataLoader:
    """A DataLoader whose order and augmentation follow an explicit generator, sliced for this rank.

    ``batch_size`` is the global batch: under ``torch.distributed`` each rank loads ``batch_size / world_size``
    examples of every global batch (training), or a contiguous share of the dataset (evaluation, ``train=False``).
    Shuffling (for ``train``) draws each epoch's permutation from ``generator``, and worker processes seed their RNGs
    (torch, ``random``, numpy) from it too, so the same generator state gives the same batches. Pass your own
    generator to save and restore its state with a checkpoint; otherwise one seeded with ``seed`` is made. With
    ``workers == 0`` augmentation draws from torch's global RNG. Worker processes start anew every epoch, seeded from
    the generator's draw at that epoch (torch's base seed), so the order does not depend on ``workers``, and a run
    resumed at an epoch's end, its generator restored, draws the crops and flips of one that did not stop (persistent
    workers would carry their streams over from epoch to epoch, and move the generator one draw less from the second
    epoch on). Starting them costs a fraction of a second an epoch.

    Args:
        dataset: The dataset.
        batch_size: Global batch size (over all ranks).
        train: Shuffle, and by default drop the last incomplete batch.
        workers: Worker processes per rank, started anew every epoch.
        seed: Seed of the generator made when ``generator`` is not given.
        generator: Generator for shuffling and worker seeds (the same state on every rank).
        drop_last: Drop the last incomplete batch; defaults to ``train``.
        pin_memory: Page-locked batches for faster host-to-GPU copies.
        world: ``(rank, world_size)``; default: from ``torch.distributed`` when it is initialised, else ``(0, 1)``.

    Returns:
        The loader.
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    sampler = build_sampler(len(dataset), batch_size, train, seed, generator, drop_last, world)  # type: ignore[arg-type]
    rank = sampler.rank
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=sampler.generator,
        persistent_workers=False,  # new workers every epoch, seeded from the generator: resumable exactly
        worker_init_fn=_ReseedWorker(rank) if rank > 0 and workers > 0 else None,
    )
