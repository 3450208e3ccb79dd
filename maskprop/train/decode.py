"""ImageNet decoded and augmented on the run's device (``data.decode: device``).

With ``data.decode: cpu`` the DataLoader's workers decode every image with PIL and put it through timm's transforms:
about 6 ms of CPU an image (BENCHMARKS.md), which bounds a GPU's step. With ``device`` the work is split so that the
workers do only what is cheap, and the device the rest:

* In the workers (or the main process with ``data.workers: 0``) each example is its file's bytes (read as they are), its
  size read from the header without decoding (PIL's lazy ``Image.open``) and its augmentation drawn from torch's
  generator, exactly as timm's ``create_transform(crop_size, is_training=True)`` (timm 1.x) draws it from the same
  generators: the random resized crop's box as torchvision's ``RandomResizedCrop.get_params`` draws it (scale (0.08, 1),
  ratio (3/4, 4/3), 10 tries, then the central fallback; timm draws the same distribution from python's ``random``),
  then the horizontal flip (``torch.rand(1) < 0.5``), then ``ColorJitter(0.4, 0.4, 0.4)``'s random order and brightness,
  contrast and saturation factors (``ColorJitter.get_params``). The batches' seeds are the DataLoader's
  (:class:`SeededBatches`), so the draws do not depend on the number of workers, and a run resumed within an epoch draws
  what it would have. :func:`collate_encoded` makes a batch ``(bytes, params, labels, paths)``: the files' bytes in one
  uint8 tensor, a float64 tensor of one row of :data:`PARAMS` per image, the labels and the files' paths (for error
  messages).
* :class:`DecodeLoader` iterates that DataLoader and turns each batch into ``(images, labels)`` on the device: the
  batch's JPEGs decoded by one ``decode_jpeg(list, device=device)`` call (nvJPEG on a GPU, libjpeg-turbo on the CPU);
  the other files (PNG, CMYK JPEGs, ...), and any JPEG the batch call fails on, one by one on the CPU (``decode_image``,
  PIL as the last resort: BMP, TIFF, ...) and moved. The decoders are TorchCodec's (``torchcodec.decoders``;
  ``pip install -e ".[decode]"``) where torchcodec imports and its image library loads with the installed torch (FFmpeg
  is not needed), else torchvision's (``torchvision.io``, deprecated since torchvision 0.29), chosen once a process
  (:func:`image_decoders`; a torchcodec installed but not loading is a warning). On the CPU both give the same uint8
  pixels (the tests' JPEGs and PNGs; both decode JPEGs with libjpeg-turbo). Then in uint8 as timm's PIL pipeline: per
  image the crop resized to ``crop_size`` (bilinear, antialiased: timm's default interpolation), then the flip and the
  colour jitter's adjustments in their drawn order (torchvision's ``transforms.v2.functional`` ops; on a GPU for the
  whole batch at once: the same uint8 pixels on the CPU, in a few kernels a batch rather than a dozen an image); the
  batch converted to float, normalised with the ImageNet mean and std, in the run's memory format. Evaluation (and
  training without ``data.augment``) resizes the short side to ``floor(crop_size / 0.875)`` and center-crops, as timm's
  evaluation transform.

Nothing is drawn on the device: the device's work is a function of the bytes and the parameters, so the batches are
the same with any number of workers and after a resume. They are not PIL's pixels: torch's antialiased resize and
its uint8 colour adjustments round otherwise than PIL's (README, "Multi-GPU and ImageNet", gives the difference).
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import unreadable_image
from .loaders import SeededBatches, build_loader
from .transforms import IMAGENET_CROP_PCT

__all__ = ["PARAMS", "DecodeLoader", "DrawAugmentation", "EncodedImage", "ImageDecoders", "augment_image",
           "augment_images", "collate_encoded", "crop_box", "decode_batch", "decode_images", "decode_loader",
           "draw_params", "image_decoders", "is_encoded", "read_encoded", "split_bytes"]

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = 0.4
FLIP = 0.5

PARAMS = ("height", "width", "jpeg", "augment", "top", "left", "crop_height", "crop_width", "flip", "first",
          "second", "third", "brightness", "contrast", "saturation", "bytes")
"""The columns of a batch's parameters, one row per image: the size read from the file's header, whether the batch's
JPEG call decodes it (a JPEG in RGB or grayscale), whether it is augmented (else the evaluation resize and crop), the
crop box, the flip (1 or 0), the order of the colour adjustments (0 brightness, 1 contrast, 2 saturation), their
factors, and the file's length in bytes. Float64: every value is exact."""
_COL = {name: i for i, name in enumerate(PARAMS)}


