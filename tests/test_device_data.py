"""Data on the training device (``data.on_device``): the batched crop, flip and normalisation against torchvision's
per-example transforms, the draws' frequencies, the DataLoader's index batches, exact resume, the refusals, and short
runs on ``shapes`` and a CIFAR stand-in."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import pytest
import torch
import yaml
from conftest import TINY_RUN, load_tool, with_overrides
from test_data import make_cifar, make_mnist
from test_graphs import _stopped_in_the_second_epoch
from test_train import _assert_same_state

import maskprop
from maskprop.cli import main
from maskprop.train import device_data, loop, setup
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import DataConfig, load_config
from maskprop.train.data import build_datasets, build_loader
from maskprop.train.device_data import (
    DeviceLoader,
    ImageTensors,
    crop_flip_batch,
    data_on_device,
    draw_crops_and_flips,
    image_tensors,
    normalize_batch,
)
from maskprop.train.graphs import GraphsChoice
from maskprop.train.setup import prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs (conftest.py)

ON_DEVICE = {"data.on_device": True}


def _per_example(image: torch.Tensor, top: int, left: int, flip: bool, padding: int) -> torch.Tensor:
    """torchvision's functional pad + crop + flip of one (C, H, W) image: what ``RandomCrop(padding)`` and
    ``RandomHorizontalFlip`` do with these draws."""
    from torchvision.transforms.v2 import functional as TF

    height, width = image.shape[-2:]
    out = TF.crop(TF.pad(image, [padding]), top, left, height, width) if padding else image
    return TF.horizontal_flip(out) if flip else out


# ---------------------------------------------------------------------------------------------------------------------
# The batched augmentation


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("padding, flip", [(4, True), (2, True), (4, False), (0, True)])
def test_batched_crop_and_flip_equal_torchvision_per_example(dtype, padding, flip, memory_format):
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (64, 3, 32, 24), generator=generator).to(dtype)
    if dtype.is_floating_point:
        images = images / 255 - 0.5  # negative values too: the padding is zero, not the minimum
    images = images.contiguous(memory_format=memory_format)
    offsets, flips = draw_crops_and_flips(64, padding, flip, generator)
    assert (offsets is None) == (padding == 0) and (flips is None) == (not flip)
    got = crop_flip_batch(images, offsets, flips, padding)
    assert got.dtype == dtype and got.shape == images.shape and got.is_contiguous(memory_format=memory_format)
    for n in range(64):
        top, left = (0, 0) if offsets is None else offsets[n].tolist()
        expected = _per_example(images[n], top, left, flips is not None and bool(flips[n]), padding)
        assert torch.equal(got[n], expected), n
    if flip:
        assert 0 < int(flips.sum()) < 64
    if padding:  # the draws reach both ends of the range
        assert int(offsets.min()) == 0 and int(offsets.max()) == 2 * padding


def test_normalisation_matches_the_transform_pipeline():
    from torchvision.transforms import v2

    from maskprop.train.transforms import CIFAR10_MEAN, CIFAR10_STD

    images = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    expected = torch.stack([reference(image) for image in images])
    for memory_format in (torch.contiguous_format, torch.channels_last):
        images = images.contiguous(memory_format=memory_format)
        got = normalize_batch(images, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD))
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def _coordinates(count: int, size: int) -> torch.Tensor:
    """``count`` copies of an image whose first channel holds each pixel's row + 1 and second its column + 1 (0 is
    the padding), as uint8 ``(count, 3, size, size)``."""
    positions = torch.arange(1, size + 1, dtype=torch.uint8)
    image = torch.stack([positions[:, None].expand(size, size), positions[None, :].expand(size, size),
                         torch.zeros(size, size, dtype=torch.uint8)])
    return image.expand(count, 3, size, size).contiguous()


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("pad_normalized", [False, True])
def test_every_crop_offset_and_both_flips_occur_with_their_frequencies(pad_normalized):
    """Through a DeviceLoader's training batches: read each example's offsets and flip back from its pixels, check
    the whole image against torchvision's per-example crop and flip of them, and count the draws."""
    size, padding, count, epochs = 32, 4, 512, 8
    data = ImageTensors(_coordinates(count, size), torch.zeros(count, dtype=torch.long), (0.0,) * 3, (1.0,) * 3,
                        padding=padding, flip=True, pad_normalized=pad_normalized)
    loader = DeviceLoader(data, 128, train=True, seed=0, augment_generator=torch.Generator().manual_seed(5))
    source = _coordinates(1, size)[0]
    cells = torch.zeros(2 * padding + 1, 2 * padding + 1, 2)
    middle = size // 2
    for _ in range(epochs):
        for images, _ in loader:
            pixels = (images * 255).round().to(torch.uint8)
            for image in pixels:
                row, col, col_next = image[0, middle, middle], image[1, middle, middle], image[1, middle, middle + 1]
                flip = bool(col_next < col)
                top = int(row) - 1 - middle + padding
                left = int(col) + padding - middle if flip else int(col) - 1 - middle + padding
                assert torch.equal(image, _per_example(source, top, left, flip, padding))
                cells[top, left, int(flip)] += 1
    assert cells.sum() == epochs * count and (cells > 0).all()
    # Each sum of squares ~ chi-square with df degrees of freedom for uniform draws: far beyond df + 6 sqrt(2 df)
    # would be a bias (one offset missing, flips at another rate); seeded, so the test gives one answer.
    for counts in (cells.sum((1, 2)), cells.sum((0, 2)), cells.sum((0, 1)), cells.flatten()):
        df = counts.numel() - 1
        assert _chi_square(counts) < df + 6 * math.sqrt(2 * df), counts


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pad_normalized", [False, True], ids=["cifar", "shapes"])
def test_the_padding_is_black_before_the_normalisation_and_zero_after(pad_normalized, memory_format):
    """A DeviceLoader's training batches are the per-example transforms of its draws, taken in order from its
    generator (offsets, then flips, a batch at a time): CIFAR's crops a uint8 image padded with black and normalises
    it, ``shapes``' crops the normalised image padded with zeros (a mean and std other than 0 and 1 tell them
    apart)."""
    from torchvision.transforms import v2

    mean, std, padding = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 3
    images = torch.randint(0, 256, (12, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(12), mean, std, padding=padding, flip=True,
                        pad_normalized=pad_normalized)
    loader = DeviceLoader(data, 8, train=True, seed=0, augment_generator=torch.Generator().manual_seed(5),
                          memory_format=memory_format)
    normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    replay = torch.Generator().manual_seed(5)
    for _ in range(2):
        for batch, labels in loader:
            offsets, flips = draw_crops_and_flips(len(labels), padding, True, replay)
            for image, label, (top, left), flip in zip(batch, labels.tolist(), offsets.tolist(), flips.tolist()):
                source = images[label]
                expected = _per_example(normalize(source), top, left, flip, padding) if pad_normalized else \
                    normalize(_per_example(source, top, left, flip, padding))
                torch.testing.assert_close(image, expected, rtol=1e-6, atol=1e-6)
    assert (offsets != padding).any()  # some padding in the crops


def test_training_examples_for_the_fix_are_the_first_augmented_alike_at_every_pass(monkeypatch):
    """The fix's evaluation on the device (``sparsity.fix: best_of_n``) takes the first ``sparsity.fix_examples``
    training examples in order, cropped and flipped as training draws them, and every pass over them draws the same
    crops and flips (the search's probe takes the same loader)."""
    run = prepare(load_config(with_overrides(TINY_RUN, **ON_DEVICE, **{"sparsity.fix_examples": 40})))
    seen = {}

    def best_of_n(scores, model, generator, samples, loader, ctx):
        seen["loader"] = loader
        return {}, {"rule": "best_of_n"}

    monkeypatch.setitem(loop._FIX_RULES, "best_of_n", best_of_n)
    loop.fix_subnetwork(run.state, run.cfg, run.ctx, run.train_loader.data)
    loader = seen["loader"]
    passes = [list(loader) for _ in range(2)]
    labels = torch.cat([y for _, y in passes[0]])
    assert torch.equal(labels, run.train_loader.data.labels[:40])
    data = run.train_loader.data.head(40)
    plain = normalize_batch(data.images, torch.tensor(data.mean), torch.tensor(data.std))
    augmented = torch.cat([x for x, _ in passes[0]])
    assert not torch.allclose(augmented, plain)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(*passes))


