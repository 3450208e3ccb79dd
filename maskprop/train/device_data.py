"""Datasets held on the training device, whose batches are made and augmented there (``data.on_device``).

At CIFAR scale a GPU step takes a few milliseconds, and torch's DataLoader, which crops, flips and normalises one
example at a time in worker processes and then copies the batch to the device, cannot keep up with it. The in-memory
datasets (``shapes``, MNIST, Fashion-MNIST, CIFAR-10/100) are small enough to live on the device instead: one uint8
tensor of all the training images and one of the validation images (:class:`ImageTensors`). A :class:`DeviceLoader`
makes each batch there, by indexing those tensors and augmenting the whole batch at once:

* **The same batches.** Its index batches come from the :class:`~maskprop.train.loaders.GlobalBatchSampler` of the
  run's loader generator, which it moves exactly as torch's DataLoader does (the workers' base seed, then the epoch's
  permutation, and the one more that a DataLoader draws at the end of an epoch), so the examples and their order are
  those of the DataLoader path, in one process and under torchrun (each rank its slice); evaluation walks each rank's
  share in order.
* **The same augmentation, drawn otherwise.** A random crop of the image's own size after zero padding (every offset
  in ``[0, 2 * padding]``, rows and columns independently and uniformly) and a horizontal flip with probability 1/2,
  per example, then the per-channel normalisation: the distribution of torchvision's ``RandomCrop(size, padding)`` +
  ``RandomHorizontalFlip`` that the datasets' own transforms draw (:mod:`maskprop.train.transforms`). For ``shapes``,
  whose dataset normalises before it crops, the padding is zero in the normalised image, as there. The draws come from
  an explicit generator on the device, seeded from the run's seed and saved in the checkpoint (``TrainState``), so a
  resumed run draws what an uninterrupted one draws; under torchrun each rank has its own stream.
* **No host work per batch.** The epoch's indices go to the device in one transfer; a batch is a handful of kernels
  (an index, two draws, a padding, a gather, the conversion to float and a multiply and an add in place, all in the
  run's memory format, held by the images), with no read back to the host.

``data.on_device: auto`` puts the data on a CUDA device where it fits in half of the free memory, and leaves the CPU
on the DataLoader path (BENCHMARKS.md, "Data loading: CIFAR batches on the device": the batches come 4-5x faster there
too, but a CPU step takes so long that a whole run measured no difference, and the switch would change every CPU run's
augmentation draws).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .config import IN_MEMORY_DATASETS, DataConfig
from .loaders import build_sampler

__all__ = ["DEVICE_MEMORY_SHARE", "DeviceLoader", "ImageTensors", "augment_seed", "crop_flip_batch",
           "data_on_device", "draw_crops_and_flips", "image_tensors", "normalize_batch"]

logger = logging.getLogger(__name__)

DEVICE_MEMORY_SHARE = 0.5
"""The share of the device's free memory (on the CPU: of the memory available) the data may take on it; the rest is
left to the model, its activations and the optimizer."""


@dataclass
class ImageTensors:
    """An in-memory image dataset as two tensors, with how its batches are augmented and normalised.

    Attributes:
        images: All images, uint8 ``(N, C, H, W)``.
        labels: Their class indices, int64 ``(N,)``.
        mean: Per-channel mean of the pixels scaled to [0, 1], subtracted in the normalisation.
        std: Per-channel standard deviation, divided by.
        padding: A random crop of the image's own size after this many pixels of zeros on each side (0: no crop).
        flip: A horizontal flip with probability 1/2.
        pad_normalized: The padding is zero in the normalised image (``shapes``, whose dataset normalises before its
            transform crops) rather than a black pixel (CIFAR, whose transform crops the image before it normalises).
    """

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0
    flip: bool = False
    pad_normalized: bool = False

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageTensors.images is a {self.images.dtype} tensor of shape "
                             f"{tuple(self.images.shape)}; expected uint8 (N, C, H, W)")
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"ImageTensors has {self.images.shape[0]} images and labels of shape "
                             f"{tuple(self.labels.shape)}; expected one label per image")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"ImageTensors has {channels} channels, {len(self.mean)} means and {len(self.std)} "
                             f"standard deviations; expected one of each per channel")
        if self.padding < 0:
            raise ValueError(f"ImageTensors.padding={self.padding} must be >= 0")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def augments(self) -> bool:
        """Whether its training batches are cropped or flipped."""
        return self.padding > 0 or self.flip

    @property
    def nbytes(self) -> int:
        """Bytes of its images and labels."""
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()

    def to(self, device: torch.device | str, memory_format: torch.memory_format | None = None) -> ImageTensors:
        """The same dataset on ``device``, its images laid out in ``memory_format`` (``None``: as they are) before they
        move, so that the device never holds two copies (``self`` where nothing changes)."""
        device = torch.device(device)
        images = self.images
        if memory_format is not None and not images.is_contiguous(memory_format=memory_format):
            images = images.contiguous(memory_format=memory_format)
        if images is self.images and images.device == device and self.labels.device == device:
            return self
        return replace(self, images=images.to(device), labels=self.labels.to(device))

    def head(self, count: int) -> ImageTensors:
        """Its first ``count`` examples (views, no copy)."""
        return replace(self, images=self.images[:count], labels=self.labels[:count])


def image_tensors(name: str, dataset: Dataset, augment: bool) -> ImageTensors:
    """The images and labels of a dataset that :func:`~maskprop.train.datasets.build_datasets` built for ``name``, as
    tensors on the CPU (those the dataset holds where it holds tensors: ``shapes``, MNIST), with the augmentation its
    transform draws when ``augment`` (pass ``False`` for a validation set) and its normalisation.

    Args:
        name: The dataset's name (``data.dataset``): one of :data:`~maskprop.train.config.IN_MEMORY_DATASETS`.
        dataset: The dataset.
        augment: Crop and flip as its training transform does (``data.augment`` on a training set; MNIST has none).

    Returns:
        The dataset as :class:`ImageTensors`.

    Raises:
        ValueError: ``name`` is not an in-memory dataset.
    """
    from .transforms import (
        CIFAR10_MEAN,
        CIFAR10_STD,
        CIFAR100_MEAN,
        CIFAR100_STD,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        MNIST_MEAN,
        MNIST_STD,
    )

    if name == "shapes":
        from .shapes import SHAPES_MEAN, SHAPES_STD

        padding = dataset.image_size // 8 if augment else 0  # shapes_datasets' crop_flip(image_size, image_size // 8)
        return ImageTensors(dataset.images, dataset.targets.long(), SHAPES_MEAN, SHAPES_STD, padding, augment,
                            pad_normalized=True)
    if name in ("mnist", "fashion_mnist"):  # no augmentation, as the papers (mnist_transform)
        mean, std = (MNIST_MEAN, MNIST_STD) if name == "mnist" else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        return ImageTensors(dataset.data.unsqueeze(1), torch.as_tensor(dataset.targets, dtype=torch.long), mean, std)
    if name in ("cifar10", "cifar100"):
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W), a view
        return ImageTensors(images, torch.as_tensor(dataset.targets, dtype=torch.long), mean, std,
                            padding=4 if augment else 0, flip=augment)  # cifar_transforms: RandomCrop(32, padding=4)
    raise ValueError(f"dataset {name!r} is not held in memory; expected one of {', '.join(IN_MEMORY_DATASETS)}")


def draw_crops_and_flips(count: int, padding: int, flip: bool, generator: torch.Generator
                         ) -> tuple[Tensor | None, Tensor | None]:
    """The random crop offsets and flips of ``count`` examples, drawn from ``generator`` on its device, in this order:
    the offsets ``(count, 2)`` (top, left), each uniform in ``[0, 2 * padding]`` (``None`` without padding), then the
    flips ``(count,)``, each true with probability 1/2 (``None`` without ``flip``)."""
    device = generator.device
    offsets = None if padding <= 0 else torch.randint(0, 2 * padding + 1, (count, 2), generator=generator,
                                                      device=device)
    flips = None if not flip else torch.randint(0, 2, (count,), generator=generator, device=device).bool()
    return offsets, flips


def _channels_last(images: Tensor) -> bool:
    """Whether ``images`` ``(N, C, H, W)`` lie channels_last in memory (and not also contiguous: one channel)."""
    return images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()


def crop_flip_batch(images: Tensor, offsets: Tensor | None, flips: Tensor | None, padding: int) -> Tensor:
    """Per example of ``images`` ``(N, C, H, W)``: a crop of ``(H, W)`` at ``offsets[n]`` (top, left) from the image
    padded with ``padding`` zeros on each side, then a horizontal flip where ``flips[n]``; what torchvision's
    ``v2.functional.pad`` + ``crop`` + ``horizontal_flip`` give one example at a time, as one gather. ``offsets``
    ``None``: no crop; ``flips`` ``None``: no flip (neither: ``images`` itself). Any dtype; a new tensor, channels_last
    if ``images`` are, else contiguous.
    """
    batch, channels, height, width = images.shape
    if offsets is None and flips is None:
        return images
    device = images.device
    if offsets is None:
        offsets, padding = torch.zeros(batch, 2, dtype=torch.long, device=device), 0
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    top, left = offsets[:, 0, None], offsets[:, 1, None]
    source_rows = top + rows  # (N, H), rows of the padded image
    source_cols = left + cols  # (N, W)
    if flips is not None:
        source_cols = torch.where(flips[:, None], left + (width - 1) - cols, source_cols)
    padded_width = width + 2 * padding
    pixels = height * width
    index = (source_rows[:, :, None] * padded_width + source_cols[:, None, :]).view(batch, pixels)
    if _channels_last(images):  # gather whole pixels (C values each) in the (N, H, W, C) order the memory holds
        hwc = images.permute(0, 2, 3, 1)
        if padding > 0:
            padded = hwc.new_zeros(batch, height + 2 * padding, padded_width, channels)
            padded[:, padding:padding + height, padding:padding + width] = hwc
            hwc = padded
        out = hwc.reshape(batch, -1, channels).gather(1, index[:, :, None].expand(batch, pixels, channels))
        return out.view(batch, height, width, channels).permute(0, 3, 1, 2)
    padded = F.pad(images, (padding,) * 4) if padding > 0 else images
    flat = padded.contiguous().view(batch, channels, -1)
    return flat.gather(2, index[:, None, :].expand(batch, channels, pixels)).view(batch, channels, height, width)


def normalize_batch(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (or float in [0, 255]) images ``(N, C, H, W)`` as float32 ``(x / 255 - mean) / std`` per channel
    (``mean``, ``std``: float32 ``(C,)`` on the images' device), in the images' memory format: torchvision's
    ``ToDtype(float32, scale=True)`` + ``Normalize``, to float rounding (one multiply and one add in place)."""
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (-mean / std).view(1, -1, 1, 1)
    out = images.to(torch.float32, copy=True)  # a new tensor even for float input, laid out as the images are
    return out.mul_(scale).add_(shift)


