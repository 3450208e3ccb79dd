"""Image transforms of the built-in datasets, from torchvision's transforms v2 and timm.

* ``shapes`` and CIFAR train with the standard random crop after zero padding and random horizontal flip
  (:func:`crop_flip`, torchvision's ``v2.RandomCrop`` + ``v2.RandomHorizontalFlip``); evaluation normalises only.
* ImageNet trains with timm's ImageNet training transform (random resized crop, flip, colour jitter) and evaluates
  with its resize-and-center-crop (:func:`imagenet_transforms`, ``timm.data.create_transform``).

Random draws come from torch's global RNG, which DataLoader workers seed from the loader's generator (see
``maskprop.train.loaders``): a fixed seed gives a reproducible run. torchvision and timm are imported inside the
functions, so ``shapes`` without augmentation needs torch alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "MNIST_MEAN", "MNIST_STD", "cifar_transforms", "crop_flip", "imagenet_transforms", "mnist_transform"]

# Per-channel statistics of the training sets (the values in common use).
IMAGENET_CROP_PCT = 0.875
"""ImageNet's evaluation crop over the resized short side (224 of 256)."""
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)

Transform = Callable[..., torch.Tensor]


def crop_flip(size: int, padding: int, flip: bool = True) -> Transform:
    """Random crop of side ``size`` after ``padding`` pixels of zeros on each side, then a horizontal flip with
    probability 1/2 (``flip``), on a (C, H, W) tensor or image: torchvision's ``v2.RandomCrop`` and
    ``v2.RandomHorizontalFlip``."""
    from torchvision.transforms import v2

    steps = [v2.RandomCrop(size, padding=padding)] if padding > 0 else []
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    """PIL image or uint8 array -> float tensor in [0, 1] -> per-channel normalisation."""
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def cifar_transforms(name: str, augment: bool = True) -> tuple[Transform, Transform]:
    """``(train, eval)`` transforms of CIFAR-10/100 images (PIL): the standard random crop (padding 4) and flip when
    ``augment``, then normalisation with the training set's mean and std."""
    from torchvision.transforms import v2

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    augmentation = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose(augmentation + _to_normalized(mean, std)), v2.Compose(_to_normalized(mean, std))


def mnist_transform(name: str) -> Transform:
    """Normalisation of MNIST / Fashion-MNIST images (PIL), without augmentation (as in the meProp and MSBP papers)."""
    from torchvision.transforms import v2

    mean, std = (MNIST_MEAN, MNIST_STD) if name == "mnist" else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return v2.Compose(_to_normalized(mean, std))


def imagenet_transforms(crop_size: int = 224, augment: bool = True) -> tuple[Transform, Transform]:
    """``(train, eval)`` transforms of ImageNet images from timm's ``create_transform``.

    Training: random resized crop to ``crop_size``, horizontal flip and colour jitter 0.4 (timm's ImageNet
    defaults), or the evaluation transform without ``augment``. Evaluation: resize the short side to
    ``crop_size / 0.875`` (256 for 224) and center-crop. Both normalise with the ImageNet mean and std.
    """
    from timm.data import create_transform

    eval_transform = create_transform(crop_size, is_training=False, crop_pct=IMAGENET_CROP_PCT)
    train_transform = create_transform(crop_size, is_training=True) if augment else eval_transform
    return train_transform, eval_transform
