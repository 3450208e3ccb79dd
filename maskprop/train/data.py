"""Datasets and loaders: the built-in procedural ``shapes`` set, MNIST / Fashion-MNIST, CIFAR-10/100 and ImageNet from
a named directory.

Nothing is ever downloaded. MNIST and Fashion-MNIST come from their IDX files in torchvision's layout
(``MNIST/raw/train-images-idx3-ubyte`` ...), CIFAR from its python pickle format (``cifar-10-batches-py`` /
``cifar-100-python``) and ImageNet from ``train`` and ``val`` folders in torchvision's ImageFolder layout, under the
directory the user names; a missing or malformed directory raises one line that says where we looked and what layout
we expect. ``shapes`` is generated in memory from a seed, needs no files and no torchvision, and is what the quickstart
runs on.

torchvision (MNIST, CIFAR, ImageNet) and timm (ImageNet transforms) are imported only by the functions that need them, so
``shapes`` works with torch alone.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from .config import DataConfig

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "SHAPES_CLASSES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "RandomCropFlip",
    "ShapesDataset",
    "build_datasets",
    "build_loader",
    "cifar_datasets",
    "imagenet_datasets",
    "mnist_datasets",
    "shapes_datasets",
]

logger = logging.getLogger(__name__)

# Per-channel statistics of the training sets (the values in common use).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Colours of ``shapes`` are uniform in [0, 1] with a little noise: mean ~1/2, std ~0.3 per channel.
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.3, 0.3, 0.3)

SHAPES_CLASSES = (
    "disc", "square", "triangle", "cross", "ring",
    "horizontal_bars", "vertical_bars", "diagonal_stripes", "checker", "two_blobs",
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------------------------------
# shapes: a procedural dataset


def _hat_matrix(size: int, nodes: int) -> torch.Tensor:
    """(size, nodes) linear-interpolation weights from ``nodes`` points spanning [-1, 1] to pixel centres."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    grid = torch.linspace(-1.0, 1.0, nodes)
    return (1.0 - (coords[:, None] - grid[None, :]).abs() * ((nodes - 1) / 2.0)).clamp_min(0.0)


