"""Writing files so that a kill, a full disk or a second process never leaves a half-written one.

- `atomic_write(path, write)`: write to a hidden temporary `.<name>.tmp-<pid>-<n>` next to `path`, fsync,
  rename over `path`. Readers see the old file or the new one, never half; globbing consumers
  (`*.parquet`) never see the temporary (hidden name, other suffix); two writers never share one.
- `clean_tmp_files(folder)`: remove the temporaries of dead processes (a SIGKILL skips `finally`).
- `sha256_file(path)`: content hash, streamed (markers and caches record it; readers verify it).
- `check_writable(path, what)`: fail before any work when an output cannot be created.
"""

from __future__ import annotations

import errno

import hashlib
import itertools
import os
from pathlib import Path

from livo_core.errors import LivoError

_counter = itertools.count()


def fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry: sync it too, or a power cut can undo it.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """A temporary name for `path`: hidden, unique to this process and call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_counter)}")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync the file, rename it to `path` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (JSON, JSONL, CSV, markdown) atomically."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def _pid_of(name: str) -> int | None:
    tail = name.rsplit(".tmp-", 1)[-1]
    pid = tail.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_tmp_files(folder: Path, recursive: bool = True, pattern: str = "*.tmp-*") -> list[Path]:
    """Remove `*.tmp-<pid>*` files and folders under `folder` whose process is dead. Returns what was removed.

    pattern: narrow it to one output's temporaries (e.g. `.<name>.tmp-*` beside an export folder)."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in sorted((folder.rglob if recursive else folder.glob)(pattern)):
        pid = _pid_of(tmp.name)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue   # another live process is writing it
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_digest(folder: Path | str, full_below: int = 64 << 20) -> str:
    """A digest of a folder's (or a file's) content: every file's relative name and size, the whole bytes of
    files under `full_below`, the first and last MiB of larger ones (multi-GB weights: what distinguishes two
    checkpoints, at a cost independent of their size). Hidden files are left out."""
    root = Path(folder)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root) if p != root else p.name}|{size}|".encode())
        with open(p, "rb") as f:
            if size < full_below:
                while block := f.read(1 << 20):
                    h.update(block)
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read(1 << 20))
    return h.hexdigest()


def check_writable(path: Path | str, what: str = "--out", file: bool = False) -> None:
    """Raise a LivoError if `path` (a folder, or a file when file=True) could not be created or written.

    Walks up to the nearest existing folder: a file in the way, or a folder that is not writable (read-only
    disk, permissions), is refused before any work starts.
    """
    path = Path(path).expanduser()
    if path.exists():
        if file and path.is_dir():
            raise LivoError(f"{what} {path} is a folder: give a file name")
        if not file and not path.is_dir():
            raise LivoError(f"{what} {path} is a file: pass a new or empty directory")
        target = path if path.is_dir() else path.parent
    else:
        target = path.parent
        while not target.exists():
            target = target.parent
        if not target.is_dir():
            raise LivoError(f"{what} {path} cannot be created: {target} is a file, not a folder; choose another path")
    if not os.access(target, os.W_OK | os.X_OK):
        raise LivoError(f"{what} {path} cannot be written ({target} is read-only or not writable by you); "
                        "choose a writable path")


def os_error_line(e: OSError) -> str:
    """A filesystem fault as `<problem>; <fix>`."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device writing{where}; free some space, then run the command again "
                "(`livo resume RUN` finishes a dataset, `livo train ... --resume latest` a training; finished work is kept)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where} ({e.strerror}); choose a writable --out folder or fix its permissions"
    if e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"cannot create{where} ({e.strerror}): a file is in the way; choose another --out or remove that file"
    return f"{e.strerror or type(e).__name__}{where}; check the path and the disk, then run the command again"
