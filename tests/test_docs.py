"""The documentation stands on its own: every repository path that a doc, docstring, comment, recipe or the README
names exists, every function that docs/methods.md names for a formula is defined where it says, and no project file
points at material outside the repository.

The scanner is tested on its own inputs first, so that a check that finds nothing cannot pass by accident.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_DIRS = ("maskprop", "tools", "tests", "recipes", "docs")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}
SKIP_DIRS = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}

# A path under one of the top-level directories, anywhere in the text (backticked or not): maskprop/sbp/layers.py,
# tools/count_ops.py, recipes/, docs/methods.md.
_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(TOP_DIRS) + r")/[\w./*<>{}-]*)")
# A backticked document of the repository root (named in capitals, as README.md) or `pyproject.toml`; lower-case
# names such as `report.md` are files a run writes.
_ROOT_FILE = re.compile(r"`([A-Z][A-Z0-9_-]*\.md|pyproject\.toml)`")
# A markdown link to something that is not a web address or an anchor of the same page.
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
# Names of material that lives outside the repository (built from parts so that this file does not name them).
_OUTSIDE = re.compile("|".join([
    r"\b" + "METHODS" + r"\.md\b", r"\b" + "DESIGN" + r"\.md\b", r"\b" + "STYLE" + r"\.md\b",
    r"(?<![\w-])" + "papers" + r"/", r"\bpaper" + r" 0\d\d\b", r"\.\./" + "shared",
    r"\b" + "DESIGN" + r" invariants?\b",
]))
# docs/methods.md's "Code:" lines: `path.py`: `name`, `Class.method`, ... up to the next path or the end of the line.
_CODE_LINE = re.compile(r"`((?:maskprop|tools)/[\w/]+\.py)`:((?:\s*`[\w.]+`(?: \([^)]*\))?,?)+)")


def project_files(root: Path = REPO) -> list[Path]:
    """The project's text files: sources, tests, tools, recipes, docs and the root's docs and config.

    In a git checkout, the files git tracks and the untracked ones it does not ignore (so a virtual environment or a
    run directory inside the checkout, under whatever name, is left out); elsewhere every file outside ``SKIP_DIRS``.
    """
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                                capture_output=True, check=True).stdout.decode()
        candidates = sorted(root / name for name in listed.split("\0") if name)
    except (OSError, subprocess.CalledProcessError):  # not a git checkout, or no git
        candidates = sorted(root.rglob("*"))
    files = []
    for path in candidates:
        parts = set(path.relative_to(root).parts[:-1])
        if (path.is_file() and path.suffix in TEXT_SUFFIXES and not parts & SKIP_DIRS
                and not any(part.endswith(".egg-info") or part.startswith(".venv") for part in parts)):
            files.append(path)
    return files


def _clean(token: str) -> str:
    return token.rstrip(".,;:)'\"")


def dangling_references(path: Path, text: str, root: Path = REPO) -> list[str]:
    """The repository paths and markdown links in ``text`` (the contents of ``path``) that name nothing that exists,
    sorted, each once."""
    missing = []
    for match in _PATH.finditer(text):
        token = _clean(match.group(1))
        if re.search(r"[*<>{}]", token):  # a pattern (recipes/*.yaml, runs/<name>): some file must match it
            pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", token)
            if not list(root.glob(pattern)):
                missing.append(token)
        elif not (root / token).exists():
            missing.append(token)
    for match in _ROOT_FILE.finditer(text):
        if not (root / match.group(1)).exists() and not (path.parent / match.group(1)).exists():
            missing.append(match.group(1))
    if path.suffix == ".md":
        for match in _LINK.finditer(text):
            target = match.group(1).split("#", 1)[0]
            if target and not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                missing.append(target)
    return sorted(set(missing))


def outside_references(text: str) -> list[str]:
    """Mentions of material outside the repository."""
    return [match.group(0) for match in _OUTSIDE.finditer(text)]


def undefined_code_names(text: str, root: Path = REPO) -> list[str]:
    """``path: name`` pairs of docs/methods.md's "Code:" lines whose name the file does not define."""
    missing = []
    for match in _CODE_LINE.finditer(text.replace("\n", " ")):
        source = root / match.group(1)
        code = source.read_text() if source.is_file() else ""
        for name in re.findall(r"`([\w.]+)`", match.group(2)):
            owner, _, member = name.rpartition(".")
            defined = rf"^\s*(?:def|class)\s+{member}\b|^{member}\s*[:=]"
            if owner:  # Class.method: the class in the file, the method inside it
                defined = rf"^\s*class\s+{owner}\b[\s\S]*?^\s+def\s+{member}\b"
            if not re.search(defined, code, re.MULTILINE):
                missing.append(f"{match.group(1)}: {name}")
    return missing


