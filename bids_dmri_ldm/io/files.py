"""Atomic writes of files and folders (standard library + numpy; no BIDS, no nipype).

The one place where the package writes a file atomically: a temporary file in the target's
folder, renamed onto the target (``os.replace``) only when complete, mode 0644; on any error the
temporary file is removed and the target is left as it was. Readers never see a half-written
file; a crash leaves at most a hidden ``.<name>.*.tmp`` file. Images go through
:mod:`.nifti` (built on :func:`atomic_path`); folders (model bundles, staged datasets) through
:func:`replace_dir`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is made 0644 and renamed onto
    ``path`` (``os.replace``), on any error it is removed and ``path`` is left as it was.

    ``suffix`` ends the temporary name (writers that pick a format from it: ``".png"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (keys sorted, numpy values as Python's) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def atomic_link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Give ``dst`` the content of ``src`` atomically: a hard link when both are on one file
    system (no byte is copied or cached twice, as nipreps' data sinks do with
    ``copyfile(use_hardlink=True)``), else a copy (:func:`atomic_copy`).

    Safe because this package never changes a written file in place: every writer replaces its
    target (:func:`atomic_path`), which gives the target a new inode and leaves the other name
    on the old content.
    """
    with atomic_path(dst) as tmp:
        os.unlink(tmp)  # os.link does not overwrite; the name stays reserved to this writer
        try:
            os.link(src, tmp)
        except OSError:  # another file system (EXDEV), or one without hard links
            shutil.copyfile(src, tmp)
    return Path(dst)


def file_stamp(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(resolved path, size in bytes, modification time in ns)`` of a file: what the work
    folder's records of uncompressed copies note, so that a reader uses a copy only while the file
    it stands for is unchanged."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished folder ``staging`` at ``target`` (same file system).

    A new ``target`` appears with one rename. An existing one is first renamed aside
    (``.<name>.old``), the new one renamed in, then the old one removed: at every moment
    ``target`` is either the complete old folder or the complete new one (between the two
    renames it is briefly absent).
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(staging, target)
        return target
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def json_default(obj: Any) -> Any:
    """JSON form of numpy scalars and arrays and of paths (``json.dumps(default=...)``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


__all__ = [
    "atomic_copy",
    "atomic_link_or_copy",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_stamp",
    "json_default",
    "replace_dir",
]
