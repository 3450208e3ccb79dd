"""The ``maskprop`` command line: usage errors are one line with exit status 2 and write nothing; --version."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, signal_after_step, with_overrides

import maskprop
from maskprop.cli import main
from maskprop.train.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
TINY = with_overrides(TINY_RUN, **{"data.train_size": 64, "data.val_size": 32, "data.batch_size": 32,
                                   "sparsity.fix_samples": 2, "sparsity.fix_examples": 32, "optim.epochs": 1,
                                   **{"finetune.epochs": 0}})


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _usage_error(capsys, argv: list[str]) -> str:
    """Run ``maskprop argv``, expect exit status 2, return the single line it printed to stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    assert status == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # no usage block before it
    assert "Traceback" not in captured.err
    return lines[0]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"maskprop {maskprop.__version__}"


def test_the_package_version_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert maskprop.__version__ == declared


@pytest.mark.parametrize("value", ["-1", "-8", "two", "1.5"])
def test_train_threads_must_be_a_count(capsys, recipe, tmp_path, value):
    out = tmp_path / "out"
    line = _usage_error(capsys, ["train", str(recipe), "--out", str(out), "--threads", value])
    assert line.startswith("maskprop train: error: argument --threads:") and repr(value) in line
    assert "auto or an integer >= 0" in line
    assert not out.exists()


def test_export_threads_must_be_a_count_too(capsys, tmp_path):
    line = _usage_error(capsys, ["export", str(tmp_path), "--threads", "-1"])
    assert line.startswith("maskprop export: error: argument --threads:") and "integer >= 0" in line


def test_train_threads_zero_and_positive_parse():
    from maskprop.cli import build_parser

    assert build_parser().parse_args(["train", "r.yaml", "--threads", "0"]).threads == 0
    assert build_parser().parse_args(["train", "r.yaml", "--threads", "3"]).threads == 3
    assert build_parser().parse_args(["train", "r.yaml", "--threads", "auto"]).threads == "auto"
    assert build_parser().parse_args(["train", "r.yaml"]).threads == "auto"  # the default
    assert build_parser().parse_args(["bench", "--threads", "2"]).threads == 2


def test_resume_with_a_recipe_says_resume_takes_none(capsys, recipe, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    line = _usage_error(capsys, ["train", str(recipe), "--resume", str(run)])
    assert line == (f"maskprop train: error: --resume takes no recipe, got '{recipe}': the run continues with its own "
                    f"config.yaml; give only key=value overrides after --resume DIR")
    assert list(run.iterdir()) == []


def test_resume_of_a_directory_that_is_no_run_says_how_to_start_one(capsys, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    line = _usage_error(capsys, ["train", "--resume", str(run)])
    assert "has no config.yaml; nothing to resume" in line
    assert list(run.iterdir()) == []
    line = _usage_error(capsys, ["train", "--resume", str(tmp_path / "missing")])
    assert line.endswith(f"run directory '{tmp_path / 'missing'}' does not exist")


def test_the_command_runs_as_a_module(tmp_path):
    """``python -m maskprop.cli --version`` (what the tests' subprocess runs use) prints the version."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "maskprop.cli", "--version"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"maskprop {maskprop.__version__}"


def test_an_output_path_through_a_file_is_one_line_for_every_command(capsys, recipe, tmp_path):
    """``--out`` below a regular file: one line naming both, exit status 2, nothing written (mkdir would raise
    FileExistsError or NotADirectoryError, a traceback), before any work is done."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for argv, out in ((["train", str(recipe)], blocker / "run"), (["report", str(tmp_path)], blocker / "x" / "rep")):
        line = _usage_error(capsys, [*argv, "--out", str(out)])
        assert line == f"maskprop {argv[0]}: error: cannot create '{out}': '{blocker}' is a file, not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny.yaml"]
    from maskprop.export import _check_out  # export checks its --out so, once it has found the run

    with pytest.raises(ValueError, match=r"^cannot create '.*exp': '.*afile' is a file, not a directory$"):
        _check_out(blocker / "exp", force=False)


def test_a_refusal_of_the_system_is_one_line(capsys, recipe, tmp_path, monkeypatch):
    """An ``OSError`` the system raises (here a permission refused when the run directory is made) is one line naming
    the path, exit status 1 (not a usage error), not a traceback."""
    import maskprop.train.loop as loop

    def refuse(path, target=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loop, "make_directory", refuse)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"maskprop train: error: Permission denied: '{tmp_path / 'run'}'"


@pytest.fixture
def fit_calls(monkeypatch) -> list:
    """``maskprop.train.loop.fit`` replaced by one that records what ``maskprop train`` hands it, then stops as Ctrl-C
    would (exit status 130, nothing trained)."""
    calls = []

    def fake_fit(cfg, out=None, resume=False, threads=None):
        calls.append({"cfg": cfg, "out": out, "resume": resume, "threads": threads})
        raise KeyboardInterrupt

    from maskprop.train import loop

    monkeypatch.setattr(loop, "fit", fake_fit)
    return calls


def test_train_hands_the_recipe_its_overrides_and_the_output_directory_to_fit(recipe, tmp_path, fit_calls, capsys):
    # Options may come between the overrides; every override after the recipe is applied.
    assert main(["train", str(recipe), "optim.lr=0.3", "--out", str(tmp_path / "a"), "seed=5", "data.seed=2"]) == 130
    call = fit_calls[-1]
    assert (call["cfg"].optim.lr, call["cfg"].seed, call["cfg"].data.seed) == (0.3, 5, 2)
    assert (call["out"], call["resume"]) == (str(tmp_path / "a"), False)
    assert "interrupted" in capsys.readouterr().err
    # --out wins over the config's out, which wins over the default runs/<recipe>-<timestamp>.
    assert main(["train", str(recipe), f"out={tmp_path / 'b'}", "--out", str(tmp_path / "a")]) == 130
    assert fit_calls[-1]["out"] == str(tmp_path / "a")
    assert main(["train", str(recipe), f"out={tmp_path / 'b'}"]) == 130
    assert fit_calls[-1]["out"] == str(tmp_path / "b")
    assert main(["train", str(recipe)]) == 130
    assert Path(fit_calls[-1]["out"]).parent == Path("runs") and Path(fit_calls[-1]["out"]).name.startswith("tiny-")


def test_train_resume_applies_its_overrides_to_the_runs_config(tmp_path, fit_calls):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(TINY), run / "config.yaml")
    assert main(["train", "--resume", str(run), "optim.lr=0.3", "log_every=7"]) == 130
    call = fit_calls[-1]
    assert (call["cfg"].optim.lr, call["cfg"].log_every, call["out"], call["resume"]) == (0.3, 7, run, True)
    assert call["cfg"].data.train_size == TINY["data"]["train_size"]  # the rest from the run's config.yaml


