"""Datasets and loaders, one module per job; this module gathers their public names.

* :mod:`maskprop.train.shapes`: the built-in procedural ``shapes`` dataset (torch alone, no files).
* :mod:`maskprop.train.datasets`: MNIST / Fashion-MNIST, CIFAR-10/100 and ImageNet from a named directory (nothing
  is downloaded; a missing or malformed directory is one line that names the expected layout), and
  :func:`build_datasets` for a data config.
* :mod:`maskprop.train.transforms`: crops and flips from torchvision's transforms v2, timm's ImageNet transforms.
* :mod:`maskprop.train.loaders`: loaders whose batches follow one generator and are the same global batches in any
  number of processes.
"""

from __future__ import annotations

from .datasets import IMAGE_EXTENSIONS, build_datasets, cifar_datasets, imagenet_datasets, mnist_datasets
from .loaders import GlobalBatchSampler, build_loader
from .shapes import SHAPES_CLASSES, SHAPES_MEAN, SHAPES_STD, ShapesDataset, shapes_datasets
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    crop_flip,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_EXTENSIONS",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAPES_CLASSES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "GlobalBatchSampler",
    "ShapesDataset",
    "build_datasets",
    "build_loader",
    "cifar_datasets",
    "crop_flip",
    "imagenet_datasets",
    "mnist_datasets",
    "shapes_datasets",
]
