"""Datasets and loaders: shapes (determinism, learnability), MNIST, CIFAR and ImageNet stand-ins in their real on-disk
formats, clear errors for missing or malformed directories, reproducible loaders."""

import ast
import gzip
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maskprop.train.data as data_module
import maskprop.train.datasets as datasets_module
from maskprop.train.config import DataConfig
from maskprop.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    SHAPES_CLASSES,
    SHAPES_MEAN,
    SHAPES_STD,
    ShapesDataset,
    build_datasets,
    build_loader,
    crop_flip,
)

# ---------------------------------------------------------------------------------------------------------------------
# Stand-ins in the real formats


class _Py2Str(bytes):
    """A Python 2 ``str``: the CIFAR pickles were written by Python 2, so their keys and names are of this type."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj):
        data = bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[_Py2Str] = save_py2str


def _py2(value):
    """Turn str keys and strings into Python 2 strings, recursively."""
    if isinstance(value, str):
        return _Py2Str(value.encode("latin1"))
    if isinstance(value, dict):
        return {_py2(k): _py2(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [_py2(v) for v in value]
    return value


def write_cifar_pickle(path, entry):
    """Write one CIFAR file as the originals are: a protocol-2 pickle of a dict with Python 2 string keys."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_py2(entry))


def make_cifar(root, name, per_batch=4, test_size=6, seed=0):
    """A tiny CIFAR-10 or CIFAR-100 in the python pickle layout; returns (train_data, train_labels, test_data,
    test_labels) with data as uint8 (N, 3072) rows (R plane, G plane, B plane, each row-major 32 x 32)."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n, tag):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n).tolist()
        entry = {"batch_label": tag, "data": data, label_key: labels,
                 "filenames": [f"img_{tag}_{i}.png" for i in range(n)]}
        if name == "cifar100":
            entry["coarse_labels"] = [label // 5 for label in labels]
        return entry

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        train = [batch(per_batch, f"training batch {i} of 5") for i in range(1, 6)]
        for i, entry in enumerate(train, 1):
            write_cifar_pickle(folder / f"data_batch_{i}", entry)
        test = batch(test_size, "testing batch 1 of 1")
        write_cifar_pickle(folder / "test_batch", test)
        write_cifar_pickle(folder / "batches.meta", {
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch, "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        train = [batch(5 * per_batch, "training batch 1 of 1")]
        write_cifar_pickle(folder / "train", train[0])
        test = batch(test_size, "testing batch 1 of 1")
        write_cifar_pickle(folder / "test", test)
        write_cifar_pickle(folder / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                                             "coarse_label_names": [f"super_{i}" for i in range(20)]})
    train_data = np.concatenate([entry["data"] for entry in train])
    train_labels = sum((entry[label_key] for entry in train), [])
    return train_data, train_labels, test["data"], test[label_key]


def make_image_folder(root, classes=("n01440764", "n01443537"), per_class=2, flat_val=False):
    """A tiny ImageNet in ImageFolder layout: root/{train,val}/<class>/<image>, PNG and JPEG files of odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split if (split == "val" and flat_val) else root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
                suffix = ".png" if i % 2 == 0 else ".JPEG"
                Image.fromarray(pixels).save(folder / f"{name}_{i}{suffix}")


# ---------------------------------------------------------------------------------------------------------------------
# shapes


def test_shapes_is_deterministic_and_splits_differ():
    first = ShapesDataset(200, seed=3)
    again = ShapesDataset(200, seed=3)
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    val = ShapesDataset(200, seed=3, train=False)
    other_seed = ShapesDataset(200, seed=4)
    assert not torch.equal(first.images, val.images)
    assert not torch.equal(first.images, other_seed.images)
    # Even seeds feed training and odd ones validation: seed 1's training set is not seed 0's validation set.
    assert not torch.equal(ShapesDataset(50, seed=1).images, ShapesDataset(50, seed=0, train=False).images)


def test_shapes_items_are_normalised_images_with_balanced_labels():
    dataset = ShapesDataset(300, seed=0)
    assert len(dataset) == 300 and dataset.num_classes == 10 and dataset.classes == list(SHAPES_CLASSES)
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (300, 3, 32, 32)
    assert torch.bincount(dataset.targets, minlength=10).tolist() == [30] * 10
    image, label = dataset[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == int(dataset.targets[7])
    expected = (dataset.images[7].float() / 255 - torch.tensor(SHAPES_MEAN).view(3, 1, 1)) / torch.tensor(
        SHAPES_STD).view(3, 1, 1)
    assert torch.allclose(image, expected)
    pixels = dataset.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.5, abs=0.05) and pixels.std().item() == pytest.approx(0.3, abs=0.05)


