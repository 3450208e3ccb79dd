"""Setting a run up: resuming a run killed before its first checkpoint, readable checkpoint errors, the config key
``sparsity.prune_residual`` reaching the model, and the number of classes of a user's ``TensorDataset``."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, with_overrides
from torch.utils.data import Subset, TensorDataset

import maskprop
from maskprop.cli import main
from maskprop.train import loop
from maskprop.train.checkpoint import error_reason, load_checkpoint
from maskprop.train.config import config_to_dict, load_config, save_config
from maskprop.train.distributed import Distributed
from maskprop.train.setup import _num_classes, _warn_changed, phase_optimizer, prepare

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs (conftest.py)

TINY = with_overrides(TINY_RUN, **{"data.train_size": 64, "data.val_size": 32, "data.batch_size": 32,
                                   "sparsity.fix_samples": 2, "sparsity.fix_examples": 32, "optim.epochs": 1,
                                   **{"log_every": 1}})
STREAMS = {"layer1", "layer2", "layer3"}


def tiny(**sections) -> dict:
    config = copy.deepcopy(TINY)
    for section, values in sections.items():
        config.setdefault(section, {}).update(values) if isinstance(values, dict) else config.update({section: values})
    return config


# ---------------------------------------------------------------------------------------------------------------------
# A run killed before its first checkpoint


def _killed_before_first_checkpoint(run: Path, monkeypatch) -> None:
    """Run ``TINY`` into ``run`` and stop it where it would write its first checkpoint, as a kill there would."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_checkpoint", killed)
        with pytest.raises(KeyboardInterrupt):
            maskprop.fit(TINY, out=run)
    assert (run / "config.yaml").is_file() and not (run / "last.pt").exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run, monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--resume", str(run)]) == 0
    assert "has no checkpoint yet" in caplog.text and "starting the run over" in caplog.text

    maskprop.fit(TINY, out=tmp_path / "straight")
    resumed, straight = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert (resumed["phase"], resumed["step"]) == (straight["phase"], straight["step"]) == ("done", 4)
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert resumed["final_accuracy"] == straight["final_accuracy"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # search 1, finetune 1: nothing left over from the killed attempt


def test_resume_before_the_first_checkpoint_from_python_too(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run, monkeypatch)
    summary = maskprop.fit(load_config(run / "config.yaml"), out=run, resume=True)
    assert summary["steps"]["search"] == 2 and (run / "last.pt").is_file()


def test_resume_of_a_directory_with_neither_checkpoint_nor_config_is_refused(tmp_path):
    save_config(load_config(TINY), tmp_path / "elsewhere.yaml")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no checkpoint .* and no config\.yaml; nothing to resume: start "
                                                r"a run with 'maskprop train RECIPE --out "):
        maskprop.fit(TINY, out=tmp_path / "run", resume=True)
    assert list((tmp_path / "run").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint errors end cleanly


@pytest.mark.parametrize("error, reason", [
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
                  "internal miniz error. If you are seeing this error, there is a high likelihood that your "
                  "checkpoint file is corrupted."),
     "PytorchStreamReader failed reading zip archive: failed finding central directory"),
    (RuntimeError("Weights only load failed. This file can still be loaded, to do so you have two options, "
                  "\x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m. \n\t(1) Re-run.\n\t"
                  "WeightsUnpickler error: Unsupported global: GLOBAL __main__.Foo was not an allowed global by "
                  "default. Please use `torch.serialization.add_safe_globals([__main__.Foo])`.\n\nCheck the docs."),
     "Unsupported global: GLOBAL __main__.Foo was not an allowed global by default"),
    (RuntimeError("WeightsUnpickler error: \n\nUnsupported operand 103\n\nCheck the documentation of torch.load"),
     "Unsupported operand 103"),
    (EOFError(), "EOFError"),
    (ValueError("one " * 60), "one " * 39 + "one ..."),
    (ValueError("x" * 200), "x" * 160 + " ..."),
    (ValueError("y" * 160), "y" * 160),  # exactly the limit: whole
    (ValueError("a" * 150 + " " + "b" * 9 + " c"), "a" * 150 + " " + "b" * 9 + " ..."),  # a word ending at the limit
])
def test_error_reason_keeps_the_first_sentence_and_whole_words(error, reason):
    assert error_reason(error) == reason


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch reading the garbage's first bytes
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_checkpoint_message_ends_cleanly(tmp_path, damage):
    path = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x04not a checkpoint" * 40,
                      "empty": b""}[damage])
    with pytest.raises(ValueError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    match = re.fullmatch(rf"checkpoint '{re.escape(str(path))}' is corrupt or truncated \((.+)\); expected a "
                         r"complete checkpoint written by maskprop train", message)
    assert match, message
    reason = match.group(1)
    assert "\n" not in message and "\x1b" not in message and len(reason) <= 164
    assert not re.search(r"[.!?]\s", reason) and not reason.endswith("."), reason  # one sentence, not a cut paragraph


# ---------------------------------------------------------------------------------------------------------------------
# sparsity.prune_residual reaches the model


def test_prune_residual_false_keeps_every_stream_group_full_in_a_run():
    summary = maskprop.fit(tiny(sparsity={"prune_residual": False}, finetune={"epochs": 0}))
    expected = maskprop.create_model("resnet20", prune_residual=False).channel_groups()
    assert not STREAMS & set(expected)
    assert summary["group_sizes"] == expected and set(summary["widths"]) == set(expected)


def test_prune_residual_default_prunes_the_streams():
    summary = maskprop.fit(tiny(finetune={"epochs": 0}))
    assert STREAMS <= set(summary["group_sizes"])


def test_prune_residual_false_on_a_model_without_streams_warns_and_runs(caplog):
    config = tiny(model={"name": "mlp", "kwargs": {"hidden": [16, 16]}}, sparsity={"prune_residual": False},
                  finetune={"epochs": 0})
    with caplog.at_level(logging.WARNING):
        summary = maskprop.fit(config)
    assert "has no residual streams; prune_residual=false changes nothing" in caplog.text
    assert summary["group_sizes"] == maskprop.create_model("mlp", hidden=[16, 16]).channel_groups()


# ---------------------------------------------------------------------------------------------------------------------
# The number of classes of a user's dataset


def _tensor_set(n: int, classes: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=generator), labels[torch.randperm(n, generator=generator)])


