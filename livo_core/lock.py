"""One writer per directory: a lock held for a run's whole lifetime.

    with RunLock(run_dir, purpose="livo dataset", timeout_s=0):
        ...   # only this process writes run_dir

The lock is `fcntl.flock` on `DIR/.lock`. The kernel drops a flock when its holder dies, even by SIGKILL,
so a crashed run never blocks the next one. The file also holds who locked it (pid, host, purpose, since
when), so a refused run can say which process to wait for or stop.

A second run on the same directory waits up to `timeout_s` seconds (0 = refuse at once) and then raises a
LivoError naming the holder and the directory. One case needs care: a flock belongs to an open file, and a
child forked without exec (multiprocessing, some Dask setups) inherits it, so the lock can outlive the
process that took it. When the recorded holder is a dead process on this host, the lock is stale: it is
taken over by replacing the lock file (the orphaned flock then guards a deleted file).

flock works between processes on one machine and on most local file systems; on NFS it depends on the
server, and a holder on another host cannot be checked for liveness (it is waited for, never taken over).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from livo_core.errors import LivoError

log = logging.getLogger("livo.lock")

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


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
    """

    def __init__(self, directory: Path | str, purpose: str = "livo run", timeout_s: float = 0.0, poll_s: float = 0.5):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.purpose = purpose
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, inode = _read_fd(fd), os.fstat(fd).st_ino
                os.close(fd)
                if self._take_over_if_stale(holder, inode):
                    continue
                if time.monotonic() >= deadline:
                    how = f"waited {self.timeout_s:g} s; " if self.timeout_s else ""
                    raise LivoError(f"{self.directory} is locked by {_describe(holder)}: {how}wait for that run to "
                                    "finish or stop it, then try again (or give a longer lock timeout)") from None
                if not waited:
                    log.warning("%s is locked by %s; waiting up to %g s", self.directory, _describe(holder), self.timeout_s)
                    waited = True
                time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
                continue
            # Locked. If a stale-lock takeover replaced the file meanwhile, this flock guards a deleted file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            self._write_holder()
            return self

    def _take_over_if_stale(self, holder: dict, inode: int) -> bool:
        """Replace the lock file when its holder is a dead process on this host. True if replaced."""
        pid = holder.get("pid")
        if not isinstance(pid, int) or holder.get("host") != socket.gethostname() or _alive(pid):
            return False
        try:
            if os.stat(self.path).st_ino != inode:   # already replaced by another waiter: just try again
                return True
        except FileNotFoundError:
            return True
        log.warning("taking over the lock of %s: its holder, %s, is dead (a child process kept the lock)",
                    self.directory, _describe(holder))
        stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.path, stale)   # the orphaned flock stays on the renamed file
            stale.unlink()
        except FileNotFoundError:          # someone else took it over first
            pass
        return True

    def _write_holder(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        # Clear the holder first: an unlocked file that still names a pid would mislead a reader.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
