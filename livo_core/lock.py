"""One writer per directory: a lock held for a run's whole lifetime.

    with RunLock(run_dir, purpose="livo dataset", timeout_s=0):
        ...   # only this process writes run_dir

The lock is `fcntl.flock` on `DIR/.lock`, which is never replaced or deleted: every process locks the same
file, and the kernel lets exactly one open file hold it. The kernel drops a flock when its holder dies,
even by SIGKILL, so a crashed run never blocks the next one and no "stale lock" needs taking over (taking
over by replacing the file is what let two processes hold a lock at once: a waiter could replace the file
a second waiter had just locked).

A flock belongs to an open file, and a child forked without exec (multiprocessing, some Dask setups)
shares its parent's open files. So that a forked child never keeps a dead parent's lock, every forked
child closes its copy of the held lock files at once (`os.register_at_fork`); the parent's lock is not
affected (a flock is released only by LOCK_UN or when every copy is closed). Children started with exec
never see the file (it is opened O_CLOEXEC).

The file also holds who locked it (pid, host, purpose, since when), so a refused run can say which
process to wait for or stop. A second run on the same directory waits up to `timeout_s` seconds (0 =
refuse at once) and then raises a LivoError naming the holder and the directory.

A reader that must not see a run change under it (`livo export`) takes the lock shared
(`RunLock(dir, shared=True)`): any number of readers at once, no writer meanwhile. A shared lock opens the
file read-only and writes nothing, so it works on a read-only copy of a run too.

flock works between processes on one machine and on most local file systems; on NFS it depends on the
server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path

from livo_core.errors import LivoError

log = logging.getLogger("livo.lock")

LOCK_NAME = ".lock"

# Locks this process holds: a forked child closes their files (see the module docstring).
_HELD: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _close_in_child() -> None:
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def read_holder(directory: Path) -> dict:
    """What the lock file says about its holder ({} when empty or unreadable). Says nothing about whether it is held."""
    try:
        return json.loads((Path(directory) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _read_fd(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (holder unknown)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('purpose', 'livo')}, "
            f"since {holder.get('since', '?')})")


class RunLock:
    """Exclusive lock on a directory for as long as the `with` block (or acquire..release) lasts.

    timeout_s: seconds to wait for another holder to finish; 0 refuses at once.
    poll_s: how often to try again while waiting.
    create: create the directory if it does not exist (False: a missing directory is a LivoError).
    shared: a reader's lock (see the module docstring); a directory without a lock file has no writer to wait for.
    """

    def __init__(self, directory: Path | str, purpose: str = "livo run", timeout_s: float = 0.0, poll_s: float = 0.5,
                 create: bool = True, shared: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.create = create
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        if self.create:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise LivoError(f"{self.directory} does not exist: nothing to lock")
        deadline = time.monotonic() + self.timeout_s
        waited = False
        while True:
            if self.shared:
                try:
                    fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return self   # never locked by a writer: nothing to share
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    how = f"waited {self.timeout_s:g} s; " if self.timeout_s else ""
                    raise LivoError(f"{self.directory} is locked by {_describe(holder)}: {how}wait for that run to "
                                    "finish or stop it, then try again (or give a longer lock timeout)") from None
                if not waited:
                    log.warning("%s is locked by %s; waiting up to %g s", self.directory, _describe(holder), self.timeout_s)
                    waited = True
                time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
                continue
            # Locked. If the directory was deleted and made again meanwhile, this flock guards a file that is gone.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            _HELD.add(self)
            if not self.shared:
                self._write_holder()
            return self

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        # Clear the holder first: an unlocked file that still names a pid would mislead a reader.
        if not self.shared:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:   # a full or read-only disk must not keep the lock held
                pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