def test_num_classes_of_a_tensor_dataset_comes_from_its_labels():
    assert _num_classes(_tensor_set(40, 5, 0)) == 5
    assert _num_classes(Subset(_tensor_set(40, 5, 0), [0, 1, 2])) == int(_tensor_set(40, 5, 0).tensors[1][:3].max()) + 1


def test_fit_on_tensor_datasets_needs_no_num_classes():
    config = tiny(data={"batch_size": 20}, finetune={"epochs": 0})
    summary = maskprop.fit(config, train_set=_tensor_set(40, 7, 0), val_set=_tensor_set(20, 7, 1))
    assert summary["dense_flops"] == maskprop.flops(maskprop.create_model("resnet20", num_classes=7), (3, 8, 8))


@pytest.mark.parametrize("method", ["vrpge", "dense"])
def test_fit_hands_over_the_trained_network_without_a_run_directory(method, tmp_path, monkeypatch):
    """``fit(out=None)`` writes nothing, and returns the trained network with the summary: its narrow model has the
    subnetwork's parameters and computes the accuracy the summary reports on the validation set, and it exports as a
    run directory does (the files checked against it)."""
    monkeypatch.chdir(tmp_path)
    config = tiny(method=method, data={"batch_size": 20})
    val = _tensor_set(20, 7, 1)
    result = maskprop.fit(config, train_set=_tensor_set(40, 7, 0), val_set=val)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(result, dict) and result["method"] == method and not result.model.training
    assert (result.mask is None) == (method == "dense") and result.spec.name == "resnet20"
    narrow = result.narrow()
    assert sum(p.numel() for p in narrow.parameters()) == result["subnet_params"]
    with torch.no_grad():
        predicted = narrow(val.tensors[0]).argmax(1)
    assert 100.0 * (predicted == val.tensors[1]).double().mean().item() == pytest.approx(result["accuracy"])
    info = result.export(tmp_path / "export", formats="safetensors")
    assert info["accuracy"] == result["accuracy"] and info["params"] == result["subnet_params"]
    with torch.no_grad():
        torch.testing.assert_close(maskprop.load_exported(tmp_path / "export")(val.tensors[0]), narrow(val.tensors[0]))