def test_shapes_image_size_and_class_count():
    dataset = ShapesDataset(40, seed=0, image_size=16, num_classes=4)
    assert dataset.images.shape == (40, 3, 16, 16) and set(dataset.targets.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_classes=11"):
        ShapesDataset(10, num_classes=11)
    with pytest.raises(ValueError, match="size=0"):
        ShapesDataset(0)


def test_shapes_classes_differ_in_geometry_not_in_colour():
    # Mean colour per class is about the same: colours are drawn the same way for every class.
    dataset = ShapesDataset(1000, seed=0)
    pixels = dataset.images.float() / 255
    means = torch.stack([pixels[dataset.targets == k].mean() for k in range(10)])
    assert (means.max() - means.min()).item() < 0.05


def test_random_crop_flip_keeps_shape_and_content():
    image = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8)
    torch.manual_seed(0)
    flips = [crop_flip(8, padding=0)(image) for _ in range(40)]
    assert all(torch.equal(out, image) or torch.equal(out, image.flip(-1)) for out in flips)
    assert any(torch.equal(out, image) for out in flips) and any(torch.equal(out, image.flip(-1)) for out in flips)
    cropped = crop_flip(8, padding=2, flip=False)(image)
    padded = F.pad(image, (2, 2, 2, 2))
    windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
    assert cropped.shape == image.shape and any(torch.equal(cropped, w) for w in windows)


def _fit(model, x, y, epochs, lr, batch=32):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            index = order[i:i + batch]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def _accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _linear_vs_cnn(train_size, val_size, linear_epochs, cnn_epochs):
    train, val = ShapesDataset(train_size, seed=0), ShapesDataset(val_size, seed=0, train=False)
    x, y = torch.stack([train[i][0] for i in range(len(train))]), train.targets
    xv, yv = torch.stack([val[i][0] for i in range(len(val))]), val.targets
    torch.manual_seed(0)
    linear = _fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), x, y, linear_epochs, 1e-3, batch=64)
    torch.manual_seed(0)
    cnn = _fit(_tiny_cnn(), x, y, cnn_epochs, 3e-3)
    return _accuracy(linear, xv, yv), _accuracy(cnn, xv, yv)


def test_shapes_is_learnable_by_a_cnn_but_not_by_a_linear_classifier(one_thread):
    # Measured: linear ~0.12-0.15, CNN ~0.41-0.44 over three dataset seeds.
    linear, cnn = _linear_vs_cnn(train_size=800, val_size=500, linear_epochs=10, cnn_epochs=5)
    assert linear < 0.25  # chance is 0.10
    assert cnn > linear + 0.15


@pytest.mark.slow
def test_shapes_small_cnn_reaches_high_accuracy_while_linear_stays_near_chance(one_thread):
    linear, cnn = _linear_vs_cnn(train_size=5000, val_size=1000, linear_epochs=20, cnn_epochs=15)
    assert linear < 0.25
    assert cnn > 0.7


def test_build_datasets_shapes_from_config():
    train, val, num_classes, input_size = build_datasets(DataConfig(train_size=64, val_size=32, seed=5))
    assert (len(train), len(val), num_classes, input_size) == (64, 32, 10, (3, 32, 32))
    steps = [(type(t).__name__, getattr(t, "padding", None)) for t in train.transform.transforms]
    assert steps == [("RandomCrop", [4, 4, 4, 4]), ("RandomHorizontalFlip", None)] and val.transform is None
    assert torch.equal(train.images, ShapesDataset(64, seed=5).images)
    train, _, _, _ = build_datasets(DataConfig(train_size=8, val_size=8, augment=False))
    assert train.transform is None


# ---------------------------------------------------------------------------------------------------------------------
# MNIST


def write_idx(path, array: np.ndarray) -> None:
    """An IDX file (LeCun's MNIST format): magic 0x0000 08 <dims>, big-endian int32 sizes, then the uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_mnist(root, folder="MNIST", train_size=40, test_size=12, seed=0, learnable=False):
    """Four IDX files under ``root/<folder>/raw``; with ``learnable`` each class is a bright bar at its own row."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train_size), ("t10k", test_size)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        if learnable:
            for image, label in zip(images, labels):
                image[2 + 2 * label: 4 + 2 * label, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def test_mnist_loads_through_build_datasets(tmp_path):
    raw = make_mnist(tmp_path, train_size=20, test_size=6)
    train, val, num_classes, input_size = build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))
    assert (len(train), len(val), num_classes, input_size) == (20, 6, 10, (1, 28, 28))
    image, label = train[3]
    pixels = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8).reshape(20, 28, 28)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[8:], dtype=np.uint8)
    assert label == labels[3]
    expected = (torch.from_numpy(pixels[3].astype(np.float32)) / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(image[0], expected)
    # the root may also be the dataset's own folder or its raw folder
    for root in (tmp_path / "MNIST", raw):
        assert len(build_datasets(DataConfig(dataset="mnist", root=str(root)))[0]) == 20


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    make_mnist(tmp_path, folder="FashionMNIST", train_size=8, test_size=4)
    train, val, _, input_size = build_datasets(DataConfig(dataset="fashion_mnist", root=str(tmp_path)))
    assert (len(train), len(val), input_size) == (8, 4, (1, 28, 28))
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))