def test_train_threads_reach_fit(recipe, fit_calls, tmp_path):
    assert main(["train", str(recipe), "--threads", "3"]) == 130 and fit_calls[-1]["threads"] == 3
    assert main(["train", str(recipe), "--threads", "0"]) == 130 and fit_calls[-1]["threads"] == 0
    assert main(["train", str(recipe)]) == 130 and fit_calls[-1]["threads"] == "auto"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(recipe.read_text())
    assert main(["train", "--resume", str(tmp_path / "run"), "--threads", "1"]) == 130
    assert fit_calls[-1]["threads"] == 1 and fit_calls[-1]["resume"]


def test_train_usage_errors_of_the_positional_items(capsys, recipe, tmp_path, fit_calls):
    line = _usage_error(capsys, ["train", "optim.lr=0.1"])
    assert line == ("maskprop train: error: expected a recipe (e.g. recipes/quickstart.yaml) before the key=value "
                    "overrides, or --resume DIR")
    run = tmp_path / "run"
    run.mkdir()
    line = _usage_error(capsys, ["train", "--resume", str(run), "--out", str(tmp_path / "x")])
    assert line == ("maskprop train: error: --out cannot be combined with --resume (the run continues in its own "
                    "directory)")
    assert fit_calls == [] and list(run.iterdir()) == []


@pytest.mark.parametrize("size", ["0,32,32", "3,32", "3,32,32,1", "3,a,32", "3,-1,32"])
def test_export_input_size_must_be_three_positive_integers(capsys, tmp_path, size):
    line = _usage_error(capsys, ["export", str(tmp_path), "--input-size", size])
    assert line == (f"maskprop export: error: --input-size {size!r} is not C,H,W (three positive integers, e.g. "
                    f"3,32,32)")


def test_a_directory_given_as_the_recipe_is_named_a_directory_not_missing(capsys, tmp_path):
    """A directory passed where the recipe goes exists: "not found" would send the user looking for a typo."""
    line = _usage_error(capsys, ["train", str(tmp_path), "--out", str(tmp_path / "run")])
    assert line == (f"maskprop train: error: config file '{tmp_path}' is a directory; expected a yaml file (e.g. "
                    f"recipes/quickstart.yaml)")
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_file_says_it_is_a_file_not_missing(capsys, recipe, tmp_path, fit_calls):
    """``--resume RUN/config.yaml`` (a file of the run instead of its directory) exists: "does not exist" would
    mislead."""
    line = _usage_error(capsys, ["train", "--resume", str(recipe)])
    assert line == (f"maskprop train: error: '{recipe}' is a file, not a run directory; expected the directory of a "
                    f"maskprop train run (--resume DIR)")
    assert fit_calls == [] and [p.name for p in tmp_path.iterdir()] == ["tiny.yaml"]


