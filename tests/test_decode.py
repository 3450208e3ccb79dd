"""``data.decode: device`` (maskprop.train.decode): ImageNet decoded and augmented on the run's device (the CPU here),
its augmentation drawn in the loader as timm's transforms draw it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from test_data import make_image_folder

import maskprop.train.decode as decode_module
from maskprop.train.config import DataConfig
from maskprop.train.datasets import imagenet_datasets
from maskprop.train.decode import (
    PARAMS,
    DecodeLoader,
    augment_image,
    augment_images,
    collate_encoded,
    crop_box,
    decode_batch,
    decode_images,
    decode_loader,
    draw_params,
    image_decoders,
    is_encoded,
    read_encoded,
    split_bytes,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LEVEL = 1 / 255 / min(STD)  # one grey level in normalised units
COL = {name: i for i, name in enumerate(PARAMS)}


def _decoders_or_skip(name):
    try:
        return image_decoders(name)
    except ImportError as err:  # torchcodec not installed, or its library does not load; a torchvision without them
        hint = "; pip install -e '.[decode]' installs torchcodec" if name == "torchcodec" else ""
        pytest.skip(f"no {name} image decoders: {err}{hint}")


@pytest.fixture(params=["torchcodec", "torchvision"])
def decoders(request, monkeypatch):
    """The test run with each library's image decoders (:func:`image_decoders`); torchcodec's skip without it."""
    chosen = _decoders_or_skip(request.param)
    monkeypatch.setattr(decode_module, "image_decoders", lambda name=None: chosen)
    return chosen


def _with_cmyk(root):
    """The stand-in plus a CMYK JPEG in each split (ImageNet has a few: PIL converts them, nvjpeg may not)."""
    from PIL import Image

    make_image_folder(root, per_class=4)
    pixels = np.random.default_rng(1).integers(0, 256, (44, 52, 3), dtype=np.uint8)
    for split in ("train", "val"):
        Image.fromarray(pixels).convert("CMYK").save(root / split / "n01440764" / "n01440764_cmyk.JPEG")
    return root


def _pil(path):
    """The file decoded by PIL as a (3, H, W) uint8 tensor: a decoder independent of torchvision's."""
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def _batch(dataset, indices):
    data, params, labels, paths = collate_encoded([dataset[i] for i in indices])
    return split_bytes(data, params), params, labels, paths