# ---------------------------------------------------------------------------------------------------------------------
# The scanner itself


def test_the_scanner_finds_dangling_paths_links_and_outside_material(tmp_path):
    # The example paths are spelt with variables so that this file names no missing path itself.
    tools, recipes, docs = TOP_DIRS[1], TOP_DIRS[3], TOP_DIRS[4]
    (tmp_path / tools).mkdir()
    (tmp_path / tools / "real.py").write_text("")
    (tmp_path / recipes).mkdir()
    (tmp_path / recipes / "a.yaml").write_text("")
    (tmp_path / "README.md").write_text("")
    gone = "GONE" + ".md"
    text = (f"See `{tools}/real.py`, {tools}/gone.py, {recipes}/*.yaml and {recipes}/*.json; `README.md`, `{gone}`.\n"
            f"[ok](README.md) [web](https://example.org) [anchor](#x) [bad]({docs}/none.md#y) `report.md`\n")
    doc = tmp_path / "notes.md"
    doc.write_text(text)
    assert dangling_references(doc, text, tmp_path) == sorted([f"{tools}/gone.py", f"{recipes}/*.json", gone,
                                                               f"{docs}/none.md"])
    assert dangling_references(doc, f"{tools}/real.py. `{recipes}/`, {tools}/real.py:", tmp_path) == []

    outside = ("as " + "METHODS" + ".md says", "paper" + " 003", "see ../" + "shared/x", "in " + "papers" + "/001.txt",
               "DESIGN" + ".md invariant 5", "STYLE" + ".md")
    for phrase in outside:
        assert outside_references(phrase), phrase
    assert outside_references("docs/methods.md, the MSBP paper, sbp/papers_x.py, paper 12") == []


def test_the_scanner_checks_the_names_of_code_lines(tmp_path):
    package = TOP_DIRS[0]
    (tmp_path / package).mkdir()
    (tmp_path / package / "m.py").write_text("X = 1\n\n\ndef f():\n    pass\n\n\nclass C:\n    def g(self):\n"
                                               "        pass\n")
    text = f"Code: `{package}/m.py`: `f`, `C`, `C.g`, `X`;\n`{package}/m.py`: `h`, `C.h` (a note)."
    assert undefined_code_names(text, tmp_path) == [f"{package}/m.py: h", f"{package}/m.py: C.h"]


def test_a_dangling_reference_added_to_a_project_file_fails_the_check(tmp_path):
    """What the real check does when someone adds a file that names a missing path: it reports it."""
    package, docs = TOP_DIRS[0], TOP_DIRS[4]
    root = tmp_path / "repo"
    (root / package).mkdir(parents=True)
    source = root / package / "new.py"
    source.write_text(f'"""Implements {docs}/methods.md, section 9 (see ' + "DESIGN" + '.md)."""\n')
    assert project_files(root) == [source]
    assert dangling_references(source, source.read_text(), root) == [f"{docs}/methods.md"]
    assert outside_references(source.read_text()) == ["DESIGN" + ".md"]


# ---------------------------------------------------------------------------------------------------------------------
# The repository


FILES = project_files()


def test_the_project_files_include_every_kind_of_doc():
    names = {path.relative_to(REPO).as_posix() for path in FILES}
    assert {"README.md", "BENCHMARKS.md", "docs/methods.md", "maskprop/cli.py", "recipes/quickstart.yaml",
            "tests/test_docs.py", "pyproject.toml"} <= names
    assert not any(name.startswith((".venv", "runs/")) for name in names)


def test_project_files_leave_out_what_git_ignores(tmp_path):
    """A virtual environment inside a checkout (CI makes ``.venv-ci``) holds thousands of third-party docs."""
    (tmp_path / ".gitignore").write_text("env-under-any-name/\n")
    for name in ("README.md", "pkg/x.py", "env-under-any-name/lib/site.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    names = {path.relative_to(tmp_path).as_posix() for path in project_files(tmp_path)}
    assert names == {"README.md", "pkg/x.py"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_named_path_exists(path):
    assert dangling_references(path, path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_nothing_points_outside_the_repository(path):
    assert outside_references(path.read_text(encoding="utf-8")) == []


def test_methods_doc_names_code_that_exists():
    text = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    assert len(_CODE_LINE.findall(text.replace("\n", " "))) >= 20  # every section says where its code is
    assert undefined_code_names(text) == []


def test_methods_doc_cites_the_papers_by_title():
    text = " ".join((REPO / "docs" / "methods.md").read_text(encoding="utf-8").split())
    for title in ("Efficient Neural Network Training via Forward and Backward Propagation Sparsification",
                  "meProp: Sparsified Back Propagation for Accelerated Deep Learning with Reduced Overfitting",
                  "Memorized Sparse Backpropagation"):
        assert f'"{title}"' in text, title
