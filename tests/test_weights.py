"""``model.weights``: a run starts from a state-dict file (torchvision's, timm's, a checkpoint's, a DDP save), a
classifier of another shape keeps its initialisation, and anything else that does not fit is one line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re

import pytest
import safetensors.torch
import timm
import torch
import torchvision
import yaml
from conftest import TINY_RUN, with_overrides

import maskprop
from maskprop.cli import main
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.config import load_config
from maskprop.train.setup import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET18 = with_overrides(TINY_RUN, **{"model.name": "resnet18", "optim.epochs": 1})


def prepared(config: dict, **overrides):
    """``prepare`` of ``config`` with dotted-key overrides: the built run, nothing written."""
    return prepare(load_config(with_overrides(config, **overrides)))


def assert_holds(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key not in skip:
            assert torch.equal(own[key], value), key


@pytest.mark.parametrize("source", ["torchvision .pth", "timm .safetensors"])
def test_torchvision_and_timm_resnet_weights_load_as_they_are(source, tmp_path):
    torch.manual_seed(1)
    if source.startswith("torchvision"):
        state = torchvision.models.resnet18(num_classes=10).state_dict()
        path = tmp_path / "resnet18.pth"
        torch.save(state, path)
    else:
        state = timm.create_model("resnet18", num_classes=10).state_dict()
        path = tmp_path / "resnet18.safetensors"
        safetensors.torch.save_file(state, path)
    run = prepared(RESNET18, **{"model.weights": str(path)})
    assert_holds(run.state.model, state)
    assert run.initial_weights.tensors == len(state) and run.initial_weights.kept_initialisation == []
    assert run.initial_weights.path == str(path.resolve())
    import hashlib

    assert run.initial_weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_classifier_of_another_shape_keeps_its_initialisation(tmp_path, caplog):
    """ImageNet's 1000-class weights into a 10-class model: everything but ``fc`` loads; ``fc`` is the seed's."""
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    fresh = prepared(RESNET18).state.model.state_dict()
    with caplog.at_level(logging.WARNING, logger="maskprop.train.weights"):
        run = prepared(RESNET18, **{"model.weights": str(path)})
    assert_holds(run.state.model, state, skip=("fc.weight", "fc.bias"))
    own = run.state.model.state_dict()
    assert torch.equal(own["fc.weight"], fresh["fc.weight"]) and torch.equal(own["fc.bias"], fresh["fc.bias"])
    assert run.initial_weights.kept_initialisation == ["fc.bias", "fc.weight"]
    assert "classifier keeps its initialisation" in caplog.text and "[1000, 512]" in caplog.text
    del state["fc.weight"], state["fc.bias"]  # a feature extractor's weights: no classifier at all
    torch.save(state, path)
    assert prepared(RESNET18, **{"model.weights": str(path)}).initial_weights.kept_initialisation == [
        "fc.bias", "fc.weight"]


def test_wrapped_and_ddp_prefixed_state_dicts_and_checkpoints_load(tmp_path):
    torch.manual_seed(2)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    for name, data in [("wrapped.pt", {"epoch": 3, "state_dict": state}),
                       ("ddp.pt", {"model": {f"module.{k}": v for k, v in state.items()}}),
                       ("no_counters.pt", {k: v for k, v in state.items() if "num_batches_tracked" not in k})]:
        torch.save(data, tmp_path / name)
        run = prepared(RESNET18, **{"model.weights": str(tmp_path / name)})
        assert_holds(run.state.model, {k: v for k, v in state.items() if "num_batches_tracked" not in k})
    # a finished run's checkpoint starts another run (here a dense run's weights start a search)
    out = tmp_path / "dense"
    recipe = tmp_path / "dense.yaml"
    recipe.write_text(yaml.safe_dump(with_overrides(TINY_RUN, method="dense", **{"optim.epochs": 1})))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(recipe), "--out", str(out)]) == 0
    run = prepared(TINY_RUN, **{"model.weights": str(out / "last.pt")})
    assert_holds(run.state.model, load_checkpoint(out / "last.pt")["model"])


def test_files_as_downloads_and_training_scripts_leave_them(tmp_path):
    """A download cache's link to a blob without a suffix (read by content), a training script's checkpoint with its
    argparse arguments beside the weights, and a private non-tensor entry."""
    import argparse

    torch.manual_seed(4)
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    blob = tmp_path / "blobs" / "3f2a9c"
    blob.parent.mkdir()
    safetensors.torch.save_file(state, blob)
    link = tmp_path / "snapshots" / "model.safetensors"
    link.parent.mkdir()
    link.symlink_to(blob)
    run = prepared(RESNET18, **{"model.weights": str(link)})
    assert_holds(run.state.model, state)
    assert run.initial_weights.path == str(link)
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "checkpoint.pth.tar")
    assert_holds(prepared(RESNET18, **{"model.weights": str(tmp_path / "checkpoint.pth.tar")}).state.model, state)
    torch.save({**state, "_metadata": {"": {"version": 1}}}, tmp_path / "with_metadata.pt")
    assert_holds(prepared(RESNET18, **{"model.weights": str(tmp_path / "with_metadata.pt")}).state.model, state)


def test_the_summary_and_a_resumed_run_keep_what_the_run_started_from(tmp_path):
    torch.manual_seed(3)
    path = tmp_path / "start.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    recipe = tmp_path / "r18.yaml"
    recipe.write_text(yaml.safe_dump(with_overrides(RESNET18, method="dense", **{"model.weights": str(path)})))
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(recipe), "--out", str(out)]) == 0
    started = json.loads((out / "summary.json").read_text())["initial_weights"]
    assert started["path"] == str(path.resolve()) and started["kept_initialisation"] == ["fc.bias", "fc.weight"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["weights"] == str(path.resolve())
    path.unlink()  # a resumed run reads its checkpoint, not the file
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["initial_weights"] == started
    checkpoint = load_checkpoint(out / "last.pt")
    checkpoint.pop("format")
    from maskprop.train.checkpoint import save_checkpoint

    save_checkpoint(dict(checkpoint, initial_weights={"path": "x"}), out / "last.pt")  # edited by hand: no digest
    with pytest.raises(ValueError, match=r"last.pt': initial_weights is \{'path': 'x'\}, not what maskprop writes"):
        maskprop.fit(load_config(with_overrides(RESNET18, method="dense")), out=out, resume=True)


def test_a_dry_run_says_what_the_weights_file_loads(tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "start.pth")
    recipe = tmp_path / "r18.yaml"
    recipe.write_text(yaml.safe_dump(with_overrides(RESNET18, **{"model.weights": str(tmp_path / "start.pth")})))
    assert main(["train", str(recipe), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    tensors = len(torchvision.models.resnet18().state_dict()) - 2  # all but the classifier's, of 1000 classes there
    assert capsys.readouterr().out.splitlines()[2] == (
        f"weights '{(tmp_path / 'start.pth').resolve()}': {tensors} tensors loaded; fc.bias, fc.weight left at "
        f"their initialisation (another shape in the file, or absent)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.yaml", "start.pth"]


def test_weights_that_do_not_fit_are_one_line_and_write_nothing(tmp_path, capsys):
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "resnet34.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip file at all")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_state.pt")
    torch.save(torchvision.models.resnet18(), tmp_path / "whole_model.pt")
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(dict(state, **{"conv1.weight": torch.zeros(32, 3, 7, 7)}), tmp_path / "narrow_stem.pth")
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, tmp_path / "one_missing.pth")
    recipe = tmp_path / "r18.yaml"
    recipe.write_text(yaml.safe_dump(RESNET18))
    cases = [
        ("nowhere.pth", "does not exist; expected a state-dict file"),
        ("corrupt.pth", "is not a readable state dict"),
        ("whole_model.pt", "torchvision.models.resnet.ResNet was not an allowed global by default); it holds Python "
                           "objects besides tensors (a whole pickled model?): save the state dict alone"),
        (".", "is a directory; expected a state-dict file"),
        ("list.pt", "holds a list; expected parameter names mapped to tensors"),
        ("no_state.pt", "holds a dict with keys ['epoch', 'optimizer'] and no state dict under model"),
        ("narrow_stem.pth", "does not fit resnet18: 1 of other shapes (conv1.weight [32, 3, 7, 7] against "
                            "conv1.weight [64, 3, 7, 7])"),
        ("one_missing.pth", "does not fit resnet18: 1 of the model's tensors missing (layer1.0.conv1.weight)"),
        ("resnet34.pth", "does not fit resnet18: 96 unknown to it (layer1.2.conv1.weight, layer1.2.bn1.weight, "
                         "layer1.2.bn1.bias, ...); expected the state dict of the same architecture"),
    ]
    for name, message in cases:
        out = tmp_path / "out"
        assert main(["train", str(recipe), "--out", str(out), f"model.weights={tmp_path / name}"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("maskprop train: error: model.weights '") and message in err[-1], err[-1]
        assert not out.exists()


def test_the_classifier_is_the_last_linear_layer_and_partial_prefixes_or_private_tensors_do_not_fit(tmp_path):
    """In a model of several linear layers (an MLP) only the last is the classifier that may keep its initialisation:
    another shape there loads the rest, another shape in a hidden layer is an error. The count of tensors loaded is
    the file's (less the classifier kept). A ``module.`` prefix on some keys only is no DDP save, and a private key
    that holds a tensor is a weight like any other: both do not fit."""
    mlp = with_overrides(TINY_RUN, **{"model.name": "mlp", "model.kwargs.hidden": [16, 12]})
    state = prepared(mlp).state.model.state_dict()
    names = [k for k in state if k.endswith(".weight")]
    first, last = names[0], names[-1]
    other_head = dict(state, **{last: torch.zeros(7, 12), last[:-len("weight")] + "bias": torch.zeros(7)})
    torch.save(other_head, tmp_path / "other_head.pt")
    run = prepared(mlp, **{"model.weights": str(tmp_path / "other_head.pt")})
    assert run.initial_weights.kept_initialisation == sorted([last, last[:-len("weight")] + "bias"])
    assert run.initial_weights.tensors == len(state) - 2
    assert_holds(run.state.model, state, skip=(last, last[:-len("weight")] + "bias"))
    cases = {"other_hidden.pt": (dict(state, **{first: torch.zeros(16, 5)}), "1 of other shapes"),
             "half_prefixed.pt": ({(f"module.{k}" if i % 2 else k): v for i, (k, v) in enumerate(state.items())},
                                  f"{len(state) // 2} unknown to it (module."),
             "private_tensor.pt": (dict(state, _extra=torch.zeros(3)), "1 unknown to it (_extra)")}
    for name, (data, message) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(ValueError, match=rf"does not fit mlp: .*{re.escape(message)}"):
            prepared(mlp, **{"model.weights": str(tmp_path / name)})


@pytest.mark.parametrize("content", [b"data:\n  batch_size: 64\n", b'{"accuracy": 93.0}', b"not a zip file at all"])
def test_a_file_that_is_no_state_dict_at_all_says_so_not_pickles_reason(tmp_path, content):
    """A recipe, a summary.json or any text given as model.weights was refused with pickle's reason ("Unsupported
    operand 100"); now the line says what the file is not and what is expected."""
    from maskprop.train.weights import load_initial_weights

    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^model.weights '{path}' is not a readable state dict \(neither a "
                                         r"safetensors nor a torch.save file\); expected a state-dict file "
                                         r"\(.safetensors, or .pt/.pth from torch.save\)$"):
        load_initial_weights(maskprop.create_model("resnet20"), str(path), "resnet20")
