"""The ``maskprop`` command line: usage errors are one line with exit status 2 and write nothing; --version."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, with_overrides

import maskprop
from maskprop.cli import main

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
    assert "integer >= 0" in line
    assert not out.exists()


def test_export_threads_must_be_a_count_too(capsys, tmp_path):
    line = _usage_error(capsys, ["export", str(tmp_path), "--threads", "-1"])
    assert line.startswith("maskprop export: error: argument --threads:") and "integer >= 0" in line


def test_train_threads_zero_and_positive_parse():
    from maskprop.cli import build_parser

    assert build_parser().parse_args(["train", "r.yaml", "--threads", "0"]).threads == 0
    assert build_parser().parse_args(["train", "r.yaml", "--threads", "3"]).threads == 3


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