def _reference(image, row, crop):
    """One image made by torchvision's v2 functional ops one at a time (uint8, on the CPU): crop, resize, flip, the
    adjustments in the drawn order."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    top, left, height, width = (int(v) for v in row[4:8].tolist())
    image = F.crop(image, top, left, height, width)
    image = F.resize(image, [crop, crop], InterpolationMode.BILINEAR, antialias=True)
    if row[COL["flip"]]:
        image = image.flip(-1)
    for which in row[9:12].tolist():
        name = ("brightness", "contrast", "saturation")[int(which)]
        image = getattr(F, f"adjust_{name}")(image, float(row[COL[name]]))
    return image


def test_the_device_pipeline_is_the_v2_ops_one_by_one(tmp_path, decoders):
    """Exact in uint8 (the same integer pixels as the ops one by one on PIL's decoding, which equals libjpeg-turbo's
    here; the batch's flips and jitters at once too, as on a GPU); the normalised float32 batch within float32 rounding
    of float64's ``(x / 255 - mean) / std``. Every image of the stand-in (PNG, RGB, grayscale and CMYK JPEGs), drawn
    under 6 seeds: flips both ways, every order."""
    root = _with_cmyk(tmp_path / "imagenet")
    _grayscale_jpeg(root)
    crop = 24
    train, _, _ = imagenet_datasets(root, crop_size=crop, decode="device")
    assert any(p.endswith("_cmyk.JPEG") for p, _ in train.samples)
    seen_flips, seen_orders = set(), set()
    for seed in range(6):
        torch.manual_seed(seed)
        data, params, labels, paths = _batch(train, range(len(train)))
        assert labels.tolist() == [label for _, label in train.samples]
        batched = {path.rsplit("_", 1)[1]: bool(row[COL["jpeg"]]) for path, row in zip(paths, params)}
        assert batched == {"0.png": False, "1.JPEG": True, "2.png": False, "3.JPEG": True, "cmyk.JPEG": False,
                           "gray.JPEG": True}
        images = decode_batch(data, params, paths, crop, torch.device("cpu"))
        assert images.shape == (len(train), 3, crop, crop) and images.dtype == torch.float32
        decoded = [_pil(path) for path in paths]
        batched = augment_images(decoded, params, crop, batched=True)  # a GPU's way: the batch's jitter at once
        assert torch.equal(batched, augment_images(decoded, params, crop, batched=False))
        for image, row, path in zip(images, params, paths):
            expected = _reference(_pil(path), row, crop)
            assert torch.equal(augment_image(_pil(path), row, crop), expected), path
            normalised = (expected.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) / \
                torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
            assert torch.allclose(image.double(), normalised, rtol=0, atol=1e-6), path
            seen_flips.add(int(row[COL["flip"]]))
            seen_orders.add(tuple(row[9:12].tolist()))
    assert seen_flips == {0, 1} and len(seen_orders) == 6


def test_the_device_pipeline_can_fail(tmp_path):
    """The comparison above sees a wrong order, a missed flip, a shifted box."""
    make_image_folder(tmp_path / "imagenet", per_class=2)
    train, _, _ = imagenet_datasets(tmp_path / "imagenet", crop_size=16, decode="device")
    torch.manual_seed(0)
    data, params, _, paths = _batch(train, [1])
    image, row = _pil(paths[0]), params[0]
    row[12:15] = torch.tensor([0.7, 1.3, 0.65], dtype=torch.float64)
    expected = _reference(image, row, 16)
    for change in ({9: row[10], 10: row[9]}, {COL["flip"]: 1 - row[COL["flip"]]}, {COL["left"]: row[COL["left"]] + 1}):
        wrong = row.clone()
        for column, value in change.items():
            wrong[column] = value
        if wrong[COL["left"]] + wrong[COL["crop_width"]] > wrong[COL["width"]]:
            wrong[COL["left"]] -= 2
        assert not torch.equal(augment_image(image, wrong, 16), expected), change


@pytest.mark.parametrize("size", [(40, 56), (500, 375), (7, 300), (300, 7), (1, 1), (224, 224)])
def test_the_draws_are_timms_draws(size):
    """Under the same torch generator state: the box is torchvision's ``RandomResizedCrop.get_params`` (the last two
    odd sizes take the central fallback), then the flip is ``RandomHorizontalFlip``'s ``torch.rand(1) < 0.5``, then
    the order and factors are ``ColorJitter(0.4, 0.4, 0.4).get_params``: what timm's training transform draws."""
    from torchvision import transforms as T

    height, width = size
    for seed in range(50):
        torch.manual_seed(seed)
        row = draw_params(height, width)
        torch.manual_seed(seed)
        box = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
        flip = float(torch.rand(1) < 0.5)
        order, b, c, s, _ = T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], None)
        assert row[4:8].tolist() == list(box) and row[COL["flip"]] == flip
        assert row[9:12].tolist() == [float(i) for i in order if i < 3] and row[12:15].tolist() == [b, c, s]
        assert row[:4].tolist() == [height, width, 1.0, 1.0]


def test_the_draws_use_the_generator_as_torchvision_does():
    """The draws consume torch's global generator exactly as torchvision's transforms do (same state after)."""
    from torchvision import transforms as T

    torch.manual_seed(3)
    draw_params(40, 56)
    after = torch.get_rng_state()
    torch.manual_seed(3)
    T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, 40, 56), [0.08, 1.0], [3 / 4, 4 / 3])
    torch.rand(1)
    T.ColorJitter.get_params([0.6, 1.4], [0.6, 1.4], [0.6, 1.4], None)
    assert torch.equal(after, torch.get_rng_state())