# ---------------------------------------------------------------------------------------------------------------------
# The same batches as the DataLoader path


class _Indexed(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 2, 2), index


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_the_index_batches_are_the_dataloaders(world_size, train):
    data = ImageTensors(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50), (0.0,), (1.0,), padding=1,
                        flip=True)
    for rank in range(world_size):
        generators = [torch.Generator().manual_seed(11) for _ in range(2)]
        reference = build_loader(_Indexed(), 8, train=train, generator=generators[0], world=(rank, world_size))
        ours = DeviceLoader(data, 8, train=train, generator=generators[1], world=(rank, world_size),
                            augment_generator=torch.Generator().manual_seed(0))
        assert len(ours) == len(reference)
        for _ in range(3):  # epochs: each draws from the generator as the DataLoader's iterator does
            expected = [labels.tolist() for _, labels in reference]
            assert [labels.tolist() for _, labels in ours] == expected
            assert torch.equal(generators[0].get_state(), generators[1].get_state())
        assert (len(expected[0]), len(expected)) == (8 // world_size, 6 if train else 7)


def test_the_dataloaders_order_does_not_depend_on_its_workers():
    """The DataLoader's workers start anew every epoch, drawing their base seed from the generator as ``workers == 0``
    does, so its batches are those of ``workers == 0`` and of the device, every epoch (and after a resume)."""
    data = ImageTensors(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50), (0.0,), (1.0,))
    orders = []
    for workers in (0, 2, "device"):
        generator = torch.Generator().manual_seed(3)
        loader = DeviceLoader(data, 8, train=True, generator=generator, world=(0, 1)) if workers == "device" else \
            build_loader(_Indexed(), 8, train=True, workers=workers, generator=generator, world=(0, 1))
        orders.append([[labels.tolist() for _, labels in loader] for _ in range(3)])
    assert orders[0] == orders[1] == orders[2]
    assert orders[0][0] != orders[0][1]


