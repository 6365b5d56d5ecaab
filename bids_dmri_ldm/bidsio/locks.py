"""Advisory locks that give one process at a time the ownership of a source run's derivatives.

A run's derivatives are written, checked and (after a failure) removed only by the process that
holds the run's lock, ``<output_dir>/logs/locks/<run id>.lock`` (``logs/`` is in
``.bidsignore``). The lock is a BSD ``flock`` on that file: the kernel releases it when its
holder exits, however it ends (``kill -9`` included), so a stale lock never blocks a rerun and
lock files are never deleted (deleting a lock file another process is waiting on would let two
processes own one run). The holder writes who it is into the file, so a process that finds the
run taken can say by whom.

``flock`` works between processes on one machine and, on Linux, on NFS (emulated with byte-range
locks); two processes of one invocation never contend for a run.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_DIR = Path("logs") / "locks"
"""Folder of the run locks, relative to the output directory."""


class LockUnavailable(OSError):
    """The lock file cannot be created or opened (e.g. the output directory is read-only)."""


class RunLock:
    """The lock of one source run's derivatives in ``output_dir``.

    Parameters
    ----------
    output_dir : path
        Root of the derivatives dataset.
    run_id : str
        The run's name stem (``sub-01_ses-1_dwi``); one lock file per run.
    folder : path
        Folder of the lock files inside ``output_dir`` (default :data:`LOCK_DIR`).

    Use :meth:`acquire` (non-blocking or blocking) and :meth:`release`; the lock is also released
    when the object is garbage-collected or the process ends.
    """

    def __init__(self, output_dir: str | os.PathLike, run_id: str, folder: str | os.PathLike = LOCK_DIR):
        self.path = Path(output_dir) / folder / f"{run_id}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; return False when another process holds it (``blocking=False``).

        ``blocking=True`` waits until the holder releases it or ends (Ctrl-C interrupts the wait).

        Raises
        ------
        LockUnavailable
            The lock file cannot be created or opened.
        """
        if self._fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o664)
            except PermissionError:  # made by another user: a read-only descriptor locks as well
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise LockUnavailable(err.errno, f"cannot create the run lock {self.path}: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise LockUnavailable(err.errno, f"cannot lock {self.path}: {err.strerror}") from None
        except BaseException:  # KeyboardInterrupt while waiting
            os.close(fd)
            raise
        self._fd = fd
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        except OSError:  # a read-only descriptor: the lock holds, only the note is missing
            pass
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it (``pid N on HOST since TIME``), or ``"?"``."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            return "?"
        return text.splitlines()[0] if text else "?"

    def release(self) -> None:
        """Release the lock (the file stays; see the module docstring)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __del__(self):  # pragma: no cover - safety net; release() is called explicitly
        try:
            self.release()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> RunLock:
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
