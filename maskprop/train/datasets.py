"""Dataset adapters: MNIST / Fashion-MNIST, CIFAR-10/100 and ImageNet from a named directory, and
:func:`build_datasets`, which builds the sets a data config names (``shapes`` included).

Nothing is ever downloaded. MNIST and Fashion-MNIST come from their IDX files in torchvision's layout
(``MNIST/raw/train-images-idx3-ubyte`` ...), CIFAR from its python pickle format (``cifar-10-batches-py`` /
``cifar-100-python``) and ImageNet from ``train`` and ``val`` folders in torchvision's ImageFolder layout, under the
directory the user names; a missing or malformed directory raises one line that says where we looked and what layout
we expect. torchvision and timm are imported only by the functions that need them.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from .shapes import shapes_datasets
from .transforms import cifar_transforms, imagenet_transforms, mnist_transform

if TYPE_CHECKING:
    from .config import DataConfig

__all__ = ["IMAGE_EXTENSIONS", "build_datasets", "cifar_datasets", "imagenet_datasets", "mnist_datasets"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _check_directory(path: Path, what: str, expected: str) -> None:
    """One line where ``path`` (``what``: e.g. "cifar10 root directory") is missing or is a file (an archive not
    extracted, say)."""
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"{what} '{path}' is a file, not a directory (an archive? extract it); {expected}")
    raise FileNotFoundError(f"{what} '{path}' does not exist; {expected}")


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
    _check_directory(root, f"{name} root directory", expected)
    missing = [f for f in (*files, meta) if not (root / folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{name} files missing under '{root / folder}': {', '.join(missing)}; {expected}")
    return root


_TORCHVISION_CLASSES: dict[str, type] = {}  # made on first use: UncheckedCIFAR10, UncheckedCIFAR100, VisibleImageFolder


def _unchecked_cifar(name: str) -> type:
    """torchvision's ``CIFAR10`` / ``CIFAR100`` reading the same files and keys, without the MD5 checks.

    ``check_integrity(path, None)`` only tests that the file exists, so real archives and tiny stand-ins written in
    the same format both load. The class is made on first use (torchvision is imported then) and lives in this module
    under ``name``, so datasets pickle by reference into spawned DataLoader workers.
    """
    if name not in _TORCHVISION_CLASSES:
        from torchvision import datasets

        base = getattr(datasets, name.removeprefix("Unchecked"))
        _TORCHVISION_CLASSES[name] = type(name, (base,), {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": f"torchvision's {base.__name__} without MD5 checks of its files.",
            "train_list": [[filename, None] for filename, _ in base.train_list],
            "test_list": [[filename, None] for filename, _ in base.test_list],
            "meta": {**base.meta, "md5": None},
        })
    return _TORCHVISION_CLASSES[name]


def _visible_image_folder() -> type:
    """torchvision's ``ImageFolder`` whose classes are the folders :func:`_image_classes` counts, those whose names do
    not start with a dot: torchvision's own takes every folder, so a ``.ipynb_checkpoints`` would become class 0, shift
    every label by one and leave the last class outside the classifier. Made on first use, as :func:`_unchecked_cifar`.
    """
    if "VisibleImageFolder" not in _TORCHVISION_CLASSES:
        from torchvision import datasets

        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = _image_classes(Path(directory))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: index for index, name in enumerate(classes)}

        _TORCHVISION_CLASSES["VisibleImageFolder"] = type("VisibleImageFolder", (datasets.ImageFolder,), {
            "__module__": __name__, "__qualname__": "VisibleImageFolder", "find_classes": find_classes,
            "__doc__": "torchvision's ImageFolder without hidden class folders (names starting with a dot).",
        })
    return _TORCHVISION_CLASSES["VisibleImageFolder"]


def __getattr__(name: str) -> type:
    # PEP 562: pickle looks these classes up here, also in a fresh worker process that has not made them yet.
    if name in ("UncheckedCIFAR10", "UncheckedCIFAR100"):
        return _unchecked_cifar(name)
    if name == "VisibleImageFolder":
        return _visible_image_folder()
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
    dataset_class = _unchecked_cifar("UncheckedCIFAR10" if name == "cifar10" else "UncheckedCIFAR100")
    train_transform, eval_transform = cifar_transforms(name, augment)
    folder = root / _CIFAR_LAYOUT[name][0]
    try:
        train_set = dataset_class(str(root), train=True, transform=train_transform)
        val_set = dataset_class(str(root), train=False, transform=eval_transform)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"could not read {name} from '{folder}' ({type(err).__name__}: {reason}); expected the CIFAR "
                         f"python pickle format: dicts with b'data' (N x 3072 uint8) and "
                         f"b'{'labels' if name == 'cifar10' else 'fine_labels'}'") from None
    num_classes = 10 if name == "cifar10" else 100
    for split, dataset in (("train", train_set), ("test", val_set)):
        targets = dataset.targets
        if len(dataset.data) != len(targets) or str(dataset.data.dtype) != "uint8":
            raise ValueError(f"{name} {split} files in '{folder}' hold {len(dataset.data)} images as "
                             f"{dataset.data.dtype} and {len(targets)} labels; expected one label per image and uint8 "
                             f"pixels (b'data': N x 3072 uint8)")
        if targets and not 0 <= min(targets) <= max(targets) < num_classes:
            raise ValueError(f"{name} {split} labels in '{folder}' span [{min(targets)}, {max(targets)}]; "
                             f"expected labels in [0, {num_classes - 1}]")
    logger.info("%s from %s: %d train, %d test images", name, folder, len(train_set), len(val_set))
    return train_set, val_set, num_classes


_MNIST_LAYOUT = {  # dataset name: torchvision class and folder
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
}
_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


def _check_idx(path: Path) -> None:
    """One line where ``path`` is not a whole IDX file of unsigned bytes (LeCun's MNIST format: the magic number
    ``0x0000 08 <dims>``, one big-endian 32-bit size per dimension, then exactly that many bytes), so that a truncated
    download is named as such rather than by torchvision's bare assertion."""
    ndim = 3 if "images" in path.name else 1
    header = 4 + 4 * ndim
    with open(path, "rb") as f:
        head = f.read(header)
    expected = f"expected an IDX file of uint8 {'images' if ndim == 3 else 'labels'} (magic 0x{0x800 + ndim:08x})"
    if len(head) < header:
        raise ValueError(f"'{path}' is truncated: {len(head)} bytes, shorter than its IDX header ({header} bytes); "
                         f"{expected}")
    if head[:3] != b"\x00\x00\x08" or head[3] != ndim:
        raise ValueError(f"'{path}' does not start with an IDX header (first bytes {head[:4].hex() or 'none'}); "
                         f"{expected}")
    sizes = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    want = header + math.prod(sizes)
    have = path.stat().st_size
    if have != want:
        state = "truncated" if have < want else "longer than its header says"
        raise ValueError(f"'{path}' is {state}: its header declares {' x '.join(map(str, sizes))} bytes of data, "
                         f"{want} bytes in all, and the file holds {have}; download and decompress it again")


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
    folder = _MNIST_LAYOUT[name]
    expected = f"expected <root>/{folder}/raw/{{{','.join(_MNIST_FILES)}}} (uncompressed IDX files)"
    if root is None:
        raise ValueError(f"data.root is required for dataset '{name}'; {expected}")
    root = Path(root).expanduser()
    if root.name == "raw" and root.parent.name == folder:
        root = root.parent.parent
    elif root.name == folder and not (root / folder).is_dir():
        root = root.parent
    _check_directory(root, f"{name} root directory", expected)
    raw = root / folder / "raw"
    missing = [f for f in _MNIST_FILES if not (raw / f).is_file()]
    if missing:
        gz = [f for f in missing if (raw / f"{f}.gz").is_file()]
        hint = f" (found {len(gz)} of them gzipped: decompress them with gunzip)" if gz else ""
        raise FileNotFoundError(f"{name} files missing under '{raw}': {', '.join(missing)}{hint}; {expected}")
    for file in _MNIST_FILES:
        _check_idx(raw / file)
    from torchvision import datasets

    transform = mnist_transform(name)
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