def augment_seed(seed: int, rank: int = 0) -> int:
    """The seed of a run's augmentation generator on the device: ``seed + 2`` on rank 0 (the mask generator takes
    ``seed + 1``), and a stream of its own for every other rank."""
    return seed + 2 + 1_000_003 * rank


class DeviceLoader:
    """The batches :func:`~maskprop.train.loaders.build_loader` gives, made on the device from :class:`ImageTensors`.

    Iterating gives ``(images, labels)``: float32 images in ``memory_format`` and int64 labels on the data's device,
    each batch a new tensor (a batch stays valid while the next ones are made). The index batches are those of
    :func:`~maskprop.train.loaders.build_sampler` with the same arguments; like torch's DataLoader, every epoch first
    draws one value from ``generator`` (the DataLoader's base seed for its workers), so the generator, and with it every
    later epoch, moves exactly as on the DataLoader path.

    Args:
        data: The dataset on its device.
        batch_size: Global batch size (over all ranks).
        train: Shuffle and drop the last incomplete batch (by default); else each rank's share in order.
        generator: Source of the order (the run's loader generator, the same state on every rank); without it, one
            seeded with ``seed``.
        seed: Seed of the generator made when ``generator`` is not given.
        augment: Crop and flip as ``data`` says (default: ``train``).
        augment_generator: Source of the crops and flips, on the data's device (e.g. the run's, saved in its
            checkpoint); without it, a new one seeded with ``augment_seed`` at every epoch, so that every epoch draws
            the same (an evaluation of augmented examples, such as the fix's).
        augment_seed: Seed of those generators.
        drop_last: Drop the last incomplete batch; defaults to ``train``.
        world: ``(rank, world_size)``; default: from ``torch.distributed`` when it is initialised, else ``(0, 1)``.
        memory_format: Memory format of the images (``torch.channels_last`` for a run with ``channels_last``).
    """

    def __init__(self, data: ImageTensors, batch_size: int, train: bool, generator: torch.Generator | None = None,
                 seed: int = 0, augment: bool | None = None, augment_generator: torch.Generator | None = None,
                 augment_seed: int = 0, drop_last: bool | None = None, world: tuple[int, int] | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.data = data
        self.sampler = build_sampler(len(data), batch_size, train, seed, generator, drop_last, world)
        self.generator = self.sampler.generator
        self.augment = (train if augment is None else augment) and data.augments
        device = data.images.device
        if augment_generator is not None and augment_generator.device != device:
            raise ValueError(f"the augmentation generator is on {augment_generator.device}, the data on {device}; "
                             f"expected a generator on the data's device")
        self.augment_generator, self.augment_seed = augment_generator, augment_seed
        self.memory_format = memory_format
        if not data.images.is_contiguous(memory_format=memory_format):  # once: every batch comes out in its layout
            self.data = data = data.to(data.images.device, memory_format)
        self._mean = torch.tensor(data.mean, dtype=torch.float32, device=device)
        self._std = torch.tensor(data.std, dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def device(self) -> torch.device:
        """Where the data and the batches are."""
        return self.data.images.device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # What a DataLoader's iterator draws when it is made: its workers' base seed, before the first permutation.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        batches = list(self.sampler)  # the whole epoch (the sampler's last, discarded permutation included)
        if not batches:
            return
        generator = self.augment_generator
        if self.augment and generator is None:
            generator = torch.Generator(device=self.device).manual_seed(self.augment_seed)
        indices = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
        if self.device.type == "cuda":
            indices = indices.pin_memory()
        indices = indices.to(self.device, non_blocking=True)  # one transfer for the epoch
        starts = accumulate((len(batch) for batch in batches), initial=0)
        for start, batch in zip(starts, batches):
            yield self._batch(indices[start:start + len(batch)], generator)

    def _batch(self, index: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        data = self.data
        images, labels = data.images[index], data.labels[index]
        if not images.is_contiguous(memory_format=self.memory_format):  # (indexing keeps it on the CPU and CUDA)
            images = images.contiguous(memory_format=self.memory_format)
        if not self.augment:
            images = normalize_batch(images, self._mean, self._std)
        else:
            offsets, flips = draw_crops_and_flips(images.shape[0], data.padding, data.flip, generator)
            if data.pad_normalized:  # the dataset's transform pads the normalised image with zeros
                images = crop_flip_batch(normalize_batch(images, self._mean, self._std), offsets, flips, data.padding)
            else:  # black pixels, cropped on uint8: a quarter of the bytes
                images = normalize_batch(crop_flip_batch(images, offsets, flips, data.padding), self._mean, self._std)
        return images.contiguous(memory_format=self.memory_format), labels  # the layout it has already


def _available_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device, the memory available on a CPU (``MemAvailable`` of ``/proc/meminfo``); ``None``
    where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _off(setting: Any, device: torch.device, reason: str, expected: str, level: int = logging.INFO) -> None:
    """``data.on_device: true`` refused for ``reason`` (one line, with what is ``expected``); ``auto`` keeps the
    DataLoader, with a log line on CUDA, where it would have put the data on the device."""
    if setting is True:
        raise ValueError(f"data.on_device=true {reason}; expected {expected}")
    if device.type == "cuda":
        logger.log(level, "data.on_device=auto keeps the DataLoader on %s: the data %s", device, reason)


def data_on_device(data: DataConfig, device: torch.device, train_set: Dataset, val_set: Dataset,
                   given: bool = False, memory_format: torch.memory_format = torch.contiguous_format
                   ) -> tuple[ImageTensors, ImageTensors] | None:
    """The training and validation sets on ``device`` as ``data.on_device`` asks, or ``None``: the DataLoader path.

    ``auto`` is on for a CUDA device, off elsewhere (see the module docstring). Whether on by ``true`` or ``auto``, the
    dataset must be one of :data:`~maskprop.train.config.IN_MEMORY_DATASETS` (not datasets given to ``fit``), and its
    images and labels must take at most :data:`DEVICE_MEMORY_SHARE` of the memory the device has free: ``true`` makes
    either a one-line error, ``auto`` falls back to the DataLoader (with a log line on CUDA).

    Args:
        data: The data config.
        device: The training device (this rank's).
        train_set: The training set ``build_datasets`` built (or the one given to ``fit``).
        val_set: The validation set.
        given: The datasets were given to ``fit``, not built from ``data``.
        memory_format: The layout of the images on the device (that of the batches the run wants).

    Raises:
        ValueError: ``data.on_device: true`` for data that cannot be held on the device.
    """
    setting = data.on_device
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return None
    if given:
        _off(setting, device, "needs an in-memory dataset that config.data names; got datasets given to fit",
             "fit(config) without train_set and val_set, or data.on_device=false")
        return None
    if data.dataset not in IN_MEMORY_DATASETS:  # auto: ImageNet (true is refused when the config is read)
        _off(setting, device, f"needs an in-memory dataset; got {data.dataset!r}",
             f"one of {', '.join(IN_MEMORY_DATASETS)}, or data.on_device=false")
        return None
    train = image_tensors(data.dataset, train_set, data.augment)
    val = image_tensors(data.dataset, val_set, False)
    needed, available = train.nbytes + val.nbytes, _available_bytes(device)
    if available is not None and needed > DEVICE_MEMORY_SHARE * available:
        _off(setting, device, f"does not fit: the {data.dataset} images and labels take {_mib(needed)}, more than "
                              f"{DEVICE_MEMORY_SHARE:.0%} of the {_mib(available)} free on {device}",
             "data.on_device=false (the DataLoader) or a device with more free memory", logging.WARNING)
        return None
    train, val = train.to(device, memory_format), val.to(device, memory_format)
    logger.info("data on %s: %d training and %d validation images (%s), batched and augmented there", device,
                len(train), len(val), _mib(needed))
    return train, val