def _mnist_config(root) -> dict:
    make_mnist(root, train_size=40, test_size=12)
    return {"data.dataset": "mnist", "data.root": str(root), "model.name": "mlp", "data.batch_size": 16}


def _cifar_config(root) -> dict:
    make_cifar(root, "cifar10", per_batch=8, test_size=12)
    return {"data.dataset": "cifar10", "data.root": str(root), "data.batch_size": 16}


@pytest.mark.parametrize("dataset", ["shapes", "cifar10", "mnist"])
@pytest.mark.parametrize("augment", [False, True])
def test_a_run_on_the_device_takes_the_dataloaders_batches(dataset, augment, tmp_path):
    """Through ``prepare``: the same examples in the same order, train (two epochs) and validation; without
    augmentation the same images too, to float rounding."""
    overrides = {"shapes": {}, "cifar10": _cifar_config(tmp_path), "mnist": _mnist_config(tmp_path)}[dataset]
    batches = {}
    for on_device in (False, True):
        cfg = load_config(with_overrides(TINY_RUN, **overrides, **{"data.augment": augment,
                                                                   "data.on_device": on_device}))
        run = prepare(cfg)
        assert isinstance(run.train_loader, DeviceLoader) == on_device
        if on_device:  # its crops and flips: a stream of their own, seeded from the run's seed (each rank's own)
            fresh = torch.Generator().manual_seed(device_data.augment_seed(cfg.seed, 0))
            assert torch.equal(run.state.augment_generator.get_state(), fresh.get_state())
            assert len({cfg.seed, cfg.seed + 1, *(device_data.augment_seed(cfg.seed, r) for r in range(4))}) == 6
        batches[on_device] = [list(run.train_loader) for _ in range(2)] + [list(run.val_loader)]
    loader_path, device_path = batches[False], batches[True]
    for epoch, (expected, got) in enumerate(zip(loader_path, device_path)):
        assert len(expected) == len(got) > 0
        for (x, y), (x_device, y_device) in zip(expected, got):
            assert torch.equal(y, y_device)
            assert x.shape == x_device.shape and x_device.is_contiguous(memory_format=torch.channels_last)
            if not augment or epoch == 2 or dataset == "mnist":  # validation and MNIST: never augmented
                torch.testing.assert_close(x_device, x, rtol=1e-6, atol=1e-6)
            else:
                assert not torch.allclose(x_device, x)