def test_mnist_errors_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(ValueError, match="data.root is required for dataset 'mnist'; expected <root>/MNIST/raw/"):
        build_datasets(DataConfig(dataset="mnist"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path / "nowhere")))
    raw = make_mnist(tmp_path)
    compressed = raw / "t10k-labels-idx1-ubyte"
    with gzip.open(f"{compressed}.gz", "wb") as f:
        f.write(compressed.read_bytes())
    compressed.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte .*gzipped: decompress them with gunzip"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte' does not start with an IDX header .*6e6f7420.*"
                                         "expected an IDX file of uint8 labels \\(magic 0x00000801\\)"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))
    # a truncated download, or one with bytes after its data, is named as such (torchvision's bare assertion was not)
    images = raw / "train-images-idx3-ubyte"
    whole = images.read_bytes()
    for damaged, wording in ((whole[:-1], "is truncated: its header declares 40 x 28 x 28 bytes of data, 31376 bytes "
                                          "in all, and the file holds 31375"),
                             (whole + b"\0", "is longer than its header says: .* the file holds 31377"),
                             (whole[:9], "is truncated: 9 bytes, shorter than its IDX header \\(16 bytes\\)"),
                             ((raw / "train-labels-idx1-ubyte").read_bytes(),  # one dimension: labels, not images
                              "does not start with an IDX header \\(first bytes 00000801\\); expected an IDX file of "
                              "uint8 images \\(magic 0x00000803\\)")):
        images.write_bytes(damaged)
        with pytest.raises(ValueError, match=f"train-images-idx3-ubyte' {wording}"):
            build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR


def test_cifar_standin_is_in_the_original_pickle_format(tmp_path):
    make_cifar(tmp_path, "cifar10", per_batch=2)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # how the CIFAR page tells readers to load it
    assert {b"batch_label", b"data", b"labels", b"filenames"} == set(entry)
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (2, 3072)


def _unnormalise(image, mean, std):
    return image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def test_cifar10_loads_through_build_datasets(tmp_path):
    train_data, train_labels, test_data, test_labels = make_cifar(tmp_path, "cifar10", per_batch=4, test_size=6)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), augment=False)
    train, val, num_classes, input_size = build_datasets(cfg)
    assert (len(train), len(val), num_classes, input_size) == (20, 6, 10, (3, 32, 32))
    assert train.targets == train_labels and val.targets == test_labels
    image, label = val[3]
    assert image.shape == (3, 32, 32) and label == test_labels[3]
    pixels = torch.from_numpy(test_data[3].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(_unnormalise(image, CIFAR10_MEAN, CIFAR10_STD), pixels, atol=1e-5)
    image, _ = train[5]
    pixels = torch.from_numpy(train_data[5].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(_unnormalise(image, CIFAR10_MEAN, CIFAR10_STD), pixels, atol=1e-5)


def test_cifar10_training_augmentation_crops_and_flips(tmp_path):
    train_data, _, _, _ = make_cifar(tmp_path, "cifar10", per_batch=1)
    train, _, _, _ = build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToImage", "ToDtype", "Normalize"]  # transforms v2
    torch.manual_seed(0)
    original = torch.from_numpy(train_data[0].reshape(3, 32, 32)).float() / 255
    views = [_unnormalise(train[0][0], CIFAR10_MEAN, CIFAR10_STD) for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.allclose(v, original, atol=1e-5) for v in views)


def test_cifar100_loads_fine_labels(tmp_path):
    _, train_labels, _, test_labels = make_cifar(tmp_path, "cifar100", per_batch=3, test_size=5)
    train, val, num_classes, input_size = build_datasets(DataConfig(dataset="cifar100", root=str(tmp_path)))
    assert (len(train), len(val), num_classes, input_size) == (15, 5, 100, (3, 32, 32))
    assert train.targets == train_labels and val.targets == test_labels
    assert train.classes[:2] == ["class_0", "class_1"]


def test_cifar_datasets_pickle_by_reference_for_spawned_workers(tmp_path, monkeypatch):
    make_cifar(tmp_path, "cifar10", per_batch=1, test_size=2)
    train, _, _, _ = build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))
    payload = pickle.dumps(train)
    monkeypatch.setattr(datasets_module, "_TORCHVISION_CLASSES", {})  # as in a fresh process that never built the class
    copy = pickle.loads(payload)
    assert type(copy).__name__ == "UncheckedCIFAR10" and copy.targets == train.targets and len(copy) == 5


