"""Writing files and directories so that a killed or failing process never leaves a half-written one behind.

Standard library only: the core (export) and the trainer both use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_directory", "atomic_write", "check_creatable", "claim_new_directory", "make_directory", "numbered",
           "sha256"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_creatable(path: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Check that no part of ``path`` is a file (where ``mkdir(parents=True)`` would raise ``FileExistsError`` or
    ``NotADirectoryError`` naming only that part).

    Raises:
        ValueError: one line naming ``target`` (default ``path``: what was to be created) and the file in the way.
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.is_dir():
            return
        if part.exists() or part.is_symlink():
            raise ValueError(f"cannot create '{target or path}': '{part}' is a file, not a directory")


def make_directory(path: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Create ``path`` and its missing parents (as ``mkdir(parents=True, exist_ok=True)``) and return it; a file in
    the way is one line naming ``target`` (:func:`check_creatable`)."""
    path = Path(path)
    check_creatable(path, target)
    path.mkdir(parents=True, exist_ok=True)
    return path


def numbered(path: str | os.PathLike) -> Iterator[Path]:
    """``path``, then ``path-2``, ``path-3``, ...: the names a default output takes where the one before is taken."""
    path = Path(path)
    yield path
    for number in itertools.count(2):
        yield path.with_name(f"{path.name}-{number}")


def claim_new_directory(path: str | os.PathLike) -> Path:
    """Create the first directory of :func:`numbered` ``path`` whose name is free, and return it. ``mkdir`` fails where
    the name exists, so two processes that chose the same name (a default name stamped to the second) never share the
    directory. Missing parents are created as by :func:`make_directory`."""
    path = Path(path)
    make_directory(path.parent, path)
    return next(candidate for candidate in numbered(path) if _created(candidate))


def _created(path: Path) -> bool:
    """Make the directory ``path``: ``False`` where the name is taken."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temp file in ``path``'s directory; on success flush, fsync and rename it over ``path``.

    On any error (or a kill before the rename) ``path`` keeps its previous content; the temp file is removed when
    Python still can. The parent directory is created if needed. The file gets the permissions of an ordinary
    ``open`` (not the private ones of a temp file: a run directory on a shared filesystem stays readable).
    """
    path = Path(path)
    make_directory(path.parent, path)
    with _naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _naming(target: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` of making a temp file or directory beside ``target`` as one naming ``target``: the
    user named that, and the temp name (``.out.k2x9.tmp``) means nothing to them."""
    try:
        yield
    except OSError as error:
        raise type(error)(error.errno, error.strerror or str(error), str(target)) from None


def _refuse_existing(target: Path, force: bool) -> None:
    if not force and (target.exists() or target.is_symlink()):
        raise ValueError(f"output directory '{target}' already exists; choose a new one, or force=True replaces it")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a new empty directory beside ``target`` to fill; when the block ends without error, rename it to
    ``target``.

    The directory gets the permissions of an ordinary ``mkdir`` (not the private ones of a temp directory), and the
    files written into it those of an ordinary ``open`` (some writers, safetensors' among them, make theirs private).
    On any
    error inside the block (or while placing it) the temp directory is removed and ``target`` is left as it was; the
    parent directory is created if needed. With ``force`` an existing ``target`` is replaced: it is moved aside, the
    new directory renamed into place, and only then the old one deleted.

    Args:
        target: The directory to create.
        force: Replace an existing ``target`` instead of refusing it.

    Raises:
        ValueError: ``target`` exists and not ``force`` (checked on entry, and again before the rename).
    """
    target = Path(target)
    _refuse_existing(target, force)
    make_directory(target.parent, target)
    with _naming(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        umask = _umask()
        tmp.chmod(0o777 & ~umask)
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                file.chmod(0o666 & ~umask)
        _refuse_existing(target, force)  # it may have appeared while the block ran
        if not (target.exists() or target.is_symlink()):
            os.replace(tmp, target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old / target.name, target)  # put the old one back (kept aside if even that fails)
            old.rmdir()
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256(path: str | os.PathLike) -> str:
    """The hex sha256 digest of the file ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