def test_the_training_set_on_the_device_is_what_the_dataset_holds(tmp_path):
    make_cifar(tmp_path, "cifar10", per_batch=2, test_size=3)
    train, val, _, _ = build_datasets(DataConfig(dataset="cifar10", root=str(tmp_path), augment=False))
    data = image_tensors("cifar10", train, augment=True)
    assert (data.padding, data.flip, data.pad_normalized, len(data)) == (4, True, False, 10)
    for index in (0, 7):
        image, label = train[index]
        torch.testing.assert_close(normalize_batch(data.images[index:index + 1], torch.tensor(data.mean),
                                                   torch.tensor(data.std))[0], image, rtol=1e-6, atol=1e-6)
        assert int(data.labels[index]) == label
    shapes_train, _, _, _ = build_datasets(DataConfig(dataset="shapes", train_size=20, val_size=10, image_size=16))
    shapes = image_tensors("shapes", shapes_train, augment=True)
    assert (shapes.padding, shapes.flip, shapes.pad_normalized) == (2, True, True)  # crop_flip(16, padding=16 // 8)
    assert not image_tensors("cifar10", val, augment=False).augments
    assert data.to("cpu") is data and data.images.is_contiguous()  # torchvision's CIFAR holds (C, H, W) planes
    moved = data.to("cpu", torch.channels_last)  # laid out before it moves: one copy on the device
    assert moved.images.is_contiguous(memory_format=torch.channels_last) and torch.equal(moved.images, data.images)


# ---------------------------------------------------------------------------------------------------------------------
# Runs: resume, refusals, the command line