def imagenet_datasets(root: str | os.PathLike | None, augment: bool = True, crop_size: int = 224,
                      decode: str = "cpu") -> tuple[Dataset, Dataset, int]:
    """ImageNet (or any ImageFolder data) from ``root/train`` and ``root/val``, with timm's transforms.

    Training: random resized crop to ``crop_size``, horizontal flip and colour jitter (timm's ``create_transform``
    defaults); without ``augment`` the evaluation transform. Validation: resize to ``crop_size / 0.875`` (256 for
    224) and center-crop. Both normalise with the ImageNet mean and std.

    With ``decode="device"`` the examples are not images but ``((bytes, params, path), label)``: each file's bytes,
    its augmentation drawn as timm's transforms draw it, and its path, which ``maskprop.train.decode`` decodes and
    augments on the run's device (``data.decode``).

    Args:
        root: Directory with ``train/<class>/<image>`` and ``val/<class>/<image>``.
        augment: Random augmentation on the training set.
        crop_size: Side of the crops.
        decode: ``cpu`` (PIL and timm's transforms in the loader) or ``device`` (bytes and parameters).

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
    _check_directory(root, "imagenet root directory", layout)
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        _check_directory(folder, "imagenet split directory", layout)
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
    image_folder = _visible_image_folder()
    if decode == "device":
        from .decode import DrawAugmentation, read_encoded

        train_transform, eval_transform = DrawAugmentation(crop_size, augment), DrawAugmentation(crop_size, False)
        loader = read_encoded
    else:
        train_transform, eval_transform = imagenet_transforms(crop_size, augment)
        loader = read_image
    sets = []
    for split, transform in (("train", train_transform), ("val", eval_transform)):
        try:
            sets.append(image_folder(str(root / split), transform=transform, loader=loader))
        except FileNotFoundError as err:  # a class folder without images
            message = f"imagenet split '{root / split}' is not in ImageFolder layout ({err}); {layout}"
            raise ValueError(message) from None
    logger.info("imagenet from %s: %d classes, %d train, %d val images", root, len(classes["train"]),
                len(sets[0]), len(sets[1]))
    return sets[0], sets[1], len(classes["train"])


def read_image(path: str) -> object:
    """torchvision's default image loader (an RGB PIL image), with one line naming the file where it cannot be read:
    a truncated or non-image file that the folder scan took for an image fails only when a step reaches it."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:  # PIL: UnidentifiedImageError (an OSError), truncated files
        raise unreadable_image(path, err) from None