def test_resume_of_a_moved_finished_run_names_where_it_is_now(capsys, tmp_path, monkeypatch):
    """A finished run copied elsewhere and resumed returns its saved summary, whose ``run_dir`` is where it was
    written: the closing lines name the directory resumed, so that the export command they print finds this run."""
    run = tmp_path / "copy"
    run.mkdir()
    save_config(load_config(TINY), run / "config.yaml")
    summary = {"method": "dense", "model": "resnet20", "keep_ratio": 1.0, "accuracy": 50.0, "subnet_params": 10,
               "dense_params": 10, "subnet_flops": 20, "dense_flops": 20, "train_cost_saving": 1.0,
               "measured_speedup": 1.0, "run_dir": str(tmp_path / "original")}
    from maskprop.train import loop

    monkeypatch.setattr(loop, "fit", lambda cfg, out=None, resume=False, threads=None: summary)
    assert main(["train", "--resume", str(run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == [f"run directory: {run}", f"export: maskprop export {run}"]


def test_runs_started_in_the_same_second_without_out_get_a_directory_each(recipe, tmp_path, monkeypatch, capsys):
    """The default run directory runs/<recipe>-<timestamp> is stamped to the second: two runs of one recipe started
    together (seeds side by side) wrote into the same directory, mixing their files, and both reported success. The
    command now makes the directory itself, taking the next free name (-2, ...); one that fails before writing
    anything leaves no directory behind."""
    from maskprop.train import loop, setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(setup, "default_run_dir", lambda name: Path("runs") / f"{name}-20260101-000000")
    outs = []

    def started(cfg, out=None, resume=False, threads=None):  # a run that has begun writing, then is stopped
        outs.append(out)
        (Path(out) / "config.yaml").write_text("method: dense\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "fit", started)
    assert main(["train", str(recipe)]) == 130 and main(["train", str(recipe)]) == 130
    assert outs == [Path("runs/tiny-20260101-000000"), Path("runs/tiny-20260101-000000-2")]

    def refused(cfg, out=None, resume=False, threads=None):  # a run refused before it writes anything
        outs.append(out)
        raise ValueError("data.root is required")

    monkeypatch.setattr(loop, "fit", refused)
    assert main(["train", str(recipe)]) == 2 and outs[-1] == Path("runs/tiny-20260101-000000-3")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny-20260101-000000", "tiny-20260101-000000-2"]
    capsys.readouterr()
    (tmp_path / "fresh").mkdir()
    monkeypatch.chdir(tmp_path / "fresh")  # no runs/ yet: the refused run leaves none either
    assert main(["train", str(recipe)]) == 2 and list((tmp_path / "fresh").iterdir()) == []


def test_a_libraries_error_of_several_lines_is_one_line(capsys, recipe, tmp_path):
    """torchvision's MaxViT refuses an input size with a message of two lines (its blocks' sizes on the second):
    ``maskprop train`` prints it as one line, exit status 2, and writes nothing."""
    pytest.importorskip("torchvision")
    line = _usage_error(capsys, ["train", str(recipe), "model.name=torchvision:maxvit_t", "data.image_size=64",
                                 "model.kwargs.input_size=[64,64]", "--out", str(tmp_path / "run")])
    assert line.startswith("maskprop train: error: model.kwargs={'input_size': [64, 64]} do not fit model "
                           "'torchvision:maxvit_t'")
    assert "not divisible by partition size 7" in line and "block input sizes: [(16, 16)" in line
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_torch_loads_is_one_line():
    """A Ctrl-C while ``import torch`` runs (the first seconds of every command) leaves torch half imported, its
    ``torch.distributed`` among the modules: the command says it was interrupted, in one line, and exits 130, rather
    than importing torch again to leave a process group it never joined."""
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import builtins, sys
        real = builtins.__import__

        def interrupted(name, *args, **kwargs):
            if name == "torch" or name.startswith("torch."):
                sys.modules.setdefault("torch.distributed", type(sys)("torch.distributed"))  # what was loaded
                raise KeyboardInterrupt
            return real(name, *args, **kwargs)

        builtins.__import__ = interrupted
        from maskprop.cli import main
        sys.exit(main(["bench", "--models", "resnet20"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "maskprop bench: interrupted\n")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_checks_the_run_says_what_it_would_do_and_writes_nothing(recipe, tmp_path, monkeypatch, capsys):
    """``--dry-run`` builds what a run builds and prints its plan; the figures are those a run then trains with."""
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    assert main(["train", str(recipe), "--dry-run", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    params = sum(p.numel() for p in maskprop.create_model("resnet20", num_classes=10).parameters())
    groups = maskprop.create_model("resnet20", num_classes=10).channel_groups()
    steps = TINY["data"]["train_size"] // TINY["data"]["batch_size"]  # the last partial batch is dropped
    assert lines[0] == "dry run of resnet20 (vrpge, keep_ratio 0.5): checked; nothing trained, nothing written"
    assert lines[1].startswith(f"model   resnet20 of maskprop.models.resnet: {params / 1e3:.2f}K params, ")
    assert lines[1].endswith(f"at 3x16x16, 10 classes; {sum(groups.values())} channels in {len(groups)} prunable "
                             f"groups")
    assert lines[2] == f"data    shapes: 64 training examples, 32 for validation; batch 32, {steps} steps an epoch"
    assert lines[3] == f"phases  search 1 epoch, {steps} steps: {steps} steps in all"
    assert lines[4] == f"budget  {round(0.5 * sum(groups.values()))} of {sum(groups.values())} channels kept in " \
                       f"expectation"
    assert lines[5] == "device  cpu, float32, channels_last; eager steps"
    assert lines[6].startswith("out     a new directory, as 'runs/tiny-")
    assert _tree(tmp_path) == before  # no runs/ folder, no run directory
    assert main(["train", str(recipe), "--out", "run", "--dry-run", "--threads", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "out     'run' (a new run)"
    assert _tree(tmp_path) == before
    # What a run would refuse at its start, the dry run refuses in the same line.
    assert main(["train", str(recipe), "model.name=resnet21", "--dry-run"]) == 2
    assert "resnet21" in capsys.readouterr().err
    # The run then takes the steps the plan said.
    summary = maskprop.fit(str(recipe), out=None, threads=1)
    assert summary["steps"] == {"search": steps, "finetune": 0, "train": 0}


def test_dry_run_of_a_resume_names_where_it_continues_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """A stopped run (SIGUSR1 after step 3, within its second epoch): ``--resume DIR --dry-run`` and
    ``--resume-if-exists --dry-run`` check its checkpoint and say where it continues, changing no file."""
    import signal

    config = with_overrides(TINY, **{"method": "dense", "data.train_size": 128, "data.batch_size": 32,
                                     "optim.epochs": 2})
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        signal_after_step(patch, 6)
        assert main(["train", str(recipe), "--out", str(run), "--threads", "1"]) == 128 + signal.SIGUSR1
    before = _tree(run)
    capsys.readouterr()
    for command in (["train", "--resume", str(run)], ["train", str(recipe), "--out", str(run), "--resume-if-exists"]):
        assert main([*command, "--dry-run", "--threads", "1"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[3] == "phases  train 2 epochs, 8 steps: 8 steps in all"
        assert out[-1] == f"out     '{run}': continues its run from train epoch 2, batch 2 (step 6)"
    assert _tree(run) == before
    assert main(["train", "--resume", str(run), "optim.lr=0.5", "--dry-run"]) == 0  # a resume may change the lr
    assert main(["train", "--resume", str(run), "model.name=resnet32", "--dry-run"]) == 2  # not the model
    assert "the config builds 'resnet32'; resume with the run's own model" in capsys.readouterr().err
    assert _tree(run) == before


def test_the_plans_device_line_names_the_kind_of_steps_and_why():
    """What a GPU run's plan says (its figures are tested above on the CPU): captured steps, or static-shape steps
    with the reason ``cuda_graphs: auto`` gave for not capturing them."""
    from maskprop.cli import _plan_text

    plan = {"model": "resnet50", "method": "vrpge", "keep_ratio": 0.5, "subnetwork": "searched", "input_size": [3, 224,
            224], "source": "maskprop.models.resnet", "params": 25_557_032, "flops": 8_178_000_000,
            "num_classes": 1000, "channels": 11456, "groups": 37, "data": "imagenet", "train_examples": 1281167,
            "val_examples": 50000, "batch_size": 256, "steps_per_epoch": 5004,
            "phases": [{"phase": "search", "epochs": 90, "steps": 450360}], "budget": 5728.0,
            "budget_unit": "channels", "device": "cuda:0", "amp": "bf16", "channels_last": True, "steps": "CUDA graphs",
            "steps_reason": None, "initial_weights": None, "run_dir": "runs/r50", "resume_from": None,
            "finished": False}
    assert "device  cuda:0, bf16 autocast, channels_last; steps captured as CUDA graphs" in _plan_text(plan)
    static = _plan_text(dict(plan, steps="static shapes", steps_reason="sparsity.weight_grad=both is not captured"))
    assert ("device  cuda:0, bf16 autocast, channels_last; static-shape steps, not captured (sparsity.weight_grad=both "
            "is not captured)") in static
    assert "phases  search 90 epochs, 450360 steps: 450360 steps in all" in static