def test_data_module_imports_torchvision_and_timm_only_where_needed():
    # shapes runs with torch alone: no module-level import of torchvision or timm (a subprocess check costs seconds).
    top_level = set()
    for name in ("shapes", "datasets", "transforms", "loaders", "distributed", "data"):
        tree = ast.parse((Path(data_module.__file__).parent / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                top_level.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
    assert "torch" in top_level and not top_level & {"torchvision", "timm", "PIL"}


def test_cifar_root_may_be_the_batches_folder_itself(tmp_path):
    make_cifar(tmp_path, "cifar10", per_batch=1, test_size=2)
    train, val, _, _ = build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path / "cifar-10-batches-py")))
    assert (len(train), len(val)) == (5, 2)


def test_cifar_missing_directory_names_the_path_and_the_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        build_datasets(DataConfig(dataset="cifar10", root=str(missing)))
    message = str(info.value)
    assert str(missing) in message and "\n" not in message
    assert "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}" in message
    assert "pickle" in message
    with pytest.raises(FileNotFoundError, match=r"<root>/cifar-100-python/\{train,test,meta\}"):
        build_datasets(DataConfig(dataset="cifar100", root=str(tmp_path)))


def test_cifar_missing_files_are_listed(tmp_path):
    make_cifar(tmp_path, "cifar10", per_batch=1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"files missing under '.*cifar-10-batches-py': data_batch_3, batches"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_cifar_without_root_or_with_a_corrupt_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"^data.root is required for dataset 'cifar10'; expected <root>/cifar-10"):
        build_datasets(DataConfig(dataset="cifar10"))
    make_cifar(tmp_path, "cifar10", per_batch=1)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"could not read cifar10 from .*; expected the CIFAR python pickle format"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))


def test_cifar_labels_out_of_range_are_rejected(tmp_path):
    make_cifar(tmp_path, "cifar10", per_batch=1)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickle(folder / "test_batch", {"data": np.zeros((1, 3072), np.uint8), "labels": [12]})
    with pytest.raises(ValueError, match=r"test labels .* span \[12, 12\]; expected labels in \[0, 9\]"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("labels,dtype,split", [([1, 2, 3], np.uint8, "train"), ([], np.uint8, "train"),
                                                ([1], np.float32, "test")])
def test_cifar_files_whose_labels_do_not_match_their_images_are_rejected(tmp_path, labels, dtype, split):
    """Labels one more or fewer than the images (the labels of every later image would be shifted, or a step would
    fail on an index), or pixels that are not uint8 (a step would fail in the image conversion): one line at load."""
    make_cifar(tmp_path, "cifar10", per_batch=1)
    name = "data_batch_2" if split == "train" else "test_batch"
    write_cifar_pickle(tmp_path / "cifar-10-batches-py" / name,
                       {"data": np.zeros((1, 3072), dtype), "labels": labels})
    images = 5 if split == "train" else 1
    count = 4 + len(labels) if split == "train" else 1
    with pytest.raises(ValueError, match=rf"^cifar10 {split} files in '.*' hold {images} images as {np.dtype(dtype)} "
                                         rf"and {count} labels; expected one label per image and uint8 pixels"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet


def test_imagenet_image_folder_loads_with_timm_transforms(tmp_path):
    make_image_folder(tmp_path)
    train, val, num_classes, input_size = build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path)))
    assert (len(train), len(val), num_classes, input_size) == (4, 4, 2, (3, 224, 224))
    assert train.classes == val.classes == ["n01440764", "n01443537"]
    image, label = train[0]
    assert image.shape == (3, 224, 224) and label == 0
    image, label = val[3]
    assert image.shape == (3, 224, 224) and label == 1
    train_steps = " ".join(type(t).__name__ for t in train.transform.transforms)
    val_steps = [type(t).__name__ for t in val.transform.transforms]
    assert "RandomResizedCrop" in train_steps and "RandomHorizontalFlip" in train_steps
    assert val_steps[:2] == ["Resize", "CenterCrop"]
    assert val.transform.transforms[0].size in (256, [256], (256, 256))


@pytest.mark.parametrize("hidden_images", [1, 0])
def test_imagenet_hidden_folders_are_no_classes(tmp_path, hidden_images):
    """A hidden folder in a split (a notebook's .ipynb_checkpoints, with or without images) is not a class: the labels
    index the visible class folders, as many as the classifier has outputs, and the sets pickle (spawned workers)."""
    import pickle

    make_image_folder(tmp_path)
    make_image_folder(tmp_path / "hidden", classes=(".ipynb_checkpoints",), per_class=hidden_images)
    for split in ("train", "val"):
        (tmp_path / "hidden" / split / ".ipynb_checkpoints").rename(tmp_path / split / ".ipynb_checkpoints")
    train, val, num_classes, _ = build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path), crop_size=32))
    assert num_classes == 2 and train.classes == val.classes == ["n01440764", "n01443537"]
    assert sorted(label for _, label in train.samples) == [0, 0, 1, 1] and len(val) == 4
    assert pickle.loads(pickle.dumps(train)).class_to_idx == train.class_to_idx