def test_timms_training_transform_is_what_the_draws_replicate():
    """timm's ``create_transform(224, is_training=True)``: RandomResizedCropAndInterpolation of scale (0.08, 1) and
    ratio (3/4, 4/3), bilinear (not a random choice), flip 1/2, ColorJitter 0.4 without hue, ImageNet mean and std:
    a timm whose defaults change fails here. Its box, drawn from python's ``random``, has the distribution of ours
    (4,000 draws each: the mean area share and log aspect ratio agree within 4 standard errors)."""
    import random

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    steps = create_transform(224, is_training=True).transforms
    crop, flip, jitter, _, normalize = steps
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert crop.interpolation == InterpolationMode.BILINEAR
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(jitter, T.ColorJitter) and jitter.hue is None
    assert [tuple(jitter.brightness), tuple(jitter.contrast), tuple(jitter.saturation)] == [(0.6, 1.4)] * 3
    assert tuple(IMAGENET_DEFAULT_MEAN) == MEAN and tuple(IMAGENET_DEFAULT_STD) == STD
    assert normalize.mean.tolist() == pytest.approx(MEAN) and normalize.std.tolist() == pytest.approx(STD)

    from PIL import Image

    image = Image.new("RGB", (500, 375))
    random.seed(0)
    torch.manual_seed(0)
    ours = torch.tensor([crop_box(375, 500) for _ in range(4000)], dtype=torch.float64)
    theirs = torch.tensor([crop.get_params(image, crop.scale, crop.ratio) for _ in range(4000)], dtype=torch.float64)
    for boxes in (ours, theirs):
        assert bool(((boxes[:, 0] + boxes[:, 2] <= 375) & (boxes[:, 1] + boxes[:, 3] <= 500)).all())
    for stat in (lambda b: b[:, 2] * b[:, 3] / (375 * 500), lambda b: torch.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] / 375):
        a, b = stat(ours), stat(theirs)
        error = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
        assert abs(a.mean().item() - b.mean().item()) < 4 * error


def test_the_eval_batches_are_timms_eval_transform_within_a_grey_level(tmp_path, decoders):
    """Resize the short side to floor(crop / 0.875), center-crop: against timm's PIL evaluation transform. torch's
    antialiased bilinear resize of uint8 (CPU) and PIL's round apart by at most one grey level; measured on the
    stand-in (random pixels, the worst case for a resize): max 0.0175 (one level, 1 / 255 / 0.224), mean about 1e-4
    in normalised units, for crops of 16 to 224 (upsampling included)."""
    root = _with_cmyk(tmp_path / "imagenet")
    for crop in (16, 32, 224):
        _, timm_val, _ = imagenet_datasets(root, crop_size=crop)
        _, val, _ = imagenet_datasets(root, crop_size=crop, decode="device")
        images, labels = next(iter(decode_loader(val, len(val), False, "cpu", workers=0)))
        expected = torch.stack([timm_val[i][0] for i in range(len(timm_val))])
        assert labels.tolist() == [label for _, label in timm_val.samples]
        diff = (images - expected).abs()
        assert diff.max().item() <= LEVEL + 1e-5 and diff.mean().item() < 1e-3, (crop, diff.max(), diff.mean())


def test_without_augment_training_is_the_eval_transform(tmp_path, decoders):
    make_image_folder(tmp_path / "imagenet", per_class=2)
    train, val, _ = imagenet_datasets(tmp_path / "imagenet", augment=False, crop_size=16, decode="device")
    assert is_encoded(train) and is_encoded(val) and not is_encoded(imagenet_datasets(tmp_path / "imagenet")[0])
    data, params, _, paths = _batch(train, range(len(train)))
    assert not params[:, COL["augment"]].any() and not params[:, 4:15].any()
    eval_loader = decode_loader(train, len(train), False, "cpu", workers=0)
    assert torch.equal(decode_batch(data, params, paths, 16, torch.device("cpu")), next(iter(eval_loader))[0])


def _epoch(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_same_seed_gives_the_same_batches(tmp_path, workers, decoders):
    """Two loaders of one seed: the same batches (workers: each batch seeded from the loader's generator; in the main
    process, from the global generator seeded alike). With workers, 1 or 2 of them give the same batches too; an
    epoch started at its batch 2 (a resume) gives the batches from 2 on."""
    make_image_folder(tmp_path / "imagenet", per_class=8)
    train, _, _ = imagenet_datasets(tmp_path / "imagenet", crop_size=16, decode="device")

    def loader(count=workers):
        torch.manual_seed(0)
        return decode_loader(train, 4, True, "cpu", workers=count, generator=torch.Generator().manual_seed(5))

    first, again = loader(), loader()
    assert isinstance(first, DecodeLoader) and len(first) == 4 and first.sampler is first.batch_sampler
    one = _epoch(first)
    torch.manual_seed(0)
    two = _epoch(again)
    assert len(one) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))
    assert not torch.equal(one[0][0], _epoch(first)[0][0])  # the next epoch draws anew
    if workers:
        other = _epoch(loader(1))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(one, other))
        resumed = loader()
        resumed.sampler.start = 2
        assert all(torch.equal(a[0], b[0]) for a, b in zip(one[2:], _epoch(resumed)))


