"""``maskprop export RUN_DIR``: which checkpoint and mask it exports, the accuracy it records, and bad input.

Runs are tiny real ones (``shapes`` at 16x16, a few steps); the other phases and methods are the same checkpoint
edited by hand (``save_checkpoint``), so each case costs an export, not a run.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN, with_overrides

import maskprop
from maskprop.cli import main
from maskprop.models.spec import ModelSpec
from maskprop.train.checkpoint import load_checkpoint, save_checkpoint
from maskprop.vrpge import ChannelScores

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = with_overrides(TINY_RUN, **{"optim.epochs": 1, "sparsity.fix_samples": 2})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny VR-PGE run through ``maskprop train``: (run directory, its stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("export_cli")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run", stdout.getvalue()


def edited_run(source: Path, target: Path, name: str = "last.pt", **changes) -> Path:
    """A run directory holding ``source``'s last.pt with some fields changed, saved as ``name``."""
    checkpoint = load_checkpoint(source / "last.pt")
    checkpoint.update(changes)
    checkpoint.pop("format")
    target.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint, target / name)
    return target


def full_model(checkpoint: dict) -> torch.nn.Module:
    model = ModelSpec.from_dict(checkpoint["model_spec"]).build()
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def export(*args: str) -> int:
    return main(["export", *map(str, args)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("maskprop export: error: "), err
    return err[-1]


def test_train_names_the_export_command(run):
    run_dir, stdout = run
    assert stdout.strip().splitlines()[-1] == f"export: maskprop export {run_dir}"


def test_export_of_a_finished_run(run, capsys):
    run_dir, _ = run
    assert export(run_dir, "--format", "safetensors,pt2") == 0  # ONNX: tests/test_export.py
    printed = capsys.readouterr().out
    out = run_dir / "export"
    assert f"wrote {out}/" in printed
    assert export(f"{run_dir}/", "--out", f"{run_dir}/again/", "--format", "safetensors") == 0  # slashes as typed
    assert f"wrote {run_dir}/again/: " in capsys.readouterr().out
    info = json.loads((out / "export.json").read_text())
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["phase"] == "done"
    assert info["accuracy"] == checkpoint["final_accuracy"]
    assert info["source"]["phase"] == "done" and info["source"]["mask"] == "fixed"
    assert info["input_size"] == [3, 16, 16]
    mask = checkpoint["fixed_mask"]
    assert info["widths"] == {g: int(m.sum()) for g, m in mask.items()}
    model = full_model(checkpoint)
    assert info["params"] == maskprop.CostModel(model, (3, 16, 16)).params(mask)
    assert info["flops"] == maskprop.flops(model, (3, 16, 16), mask)
    assert set(info["files"]) == {"plan.json", "model.safetensors", "model.pt2"}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        reference = model(x)
    with torch.no_grad():
        torch.testing.assert_close(maskprop.load_exported(out)(x), reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.export.load(str(out / "model.pt2")).module()(x), reference, rtol=1e-5,
                                   atol=1e-6)


def test_search_phase_is_refused_unless_top_scores(run, tmp_path, capsys):
    run_dir, _ = run
    searching = edited_run(run_dir, tmp_path / "searching", phase="search", epoch=1, fixed_mask=None,
                           final_accuracy=None, last_accuracy=None)
    assert export(searching) == 2
    line = error_line(capsys)
    assert "phase 'search'" in line and "--mask top_scores" in line
    assert list(searching.iterdir()) == [searching / "last.pt"]

    assert export(searching, "--mask", "top_scores", "--format", "safetensors") == 0
    info = json.loads((searching / "export" / "export.json").read_text())
    assert info["accuracy"] is None and "not measured" in info["accuracy_source"]
    checkpoint = load_checkpoint(searching / "last.pt")
    scores = ChannelScores(dict(checkpoint["groups"]), TINY["sparsity"]["keep_ratio"])
    scores.load_state_dict(checkpoint["scores"])
    assert info["widths"] == {g: int(m.sum()) for g, m in scores.top_mask().items()}


def test_top_scores_of_a_run_with_a_budget_in_flops_are_chosen_at_its_channel_prices(run, tmp_path):
    """With ``sparsity.budget_unit: flops`` the top-score subnetwork fills the priced budget (each channel at
    ``CostModel.channel_prices``), which here is another subnetwork than the channel budget's."""
    run_dir, _ = run
    checkpoint = load_checkpoint(run_dir / "last.pt")
    config = copy.deepcopy(checkpoint["config"])
    config["sparsity"]["budget_unit"] = "flops"
    priced = edited_run(run_dir, tmp_path / "priced", phase="search", epoch=1, fixed_mask=None, final_accuracy=None,
                        last_accuracy=None, config=config)
    assert export(priced, "--mask", "top_scores", "--format", "safetensors") == 0
    groups, keep_ratio = dict(checkpoint["groups"]), config["sparsity"]["keep_ratio"]
    prices = maskprop.CostModel(full_model(checkpoint), (3, 16, 16)).channel_prices(keep_ratio)
    masks = {}
    for unit, scores in (("flops", ChannelScores(groups, keep_ratio, prices=prices)),
                         ("channels", ChannelScores(groups, keep_ratio))):
        scores.load_state_dict(checkpoint["scores"])
        masks[unit] = scores.top_mask()
    assert any(not torch.equal(masks["flops"][g], masks["channels"][g]) for g in groups)  # the prices matter here
    exported = maskprop.WidthPlan.load(priced / "export").mask()
    assert all(torch.equal(exported[g], masks["flops"][g]) for g in groups)


def test_last_checkpoint_of_an_unfinished_run_records_its_epoch_s_accuracy(run, tmp_path):
    """last.pt keeps the accuracy its epoch measured (a finished run's is its final one), which an export of the
    subnetwork that epoch evaluated records; another subnetwork's export records none."""
    run_dir, _ = run
    finished = load_checkpoint(run_dir / "last.pt")
    assert finished["last_accuracy"] == finished["final_accuracy"] is not None
    searching = edited_run(run_dir, tmp_path / "searching", phase="search", epoch=1, fixed_mask=None,
                           final_accuracy=None, last_accuracy=37.5)
    assert export(searching, "--mask", "top_scores", "--format", "safetensors") == 0
    info = json.loads((searching / "export" / "export.json").read_text())
    assert info["accuracy"] == 37.5 and "measured at epoch 1 of phase 'search'" in info["accuracy_source"]
    tuning = edited_run(run_dir, tmp_path / "tuning", phase="finetune", epoch=1, final_accuracy=None,
                        last_accuracy=41.0)
    assert export(tuning, "--format", "safetensors") == 0
    assert json.loads((tuning / "export" / "export.json").read_text())["accuracy"] == 41.0
    assert export(tuning, "--mask", "top_scores", "--format", "safetensors", "--out", tuning / "top") == 0
    info = json.loads((tuning / "top" / "export.json").read_text())
    assert info["accuracy"] is None and "evaluated with the fixed subnetwork" in info["accuracy_source"]


def test_best_checkpoint_from_the_search_records_its_accuracy(run, tmp_path, capsys):
    run_dir, _ = run
    best = edited_run(run_dir, tmp_path / "best", name="best.pt", phase="search", fixed_mask=None,
                      best_accuracy=42.5)
    assert export(best, "--checkpoint", "best", "--format", "safetensors") == 2
    assert "phase 'search'" in error_line(capsys)
    assert export(best, "--checkpoint", "best", "--mask", "top_scores", "--format", "safetensors") == 0
    info = json.loads((best / "export" / "export.json").read_text())
    assert info["accuracy"] == 42.5 and info["source"]["checkpoint"].endswith("best.pt")


def test_a_subnetwork_the_checkpoint_did_not_evaluate_records_no_accuracy(run, tmp_path):
    """A finished run's final accuracy and a fine-tuning best.pt's accuracy are those of the fixed subnetwork: an
    export of the top-score subnetwork records none."""
    run_dir, _ = run
    assert export(run_dir, "--mask", "top_scores", "--format", "safetensors", "--out", tmp_path / "top") == 0
    info = json.loads((tmp_path / "top" / "export.json").read_text())
    assert info["accuracy"] is None and info["source"]["mask"] == "top_scores"
    best = edited_run(run_dir, tmp_path / "best", name="best.pt", phase="finetune", best_accuracy=42.5)
    assert export(best, "--checkpoint", "best", "--mask", "top_scores", "--format", "safetensors") == 0
    info = json.loads((best / "export" / "export.json").read_text())
    assert info["accuracy"] is None and "evaluated with the fixed subnetwork" in info["accuracy_source"]


def test_dense_run_exports_the_whole_model(run, tmp_path, capsys):
    run_dir, _ = run
    dense = edited_run(run_dir, tmp_path / "dense", method="dense", scores=None, fixed_mask=None)
    assert export(dense, "--format", "safetensors") == 0
    info = json.loads((dense / "export" / "export.json").read_text())
    assert info["params"] == info["dense_params"] and info["flops"] == info["dense_flops"]
    assert info["source"]["mask"] == "none (whole model)"
    assert info["accuracy"] == load_checkpoint(dense / "last.pt")["final_accuracy"]
    capsys.readouterr()
    assert export(dense, "--mask", "top_scores", "--out", tmp_path / "top") == 2
    assert "without channel scores" in error_line(capsys)
    assert not (tmp_path / "top").exists()


def test_sparse_backward_run_exports_plain_layers(tmp_path):
    config = dict(TINY, method="msbp", model={"name": "mlp", "kwargs": {"hidden": [32, 32]}},
                  sbp={"ratio": 0.25})
    config["data"] = dict(TINY["data"], image_size=8)
    maskprop.fit(config, out=tmp_path / "msbp")
    assert export(tmp_path / "msbp", "--format", "safetensors,pt2") == 0
    info = json.loads((tmp_path / "msbp" / "export" / "export.json").read_text())
    assert info["input_size"] == [3, 8, 8]
    assert info["spec"]["kwargs"] == {"hidden": [32, 32], "in_features": 192, "num_classes": 10}
    assert info["params"] == info["dense_params"]
    checkpoint = load_checkpoint(tmp_path / "msbp" / "last.pt")
    model = maskprop.create_model("mlp", num_classes=10, in_features=192, hidden=[32, 32])
    model.load_state_dict(checkpoint["model"])
    loaded = maskprop.load_exported(tmp_path / "msbp" / "export")
    assert {type(m) for m in loaded.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line each, exit 2, nothing written


def _bad_cases(run_dir: Path, tmp_path: Path) -> list[tuple[list[str], str, Path]]:
    """(arguments, expected message part, directory that must stay as it was)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    spec = load_checkpoint(run_dir / "last.pt")["model_spec"]
    other = edited_run(run_dir, tmp_path / "other", model_spec={**spec, "name": "resnet32"})
    wider = edited_run(run_dir, tmp_path / "wider", model_spec={**spec, "kwargs": {**spec["kwargs"], "width": 2}})
    unknown = edited_run(run_dir, tmp_path / "unknown", model_spec={**spec, "name": "resnet21"})
    rejected = edited_run(run_dir, tmp_path / "rejected", model_spec={**spec, "kwargs": {"depth": 3}})
    old = tmp_path / "old"
    old.mkdir()
    checkpoint = load_checkpoint(run_dir / "last.pt")
    torch.save(dict(checkpoint, format=0), old / "last.pt")
    taken = edited_run(run_dir, tmp_path / "taken")
    (taken / "export").mkdir()
    return [
        ([tmp_path / "nowhere"], "does not exist", tmp_path),
        ([empty], "has no checkpoint 'last.pt'", empty),
        ([corrupt], "corrupt or truncated", corrupt),
        ([other], "another model", other),
        ([wider], "another model", wider),
        ([unknown], "names model 'resnet21', which is not registered", unknown),
        ([rejected], "model 'resnet20' does not take the keywords {'depth': 3}", rejected),
        ([old], "has format 0", old),
        ([taken, "--format", "safetensors,tflite"], "unknown export format(s) 'tflite'", taken),
        ([run_dir, "--format", "timm", "--out", tmp_path / "timm"], "resnet20 with", tmp_path),
        ([taken], "exists; pass --force", taken),
        ([taken, "--input-size", "3,16"], "not C,H,W", taken),
    ]


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys):
    run_dir, _ = run
    for args, message, folder in _bad_cases(run_dir, tmp_path):
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        assert export(*args) == 2, args
        line = error_line(capsys)
        assert message in line, (args, line)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args


def test_force_never_replaces_the_run_or_a_folder_of_runs(run, tmp_path, capsys):
    """``--out`` naming the run directory or the folder it lies in is refused even with ``--force`` (replacing
    deletes it); the run keeps every file."""
    run_dir, _ = run
    before = sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*"))
    for out in (run_dir, run_dir.parent):
        assert export(run_dir, "--out", out, "--force", "--format", "safetensors") == 2
        assert "is not an earlier maskprop export" in error_line(capsys)
    assert sorted(p.relative_to(run_dir.parent) for p in run_dir.parent.rglob("*")) == before


def test_another_input_size_than_the_run_s_is_said(run, tmp_path, caplog):
    run_dir, _ = run
    with caplog.at_level(logging.WARNING, logger="maskprop.export"):
        assert export(run_dir, "--out", tmp_path / "same", "--format", "safetensors", "--input-size", "3,16,16") == 0
        assert not caplog.records
        assert export(run_dir, "--out", tmp_path / "other", "--format", "safetensors", "--input-size", "3,24,24") == 0
    assert "input size 3,24,24 is not the 3,16,16 the run trained on" in caplog.text
    info = json.loads((tmp_path / "other" / "export.json").read_text())
    assert info["flops"] > json.loads((tmp_path / "same" / "export.json").read_text())["flops"]


def test_missing_onnx_extra_is_named(run, tmp_path, capsys, monkeypatch):
    run_dir, _ = run
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # importing it raises ImportError
    assert export(run_dir, "--format", "onnx", "--out", tmp_path / "out") == 2
    line = error_line(capsys)
    assert "onnx extra (onnxruntime is not installed)" in line and "maskprop[onnx]" in line
    assert not (tmp_path / "out").exists()
    from maskprop.export import parse_formats

    assert parse_formats(None) == ["safetensors", "pt2"]  # the default leaves out what is not installed


def test_force_replaces_an_export(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "out"
    assert export(run_dir, "--out", out, "--format", "safetensors,pt2") == 0
    assert export(run_dir, "--out", out, "--format", "safetensors", "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors", "plan.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_input_size_follows_the_data_config():
    from maskprop.export import run_input_size
    from maskprop.train.config import load_config
    from maskprop.train.data import build_datasets

    cfg = load_config({"data": {"dataset": "shapes", "image_size": 24, "train_size": 4, "val_size": 4}})
    assert run_input_size({"data": {"dataset": "shapes", "image_size": 24}}) == build_datasets(cfg.data)[3]
    assert run_input_size({"data": {"dataset": "cifar100"}}) == (3, 32, 32)
    assert run_input_size({"data": {"dataset": "fashion_mnist"}}) == (1, 28, 28)
    assert run_input_size({"data": {"dataset": "imagenet", "crop_size": 160}}) == (3, 160, 160)
    with pytest.raises(ValueError, match="--input-size"):
        run_input_size({"data": {"dataset": "svhn"}})


def test_input_size_of_every_dataset_and_of_the_config_defaults():
    """mnist and both CIFARs at their fixed sizes; a config that leaves the dataset, the image size or the ImageNet
    crop out gets the trainer's defaults (shapes, its default image size, the default crop)."""
    from maskprop.export import run_input_size
    from maskprop.train.config import load_config
    from maskprop.train.data import build_datasets

    assert run_input_size({"data": {"dataset": "mnist"}}) == (1, 28, 28)
    assert run_input_size({"data": {"dataset": "cifar10"}}) == (3, 32, 32)
    defaults = load_config({}).data
    small = {"train_size": 4, "val_size": 4}
    assert run_input_size({}) == run_input_size({"data": {"dataset": "shapes"}}) == build_datasets(
        load_config({"data": small}).data)[3]
    assert run_input_size({"data": {"image_size": 24}}) == build_datasets(
        load_config({"data": {**small, "image_size": 24}}).data)[3] == (3, 24, 24)
    assert run_input_size({"data": {"dataset": "imagenet"}}) == (3, defaults.crop_size, defaults.crop_size)


def test_a_checkpoint_written_before_the_model_spec_still_exports(run, tmp_path):
    """Its spec is derived from its config, as the trainer resolved the model then."""
    run_dir, _ = run
    checkpoint = load_checkpoint(run_dir / "last.pt")
    old = edited_run(run_dir, tmp_path / "old", model_spec=None)
    assert export(old, "--format", "safetensors") == 0
    info = json.loads((old / "export" / "export.json").read_text())
    assert info["spec"] == checkpoint["model_spec"]


def test_a_checkpoint_written_before_the_model_spec_exports_at_the_input_size_given(run, tmp_path):
    """Its input size comes from --input-size where given: a run on data the config does not describe needs it."""
    run_dir, _ = run
    checkpoint = load_checkpoint(run_dir / "last.pt")
    config = copy.deepcopy(checkpoint["config"])
    config["data"]["dataset"] = "my_images"
    old = edited_run(run_dir, tmp_path / "old", model_spec=None, config=config)
    assert export(old, "--format", "safetensors", "--input-size", "3,16,16") == 0
    assert json.loads((old / "export" / "export.json").read_text())["spec"] == checkpoint["model_spec"]
    assert export(old, "--format", "safetensors", "--input-size", "3,24,24", "--out", tmp_path / "larger") == 0
    info = json.loads((tmp_path / "larger" / "export.json").read_text())
    assert info["input_size"] == [3, 24, 24] and info["spec"]["input_size"] == [3, 24, 24]


def test_an_mlp_checkpoint_written_before_the_model_spec_still_exports(tmp_path):
    """Its number of classes is read from its classifier, the last linear layer (not the first hidden one)."""
    config = with_overrides(TINY, method="dense", model={"name": "mlp", "kwargs": {"hidden": [32, 24]}},
                            **{"data.image_size": 8, "data.train_size": 64, "finetune.epochs": 0})
    maskprop.fit(config, out=tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    old = edited_run(tmp_path / "run", tmp_path / "old", model_spec=None)
    assert export(old, "--format", "safetensors") == 0
    info = json.loads((old / "export" / "export.json").read_text())
    assert info["spec"] == checkpoint["model_spec"] and info["spec"]["kwargs"]["num_classes"] == 10


# ---------------------------------------------------------------------------------------------------------------------
# Every kind of run exports, exactly

RUN_KINDS = {
    "cifar_resnet": ("vrpge", {"name": "resnet20"}, {}),
    "cifar_resnet_residual_kept": ("vrpge", {"name": "resnet20"}, {"sparsity.prune_residual": False}),
    "wide_resnet": ("vrpge", {"name": "wrn16_8"}, {}),
    "wide_resnet_residual_kept": ("vrpge", {"name": "wrn16_8"},
                                  {"sparsity.prune_residual": False}),
    "imagenet_resnet": ("vrpge", {"name": "resnet18", "kwargs": {"num_classes": 10}}, {}),
    "imagenet_resnet_residual_kept": ("vrpge", {"name": "resnet18"}, {"sparsity.prune_residual": False}),
    "vgg": ("vrpge", {"name": "vgg11_bn"}, {"data.image_size": 32}),  # five poolings
    "dense_vgg": ("dense", {"name": "vgg11_bn"}, {"data.image_size": 32}),
    "mlp_msbp": ("msbp", {"name": "mlp", "kwargs": {"hidden": [32, 32]}}, {"sbp.ratio": 0.25}),
}


@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_every_kind_of_run_exports_exactly(kind, tmp_path):
    method, model_config, overrides = RUN_KINDS[kind]
    config = with_overrides(TINY, method=method, model=model_config, **{"optim.epochs": 1, "finetune.epochs": 0,
                                                                        "data.train_size": 64, **overrides})
    maskprop.fit(config, out=tmp_path / "run")
    assert export(tmp_path / "run", "--format", "safetensors") == 0
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    spec = ModelSpec.from_dict(checkpoint["model_spec"])
    size = config["data"]["image_size"]
    assert spec.input_size == (3, size, size) and spec.num_classes == 10
    if "prune_residual" in spec.kwargs:
        assert spec.kwargs["prune_residual"] is not ("residual_kept" in kind)
    model = full_model(checkpoint).double()
    assert [list(g) for g in checkpoint["groups"]] == [list(g) for g in model.channel_groups().items()]
    mask = checkpoint["fixed_mask"]
    assert (mask is None) == (method != "vrpge")
    loaded = maskprop.load_exported(tmp_path / "run" / "export").double()
    x = torch.randn(3, *spec.input_size, dtype=torch.double)
    with torch.no_grad(), maskprop.use_mask(model, mask):
        reference = model(x)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference, rtol=1e-10, atol=1e-12)


def test_the_random_baseline_exports_its_subnetwork_with_the_accuracy_it_measured(tmp_path):
    """Its search phase trains the fixed random subnetwork, so best.pt's accuracy is that subnetwork's."""
    config = with_overrides(TINY, **{"sparsity.fix": "random", "optim.epochs": 2, "finetune.epochs": 0,
                                     "data.train_size": 64})
    maskprop.fit(config, out=tmp_path / "run")
    assert export(tmp_path / "run", "--checkpoint", "best", "--format", "safetensors") == 0
    info = json.loads((tmp_path / "run" / "export" / "export.json").read_text())
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert info["accuracy"] == best["best_accuracy"] and info["source"]["mask"] == "fixed"
    assert info["widths"] == {g: int(m.sum()) for g, m in best["fixed_mask"].items()}


def test_a_file_named_as_the_run_directory_is_called_a_file_not_missing(tmp_path, capsys):
    """``maskprop export RUN/last.pt`` (the checkpoint instead of its directory) exists: "does not exist" would
    mislead; one line says it is a file, exit status 2, nothing written."""
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"")
    assert export(checkpoint) == 2
    assert error_line(capsys) == (f"maskprop export: error: '{checkpoint}' is a file, not a run directory; expected "
                                  f"the directory of a maskprop train run (the one holding last.pt)")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("name", ["export.json", "notes.txt"])
def test_a_file_named_as_the_output_is_refused_even_with_force(tmp_path, capsys, name):
    """``--out`` naming a regular file is not an earlier export: refused with or without ``--force``, and the file
    kept (one named ``export.json`` was taken for an export and replaced by a directory with ``--force``). The check
    comes before the checkpoint is read."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.pt").write_bytes(b"")
    out = tmp_path / name
    out.write_text("keep me")
    for force in ([], ["--force"]):
        assert export(run_dir, "--out", out, *force) == 2
        assert error_line(capsys) == (f"maskprop export: error: '{out}' exists and is a file, not an earlier maskprop "
                                      f"export; expected a new directory for the output (--force, force=True, "
                                      f"replaces only an earlier export)")
    assert out.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", name])
