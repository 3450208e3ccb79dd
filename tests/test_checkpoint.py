"""Checkpoint files: atomic writes, one-line errors for damaged or foreign files, the compatibility check."""

from __future__ import annotations

import pytest
import torch

from maskprop.models.spec import ModelSpec
from maskprop.train import checkpoint as ckpt
from maskprop.train.checkpoint import CHECKPOINT_KEYS, check_compatible, load_checkpoint, save_checkpoint

GROUPS = {"layer1": 16, "layer1.0.conv1": 16}


def _checkpoint(**changes) -> dict:
    data = {key: None for key in CHECKPOINT_KEYS if key != "format"}
    data.update(model_name="resnet20", model_kwargs={}, groups=[[g, n] for g, n in GROUPS.items()], method="vrpge",
                phase="search", epoch=1, step=10, model={"w": torch.arange(6.0)}, counters={"train_flops": 7})
    data.update(changes)
    return data


def test_save_then_load_round_trips_tensors_and_values(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_checkpoint(), path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0))
    assert (loaded["step"], loaded["counters"], loaded["format"]) == (10, {"train_flops": 7}, 1)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_checkpoint(step=1), path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_checkpoint(step=2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_files_are_named_as_corrupt(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "garbage": b"\x00not a zip" * 10, "empty": b""}[damage])
    with pytest.raises(ValueError, match=rf"^checkpoint '{path}' is corrupt or truncated \(.*\); expected a complete "):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="is not a maskprop checkpoint"):
        load_checkpoint(tmp_path / "list.pt")
    torch.save({"model": {}}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"is not a maskprop training checkpoint \(missing format, model_name"):
        load_checkpoint(tmp_path / "weights.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_check_compatible_names_what_differs():
    spec = ModelSpec("resnet20", {"num_classes": 10, "prune_residual": True})
    check_compatible(_checkpoint(), "c.pt", spec, {}, GROUPS, "vrpge")
    with pytest.raises(ValueError, match="from model 'resnet20', the config builds 'resnet32'"):
        check_compatible(_checkpoint(), "c.pt", ModelSpec("resnet32"), {}, GROUPS, "vrpge")
    with pytest.raises(ValueError, match=r"model.kwargs=\{\}, the config has model.kwargs=\{'width': 2\}"):
        check_compatible(_checkpoint(), "c.pt", spec, {"width": 2}, GROUPS, "vrpge")
    with pytest.raises(ValueError, match=r"group 2 is nothing in the checkpoint but 'extra' \(4\) here"):
        check_compatible(_checkpoint(), "c.pt", spec, {}, {**GROUPS, "extra": 4}, "vrpge")
    with pytest.raises(ValueError, match="is a method='vrpge' run, the config says method='dense'"):
        check_compatible(_checkpoint(), "c.pt", spec, {}, GROUPS, "dense")


def test_check_compatible_compares_the_saved_spec():
    spec = ModelSpec("resnet20", {"num_classes": 10, "prune_residual": True})
    saved = _checkpoint()
    saved["model_spec"] = spec.to_dict()
    check_compatible(saved, "c.pt", spec, {"ignored": "the spec decides"}, GROUPS, "vrpge")
    other = ModelSpec("resnet20", {"num_classes": 10, "prune_residual": False})
    with pytest.raises(ValueError, match=r"built with \{'num_classes': 10, 'prune_residual': True\}, the config builds "
                                         r"it with \{'num_classes': 10, 'prune_residual': False\}"):
        check_compatible(saved, "c.pt", other, {}, GROUPS, "vrpge")