def test_imagenet_crop_size_and_no_augmentation(tmp_path):
    make_image_folder(tmp_path, per_class=1)
    train, val, _, input_size = build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path), crop_size=64,
                                                          augment=False))
    assert input_size == (3, 64, 64) and train[0][0].shape == (3, 64, 64)
    assert repr(train.transform) == repr(val.transform)


def test_imagenet_missing_directories_name_the_path_and_the_layout(tmp_path):
    layout = r"expected <root>/train/<class>/<image> and <root>/val/<class>/<image>"
    with pytest.raises(FileNotFoundError, match=rf"imagenet root directory '.*nowhere' does not exist; {layout}"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path / "nowhere")))
    (tmp_path / "train" / "n0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=rf"imagenet split directory '.*val' does not exist; {layout}"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path)))
    with pytest.raises(ValueError, match=r"data.root is required for dataset 'imagenet'"):
        build_datasets(DataConfig(dataset="imagenet"))


def test_imagenet_flat_val_folder_is_explained(tmp_path):
    make_image_folder(tmp_path, flat_val=True)
    with pytest.raises(ValueError, match=r"'.*val' has no class folders \(it holds images directly: sort them into"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path)))


def test_imagenet_class_mismatch_and_empty_class_folder(tmp_path):
    make_image_folder(tmp_path)
    (tmp_path / "val" / "n09999999").mkdir()
    with pytest.raises(ValueError, match=r"train and val class folders differ .*only in val: \['n09999999'\]"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path)))
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(ValueError, match=r"is not in ImageFolder layout"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------------------
# Loaders


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.tensor(index), torch.rand(())  # the random part shows how augmentation is seeded


def _epoch(loader):
    return torch.cat([index for index, _ in loader]).tolist()


def test_loader_shuffling_follows_the_seed():
    dataset = _Indexed(50)
    first = build_loader(dataset, batch_size=8, train=True, seed=1)
    order = _epoch(first)
    assert order == _epoch(build_loader(dataset, batch_size=8, train=True, seed=1))
    assert order != _epoch(build_loader(dataset, batch_size=8, train=True, seed=2))
    assert len(order) == 48 and len(set(order)) == 48  # drop_last for training
    assert _epoch(first) != order  # the next epoch draws a new permutation from the same generator


def test_loader_generator_state_restores_the_order():
    dataset = _Indexed(30)
    generator = torch.Generator().manual_seed(7)
    loader = build_loader(dataset, batch_size=4, train=True, generator=generator)
    _epoch(loader)
    state = generator.get_state()
    expected = _epoch(loader)
    resumed = build_loader(dataset, batch_size=4, train=True, generator=torch.Generator().manual_seed(0))
    resumed.generator.set_state(state)
    assert _epoch(resumed) == expected


def test_eval_loader_keeps_order_and_every_example():
    loader = build_loader(_Indexed(10), batch_size=4, train=False)
    assert _epoch(loader) == list(range(10))
    assert _epoch(build_loader(_Indexed(10), batch_size=4, train=True, drop_last=False)).__len__() == 10


def test_loader_rejects_a_dataset_smaller_than_one_batch():
    with pytest.raises(ValueError, match=r"a training set of 3 examples gives no full batch of 8 .*expected "
                                         r"data.batch_size <= 3"):
        build_loader(_Indexed(3), batch_size=8, train=True)
    assert len(build_loader(_Indexed(3), batch_size=8, train=False)) == 1


def test_loader_with_workers_is_reproducible_and_starts_its_workers_every_epoch():
    """The same generator state gives the same batches and the workers' same draws, at every epoch: a loader made
    afresh at epoch 2 from the generator's state after epoch 1 (a resumed run's) draws what the one that went on
    draws (persistent workers carried their streams over)."""
    dataset = _Indexed(16)
    runs = []
    for _ in range(2):
        loader = build_loader(dataset, batch_size=4, train=True, workers=1, seed=3)
        assert not loader.persistent_workers
        runs.append([[(index.tolist(), noise.tolist()) for index, noise in loader] for _epoch in range(2)])
    assert runs[0] == runs[1]
    generator = torch.Generator().manual_seed(3)
    first = build_loader(dataset, batch_size=4, train=True, workers=1, generator=generator)
    assert [(index.tolist(), noise.tolist()) for index, noise in first] == runs[0][0]
    resumed = build_loader(dataset, batch_size=4, train=True, workers=1, generator=generator)
    assert [(index.tolist(), noise.tolist()) for index, noise in resumed] == runs[0][1]


def test_imagenet_recipe_trains_on_a_tiny_image_folder_tree(tmp_path, one_thread):
    # The recipe as shipped (ResNet-50, bf16, channels_last, timm transforms, SGD 0.256/0.875, warmup, label smoothing),
    # shrunk to seconds: 32-pixel crops, a global batch of 4, one search and one finetune epoch.
    import maskprop
    from maskprop.train.config import load_config

    make_image_folder(tmp_path / "imagenet", per_class=4)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "imagenet_resnet50.yaml"
    cfg = load_config(recipe, [f"data.root={tmp_path / 'imagenet'}", "data.batch_size=4", "data.workers=0",
                               "data.crop_size=32", "optim.epochs=1", "optim.warmup_epochs=1", "finetune.epochs=1",
                               "sparsity.fix_samples=2", "device=cpu"])
    assert (cfg.model.name, cfg.amp, cfg.channels_last, cfg.optim.lr, cfg.optim.momentum) == (
        "resnet50", "bf16", True, 0.256, 0.875)
    assert (cfg.optim.label_smoothing, cfg.sparsity.score_lr, cfg.data.dataset) == (0.1, 12e-3, "imagenet")
    summary = maskprop.fit(cfg, out=tmp_path / "run")
    assert summary["accuracy"] is not None and (tmp_path / "run" / "last.pt").is_file()
    records = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2  # one search epoch, one finetune epoch (2 steps each: 8 images / global batch 4)


def test_imagenet_recipe_without_train_or_val_folder_is_one_line(tmp_path):
    (tmp_path / "imagenet" / "train" / "n01440764").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"imagenet split directory '.*val' does not exist; expected "
                                                r"<root>/train/<class>/<image> and <root>/val/<class>/<image>"):
        build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path / "imagenet")))