def _cut_jpeg_batch(root):
    """A whole JPEG and one cut in half (its header reads, its data does not) of the stand-in at ``root``, as one
    encoded batch: the cut file and ``(bytes, params, labels, paths)``."""
    whole = root / "train" / "n01440764" / "n01440764_1.JPEG"
    cut = root / "train" / "n01440764" / "n01440764_8.JPEG"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    train, _, _ = imagenet_datasets(root, crop_size=16, decode="device")
    indices = [[path for path, _ in train.samples].index(str(p)) for p in (whole, cut)]
    return cut, _batch(train, indices)


def test_an_unreadable_file_is_named(tmp_path, decoders):
    """A file PIL cannot open fails in the loader (worker or not); a JPEG whose header reads but whose data is cut
    fails where it is decoded: both one line naming the file, as ``read_image`` does."""
    from maskprop.cli import _one_line

    make_image_folder(tmp_path, per_class=2)
    bad = tmp_path / "train" / "n01440764" / "n01440764_9.JPEG"
    bad.write_bytes(b"not an image")
    train, _, _ = imagenet_datasets(tmp_path, crop_size=16, decode="device")
    index = [path for path, _ in train.samples].index(str(bad))
    message = rf"^cannot read image '{re.escape(str(bad))}' \(cannot identify image file .*\); expected an image file"
    with pytest.raises(ValueError, match=message):
        train[index]
    loader = decode_loader(torch.utils.data.Subset(train, [index]), 1, False, "cpu", workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert re.match(message, _one_line(caught.value))

    cut, (data, params, _, paths) = _cut_jpeg_batch(tmp_path)
    assert params[:, COL["jpeg"]].tolist() == [1.0, 1.0]  # both go to the batch call, which fails: one by one
    with pytest.raises(ValueError, match=rf"^cannot read image '{re.escape(str(cut))}' \(.*truncated.*\); expected"):
        decode_batch(data, params, paths, 16, torch.device("cpu"))


def test_torchcodec_and_torchvision_decode_the_stand_in_alike(tmp_path):
    """The batch's images from each library's decoders (JPEGs by the batch call; PNG, CMYK and BMP one by one, BMP by
    PIL) are the same uint8 pixels, PIL's."""
    from PIL import Image

    root = _with_cmyk(tmp_path / "imagenet")
    _grayscale_jpeg(root)
    pixels = np.random.default_rng(3).integers(0, 256, (30, 34, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "n01443537" / "n01443537_bmp.bmp")
    train, _, _ = imagenet_datasets(root, crop_size=16, decode="device")
    data, params, _, paths = _batch(train, range(len(train)))
    assert params[:, COL["jpeg"]].sum() == 5 and len(paths) == 11  # 4 RGB JPEGs and a grayscale one
    decoded = {}
    for name in ("torchvision", "torchcodec"):
        chosen = _decoders_or_skip(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decode_module, "image_decoders", lambda name=None: chosen)
            decoded[name] = decode_images(data, params, paths, torch.device("cpu"))
    for theirs, ours, path in zip(decoded["torchvision"], decoded["torchcodec"], paths):
        assert ours.dtype == torch.uint8 and torch.equal(ours, theirs) and torch.equal(ours, _pil(path)), path


def test_a_16_bit_png_decodes_to_8_bits_alike_with_either_library(decoders, tmp_path):
    """A 16-bit grayscale PNG holding every 16-bit value decodes to RGB uint8 round(value / 257) (closed form), the
    value each library's decoders give (torchvision's own are uint16): the augmentation takes uint8."""
    from PIL import Image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = decode_module._decode_one(read_encoded(str(path)).data, str(path))
    expected = torch.from_numpy(np.rint(values / 257.0).astype(np.uint8)).expand(3, 256, 256)
    assert image.dtype == torch.uint8 and torch.equal(image, expected)


def _torchcodec_modules():
    import sys

    return {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torchcodec"}


@pytest.fixture
def fresh_choice():
    """:func:`image_decoders` chooses anew in the test, and again after it, with torchcodec's modules as they were
    (torchcodec imported first where it loads: its native libraries load once a process)."""
    import sys

    try:
        image_decoders("torchcodec")
    except ImportError:
        pass
    before = _torchcodec_modules()
    image_decoders.cache_clear()
    yield
    for name in _torchcodec_modules():
        del sys.modules[name]
    sys.modules.update(before)
    image_decoders.cache_clear()


def _fake_torchcodec(tmp_path, monkeypatch, decoders_init):
    """A torchcodec package whose ``decoders/__init__.py`` is ``decoders_init``, imported in place of any other
    (with :func:`fresh_choice`, which puts the modules back)."""
    import sys

    package = tmp_path / "fake" / "torchcodec"
    (package / "decoders").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "decoders" / "__init__.py").write_text(decoders_init)
    for name in _torchcodec_modules():
        del sys.modules[name]
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))


