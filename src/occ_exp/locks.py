"""File locks between processes: one writer per run directory, one builder per cache entry.

Both are `flock(2)` locks on a small file. The kernel holds such a lock for as long as the
process keeps the file open and drops it when the process dies, however it dies (SIGKILL, OOM
killer, node reboot of a local disk), so a lock left by a dead process never blocks anyone: there
is nothing to clean up and no staleness to guess. The holder writes its pid, host and start time
into the file so that a refused process can say who holds it.

    with run_lock(run_dir):          # a second process on run_dir: RunDirLocked at once
        ...
    with file_lock(cache / "x.lock"):  # waits; a signal handler that raises (GracefulStop during
        ...                            # set-up) ends the wait at once

A process forked while holding a lock (without exec) would share it and keep it alive after the
holder's death; each lock is therefore closed in forked children (`os.register_at_fork`): closing
a shared descriptor does not release the parent's lock. Where the file system does not support
`flock` (some network mounts), the run goes on unlocked after one warning line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import weakref
from pathlib import Path

RUN_LOCK_NAME = ".run.lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


def holder(path: str | os.PathLike) -> str:
    """Who holds the lock at `path`, as written by the holder: 'pid N on host H since T'."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process (it has not written its pid yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info['pid']} on host {info.get('host', '?')} since {since}"


_held: "weakref.WeakSet[FileLock]" = weakref.WeakSet()


def _close_in_child() -> None:  # a forked child must not keep its parent's locks alive
    for lock in list(_held):
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_close_in_child)


class FileLock:
    """An exclusive flock on `path`, with the holder's pid and host written into the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None
        self.supported = True

    def acquire(self, blocking: bool = True, log=None) -> "FileLock":
        """Take the lock. Not `blocking`: RunDirLocked at once if another process holds it.
        `blocking`: wait (saying once who holds it, through `log`)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    raise RunDirLocked(f"{self.path.parent} is in use by {holder(self.path)}; wait for that run to end "
                                       "(or stop it), or give this one another directory (hydra.run.dir=...)") from None
                if log is not None:
                    log(f"waiting for the lock {self.path}, held by {holder(self.path)}")
                fcntl.flock(fd, fcntl.LOCK_EX)  # a raising signal handler interrupts this wait
        except OSError as e:
            os.close(fd)
            if e.errno not in _UNSUPPORTED:
                raise
            self.supported = False
            print(f"warning: {self.path.parent} does not support file locks ({e.strerror}); "
                  "going on without one, so do not start a second process on it", file=sys.stderr)
            return self
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _held.add(self)
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could let two processes lock two different files)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _held.discard(self)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "FileLock":  # acquire first (run_lock, file_lock); the block releases it
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, log=None):
    """Wait for an exclusive lock on `path` (e.g. one cache entry built by one process at a time)."""
    lock = FileLock(path).acquire(blocking=True, log=log)
    try:
        yield lock
    finally:
        lock.release()


def run_lock(run_dir: str | os.PathLike) -> FileLock:
    """The run directory's lock, taken at once or refused: RunDirLocked names the holder."""
    return FileLock(Path(run_dir) / RUN_LOCK_NAME).acquire(blocking=False)