def test_labels_of_a_narrower_integer_type_train_as_int64_ones(tmp_path):
    """A dataset holding its labels as int32 (or uint8) trains as with int64 labels (the loss takes int64: the batches
    are converted on their way to the device), to the same weights."""
    config = tiny(data={"batch_size": 20}, finetune={"epochs": 0})
    results = []
    for dtype in (torch.int64, torch.int32, torch.uint8):
        train, val = _tensor_set(40, 7, 0), _tensor_set(20, 7, 1)
        train, val = (TensorDataset(d.tensors[0], d.tensors[1].to(dtype)) for d in (train, val))
        results.append(maskprop.fit(config, train_set=train, val_set=val))
    for result in results[1:]:
        assert result["accuracy"] == results[0]["accuracy"]
        for (name, a), b in zip(result.model.state_dict().items(), results[0].model.state_dict().values()):
            assert torch.equal(a, b), name


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, label) -> None:
        self.label = label

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.zeros(3, 8, 8), self.label


@pytest.mark.parametrize("label,what", [(0.5, "float 0.5"), ("cat", "str 'cat'"),
                                        (torch.tensor(1.0), "a torch.float32 tensor of shape ()"),
                                        (torch.tensor([0, 1]), "a torch.int64 tensor of shape (2,)")])