def _shape_distance(kind: int, dx: torch.Tensor, dy: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Signed distance to the edge of shape ``kind`` (positive inside), in radius units, and its pattern factor.

    ``dx``, ``dy`` are the (n, S, S) pixel offsets from each shape's centre in radius units; ``p`` holds the per-image
    parameters of these n images. Returns (n, 2, S, S): distance and a pattern coverage in [0, 1].
    """
    def rotated(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, si = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
        return c * dx + si * dy, -si * dx + c * dy

    def wave(w: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        return torch.cos((2 * math.pi) * p["frequency"][:, None, None] * w + phase[:, None, None])

    one = torch.ones_like(dx)
    if kind in (0, 4, 5, 6, 7, 8):
        dist = torch.sqrt(dx * dx + dy * dy)
    if kind == 0:  # disc
        return torch.stack((0.9 - dist, one), 1)
    if kind == 4:  # ring
        return torch.stack((0.22 - (dist - 0.7).abs(), one), 1)
    if kind in (5, 6, 7):  # bars inside a disc window; their orientation is the class
        if kind == 7:
            theta = math.pi / 4 + p["diagonal"] * (math.pi / 2)
        else:
            theta = torch.full_like(p["jitter"], 0.0 if kind == 5 else math.pi / 2)
        _, across = rotated(theta + p["jitter"])
        bars = (2.5 * wave(across, p["phase"][:, 0]) + 0.5).clamp(0.0, 1.0)
        return torch.stack((1.0 - dist, bars), 1)
    u, v = rotated(p["angle"])
    if kind == 8:  # checker inside a disc window
        cells = (2.5 * wave(u, p["phase"][:, 0]) * wave(v, p["phase"][:, 1]) + 0.5).clamp(0.0, 1.0)
        return torch.stack((1.0 - dist, cells), 1)
    if kind == 1:  # square (rotated: a diamond is a square too)
        return torch.stack((0.75 - torch.maximum(u.abs(), v.abs()), one), 1)
    if kind == 2:  # equilateral triangle, circumradius 1
        sides = [0.5 - (u * math.cos(a) + v * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return torch.stack((torch.minimum(torch.minimum(sides[0], sides[1]), sides[2]), one), 1)
    if kind == 3:  # plus-shaped cross
        arm_a = torch.minimum(0.95 - u.abs(), 0.25 - v.abs())
        arm_b = torch.minimum(0.25 - u.abs(), 0.95 - v.abs())
        return torch.stack((torch.maximum(arm_a, arm_b), one), 1)
    # two blobs on a random axis
    blob_a = 0.38 - torch.sqrt((u - 0.55) ** 2 + v * v)
    blob_b = 0.38 - torch.sqrt((u + 0.55) ** 2 + v * v)
    return torch.stack((torch.maximum(blob_a, blob_b), one), 1)


def _render_shapes(labels: torch.Tensor, image_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw one image per label as uint8 (N, 3, S, S).

    Each image is a shape of its class at a random position, scale, rotation and colour over a background of random
    colour, gradient and low-frequency texture, with pixel noise. Class identity lies in the shape's geometry only:
    colours, sizes and positions are drawn the same way for every class, so pixel statistics hardly tell classes
    apart and a linear classifier on pixels stays far below a small CNN.
    """
    n, s = labels.numel(), image_size

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    # Every random draw covers all n images in a fixed order: the result depends on the labels and the generator only.
    params = {
        "center": uniform(-0.45, 0.45, 2),
        "radius": uniform(0.4, 0.7),  # in units of half the image side
        "angle": uniform(0.0, 2 * math.pi),
        "jitter": uniform(-0.2, 0.2),  # small rotation of the oriented bars
        "diagonal": torch.randint(0, 2, (n,), generator=generator).float(),  # which diagonal the stripes follow
        "frequency": uniform(1.6, 2.2),  # pattern cycles per radius: bars 2-3 pixels wide at 32x32
        "phase": uniform(0.0, 2 * math.pi, 2),
    }
    background = torch.rand(n, 3, generator=generator)
    # The foreground differs from the background by 0.3-0.7 in every channel: always visible, no colour per class.
    foreground = (background + uniform(0.3, 0.7, 3)) % 1.0
    # Background texture: random values on a 4x4 grid plus a linear ramp, interpolated bilinearly (exact for the ramp).
    grid = torch.linspace(-1.0, 1.0, 4)
    slopes = uniform(-0.25, 0.25, 3, 2)
    nodes = 0.12 * torch.randn(n, 3, 4, 4, generator=generator)
    nodes = nodes + slopes[..., 0, None, None] * grid[None, :] + slopes[..., 1, None, None] * grid[:, None]
    noise_std = uniform(0.02, 0.08)
    noise = torch.rand(n, 3, s, s, generator=generator).sub_(0.5)  # uniform: cheaper to draw than normal

    hat = _hat_matrix(s, 4)
    back = background[:, :, None, None] + hat @ nodes @ hat.T  # (N, 3, S, S)

    coords = (torch.arange(s, dtype=torch.float32) + 0.5) * (2.0 / s) - 1.0
    coverage = torch.empty(n, 1, s, s)
    for kind in range(len(SHAPES_CLASSES)):
        idx = (labels == kind).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        p = {name: value[idx] for name, value in params.items()}
        radius = p["radius"][:, None, None]
        dx = (coords[None, None, :] - p["center"][:, 0, None, None]) / radius
        dy = (coords[None, :, None] - p["center"][:, 1, None, None]) / radius
        dx, dy = torch.broadcast_tensors(dx, dy)
        distance, pattern = _shape_distance(kind, dx, dy, p).unbind(1)
        # Signed distance in pixels -> anti-aliased coverage.
        edge = (distance * (radius * (s / 2.0)) + 0.5).clamp(0.0, 1.0)
        coverage[idx, 0] = edge * pattern

    image = torch.lerp(back, foreground[:, :, None, None].expand_as(back), coverage)
    image = image.add_(noise.mul_(math.sqrt(12.0) * noise_std[:, None, None, None]))  # std = noise_std
    return image.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


class RandomCropFlip:
    """Random crop after zero padding and random horizontal flip of a (C, H, W) tensor, using torch's global RNG.

    The torch-only counterpart of torchvision's ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``; in
    DataLoader workers the global RNG is seeded per worker from the loader's generator.

    Args:
        padding: Pixels of zero padding on each side before cropping back to the input size.
        flip: Flip horizontally with probability 1/2.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, h, w = image.shape
        if self.padding > 0:
            p = self.padding
            padded = F.pad(image, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            image = padded[:, top:top + h, left:left + w]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"


class ShapesDataset(Dataset):
    """Procedural 10-class image dataset generated in memory: no files, deterministic for a seed.

    The classes are shape kinds (``SHAPES_CLASSES``): disc, square, triangle, cross, ring, horizontal bars, vertical
    bars, diagonal stripes, checker and two blobs, at random position, scale, rotation and colour over a textured
    background with noise. Labels are balanced. Train and validation sets of one seed come from different random
    streams, so they share no image.

    Args:
        size: Number of images.
        seed: Seed of the generator.
        image_size: Side of the square images in pixels.
        num_classes: Number of classes used, the first ``num_classes`` of ``SHAPES_CLASSES`` (2 to 10).
        train: Draw from the training stream of ``seed`` (else the validation stream).
        transform: Applied to the normalised (3, S, S) float image, e.g. ``RandomCropFlip()``.
    """

    def __init__(self, size: int, seed: int = 0, image_size: int = 32, num_classes: int = 10, train: bool = True,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if size < 1:
            raise ValueError(f"ShapesDataset size={size} must be >= 1")
        if not 2 <= num_classes <= len(SHAPES_CLASSES):
            raise ValueError(f"ShapesDataset num_classes={num_classes} must be in [2, {len(SHAPES_CLASSES)}]")
        if image_size < 8:
            raise ValueError(f"ShapesDataset image_size={image_size} must be >= 8")
        if seed < 0:
            raise ValueError(f"ShapesDataset seed={seed} must be >= 0")
        self.size, self.seed, self.image_size, self.train = size, seed, image_size, train
        self.classes = list(SHAPES_CLASSES[:num_classes])
        self.transform = transform
        # Even streams for training, odd for validation: no seed's validation set equals any seed's training set.
        generator = torch.Generator().manual_seed(2 * seed + (0 if train else 1))
        labels = torch.arange(size) % num_classes
        self.targets = labels[torch.randperm(size, generator=generator)]
        # Chunks of 1024 keep the float temporaries small (cache-friendly); the draws follow one generator in order.
        chunks = [_render_shapes(self.targets[i:i + 1024], image_size, generator) for i in range(0, size, 1024)]
        self.images = torch.cat(chunks)  # uint8 (N, 3, S, S): a quarter of the memory of float
        self._mean = torch.tensor(SHAPES_MEAN).view(3, 1, 1)
        self._std = torch.tensor(SHAPES_STD).view(3, 1, 1)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = (self.images[index].float() / 255.0 - self._mean) / self._std
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        split = "train" if self.train else "val"
        return (f"{type(self).__name__}(size={self.size}, seed={self.seed}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, split={split})")


# ---------------------------------------------------------------------------------------------------------------------
# Building datasets from a DataConfig


def shapes_datasets(train_size: int, val_size: int, seed: int = 0, augment: bool = True,
                    image_size: int = 32) -> tuple[ShapesDataset, ShapesDataset]:
    """The ``shapes`` training and validation sets of one seed.

    Args:
        train_size: Number of training images.
        val_size: Number of validation images.
        seed: Seed; training and validation come from different streams of it.
        augment: Random crop (padding 4) and horizontal flip on the training set; every class is flip-invariant.
        image_size: Side of the images in pixels.

    Returns:
        ``(train_set, val_set)``.
    """
    transform = RandomCropFlip(padding=image_size // 8) if augment else None
    train_set = ShapesDataset(train_size, seed, image_size=image_size, train=True, transform=transform)
    val_set = ShapesDataset(val_size, seed, image_size=image_size, train=False)
    return train_set, val_set


_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"),
                "batches.meta", "{data_batch_1..5,test_batch,batches.meta}"),
    "cifar100": ("cifar-100-python", ("train", "test"), "meta", "{train,test,meta}"),
}


def _cifar_folder(name: str, root: str | os.PathLike | None) -> Path:
    """Check the CIFAR directory before torchvision sees it, so that a bad path gets our one-line message.

    ``root`` may be the directory that holds ``cifar-10-batches-py`` (torchvision's convention) or that folder itself.
    Returns the directory to hand to torchvision.
    """
    folder, files, meta, pattern = _CIFAR_LAYOUT[name]
    expected = (f"expected <root>/{folder}/{pattern} in the CIFAR python pickle format "
                f"(extracted from the python version archive of {name.upper().replace('CIFAR', 'CIFAR-')})")
    if root is None:
        raise ValueError(f"data.root is required for dataset '{name}'; {expected}")
    root = Path(root).expanduser()
    if root.name == folder and not (root / folder).is_dir():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root directory '{root}' does not exist; {expected}")
    missing = [f for f in (*files, meta) if not (root / folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name} files missing under '{root / folder}': {', '.join(missing)}; {expected}")
    return root


_UNCHECKED_CIFAR: dict[str, type] = {}


def _unchecked_cifar(name: str) -> type:
    """torchvision's ``CIFAR10`` / ``CIFAR100`` reading the same files and keys, without the MD5 checks.

    ``check_integrity(path, None)`` only tests that the file exists, so real archives and tiny stand-ins written in
    the same format both load. The class is made on first use (torchvision is imported then) and lives in this module
    under ``name``, so datasets pickle by reference into spawned DataLoader workers.
    """
    if name not in _UNCHECKED_CIFAR:
        from torchvision import datasets

        base = getattr(datasets, name.removeprefix("Unchecked"))
        _UNCHECKED_CIFAR[name] = type(name, (base,), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"torchvision's {base.__name__} without MD5 checks of its files.",
            "train_list": [[filename, None] for filename, _ in base.train_list],
            "test_list": [[filename, None] for filename, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        })
    return _UNCHECKED_CIFAR[name]


def __getattr__(name: str) -> type:
    # PEP 562: pickle looks the CIFAR classes up here, also in a fresh worker process that has not made them yet.
    if name in ("UncheckedCIFAR10", "UncheckedCIFAR100"):
        return _unchecked_cifar(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cifar_datasets(name: str, root: str | os.PathLike | None, augment: bool = True) -> tuple[Dataset, Dataset, int]:
    """CIFAR-10 or CIFAR-100 from its python pickle files, with the standard augmentation and normalisation.

    Training: ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip`` (when ``augment``), then per-channel
    normalisation; validation (the test batch): normalisation only. Nothing is downloaded and, unlike torchvision's
    default, the files' MD5 sums are not checked (any file in the right format loads).

    Args:
        name: ``cifar10`` or ``cifar100``.
        root: Directory holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that folder itself).
        augment: Random crop and flip on the training set.

    Returns:
        ``(train_set, val_set, num_classes)``.

    Raises:
        ValueError: ``root`` is not given, or a file is not in the CIFAR pickle format.
        FileNotFoundError: The directory or one of its files is missing (the message names the expected layout).
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected 'cifar10' or 'cifar100'")
    root = _cifar_folder(name, root)
    from torchvision import transforms

    dataset_class = _unchecked_cifar("UncheckedCIFAR10" if name == "cifar10" else "UncheckedCIFAR100")
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    augmentation = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    folder = root / _CIFAR_LAYOUT[name][0]
    try:
        train_set = dataset_class(str(root), train=True, transform=transforms.Compose(augmentation + normalize))
        val_set = dataset_class(str(root), train=False, transform=transforms.Compose(normalize))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"could not read {name} from '{folder}' ({type(err).__name__}: {reason}); expected the CIFAR "
                         f"python pickle format: dicts with b'data' (N x 3072 uint8) and "
                         f"b'{'labels' if name == 'cifar10' else 'fine_labels'}'") from None
    num_classes = 10 if name == "cifar10" else 100
    for split, dataset in (("train", train_set), ("test", val_set)):
        targets = dataset.targets
        if targets and not 0 <= min(targets) <= max(targets) < num_classes:
            raise ValueError(f"{name} {split} labels in '{folder}' span [{min(targets)}, {max(targets)}]; "
                             f"expected labels in [0, {num_classes - 1}]")
    logger.info("%s from %s: %d train, %d test images", name, folder, len(train_set), len(val_set))
    return train_set, val_set, num_classes