class EncodedImage(NamedTuple):
    """A file's bytes and what its header says, read without decoding (:func:`read_encoded`)."""

    data: Tensor
    path: str
    height: int
    width: int
    jpeg: bool


def read_encoded(path: str) -> EncodedImage:
    """The ImageFolder loader of ``data.decode: device``: the file's bytes and its size and format from its header.

    Raises:
        ValueError: The file cannot be opened as an image (one line naming it, as ``read_image`` does).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:  # lazy: reads the header only
            width, height = image.size
            jpeg = image.format == "JPEG" and image.mode in ("RGB", "L")
        with open(path, "rb") as file:  # not torchvision.io.read_file: deprecated with its decoders
            data = torch.frombuffer(bytearray(file.read()), dtype=torch.uint8)
    except (OSError, ValueError, SyntaxError, RuntimeError) as err:
        raise unreadable_image(path, err) from None
    return EncodedImage(data, path, height, width, jpeg)


def crop_box(height: int, width: int, scale: tuple[float, float] = SCALE,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random resized crop of an image of ``height`` x ``width``, drawn from
    torch's global generator exactly as torchvision's ``RandomResizedCrop.get_params`` draws it."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return int(top), int(left), h, w
    in_ratio = float(width) / float(height)  # the central fallback
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(height: int, width: int, jpeg: bool = True, augment: bool = True) -> Tensor:
    """One image's row of :data:`PARAMS`, its augmentation drawn from torch's global generator in timm's order: the
    crop box, the flip, the colour jitter's order and factors (nothing drawn without ``augment``)."""
    row = torch.zeros(len(PARAMS), dtype=torch.float64)
    row[:4] = torch.tensor([height, width, float(jpeg), float(augment)], dtype=torch.float64)
    if not augment:
        return row
    row[4:8] = torch.tensor(crop_box(height, width), dtype=torch.float64)
    row[8] = float(torch.rand(1) < FLIP)
    order = torch.randperm(4)  # ColorJitter.get_params: the order of the four adjustments, hue (3) unused here
    factors = [float(torch.empty(1).uniform_(1 - JITTER, 1 + JITTER)) for _ in range(3)]
    row[9:12] = order[order < 3].to(torch.float64)
    row[12:15] = torch.tensor(factors, dtype=torch.float64)
    return row


class DrawAugmentation:
    """The ImageFolder transform of ``data.decode: device``: an :class:`EncodedImage` -> ``(bytes, params row,
    path)``, the row drawn by :func:`draw_params` (``augment``) or the evaluation's (no draw). Picklable.

    Attributes:
        crop_size: Side of the images the device makes.
        augment: Draw a random resized crop, flip and colour jitter; else resize and center-crop.
    """

    def __init__(self, crop_size: int, augment: bool) -> None:
        self.crop_size, self.augment = crop_size, augment

    def __call__(self, image: EncodedImage) -> tuple[Tensor, Tensor, str]:
        return image.data, draw_params(image.height, image.width, image.jpeg, self.augment), image.path

    def __repr__(self) -> str:
        return f"DrawAugmentation(crop_size={self.crop_size}, augment={self.augment})"


def collate_encoded(items: list[tuple[tuple[Tensor, Tensor, str], int]]) -> tuple[Tensor, Tensor, Tensor,
                                                                                   list[str]]:
    """A batch of ``data.decode: device``: ``(bytes, params, labels, paths)``, the files' bytes one after the other
    in one uint8 tensor (one block of shared memory from a worker, not one per file), their lengths in ``params``'
    ``bytes`` column (:func:`split_bytes` cuts them apart)."""
    params = torch.stack([row for (_, row, _), _ in items])
    params[:, _COL["bytes"]] = torch.tensor([data.numel() for (data, _, _), _ in items], dtype=torch.float64)
    return (torch.cat([data for (data, _, _), _ in items]), params,
            torch.tensor([label for _, label in items], dtype=torch.long), [path for (_, _, path), _ in items])