def test_an_image_that_cannot_be_read_names_its_file(tmp_path):
    """A truncated or non-image file among the images passes the folder scan and fails when a step reaches it: one
    line naming the file (a ValueError, usage error), also when a DataLoader worker meets it (the command line prints
    the worker's last line, not its traceback)."""
    from maskprop.cli import _one_line

    make_image_folder(tmp_path)
    bad = tmp_path / "train" / "n01440764" / "n01440764_9.JPEG"
    bad.write_bytes(b"not an image")
    train, *_ = build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path), crop_size=32))
    index = [path for path, _ in train.samples].index(str(bad))
    message = rf"^cannot read image '{re.escape(str(bad))}' \(cannot identify image file .*\); expected an image file"
    with pytest.raises(ValueError, match=message):
        train[index]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train, [index]), num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value) and re.match(message, _one_line(caught.value))


@pytest.mark.parametrize("dataset", ["cifar10", "mnist", "imagenet"])
def test_a_root_that_is_a_file_says_so(tmp_path, dataset):
    """An archive named as the root (``cifar-10-python.tar.gz``, say) is a file, not a missing directory."""
    archive = tmp_path / "data.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(ValueError, match=rf"^{dataset} root directory '{re.escape(str(archive))}' is a file, not a "
                                         rf"directory \(an archive\? extract it\); expected"):
        build_datasets(DataConfig(dataset=dataset, root=str(archive)))
    make_image_folder(tmp_path / "folder")
    if dataset == "imagenet":  # an unextracted val.tar beside train/
        shutil.rmtree(tmp_path / "folder" / "val")
        (tmp_path / "folder" / "val").write_bytes(b"")
        with pytest.raises(ValueError, match=r"^imagenet split directory '.*val' is a file, not a directory"):
            build_datasets(DataConfig(dataset="imagenet", root=str(tmp_path / "folder")))


def test_data_settings_the_dataset_does_not_read_are_warned_of(tmp_path, caplog):
    make_cifar(tmp_path, "cifar10", per_batch=1)
    with caplog.at_level("WARNING", logger="maskprop.train.datasets"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path), train_size=8, crop_size=64))
    assert ("data.dataset=cifar10 does not read data.train_size=8, data.crop_size=64 (set for another dataset?): "
            "they change nothing") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="maskprop.train.datasets"):
        build_datasets(DataConfig(dataset="shapes", root=str(tmp_path), train_size=8, val_size=8))
    assert "data.dataset=shapes does not read data.root=" in caplog.text and "train_size" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="maskprop.train.datasets"):
        build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path)))
    assert "does not read" not in caplog.text
    missing = pytest.raises(FileNotFoundError, match="mnist files")
    with caplog.at_level("WARNING", logger="maskprop.train.datasets"), missing:
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path), train_size=8))  # no files: the error alone
    assert "does not read" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Constants, label ranges and sizes against independent values