_MNIST_LAYOUT = {  # dataset name: (torchvision class and folder, normalisation)
    "mnist": ("MNIST", MNIST_MEAN, MNIST_STD),
    "fashion_mnist": ("FashionMNIST", FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def mnist_datasets(name: str, root: str | os.PathLike | None) -> tuple[Dataset, Dataset, int]:
    """MNIST or Fashion-MNIST from its IDX files, normalised, without augmentation (as in the meProp and MSBP papers).

    The training set is the 60,000 training images, the validation set the 10,000 test images (the MSBP paper splits
    5,000 development images off the training set; the test set is what both papers report).

    Args:
        name: ``mnist`` or ``fashion_mnist``.
        root: Directory holding ``MNIST/raw/`` (``FashionMNIST/raw/``) with the four uncompressed IDX files, as
            torchvision lays them out; that folder or its ``raw`` folder are accepted too.

    Returns:
        ``(train_set, val_set, 10)``.

    Raises:
        ValueError: ``root`` is not given, or a file is not in the IDX format.
        FileNotFoundError: The directory or one of its files is missing (the message names the expected layout).
    """
    if name not in _MNIST_LAYOUT:
        raise ValueError(f"unknown MNIST-style dataset {name!r}; expected 'mnist' or 'fashion_mnist'")
    folder, mean, std = _MNIST_LAYOUT[name]
    expected = f"expected <root>/{folder}/raw/{{{','.join(_MNIST_FILES)}}} (uncompressed IDX files)"
    if root is None:
        raise ValueError(f"data.root is required for dataset '{name}'; {expected}")
    root = Path(root).expanduser()
    if root.name == "raw" and root.parent.name == folder:
        root = root.parent.parent
    elif root.name == folder and not (root / folder).is_dir():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root directory '{root}' does not exist; {expected}")
    raw = root / folder / "raw"
    missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
    if missing:
        gz = [f for f in missing if (raw / f"{f}.gz").is_file()]
        hint = f" (found {len(gz)} of them gzipped: decompress them with gunzip)" if gz else ""
        raise FileNotFoundError(f"{name} files missing under '{raw}': {', '.join(missing)}{hint}; {expected}")
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    dataset_class = getattr(datasets, folder)
    try:
        sets = [dataset_class(str(root), train=train, transform=transform, download=False) for train in (True, False)]
    except (AssertionError, RuntimeError, ValueError, IndexError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"could not read {name} from '{raw}' ({reason}); expected IDX files (magic 2051 for "
                         f"images, 2049 for labels)") from None
    for split, dataset in zip(("train", "test"), sets):
        if len(dataset.data) != len(dataset.targets) or dataset.data.dim() != 3:
            raise ValueError(f"{name} {split} files in '{raw}' hold {tuple(dataset.data.shape)} images and "
                             f"{len(dataset.targets)} labels; expected N x H x W images and N labels")
        if len(dataset.targets) and not 0 <= int(dataset.targets.min()) <= int(dataset.targets.max()) < 10:
            raise ValueError(f"{name} {split} labels in '{raw}' span [{int(dataset.targets.min())}, "
                             f"{int(dataset.targets.max())}]; expected labels in [0, 9]")
    logger.info("%s from %s: %d train, %d test images", name, raw, len(sets[0]), len(sets[1]))
    return sets[0], sets[1], 10


def _image_classes(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def imagenet_datasets(root: str | os.PathLike | None, augment: bool = True,
                      crop_size: int = 224) -> tuple[Dataset, Dataset, int]:
    """ImageNet (or any ImageFolder data) from ``root/train`` and ``root/val``, with timm's transforms.

    Training: random resized crop to ``crop_size``, horizontal flip and colour jitter (timm's ``create_transform``
    defaults); without ``augment`` the evaluation transform. Validation: resize to ``crop_size / 0.875`` (256 for
    224) and center-crop. Both normalise with the ImageNet mean and std.

    Args:
        root: Directory with ``train/<class>/<image>`` and ``val/<class>/<image>``.
        augment: Random augmentation on the training set.
        crop_size: Side of the crops.

    Returns:
        ``(train_set, val_set, num_classes)``.

    Raises:
        ValueError: ``root`` is not given, a split is not in ImageFolder layout, or the splits' classes differ.
        FileNotFoundError: ``root`` or one of its splits is missing.
    """
    layout = ("expected <root>/train/<class>/<image> and <root>/val/<class>/<image> (torchvision ImageFolder layout, "
              "one folder per class)")
    if root is None:
        raise ValueError(f"data.root is required for dataset 'imagenet'; {layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet root directory '{root}' does not exist; {layout}")
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(f"imagenet split directory '{folder}' does not exist; {layout}")
        classes[split] = _image_classes(folder)
        if not classes[split]:
            flat = any(Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in os.scandir(folder))
            hint = " (it holds images directly: sort them into one folder per class)" if flat else ""
            raise ValueError(f"imagenet split directory '{folder}' has no class folders{hint}; {layout}")
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))[:3]
        only_val = sorted(set(classes["val"]) - set(classes["train"]))[:3]
        raise ValueError(f"imagenet train and val class folders differ under '{root}' ({len(classes['train'])} vs "
                         f"{len(classes['val'])}; only in train: {only_train}, only in val: {only_val}); "
                         f"expected the same class folders in both")
    from timm.data import create_transform
    from torchvision import datasets

    eval_transform = create_transform(crop_size, is_training=False, crop_pct=0.875)
    train_transform = create_transform(crop_size, is_training=True) if augment else eval_transform
    sets = []
    for split, transform in (("train", train_transform), ("val", eval_transform)):
        try:
            sets.append(datasets.ImageFolder(str(root / split), transform=transform))
        except FileNotFoundError as err:  # a class folder without images
            message = f"imagenet split '{root / split}' is not in ImageFolder layout ({err}); {layout}"
            raise ValueError(message) from None
    logger.info("imagenet from %s: %d classes, %d train, %d val images", root, len(classes["train"]),
                len(sets[0]), len(sets[1]))
    return sets[0], sets[1], len(classes["train"])


def build_datasets(cfg_data: DataConfig) -> tuple[Dataset, Dataset, int, tuple[int, int, int]]:
    """The training and validation sets named by a data config.

    Args:
        cfg_data: The ``data`` section of the run configuration.

    Returns:
        ``(train_set, val_set, num_classes, input_size)`` with ``input_size`` = (channels, height, width).
    """
    name = cfg_data.dataset
    if name == "shapes":
        size = cfg_data.image_size
        train_set, val_set = shapes_datasets(cfg_data.train_size, cfg_data.val_size, cfg_data.seed, cfg_data.augment,
                                             image_size=size)
        return train_set, val_set, train_set.num_classes, (3, size, size)
    if name in _MNIST_LAYOUT:
        train_set, val_set, num_classes = mnist_datasets(name, cfg_data.root)
        height, width = train_set.data.shape[1:]
        return train_set, val_set, num_classes, (1, height, width)
    if name in ("cifar10", "cifar100"):
        train_set, val_set, num_classes = cifar_datasets(name, cfg_data.root, cfg_data.augment)
        return train_set, val_set, num_classes, (3, 32, 32)
    if name == "imagenet":
        train_set, val_set, num_classes = imagenet_datasets(cfg_data.root, cfg_data.augment, cfg_data.crop_size)
        return train_set, val_set, num_classes, (3, cfg_data.crop_size, cfg_data.crop_size)
    raise ValueError(f"data.dataset={name!r} is not a dataset; expected one of 'shapes', 'mnist', 'fashion_mnist', "
                     f"'cifar10', 'cifar100', 'imagenet'")


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int = 0, seed: int = 0,
                 generator: torch.Generator | None = None, drop_last: bool | None = None,
                 sampler: Sampler | None = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose order and augmentation follow an explicit generator.

    Shuffling (for ``train``) draws each epoch's permutation from ``generator``, and worker processes seed their
    RNGs (torch, ``random``, numpy) from it too, so the same generator state gives the same batches. Pass your own
    generator to save and restore its state with a checkpoint; otherwise one seeded with ``seed`` is made. With
    ``workers == 0`` augmentation draws from torch's global RNG.

    Args:
        dataset: The dataset.
        batch_size: Batch size per loader (per process under DDP).
        train: Shuffle, and by default drop the last incomplete batch.
        workers: Worker processes; they persist across epochs when > 0.
        seed: Seed of the generator made when ``generator`` is not given.
        generator: Generator for shuffling and worker seeds.
        drop_last: Drop the last incomplete batch; defaults to ``train``.
        sampler: A sampler (e.g. ``DistributedSampler``) that replaces shuffling; it owns the order.
        pin_memory: Page-locked batches for faster host-to-GPU copies.

    Returns:
        The loader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    drop_last = train if drop_last is None else drop_last
    size = len(dataset)  # type: ignore[arg-type]
    if drop_last and sampler is None and size < batch_size:
        raise ValueError(f"a dataset of {size} examples gives no full batch of batch_size={batch_size} with drop_last; "
                         f"expected batch_size <= {size} or drop_last=False")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=workers > 0,
    )