def test_a_label_that_is_not_a_class_index_is_a_one_line_error(label, what, tmp_path):
    config = tiny(model={"name": "resnet20", "kwargs": {"num_classes": 3}})
    with pytest.raises(ValueError, match=rf"^train_set\[0\]'s label is {re.escape(what)}; expected a class index"):
        maskprop.fit(config, train_set=_Pairs(label), val_set=_Pairs(0), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _Unlabelled(torch.utils.data.Dataset):
    """Examples whose labels cannot be read up front (no ``targets``), the last ones out of range."""

    def __init__(self, n: int, bad_from: int) -> None:
        self.n, self.bad_from = n, bad_from

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return torch.zeros(3, 8, 8), 7 if index >= self.bad_from else index % 3


@pytest.mark.parametrize("method", ["vrpge", "dense"])
def test_a_label_out_of_range_met_in_a_batch_is_a_one_line_error(method):
    """Labels a dataset cannot show up front are checked in each batch on the host before they reach the loss (on a
    GPU a label out of range is a device-side assert that ends the process's CUDA context): one line naming the range
    found, in the training and in the validation data."""
    config = tiny(method=method, model={"name": "resnet20", "kwargs": {"num_classes": 3}},
                  data={"batch_size": 4})
    message = r"^a batch has labels from [0-2] to 7, the model 3 classes; expected labels in \[0, 2\] \(or set"
    with pytest.raises(ValueError, match=message):
        maskprop.fit(config, train_set=_Unlabelled(16, 14), val_set=_Unlabelled(8, 8))
    with pytest.raises(ValueError, match=message):
        maskprop.fit(config, train_set=_Unlabelled(16, 16), val_set=_Unlabelled(8, 6))


def test_under_torchrun_only_the_main_rank_writes_the_export(tmp_path, monkeypatch):
    """Every rank holds the same network after ``fit``; ``.export`` writes it from rank 0 alone (ranks writing one
    directory at once would race), and returns ``None`` on the others."""
    result = maskprop.fit(tiny(finetune={"epochs": 0}))
    monkeypatch.setattr(loop, "current", lambda: Distributed(rank=1, world_size=2))
    assert result.export(tmp_path / "export", formats="safetensors") is None and not (tmp_path / "export").exists()
    monkeypatch.setattr(loop, "current", lambda: Distributed(rank=0, world_size=2))
    assert result.export(tmp_path / "export", formats="safetensors")["params"] == result["subnet_params"]


def test_resuming_a_finished_run_returns_its_record_unchanged(tmp_path, caplog):
    """``fit(..., resume=True)`` on a run that has finished trains nothing and rewrites nothing: a changed setting is
    reported, and ``config.yaml`` and ``summary.json`` stay as the run wrote them; the result is the saved summary with
    the final network."""
    config = tiny(finetune={"epochs": 0})
    first = maskprop.fit(config, out=tmp_path / "run")
    files = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.yaml", "summary.json", "last.pt")}
    changed = tiny(finetune={"epochs": 0}, sparsity={"keep_ratio": 0.25})
    with caplog.at_level(logging.INFO):
        again = maskprop.fit(changed, out=tmp_path / "run", resume=True)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in files} == files
    assert again == first and again["keep_ratio"] == 0.5
    assert "sparsity.keep_ratio: 0.5 -> 0.25" in caplog.text and "has finished: nothing to train" in caplog.text
    for (name, a), b in zip(again.model.state_dict().items(), first.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_finished_run_whose_search_trained_adam_resumes_with_its_finetune_sgd(tmp_path):
    """A resumed VR-PGE run past its search (finetuning, or done) gets the finetune SGD, the optimizer its checkpoint
    saved, also where the search trained Adam: its SGD state would not load into the search's Adam."""
    config = tiny(optim={"optimizer": "adam", "lr": 1e-3}, finetune={"lr": 0.03, "momentum": 0.7})
    first = maskprop.fit(config, out=tmp_path / "run")
    run = prepare(load_config(config), run_dir=tmp_path / "run", resume=True)
    group = run.state.weight_optimizer.param_groups[0]
    assert run.state.phase == "done" and type(run.state.weight_optimizer).__name__ == "SGD"
    assert group["momentum"] == 0.7 and group["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine's end
    assert maskprop.fit(config, out=tmp_path / "run", resume=True) == first


def test_a_resume_warns_of_each_changed_setting_but_the_free_ones(caplog):
    """The settings that change what a resumed run computes are named in one warning, each with its saved and its new
    value; those that do not (where the data lies, loader workers, device, logging and saving intervals, out) are
    left out."""
    saved = config_to_dict(load_config(tiny()))
    free = ["data.root=/elsewhere", "data.workers=2", "device=cpu", "log_every=7", "eval_every=3", "save_every=5",
            "out=runs/b"]
    with caplog.at_level(logging.WARNING, logger="maskprop.train.setup"):
        _warn_changed(saved, config_to_dict(load_config(tiny(), free)))
        assert caplog.records == []
        _warn_changed(saved, config_to_dict(load_config(tiny(), [*free, "optim.lr=0.05", "seed=4"])))
    assert [r.getMessage() for r in caplog.records] == [
        "resuming with settings changed since the checkpoint (schedules keep their saved lengths): optim.lr: 0.1 -> "
        "0.05; seed: 0 -> 4"]


@pytest.mark.parametrize("config", [None, 3, ["model.name=resnet20"]])
def test_fit_without_a_config_is_a_one_line_type_error(config):
    with pytest.raises(TypeError, match=r"^config is \w+; expected a Config, a mapping or a yaml path"):
        maskprop.fit(config)


def test_tensor_dataset_with_float_labels_is_a_one_line_error():
    images = torch.randn(8, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^the labels of TensorDataset are not class indices \(a torch.float32 "
                                         r"tensor of shape \(8,\), .*expected one integer >= 0 per example$"):
        _num_classes(TensorDataset(images, torch.rand(8)))


def test_tensor_dataset_with_negative_labels_is_a_one_line_error():
    images = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"^the labels of TensorDataset are not class indices \(a torch.int64 "
                                         r"tensor of shape \(4,\), smallest -1\); expected one integer >= 0"):
        _num_classes(TensorDataset(images, torch.tensor([0, -1, 2, 1])))


def test_settings_are_checked_before_the_data_is_read(tmp_path):
    """A device that is not there or an unknown model is said before the dataset is looked at (an ImageNet folder
    scan takes minutes): the error is the setting's, not the data's."""
    missing = {"dataset": "imagenet", "root": str(tmp_path / "nowhere")}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device='cuda' but CUDA is not available"):
            maskprop.fit(tiny(device="cuda", data=missing))
    with pytest.raises(ValueError, match="^model.name='resnet33' is not a registered model"):
        maskprop.fit(tiny(model={"name": "resnet33"}, data=missing))
    with pytest.raises(FileNotFoundError, match="imagenet root directory .* does not exist"):
        maskprop.fit(tiny(data=missing))


def test_a_relative_data_root_is_saved_absolute(tmp_path, monkeypatch):
    """config.yaml keeps data.root absolute, so that ``--resume`` from another directory (or a torchrun node started
    elsewhere) finds the data."""
    from test_data import make_cifar

    make_cifar(tmp_path / "data", "cifar10", per_batch=4)
    monkeypatch.chdir(tmp_path)
    config = tiny(method="dense", data={"dataset": "cifar10", "root": "data", "batch_size": 4}, finetune={"epochs": 0})
    maskprop.fit(config, out=tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.root == str(tmp_path / "data")


def test_a_dataset_of_one_class_is_warned_of(caplog):
    """One class (an ImageFolder of one folder, a stand-in): every prediction is right and the run reports 100%."""
    one = TensorDataset(torch.randn(40, 3, 8, 8), torch.zeros(40, dtype=torch.long))
    with caplog.at_level(logging.WARNING):
        summary = maskprop.fit(tiny(data={"batch_size": 20}, finetune={"epochs": 0}), train_set=one, val_set=one)
    assert "the data has 1 class: every prediction is right" in caplog.text and summary["accuracy"] == 100.0


def test_sync_bn_in_one_process_is_warned_of(caplog):
    """sync_bn=true synchronises nothing without torchrun's ranks: the run says so rather than ignoring it quietly."""
    with caplog.at_level(logging.WARNING):
        prepare(load_config(tiny(device="cpu", sync_bn=True)))
    assert "sync_bn=true synchronises BatchNorm statistics between torchrun's processes; this run is one" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare(load_config(tiny(device="cpu")))
    assert "sync_bn" not in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# Each setting reaches the object that uses it


def test_prepare_hands_each_setting_to_the_object_that_uses_it():
    """Label smoothing reaches the loss, clip_grad_norm and the CPU's align (null: 1) the step context, score_lr the
    scores' Adam, the seed the generators (masks: seed + 1); validation reads every example once, in order."""
    cfg = load_config(tiny(seed=3, device="cpu", data={"val_size": 40}, sparsity={"score_lr": 0.05},
                           optim={"label_smoothing": 0.1, "clip_grad_norm": 2.0}))
    run = prepare(cfg)
    assert run.ctx.criterion.label_smoothing == 0.1 and run.ctx.clip_grad_norm == 2.0 and run.ctx.align == 1
    assert run.state.score_optimizer.param_groups[0]["lr"] == 0.05
    assert (run.state.mask_generator.initial_seed(), run.state.loader_generator.initial_seed()) == (4, 3)
    labels = torch.cat([y for _, y in run.val_loader])
    assert torch.equal(labels, torch.as_tensor(run.val_loader.dataset.targets))  # 40 of 40, unshuffled
    assert [len(y) for _, y in run.train_loader] == [32, 32]
    assert load_config(tiny(sparsity={"align": 4})).sparsity.align == 4 and prepare(
        load_config(tiny(device="cpu", sparsity={"align": 4}))).ctx.align == 4


def test_phase_optimizer_follows_each_phases_recipe():
    """The search runs SGD at optim's settings with a linear warm-up of optim.warmup_epochs then a cosine to 0 at
    optim.epochs; the finetune SGD at finetune's settings (nesterov: optim's) with its own cosine; closed forms."""
    cfg = load_config(None, ["optim.lr=0.2", "optim.momentum=0.8", "optim.weight_decay=1e-4", "optim.nesterov=true",
                             "optim.epochs=4", "optim.warmup_epochs=1", "finetune.lr=0.03", "finetune.momentum=0.7",
                             "finetune.weight_decay=2e-4", "finetune.epochs=2"])
    model, steps = torch.nn.Linear(3, 2), 5

    def lrs(phase: str, config=cfg) -> tuple[dict, list[float]]:
        optimizer, schedule = phase_optimizer(config, model, phase, steps)
        group = {k: optimizer.param_groups[0].get(k) for k in ("momentum", "weight_decay", "nesterov")}
        seen = []
        for t in range(21):
            schedule.step_update(t)
            seen.append(optimizer.param_groups[0]["lr"])
        return {"type": type(optimizer).__name__, **group}, seen

    group, seen = lrs("search")
    assert group == {"type": "SGD", "momentum": 0.8, "weight_decay": 1e-4, "nesterov": True}
    expected = [0.2 * t / 5 if t < 5 else 0.5 * 0.2 * (1 + math.cos(math.pi * t / 20)) for t in range(21)]
    assert seen == pytest.approx(expected, abs=1e-12)
    group, seen = lrs("finetune")
    assert group == {"type": "SGD", "momentum": 0.7, "weight_decay": 2e-4, "nesterov": True}
    expected = [0.5 * 0.03 * (1 + math.cos(math.pi * min(t, 10) / 10)) for t in range(21)]
    assert seen == pytest.approx(expected, abs=1e-12)
    constant = load_config(cfg, ["optim.schedule=constant", "optim.warmup_epochs=0"])
    assert lrs("search", constant)[1] == pytest.approx([0.2] * 21)
    group, seen = lrs("train", load_config(None, ["method=msbp", "optim.epochs=4"]))
    assert group["type"] == "Adam" and seen == pytest.approx(
        [0.5 * 1e-3 * (1 + math.cos(math.pi * t / 20)) for t in range(21)], abs=1e-15)


@pytest.mark.parametrize("name,keyword", [("timm:vit_tiny_patch16_224", "img_size"),
                                          ("torchvision:vit_b_16", "image_size")])
def test_a_vision_transformer_of_another_image_size_names_the_keyword_that_sets_it(name, keyword, tmp_path):
    """A converted model whose check fails on the run's images (a transformer built for 224 x 224 reading 16 x 16)
    says which keyword sets its image size; with the check off, the cost model says the same in one line."""
    config = with_overrides(TINY_RUN, **{"model.name": name})
    with pytest.raises(ValueError, match=rf"^model {name} of {name.split(':')[0]}: check 'dense' failed: .*; a model "
                                         rf"built for one image size takes model.kwargs.{keyword}=16 \(model.check"):
        maskprop.fit(config, out=tmp_path / "checked")
    with pytest.raises(ValueError, match=rf"^model '{name}' does not take shapes inputs of size \(3, 16, 16\)"):
        maskprop.fit(with_overrides(config, **{"model.check": False}), out=tmp_path / "unchecked")


@pytest.mark.parametrize("value", ["abc", 2.7, True, 0])
def test_a_number_of_classes_that_is_no_count_is_one_line_naming_it(value, tmp_path):
    """``model.kwargs.num_classes=abc`` was refused with Python's "invalid literal for int() with base 10: 'abc'",
    and 2.7 became 2 classes without a word; now each is one line naming the key, the value and what is expected."""
    config = tiny(method="dense", model={"name": "resnet20", "kwargs": {"num_classes": value}})
    with pytest.raises(ValueError, match=rf"^model.kwargs.num_classes={re.escape(repr(value))} is not a number of "
                                         rf"classes; expected an integer >= 1 \(at least the data's\), or leave it "
                                         rf"unset \(the data's count\)$"):
        maskprop.fit(config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, kwargs, expected", [
    ("resnet20", {"widht": 2}, "did you mean model.kwargs.width?"),
    ("wrn16_8", {"droprate": 0.1}, "did you mean model.kwargs.drop_rate?"),
    ("resnet20", {"depht": 2}, "expected a keyword that maskprop.models.resnet.ResNet takes"),
    ("timm:vit_tiny_patch16_224", {"img_sz": 16}, "did you mean model.kwargs.img_size?"),
    ("torchvision:vit_b_16", {"img_size": 16}, "did you mean model.kwargs.image_size?"),  # not timm's class
])
def test_a_misspelt_model_keyword_names_the_one_meant(name, kwargs, expected, tmp_path):
    """A keyword the model does not take listed every keyword passed (the run's own num_classes and prune_residual
    too) and Python's TypeError; now the line names the key and the closest one the model takes."""
    if ":" in name:
        pytest.importorskip(name.split(":")[0])
    key = next(iter(kwargs))
    config = tiny(method="dense", model={"name": name, "kwargs": kwargs})
    with pytest.raises(ValueError) as error:
        maskprop.fit(config, out=tmp_path / "run")
    assert str(error.value) == (f"model.kwargs={kwargs} do not fit model {name!r} (it takes no keyword {key!r}; "
                                f"{expected})")
    assert not (tmp_path / "run").exists()


def test_torchvisions_maxvit_of_another_image_size_names_its_own_keyword(tmp_path):
    """torchvision's MaxViT is built for one size by ``input_size`` (``[H, W]``), not ``image_size``: the hint named
    ``model.kwargs.image_size=16``, a keyword it does not take."""
    config = with_overrides(TINY_RUN, **{"model.name": "torchvision:maxvit_t"})
    with pytest.raises(ValueError, match=r"^model torchvision:maxvit_t of torchvision: check 'dense' failed: .*; a "
                                         r"model built for one image size takes model.kwargs.input_size=\[16,16\] "
                                         r"\(model.check=false skips this check\)$"):
        maskprop.fit(config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fewer_classes_than_the_named_dataset_has_are_refused_before_anything_is_written(tmp_path, capsys):
    """``model.kwargs.num_classes`` below the classes of the dataset the config names (here ``shapes``' 10) started
    the run, wrote its directory and failed at the first batch, so that a rerun with the same output directory was
    refused as another run's. Now one line before anything is written; as many classes or more still train."""
    config = tiny(method="dense", model={"name": "resnet20", "kwargs": {"num_classes": 5}})
    with pytest.raises(ValueError, match=r"^model.kwargs.num_classes=5 is below the 10 classes of "
                                         r"data.dataset='shapes' \(labels 0 to 9\); expected at least 10, or leave it "
                                         r"unset \(the data's count\)$"):
        maskprop.fit(config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    assert main(["train", "--out", str(tmp_path / "cli"), str(recipe), "model.kwargs.num_classes=9"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "maskprop train: error: model.kwargs.num_classes=9 is below the 10 classes")
    assert not (tmp_path / "cli").exists()