def test_normalisation_constants_are_the_published_training_set_statistics(tmp_path):
    """The per-channel statistics quoted for each training set, and each dataset normalising with its own."""
    from maskprop.train import transforms

    assert (transforms.CIFAR10_MEAN, transforms.CIFAR10_STD) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert (transforms.CIFAR100_MEAN, transforms.CIFAR100_STD) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert (transforms.MNIST_MEAN, transforms.MNIST_STD) == ((0.1307,), (0.3081,))
    assert (transforms.FASHION_MNIST_MEAN, transforms.FASHION_MNIST_STD) == ((0.2860,), (0.3530,))

    def steps(dataset):
        return {type(t).__name__: t for t in dataset.transform.transforms}

    make_cifar(tmp_path / "c100", "cifar100", per_batch=1, test_size=1)
    train, val, _, _ = build_datasets(DataConfig(dataset="cifar100", root=str(tmp_path / "c100")))
    for dataset in (train, val):
        normalize = steps(dataset)["Normalize"]
        assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    crop = steps(train)["RandomCrop"]
    assert (tuple(crop.size), list(crop.padding)) == ((32, 32), [4, 4, 4, 4])  # the standard 32 + 4-pixel padding
    make_mnist(tmp_path / "f", folder="FashionMNIST", train_size=2, test_size=2)
    train, _, _, _ = build_datasets(DataConfig(dataset="fashion_mnist", root=str(tmp_path / "f")))
    assert (tuple(steps(train)["Normalize"].mean), tuple(steps(train)["Normalize"].std)) == ((0.2860,), (0.3530,))


@pytest.mark.parametrize("name,label", [("cifar10", 10), ("cifar10", -1), ("cifar100", 100)])
def test_cifar_labels_just_outside_the_classes_are_rejected(tmp_path, name, label):
    make_cifar(tmp_path, name, per_batch=1)
    folder, test_file, key = (("cifar-10-batches-py", "test_batch", "labels") if name == "cifar10"
                              else ("cifar-100-python", "test", "fine_labels"))
    write_cifar_pickle(tmp_path / folder / test_file, {"data": np.zeros((2, 3072), np.uint8), key: [0, label]})
    span = rf"test labels .* span \[{min(0, label)}, {max(0, label)}\]; expected labels in"
    with pytest.raises(ValueError, match=span):
        build_datasets(DataConfig(dataset=name, root=str(tmp_path)))


def test_mnist_label_10_is_rejected_and_the_input_size_is_channels_height_width(tmp_path):
    raw = make_mnist(tmp_path, train_size=4, test_size=2)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 10]))
    with pytest.raises(ValueError, match=r"test labels .* span \[0, 10\]; expected labels in \[0, 9\]"):
        build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([0, 9]))
    for prefix, n in (("train", 4), ("t10k", 2)):  # images of 20 rows and 28 columns
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.zeros((n, 20, 28)))
    assert build_datasets(DataConfig(dataset="mnist", root=str(tmp_path)))[3] == (1, 20, 28)


def test_shapes_of_more_than_one_chunk_keep_one_image_per_label():
    dataset = ShapesDataset(1030, seed=0, image_size=8)  # past the 1024-image rendering chunk
    assert dataset.images.shape == (1030, 3, 8, 8) and len(dataset.targets) == 1030
    assert torch.bincount(dataset.targets, minlength=10).tolist() == [103] * 10


def test_build_datasets_shapes_validation_set_is_the_validation_stream_and_padding_is_an_eighth():
    train, val, _, input_size = build_datasets(DataConfig(train_size=40, val_size=30, seed=2, image_size=16))
    assert input_size == (3, 16, 16)
    assert torch.equal(val.images, ShapesDataset(30, seed=2, image_size=16, train=False).images) and not val.train
    assert not (train.images[:, None] == val.images[None]).flatten(2).all(2).any()  # no image shared
    assert train.transform.transforms[0].padding == [2, 2, 2, 2]  # 16 / 8
    with pytest.raises(ValueError, match="num_classes=1 must be in"):
        ShapesDataset(10, num_classes=1)


def test_shapes_horizontal_bars_vary_down_the_rows_and_vertical_bars_along_them():
    dataset = ShapesDataset(400, seed=0)
    pixels = dataset.images.float()
    down = (pixels[:, :, 1:, :] - pixels[:, :, :-1, :]).abs().mean((1, 2, 3))  # change from one row to the next
    along = (pixels[:, :, :, 1:] - pixels[:, :, :, :-1]).abs().mean((1, 2, 3))
    horizontal, vertical = dataset.targets == SHAPES_CLASSES.index("horizontal_bars"), dataset.targets == 6
    assert SHAPES_CLASSES[6] == "vertical_bars"
    assert (down[horizontal] > along[horizontal]).float().mean() > 0.9
    assert (along[vertical] > down[vertical]).float().mean() > 0.9


def test_shapes_background_interpolation_is_exact_for_a_ramp():
    """The hat matrix interpolates linearly between 4 nodes spanning [-1, 1] to pixel centres (i + 1/2) * 2/S - 1:
    its rows sum to one and it reproduces a linear function of the nodes exactly."""
    from maskprop.train.shapes import _hat_matrix

    for size in (8, 32):
        hat = _hat_matrix(size, 4).double()
        centres = torch.tensor([(i + 0.5) * 2 / size - 1 for i in range(size)], dtype=torch.float64)
        torch.testing.assert_close(hat.sum(1), torch.ones(size, dtype=torch.float64))
        torch.testing.assert_close(hat @ torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64), centres)