def test_the_decoders_are_torchcodecs_where_it_loads(tmp_path, monkeypatch, fresh_choice):
    """TorchCodec's where it imports; torchvision's, silently, where it is not installed, and with a warning naming
    the error where it is installed but its library does not load; asked for, a torchcodec that does not load is an
    ImportError."""
    import sys
    import warnings

    try:
        import torchcodec.decoders  # noqa: F401
        installed = True
    except Exception:
        installed = False
    assert image_decoders().name == ("torchcodec" if installed else "torchvision")
    assert image_decoders("torchvision").name == "torchvision"
    with pytest.raises(ValueError, match="expected 'torchcodec' or 'torchvision'"):
        image_decoders("pil")

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchcodec":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    with monkeypatch.context() as patch:
        for name in _torchcodec_modules():
            del sys.modules[name]
        patch.setattr(sys, "meta_path", [NotInstalled(), *sys.meta_path])
        image_decoders.cache_clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert image_decoders().name == "torchvision"
        with pytest.raises(ImportError, match="^torchcodec's image decoders do not load"):
            image_decoders("torchcodec")

    image_decoders.cache_clear()
    _fake_torchcodec(tmp_path, monkeypatch, "raise OSError('libtorchcodec_image.so: undefined symbol: aoti_x')\n")
    with pytest.warns(RuntimeWarning, match=r"^torchcodec's image decoders do not load \(libtorchcodec_image.so: "
                                            r"undefined symbol: aoti_x\); data.decode: device decodes with "
                                            r"torchvision's$"):
        chosen = image_decoders()
    assert chosen.name == "torchvision"
    with pytest.raises(ImportError, match="undefined symbol: aoti_x"):
        image_decoders("torchcodec")


def test_decode_device_is_for_imagenet_only():
    assert DataConfig(dataset="imagenet", decode="device").decode == "device"
    assert DataConfig().decode == "cpu"
    with pytest.raises(ValueError, match=r"^data.decode='device' decodes image files on the device; got "
                                         r"data.dataset='cifar10' \(expected data.dataset='imagenet', or "
                                         r"data.decode='cpu'\)$"):
        DataConfig(dataset="cifar10", decode="device")


def test_maskprop_train_with_decode_device_on_cifar10_is_a_usage_error(tmp_path, capsys):
    import yaml

    from maskprop.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"dataset": "cifar10", "root": str(tmp_path), "decode": "device"}}))
    status = main(["train", str(recipe), "--out", str(tmp_path / "run")])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "data.decode='device'" in lines[0] and "expected data.dataset='imagenet'" in lines[0]
    assert not (tmp_path / "run").exists()


def _imagenet_run(root, **overrides):
    from conftest import TINY_RUN, with_overrides

    config = with_overrides(TINY_RUN, **{"data.dataset": "imagenet", "data.root": str(root), "data.decode": "device",
                                         "data.crop_size": 16, "data.batch_size": 4, "model.kwargs": {"num_classes": 2},
                                         "optim.epochs": 1, "finetune.epochs": 1, "sparsity.fix_examples": 8,
                                         "sparsity.fix_samples": 2, **overrides})
    for key in ("train_size", "val_size", "image_size"):
        config["data"].pop(key)
    return config