def unreadable_image(path: str, err: BaseException) -> ValueError:
    """The one-line error of an image file that cannot be read or decoded, naming it."""
    return ValueError(f"cannot read image '{path}' ({' '.join(str(err).split()) or type(err).__name__}); expected an "
                      f"image file PIL can open: replace or remove it")


_USED_BY = {"root": ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"), "train_size": ("shapes",),
            "val_size": ("shapes",), "image_size": ("shapes",), "seed": ("shapes",), "crop_size": ("imagenet",)}
"""The data settings only some datasets read (the others are read by every dataset)."""


def _warn_unused(cfg_data: DataConfig) -> None:
    """Warn of settings changed from their defaults that the dataset does not read (``data.train_size`` on CIFAR, a
    ``data.root`` given to ``shapes``): a run that looks configured but is not."""
    fields = type(cfg_data).model_fields
    unused = [key for key, users in _USED_BY.items()
              if cfg_data.dataset not in users and getattr(cfg_data, key) != fields[key].default]
    if unused:
        logger.warning("data.dataset=%s does not read %s (set for another dataset?): they change nothing",
                       cfg_data.dataset, ", ".join(f"data.{key}={getattr(cfg_data, key)!r}" for key in unused))


def build_datasets(cfg_data: DataConfig) -> tuple[Dataset, Dataset, int, tuple[int, int, int]]:
    """The training and validation sets named by a data config.

    Args:
        cfg_data: The ``data`` section of the run configuration.

    Returns:
        ``(train_set, val_set, num_classes, input_size)`` with ``input_size`` = (channels, height, width).
    """
    built = _build_datasets(cfg_data)
    _warn_unused(cfg_data)  # once the data is there: a missing dataset is one line, not a warning and the error
    return built


def _build_datasets(cfg_data: DataConfig) -> tuple[Dataset, Dataset, int, tuple[int, int, int]]:
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
        train_set, val_set, num_classes = imagenet_datasets(cfg_data.root, cfg_data.augment, cfg_data.crop_size,
                                                            cfg_data.decode)
        return train_set, val_set, num_classes, (3, cfg_data.crop_size, cfg_data.crop_size)
    raise ValueError(f"data.dataset={name!r} is not a dataset; expected one of 'shapes', 'mnist', 'fashion_mnist', "
                     f"'cifar10', 'cifar100', 'imagenet'")