def split_bytes(data: Tensor, params: Tensor) -> list[Tensor]:
    """The files' bytes of a batch (:func:`collate_encoded`), one 1-D uint8 tensor each (views)."""
    return list(torch.split(data, params[:, _COL["bytes"]].long().tolist()))


class ImageDecoders(NamedTuple):
    """The image decoders :func:`decode_images` calls, from one library (:func:`image_decoders`)."""

    name: str
    """``"torchcodec"`` or ``"torchvision"``."""
    decode_jpeg: Callable[..., Any]
    """``decode_jpeg(list of 1-D uint8 tensors, mode=rgb, device=device)``: a list of (3, H, W) uint8 tensors."""
    decode_image: Callable[..., Any]
    """``decode_image(1-D uint8 tensor, mode=rgb)``: one image on the CPU, its format read from its bytes."""
    rgb: Any
    """The library's ``ImageReadMode.RGB``."""


@functools.cache
def image_decoders(name: str | None = None) -> ImageDecoders:
    """The image decoders of ``data.decode: device``, chosen once a process: TorchCodec's where torchcodec imports
    (its native image library loads with the installed torch; FFmpeg is not needed), else torchvision's, which
    torchvision 0.29 deprecates for TorchCodec's. ``name`` (``"torchcodec"`` or ``"torchvision"``) asks for one.
    A torchcodec that is installed but does not load is a warning, and torchvision's decoders are used.

    Raises:
        ImportError: ``name="torchcodec"`` and torchcodec does not import.
    """
    if name not in (None, "torchcodec", "torchvision"):
        raise ValueError(f"image decoders {name!r}: expected 'torchcodec' or 'torchvision'")
    if name != "torchvision":
        try:
            from torchcodec.decoders import ImageReadMode, decode_image, decode_jpeg
        except Exception as err:  # not installed (ImportError), or its library does not load (OSError, ...)
            reason = f"torchcodec's image decoders do not load ({' '.join(str(err).split()) or type(err).__name__})"
            if name == "torchcodec":
                raise ImportError(reason) from err
            if not (isinstance(err, ModuleNotFoundError) and err.name == "torchcodec"):  # installed, but broken
                warnings.warn(f"{reason}; data.decode: device decodes with torchvision's", RuntimeWarning,
                              stacklevel=2)
        else:
            return ImageDecoders("torchcodec", decode_jpeg, decode_image, ImageReadMode.RGB)
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    return ImageDecoders("torchvision", decode_jpeg, decode_image, ImageReadMode.RGB)


def _decode_one(data: Tensor, path: str) -> Tensor:
    """A file decoded to RGB uint8 on the CPU: the image decoders' ``decode_image`` (:func:`image_decoders`; a
    16-bit PNG scaled to 8 bits alike by both libraries), else PIL (BMP, TIFF, ...)."""
    decoders = image_decoders()
    try:
        image = decoders.decode_image(data, mode=decoders.rgb)
    except (RuntimeError, ValueError):  # torchvision raises RuntimeError on a format it lacks, torchcodec ValueError
        pass
    else:  # a 16-bit PNG: torchvision's is uint16; to uint8 as torchcodec scales it, round(value / 257)
        return image if image.dtype == torch.uint8 else ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            return pixels.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, SyntaxError) as err:
        raise unreadable_image(path, err) from None


def decode_images(data: list[Tensor], params: Tensor, paths: list[str], device: torch.device) -> list[Tensor]:
    """The batch's images as (3, H, W) uint8 tensors on ``device``: its JPEGs (``params``' ``jpeg`` column) by one
    ``decode_jpeg`` call there (:func:`image_decoders`), the rest, and all of them where that call fails, one by one
    on the CPU and moved.

    Raises:
        ValueError: A file cannot be decoded, or its decoded size is not the size its header gave (one line naming
            the file).
    """
    decoders = image_decoders()
    images: list[Tensor | None] = [None] * len(data)
    rows = params.tolist()  # one read of the host tensor, not three indexings an image
    batch = [i for i, row in enumerate(rows) if row[_COL["jpeg"]] > 0]
    if batch:
        try:
            decoded = decoders.decode_jpeg([data[i] for i in batch], mode=decoders.rgb, device=device)
            for i, image in zip(batch, decoded):
                images[i] = image
        except (RuntimeError, ValueError):  # one bad file fails the whole call: decode them one by one
            pass
    for i, image in enumerate(images):
        if image is None:
            images[i] = image = _decode_one(data[i], paths[i]).to(device, non_blocking=True)
        size = (int(rows[i][_COL["height"]]), int(rows[i][_COL["width"]]))
        if tuple(image.shape) != (3, *size):
            raise ValueError(f"image '{paths[i]}' decodes to {tuple(image.shape)}, its header said {size[0]} x "
                             f"{size[1]}; expected an image whose header is its size: replace or remove it")
    return images  # type: ignore[return-value]