def test_a_search_decodes_on_the_device_in_every_loader(tmp_path, monkeypatch, one_thread):
    """A VR-PGE run: its training and validation batches, the search's probe of the top-score subnetwork and the fix's
    best-of-n batches all come decoded (``decode_batch``), none from PIL; the dry run's plan says so."""
    import maskprop
    import maskprop.train.decode as decode_module
    from maskprop.train.loop import plan_run

    make_image_folder(tmp_path / "imagenet", per_class=8)
    calls = []
    real = decode_module.decode_batch

    def counting(data, params, *args, **kwargs):
        calls.append(bool(params[:, COL["augment"]].any()))
        return real(data, params, *args, **kwargs)

    monkeypatch.setattr(decode_module, "decode_batch", counting)
    monkeypatch.setattr("maskprop.train.datasets.read_image", lambda path: pytest.fail(f"PIL read {path}"))
    config = _imagenet_run(tmp_path / "imagenet")
    plan = plan_run(config)
    assert plan["data"] == "imagenet, decoded on cpu" and plan["decode"] == "device" and plan["steps_per_epoch"] == 4
    result = maskprop.fit(config, out=None)
    assert result["steps"] == {"search": 4, "finetune": 4, "train": 0} and 0 <= result["accuracy"] <= 100
    # 4 + 4 training batches (search, finetune) and the fix's 2 x 2 best-of-n batches augmented; validation and the
    # probe's batches not (the probe reads the first examples in order, augmented: the training set's transform)
    assert calls.count(True) >= 8 + 4 and len(calls) > calls.count(True)


def test_bench_data_times_both_decode_paths_side_by_side(capsys):
    from conftest import load_tool

    bench = load_tool("bench_data")
    threads = torch.get_num_threads()
    try:  # the tool sets one thread
        assert bench.main(["--decode", "cpu", "device", "--images", "24", "--size", "64", "48", "--batch-size", "4",
                           "--batches", "2", "--repeats", "2", "--workers", "0", "--crop-size", "32"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "| decode | workers | images/s | ms per image | device / cpu (paired) |"
    assert re.fullmatch(r"\| cpu \| 0 \| [\d,]+ \| [\d.]+ \|  \|", lines[3])
    assert re.fullmatch(r"\| device \| 0 \| [\d,]+ \| [\d.]+ \| [\d.]+x \|", lines[4])


def test_decode_device_with_datasets_given_to_fit_is_an_error(tmp_path):
    import maskprop
    from maskprop.train.data import ShapesDataset

    config = _imagenet_run(tmp_path, **{"model.kwargs": {"num_classes": 10}})
    with pytest.raises(ValueError, match=r"^data.decode='device' decodes the image files of data.dataset='imagenet'; "
                                         r"got datasets given to fit \(expected data.decode='cpu' with them\)$"):
        maskprop.fit(config, ShapesDataset(8, seed=0), ShapesDataset(8, seed=1), out=None)


def _grayscale_jpeg(root):
    from PIL import Image

    pixels = np.random.default_rng(2).integers(0, 256, (36, 60), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "n01443537" / "n01443537_gray.JPEG")


@pytest.mark.gpu
def test_on_cuda_the_batches_are_the_cpus_within_a_few_grey_levels(tmp_path, decoders):
    """nvjpeg's batch decode (RGB and grayscale JPEGs; PNG and CMYK one by one on the CPU) and the CUDA resize and
    adjustments against the CPU's: not exact (nvjpeg's IDCT and chroma upsampling, CUDA's float resize rounded to
    uint8). The tolerance (mean under one grey level, max 16) is a first guess, not measured yet: print the figures
    and set it from them."""
    root = _with_cmyk(tmp_path / "imagenet")
    _grayscale_jpeg(root)
    train, val, _ = imagenet_datasets(root, crop_size=32, decode="device")
    for dataset in (train, val):
        torch.manual_seed(0)
        data, params, _, paths = _batch(dataset, range(len(dataset)))
        assert params[:, COL["jpeg"]].sum() < len(dataset)  # some go one by one
        cpu = decode_batch(data, params, paths, 32, torch.device("cpu"))
        cuda = decode_batch(data, params, paths, 32, torch.device("cuda"), torch.channels_last)
        assert cuda.is_cuda and cuda.is_contiguous(memory_format=torch.channels_last)
        diff = (cuda.cpu() - cpu).abs() / LEVEL
        print(f"cuda against cpu, grey levels: max {diff.max().item():.2f}, mean {diff.mean().item():.3f}")
        assert diff.mean().item() < 1 and diff.max().item() <= 16


@pytest.mark.gpu
def test_on_cuda_a_cut_jpeg_in_the_batch_is_named(tmp_path, decoders):
    make_image_folder(tmp_path, per_class=2)
    cut, (data, params, _, paths) = _cut_jpeg_batch(tmp_path)
    with pytest.raises(ValueError, match=rf"^cannot read image '{re.escape(str(cut))}' \("):
        decode_batch(data, params, paths, 16, torch.device("cuda"))
