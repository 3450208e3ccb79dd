"""The built-in procedural ``shapes`` dataset: ten classes of shapes drawn in memory from a seed.

It needs no files; it is what the quickstart and the tests run on. Generation uses torch alone; the training
augmentation (random crop and flip) comes from torchvision's transforms v2 (``maskprop.train.transforms``), imported
only when a dataset is built with augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

__all__ = ["SHAPES_CLASSES", "SHAPES_MEAN", "SHAPES_STD", "ShapesDataset", "shapes_datasets"]

# Colours of ``shapes`` are uniform in [0, 1] with a little noise: mean ~1/2, std ~0.3 per channel.
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.3, 0.3, 0.3)

SHAPES_CLASSES = (
    "disc", "square", "triangle", "cross", "ring",
    "horizontal_bars", "vertical_bars", "diagonal_stripes", "checker", "two_blobs",
)


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
        transform: Applied to the normalised (3, S, S) float image, e.g.
            ``maskprop.train.transforms.crop_flip(size, padding)``.
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


def shapes_datasets(train_size: int, val_size: int, seed: int = 0, augment: bool = True,
                    image_size: int = 32) -> tuple[ShapesDataset, ShapesDataset]:
    """The ``shapes`` training and validation sets of one seed.

    Args:
        train_size: Number of training images.
        val_size: Number of validation images.
        seed: Seed; training and validation come from different streams of it.
        augment: Random crop (padding ``image_size / 8``, zeros) and horizontal flip on the training set, by
            torchvision's transforms v2; every class is flip-invariant.
        image_size: Side of the images in pixels.

    Returns:
        ``(train_set, val_set)``.
    """
    transform = None
    if augment:
        from .transforms import crop_flip

        transform = crop_flip(image_size, padding=image_size // 8)
    train_set = ShapesDataset(train_size, seed, image_size=image_size, train=True, transform=transform)
    val_set = ShapesDataset(val_size, seed, image_size=image_size, train=False)
    return train_set, val_set