@pytest.mark.parametrize("static", [False, True])
def test_a_resumed_run_on_the_device_equals_an_uninterrupted_one(tmp_path, monkeypatch, static):
    """Eager steps, and the static-shape steps (run eagerly) that a CUDA device takes, which copy each batch into
    their own inputs."""
    if static:
        monkeypatch.setattr(setup, "resolve_cuda_graphs", lambda cfg, device, model=None: GraphsChoice(True, False))
    config = with_overrides(TINY_RUN, **ON_DEVICE, **{"optim.epochs": 3, "save_every": 1, "finetune.epochs": 1})
    maskprop.fit(config, out=tmp_path / "straight")
    _stopped_in_the_second_epoch(config, tmp_path / "stopped", monkeypatch)
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert stopped["epoch"] == 1 and "augment" in stopped["rng"]
    maskprop.fit(config, out=tmp_path / "stopped", resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    _assert_same_state(a, b)
    assert torch.equal(a["rng"]["augment"], b["rng"]["augment"])
    assert not torch.equal(a["rng"]["augment"], stopped["rng"]["augment"])  # it drew since


def test_resuming_a_run_from_before_the_setting_warns_only_where_it_moves_the_data(caplog):
    """A checkpoint's config without ``data.on_device`` (written before it existed) holds no setting the user changed;
    a run resumed from it on the device (``auto`` on CUDA, or ``true``) says that its crops and flips start anew."""
    from maskprop.train.config import config_to_dict
    from maskprop.train.setup import _warn_changed

    saved = config_to_dict(load_config(TINY_RUN))
    del saved["data"]["on_device"]
    with caplog.at_level(logging.WARNING):
        _warn_changed(saved, config_to_dict(load_config(TINY_RUN)))
        assert caplog.records == []
        _warn_changed(saved, config_to_dict(load_config(TINY_RUN, ["data.on_device=true"])))
    assert [r.getMessage() for r in caplog.records] == [
        "resuming with settings changed since the checkpoint (schedules keep their saved lengths): data.on_device: "
        "None -> True"]
    run = prepare(load_config(TINY_RUN, ["data.on_device=true"]))
    checkpoint = prepare(load_config(TINY_RUN)).state.checkpoint(run.cfg, run.groups)
    assert "augment" not in checkpoint["rng"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run.state.load(checkpoint)
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint holds no augmentation generator (its run took its batches from the DataLoader, "
        "data.on_device off): the crops and flips on the device are drawn anew from here on"]


def test_a_run_resumed_on_another_kind_of_device_draws_its_crops_and_flips_anew(caplog):
    """A CUDA generator's state (Philox, 16 bytes) does not fit a CPU generator, nor the CPU's a CUDA one: a run
    whose data was on one kind of device, resumed with its data on the other, continues with a warning (as the CUDA
    RNGs of another machine are left alone) rather than refusing the whole checkpoint."""
    run = prepare(load_config(TINY_RUN, ["data.on_device=true"]))
    checkpoint = run.state.checkpoint(run.cfg, run.groups)
    assert checkpoint["rng"]["augment_device"] == "cpu"
    before = run.state.augment_generator.get_state()
    checkpoint["rng"]["augment"], checkpoint["rng"]["augment_device"] = torch.zeros(16, dtype=torch.uint8), "cuda"
    with caplog.at_level(logging.WARNING):
        run.state.load(checkpoint)
    assert [r.getMessage() for r in caplog.records] == [
        "the checkpoint's crops and flips on the device were drawn on cuda, this run's are on cpu: they are drawn "
        "anew from here on"]
    assert torch.equal(run.state.augment_generator.get_state(), before)


def test_on_device_true_is_refused_where_the_data_cannot_be_there(tmp_path, monkeypatch, caplog):
    with pytest.raises(ValueError, match=r"^data.on_device=true needs an in-memory dataset; got 'imagenet' "
                                         r"\(expected one of shapes, mnist, fashion_mnist, cifar10, cifar100, or "
                                         r"data.on_device=auto or false\)$"):
        load_config({"data": {"dataset": "imagenet", "on_device": True}})
    assert load_config({"data": {"dataset": "imagenet"}}).data.on_device == "auto"
    with pytest.raises(ValueError, match=r"^data.on_device=2 is not a valid choice; expected 'auto', true or false$"):
        load_config({"data": {"on_device": 2}})
    train, val = maskprop.train.data.shapes_datasets(64, 32, image_size=16)
    with pytest.raises(ValueError, match=r"^data.on_device=true needs an in-memory dataset that config.data names; "
                                         r"got datasets given to fit; expected fit\(config\) without train_set and "
                                         r"val_set, or data.on_device=false$"):
        maskprop.fit(with_overrides(TINY_RUN, **ON_DEVICE), train, val)
    monkeypatch.setattr(device_data, "_available_bytes", lambda device: 100_000)
    with pytest.raises(ValueError, match=r"^data.on_device=true does not fit: the shapes images and labels take 0.1 "
                                         r"MiB, more than 50% of the 0.1 MiB free on cpu; expected "
                                         r"data.on_device=false \(the DataLoader\) or a device with more free "
                                         r"memory$"):
        maskprop.fit(with_overrides(TINY_RUN, **ON_DEVICE))
    # auto on a CUDA device falls back to the DataLoader with one line (the device is not touched when it does)
    cuda = torch.device("cuda", 0)
    for dataset, level, words in (("shapes", logging.WARNING, "does not fit"),
                                  ("imagenet", logging.INFO, "needs an in-memory dataset; got 'imagenet'")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="maskprop.train.device_data"):
            assert data_on_device(DataConfig(dataset=dataset), cuda, train, val) is None
        assert [(r.levelno, words in r.getMessage()) for r in caplog.records] == [(level, True)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskprop.train.device_data"):  # the CPU: auto is off, silently
        assert data_on_device(DataConfig(), torch.device("cpu"), train, val) is None
        assert data_on_device(DataConfig(), cuda, train, val, given=True) is None
    assert len(caplog.records) == 1 and "got datasets given to fit" in caplog.records[0].getMessage()


def test_maskprop_train_with_the_data_on_the_device(tmp_path, caplog):
    """A CIFAR stand-in in its on-disk format, trained by the command line with ``data.on_device=true`` on the CPU."""
    make_cifar(tmp_path, "cifar10", per_batch=8, test_size=12)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(with_overrides(TINY_RUN, **{
        "data.dataset": "cifar10", "data.root": str(tmp_path), "data.batch_size": 16, "optim.epochs": 1,
        "finetune.epochs": 1, "sparsity.fix_samples": 2})))
    with caplog.at_level(logging.INFO, logger="maskprop.train.device_data"), \
            contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(recipe), "data.on_device=true", "--out", str(tmp_path / "run"),
                     "--threads", "1"]) == 0
    assert any(r.getMessage().startswith("data on cpu: 40 training and 12 validation images") for r in caplog.records)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["on_device"] is True
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["phase"] == "done" and "augment" in checkpoint["rng"]


def test_the_data_benchmark_compares_the_dataloader_with_the_device(capsys):
    bench = load_tool("bench_data")
    assert bench.main(["--cifar", "--workers", "0", "--images", "300", "--batch-size", "32", "--batches", "2",
                       "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["| path | images/s | ms per batch | on-device / this (paired) |", "|---|---:|---:|---:|"]
    assert [line.split(" | ")[0] for line in lines[3:]] == ["| DataLoader, workers 0", "| on the device (cpu)"]
    assert lines[-1].endswith("| 1.00x |")
