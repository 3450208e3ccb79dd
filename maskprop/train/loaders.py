"""Loaders whose batches follow one explicit generator and are the same global batches in any number of processes.

``data.batch_size`` is the global batch. :class:`GlobalBatchSampler` draws one order of the whole dataset per epoch
from the run's loader generator (seeded alike on every rank), cuts it into global batches, and gives each rank its
contiguous slice of every global batch: the sequence of global batches does not depend on the world size, and in one
process the sampler draws from the generator exactly as torch's ``RandomSampler`` + ``BatchSampler`` did before it
(one permutation per epoch and one more that is discarded, after the worker base seed), so a run's data order is
unchanged by it. Evaluation loaders give each rank a contiguous share of the dataset in order,
without padding or repetition, so that counts summed over the ranks are exactly those of one process.

Worker processes draw each batch's augmentation from a seed of that batch alone (:class:`Batch`): the generator's
state as the epoch starts, the batch's number and the rank. So the crops and flips do not depend on how many workers
there are or which of them loads a batch, and an epoch resumed at any batch (:attr:`GlobalBatchSampler.start`) draws
what it would have drawn.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from .distributed import current

__all__ = ["Batch", "GlobalBatchSampler", "SeededBatches", "batch_seed", "build_loader", "build_sampler"]


class Batch(list):
    """One rank's indices of one batch, and the seed its augmentation draws from in a worker process.

    Attributes:
        number: The batch's place in its epoch (0 for the first).
        seed: A 63-bit seed of the loader generator's state as the epoch starts, ``number`` and the rank
            (:func:`batch_seed`).
    """

    def __init__(self, indices: list[int], number: int, seed: int) -> None:
        super().__init__(indices)
        self.number, self.seed = number, seed


def batch_seed(epoch: int, number: int, rank: int) -> int:
    """The seed of batch ``number`` of the epoch ``epoch`` (the loader generator's state as the epoch starts, as
    :func:`_state_digest` reads it), on ``rank``: 63 bits of a BLAKE2b hash of the three (every rank draws its own
    augmentation)."""
    digest = hashlib.blake2b(f"{epoch},{number},{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _state_digest(generator: torch.Generator | None) -> int:
    """64 bits of a BLAKE2b hash of ``generator``'s state (0 without one): a value of the epoch that draws nothing
    from it, so the data order stays what it was."""
    if generator is None:
        return 0
    state = bytes(generator.get_state().tolist())  # a uint8 tensor (numpy not needed)
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little")


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

    Each batch comes with the seed of its augmentation in worker processes (:class:`Batch`), from the generator's
    state as the epoch starts. :attr:`start` set to ``k`` makes the next epoch draw as every epoch does and yield its
    batches from the ``k``-th on: an epoch resumed where a checkpoint left it.

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
        self.start = 0
        """The batch the next epoch starts at (reset to 0 when it starts)."""

    def _shard_range(self) -> range:
        per_rank, extra = divmod(self.size, self.world_size)
        start = self.rank * per_rank + min(self.rank, extra)
        return range(start, start + per_rank + (self.rank < extra))

    def __len__(self) -> int:
        if self.shard:
            return math.ceil(len(self._shard_range()) / self.local_batch)
        return self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        first, self.start = self.start, 0
        draw = _state_digest(self.generator)
        if self.shard:
            indices = list(self._shard_range())
            starts = range(0, len(indices), self.local_batch)
            for number in range(first, len(starts)):
                part = indices[starts[number]:starts[number] + self.local_batch]
                yield Batch(part, number, batch_seed(draw, number, self.rank))
            return
        order = torch.randperm(self.size, generator=self.generator) if self.shuffle else torch.arange(self.size)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for number, start in enumerate(range(0, self.size, self.batch_size)):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.batch_size:
                if self.drop_last:
                    break
                lo, hi = 0, len(batch)  # one process (checked in __init__)
            if number >= first:
                yield Batch(batch[lo:hi].tolist(), number, batch_seed(draw, number, self.rank))
        if self.shuffle:  # torch's RandomSampler draws one more permutation when a BatchSampler exhausts it
            torch.randperm(self.size, generator=self.generator)


class SeededBatches(Dataset):
    """``dataset`` whose examples, fetched a batch at a time in a worker process, draw their random transforms from
    the batch's own seed (:class:`Batch`): torch's, ``random``'s and numpy's global generators are seeded with it
    first. In the main process (``workers == 0``) nothing is seeded: the transforms draw from the run's global
    generators, as without this wrapper. Picklable for spawned workers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the dataset's own attributes (``targets``, ``classes``, ...)
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitems__(self, batch: list[int]) -> list[Any]:
        if isinstance(batch, Batch) and get_worker_info() is not None:
            torch.manual_seed(batch.seed)
            random.seed(batch.seed)
            try:
                import numpy as np

                np.random.seed(batch.seed % 2**32)
            except ImportError:
                pass
        return [self.dataset[i] for i in batch]


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
                 pin_memory: bool = False, world: tuple[int, int] | None = None,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """A DataLoader whose order and augmentation follow an explicit generator, sliced for this rank.

    ``batch_size`` is the global batch: under ``torch.distributed`` each rank loads ``batch_size / world_size``
    examples of every global batch (training), or a contiguous share of the dataset (evaluation, ``train=False``).
    Shuffling (for ``train``) draws each epoch's permutation from ``generator``, so the same generator state gives the
    same batches; pass your own generator to save and restore its state with a checkpoint, otherwise one seeded with
    ``seed`` is made. With ``workers == 0`` augmentation draws from the global generators (torch's, ``random``'s);
    in worker processes each batch draws from a seed of its own (``generator``'s state as the epoch starts, the
    batch's number and the rank: :class:`SeededBatches`), so the crops and flips do not depend on the number of
    workers (1 or more), and a run resumed at any batch, its generator restored to the epoch's start and
    :attr:`GlobalBatchSampler.start` set, draws what one that did not stop draws. Workers start anew every epoch: a
    DataLoader's persistent workers would draw their base seed from ``generator`` at the first epoch only, and so
    move it, and every later epoch's order, otherwise than ``workers == 0`` does (starting them costs a fraction of a
    second an epoch).

    Args:
        dataset: The dataset.
        batch_size: Global batch size (over all ranks).
        train: Shuffle, and by default drop the last incomplete batch.
        workers: Worker processes per rank, started anew every epoch.
        seed: Seed of the generator made when ``generator`` is not given.
        generator: Generator of the order and of the batches' seeds (the same state on every rank).
        drop_last: Drop the last incomplete batch; defaults to ``train``.
        pin_memory: Page-locked batches for faster host-to-GPU copies.
        world: ``(rank, world_size)``; default: from ``torch.distributed`` when it is initialised, else ``(0, 1)``.
        collate_fn: How a batch's examples are put together; default: torch's (tensors stacked).

    Returns:
        The loader.
    """
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    sampler = build_sampler(len(dataset), batch_size, train, seed, generator, drop_last, world)  # type: ignore[arg-type]
    return DataLoader(
        SeededBatches(dataset),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=sampler.generator,
        collate_fn=collate_fn,
        persistent_workers=False,  # they would move the generator less from the second epoch on (see above)
    )