def _crop_resize(image: Tensor, row: list[float], crop_size: int) -> Tensor:
    """One image's random resized crop (bilinear, antialiased), or the evaluation's resize and center-crop."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if not row[_COL["augment"]]:
        image = F.resize(image, [math.floor(crop_size / IMAGENET_CROP_PCT)], InterpolationMode.BILINEAR, antialias=True)
        return F.center_crop(image, [crop_size, crop_size])
    top, left, height, width = (int(v) for v in row[4:8])
    return F.resized_crop(image, top, left, height, width, [crop_size, crop_size], InterpolationMode.BILINEAR,
                          antialias=True)


def _grayscale(images: Tensor) -> Tensor:
    """torchvision's grayscale of uint8 images as its colour adjustments take it: float, floored."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's ``_blend`` of uint8 images with a factor per image: ``addcmul`` rounds as its ``add_`` with
    ``alpha`` does (one fused multiply-add), so the pixels are the same."""
    blended = images.to(torch.float32).mul_(ratio)  # uint8 times float32 promotes alike, but 10x slower broadcast
    return blended.addcmul_(other, 1.0 - ratio).clamp_(0, 255).to(torch.uint8)


def _flip_jitter(batch: Tensor, params: Tensor) -> Tensor:
    """The flips and colour jitters of a batch of (N, 3, S, S) uint8 images, a few kernels for the whole batch: each
    round applies every image's next adjustment (``transforms.v2.functional.adjust_brightness``, ``_contrast``,
    ``_saturation``, the same uint8 pixels) to the images whose next it is, in place. Rows without ``augment`` are
    left."""
    augment = params[:, _COL["augment"]] > 0
    if not augment.any():
        return batch
    device = batch.device
    flip = torch.nonzero(augment & (params[:, _COL["flip"]] > 0)).flatten().to(device)
    if len(flip):
        batch.index_copy_(0, flip, batch.index_select(0, flip).flip(-1))
    factors = params[:, 12:15].to(device=device, dtype=torch.float32).view(-1, 3, 1, 1, 1)
    for step in range(3):
        for which in range(3):
            rows = torch.nonzero(augment & (params[:, 9 + step] == which)).flatten()
            if not len(rows):
                continue
            rows = rows.to(device)
            images, ratio = batch.index_select(0, rows), factors.index_select(0, rows)[:, which]
            if which == 0:  # brightness: blended with black
                images = images.to(torch.float32).mul_(ratio).clamp_(0, 255).to(torch.uint8)
            elif which == 1:  # contrast: with the grayscale's mean
                images = _blend(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), ratio)
            else:  # saturation: with the grayscale
                images = _blend(images, _grayscale(images), ratio)
            batch.index_copy_(0, rows, images)
    return batch


def _flip_jitter_one(image: Tensor, row: list[float]) -> Tensor:
    """One image's flip and colour jitter by torchvision's ``transforms.v2.functional`` ops, one after the other."""
    from torchvision.transforms.v2 import functional as F

    if not row[_COL["augment"]]:
        return image
    if row[_COL["flip"]]:
        image = F.horizontal_flip(image)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for which in row[9:12]:
        image = adjust[int(which)](image, row[12 + int(which)])
    return image


def augment_images(images: list[Tensor], params: Tensor, crop_size: int, batched: bool | None = None) -> Tensor:
    """Decoded (3, H, W) uint8 images made into a (N, 3, crop_size, crop_size) uint8 batch by their rows of
    :data:`PARAMS`: one by one the random resized crop (or the evaluation's resize and center-crop), then the flips
    and the colour jitters in each image's order, image by image with torchvision's ops, or ``batched`` for the whole
    batch at once (:func:`_flip_jitter`: the same pixels in a few kernels a batch rather than a dozen an image).
    ``batched`` defaults to a device other than the CPU: on the CPU, image by image was 0.33 ms an image of crop 224
    against 0.9 for the batch at once (the batch's float copies do not stay in the caches)."""
    rows = params.tolist()
    if batched is None:
        batched = images[0].device.type != "cpu" if images else False
    if batched:
        return _flip_jitter(torch.stack([_crop_resize(image, row, crop_size) for image, row in zip(images, rows)]),
                            params)
    return torch.stack([_flip_jitter_one(_crop_resize(image, row, crop_size), row) for image, row in zip(images, rows)])


def augment_image(image: Tensor, row: Tensor, crop_size: int) -> Tensor:
    """One decoded (3, H, W) uint8 image made into a ``crop_size`` square by its row of :data:`PARAMS`
    (:func:`augment_images`, image by image)."""
    return augment_images([image], row.unsqueeze(0), crop_size, batched=False)[0]


def decode_batch(data: list[Tensor], params: Tensor, paths: list[str], crop_size: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """A batch of ``data.decode: device`` as the training step takes it: (N, 3, crop_size, crop_size) float32 on
    ``device``, normalised with the ImageNet mean and std, in ``memory_format``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # what timm's transforms normalise with
    from torchvision.transforms.v2 import functional as F

    batch = augment_images(decode_images(data, params, paths, device), params, crop_size)
    batch = F.normalize(F.to_dtype(batch, torch.float32, scale=True), list(IMAGENET_DEFAULT_MEAN),
                        list(IMAGENET_DEFAULT_STD))
    return batch.contiguous(memory_format=memory_format)


def is_encoded(dataset: Any) -> bool:
    """Whether ``dataset`` (or the dataset a :class:`~torch.utils.data.Subset` or ``SeededBatches`` wraps) gives
    the examples of ``data.decode: device`` (:class:`DrawAugmentation`)."""
    while isinstance(dataset, (Subset, SeededBatches)):
        dataset = dataset.dataset
    return isinstance(getattr(dataset, "transform", None), DrawAugmentation)


def _crop_size(dataset: Any) -> int:
    while isinstance(dataset, (Subset, SeededBatches)):
        dataset = dataset.dataset
    return dataset.transform.crop_size


class DecodeLoader:
    """A DataLoader of encoded batches (:func:`collate_encoded`) whose batches are decoded and augmented on
    ``device`` (:func:`decode_batch`): ``(images, labels)`` there. It presents itself to the training loop as the
    DataLoader does: ``len``, iteration, ``dataset``, and ``batch_sampler`` / ``sampler`` (its
    :class:`~maskprop.train.loaders.GlobalBatchSampler`, whose ``start`` resumes an epoch).

    Args:
        loader: The DataLoader (:func:`build_loader` with ``collate_fn=collate_encoded``).
        device: Where the batches are decoded and made.
        memory_format: Memory format of the images (``torch.channels_last`` with ``channels_last``).
    """

    def __init__(self, loader: DataLoader, device: torch.device | str,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.loader, self.device, self.memory_format = loader, torch.device(device), memory_format
        self.dataset = loader.dataset
        self.batch_sampler = self.sampler = loader.batch_sampler
        self.generator = loader.generator
        self.crop_size = _crop_size(loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for data, params, labels, paths in self.loader:
            images = decode_batch(split_bytes(data, params), params, paths, self.crop_size, self.device,
                                  self.memory_format)
            yield images, labels.to(self.device, non_blocking=True)


def decode_loader(dataset: Dataset, batch_size: int, train: bool, device: torch.device | str,
                  memory_format: torch.memory_format = torch.contiguous_format, **kwargs: Any) -> DecodeLoader:
    """:func:`~maskprop.train.loaders.build_loader` over an encoded dataset (:func:`is_encoded`; its other arguments
    in ``kwargs``), its batches decoded on ``device``."""
    loader = build_loader(dataset, batch_size, train, collate_fn=collate_encoded, **kwargs)
    return DecodeLoader(loader, device, memory_format)