# ---------------------------------------------------------------------------------------------------------------------
# Loader lengths and worker seeds


@pytest.mark.parametrize("size,batch,train,drop_last,world", [
    (50, 8, True, True, (0, 1)), (50, 8, True, False, (0, 1)), (48, 8, True, False, (1, 2)),
    (50, 8, True, True, (1, 2)),
    (11, 4, False, None, (0, 2)), (11, 4, False, None, (1, 2)), (10, 4, False, None, (0, 1))])
def test_loader_length_is_the_number_of_batches_it_yields(size, batch, train, drop_last, world):
    loader = build_loader(_Indexed(size), batch_size=batch, train=train, drop_last=drop_last, world=world)
    assert len(loader) == len(list(loader))


def test_a_training_set_of_exactly_one_batch_gives_one_batch():
    assert _epoch(build_loader(_Indexed(8), batch_size=8, train=True)).__len__() == 8


class _Augmented(_Indexed):
    """An example's random part from all three global generators, as transforms draw (torch's, random's, numpy's)."""

    def __getitem__(self, index):
        import random

        return torch.tensor(index), torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()])


def _batches(loader):
    return [(index.tolist(), noise.tolist()) for index, noise in loader]


def test_each_batch_draws_from_its_own_seed_whatever_the_workers():
    """In worker processes a batch's transforms draw from the seed of its epoch, number and rank (torch, random and
    numpy alike): one worker and two load the same batches, and nothing draws the same twice."""
    from maskprop.train.loaders import batch_seed

    dataset = _Augmented(24)
    one, two = (_batches(build_loader(dataset, batch_size=4, train=True, workers=w, seed=3)) for w in (1, 2))
    assert one == two
    noise = [value for _, batch in one for row in batch for value in row]
    assert len(set(noise)) == len(noise)
    sampler = build_loader(dataset, batch_size=4, train=True, workers=1, seed=3).batch_sampler
    torch.empty((), dtype=torch.int64).random_(generator=sampler.generator)  # the DataLoader's draw, then the epoch
    seeds = [(batch.number, batch.seed) for batch in sampler]
    assert [n for n, _ in seeds] == list(range(6)) and len({s for _, s in seeds}) == 6
    torch.manual_seed(seeds[2][1])  # batch 2's first example draws first from its batch's seed
    assert one[2][1][0][0] == torch.rand(()).item()
    assert batch_seed(7, 2, 0) != batch_seed(7, 2, 1) != batch_seed(7, 3, 1)  # ranks draw apart


def test_an_epoch_resumed_at_a_batch_gives_the_rest_of_it_with_workers():
    """A loader whose generator is set back to the epoch's start and whose sampler starts at batch 3 gives batches
    3-5 of that epoch, their crops (here: draws) included, and the next epoch as the uninterrupted loader does."""
    dataset = _Augmented(24)
    generator = torch.Generator().manual_seed(5)
    at_start = generator.get_state()
    straight = build_loader(dataset, batch_size=4, train=True, workers=2, generator=generator)
    epochs = [_batches(straight) for _ in range(2)]
    resumed = build_loader(dataset, batch_size=4, train=True, workers=2, generator=torch.Generator())
    resumed.generator.set_state(at_start)
    resumed.batch_sampler.start = 3
    assert _batches(resumed) == epochs[0][3:]
    assert resumed.batch_sampler.start == 0 and _batches(resumed) == epochs[1]


def test_batches_loaded_in_the_main_process_draw_from_the_global_generators():
    """With no workers nothing is reseeded: the transforms draw from the run's global generators (whose states a
    checkpoint saves), as they did before batches had seeds."""
    import random

    dataset = _Augmented(8)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)
        loaded = _batches(build_loader(dataset, batch_size=4, train=False, workers=0))
        torch.manual_seed(11)
        random.seed(12)
        np.random.seed(13)
        expected = [[torch.rand(()).item(), random.random(), np.random.rand()] for _ in range(8)]
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
    assert [row for _, batch in loaded for row in batch] == torch.tensor(expected).tolist()  # as float32
    assert build_loader(dataset, batch_size=4, train=False).dataset.size == 8  # the dataset's own attributes


def test_the_worker_start_benchmark_times_both_loaders(capsys):
    """tools/bench_worker_start.py times epochs with workers started anew against persistent ones and prints both."""
    from conftest import load_tool

    assert load_tool("bench_worker_start").main(["--images", "300", "--workers", "1", "--repeats", "1",
                                                  "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "3 batches of 100, 1 workers" in out and "workers started anew:" in out and "paired ratio" in out
