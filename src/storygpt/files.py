"""Writing files so that a crash never leaves half of one: `atomic_write` (a file) and `atomic_dir` (a folder),
both written beside their destination and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike, write, check=None, keep_old_as: str | os.PathLike | None = None) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path`: readers see the old or the new file, never half.

    check(tmp_path), when given, reads the written file back before it takes `path`'s place (it raises if the
    file is bad); keep_old_as: the file `path` held until now stays there (keep_copy). Whatever fails (a full
    disk, a bad read-back) leaves `path` and `keep_old_as` as they were and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result gets a normal file's permissions
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        if keep_old_as is not None and path.is_file():
            keep_copy(path, keep_old_as)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def keep_copy(path: str | os.PathLike, copy: str | os.PathLike) -> None:
    """`copy` becomes the file at `path`, atomically: a hard link (no bytes copied) where the filesystem has
    them, else a copy. `path` itself is not touched; replacing it later (os.replace) leaves `copy` as it was."""
    path, copy = Path(path), Path(copy)
    fd, tmp = tempfile.mkstemp(prefix=f".{copy.name}.", suffix=".tmp", dir=copy.parent)
    os.close(fd)
    try:
        os.unlink(tmp)  # os.link wants a free name; mkstemp only chose one no other writer uses
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, copy)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside `path` to fill; when the block ends without an error it replaces `path`
    (an old one is removed), otherwise it is deleted: `path` is the old folder or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


