"""The run-directory lock never has two holders: many real processes racing for it, round after round,
including rounds where the holder is SIGKILLed (alone, or after forking a child that outlives it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from livo_core.lock import RunLock, read_holder

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RACERS, ROUNDS = 8, 20

# A racer: each round, wait for the round's start file, take the lock (waiting for it), log enter/exit while
# holding it, then say it is done. Log lines are single O_APPEND writes: atomic and in order.
RACER = textwrap.dedent("""
    import os, sys, time
    from livo_core.lock import RunLock
    lock_dir, log, sync, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for r in range(rounds):
        while not os.path.exists(f"{sync}/go-{r}"):
            time.sleep(0.0005)
        with RunLock(lock_dir, purpose="racer", timeout_s=60, poll_s=0.001):
            os.write(fd, f"{r} enter {os.getpid()}\\n".encode())
            time.sleep(0.002)
            os.write(fd, f"{r} exit {os.getpid()}\\n".encode())
        open(f"{sync}/done-{r}-{os.getpid()}", "w").close()
""")

# A victim: takes the lock before the round starts, logs enter, (optionally forks a child that outlives
# it), logs "killed" while still holding the lock, and SIGKILLs itself. The racers must wait for its death.
VICTIM = textwrap.dedent("""
    import os, signal, sys, time
    from livo_core.lock import RunLock
    lock_dir, log, r, fork = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "fork"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lock = RunLock(lock_dir, purpose="victim").acquire()
    os.write(fd, f"{r} enter {os.getpid()}\\n".encode())
    print("holding", flush=True)
    if fork and os.fork() == 0:      # the child inherits the open lock file, then outlives its parent
        time.sleep(30)
        os._exit(0)
    time.sleep(0.2)                  # the racers are trying now
    os.write(fd, f"{r} exit {os.getpid()}\\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _check_log(lines: list[str]) -> dict[int, int]:
    """Replay the enter/exit log: never two holders at once. Returns holders per round."""
    inside: str | None = None
    per_round: dict[int, int] = {}
    for line in lines:
        r, what, pid = line.split()
        if what == "enter":
            assert inside is None, f"two holders at once: {pid} entered while {inside} held the lock (round {r})"
            inside = pid
            per_round[int(r)] = per_round.get(int(r), 0) + 1
        else:
            assert inside == pid, f"{pid} left a lock held by {inside}"
            inside = None
    return per_round


def test_racing_processes_never_share_the_lock(tmp_path):
    lock_dir, log, sync = tmp_path / "run", tmp_path / "log", tmp_path / "sync"
    lock_dir.mkdir()
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([PY, "-c", RACER, str(lock_dir), str(log), str(sync), str(ROUNDS)], env=env)
              for _ in range(RACERS)]
    orphans = []
    try:
        for r in range(ROUNDS):
            victim = None
            if r % 3 != 1:   # 2 rounds in 3: a SIGKILLed holder (every other one leaves a forked child behind)
                victim = subprocess.Popen([PY, "-c", VICTIM, str(lock_dir), str(log), str(r), "fork" if r % 2 else "plain"],
                                          env=env, stdout=subprocess.PIPE, text=True)
                assert victim.stdout.readline().strip() == "holding"
            (sync / f"go-{r}").touch()
            if victim is not None:
                assert victim.wait(timeout=60) == -signal.SIGKILL
            deadline = time.monotonic() + 120
            while len(list(sync.glob(f"done-{r}-*"))) < RACERS:
                assert all(p.poll() in (None, 0) for p in racers), "a racer crashed"
                assert time.monotonic() < deadline, f"round {r} did not finish"
                time.sleep(0.005)
        for p in racers:
            assert p.wait(timeout=60) == 0
    finally:
        for p in racers:
            if p.poll() is None:
                p.kill()
        # the victims' forked children (they hold no lock: they closed it at fork)
        for line in subprocess.run(["pgrep", "-f", "time.sleep\\(30\\)"], capture_output=True, text=True).stdout.split():
            orphans.append(int(line))
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    per_round = _check_log(log.read_text().splitlines())
    victims = sum(r % 3 != 1 for r in range(ROUNDS))
    # every racer held the lock once per round, and every victim once: one holder at a time, nobody starved
    assert sum(per_round.values()) == RACERS * ROUNDS + victims
    assert all(per_round[r] == RACERS + (r % 3 != 1) for r in range(ROUNDS))


def test_a_forked_child_does_not_keep_a_dead_parents_lock(tmp_path):
    code = textwrap.dedent(f"""
        import os, time
        from livo_core.lock import RunLock
        lock = RunLock({str(tmp_path)!r}, purpose="forking holder").acquire()
        child = os.fork()
        if child == 0:   # Python code runs in the child only after its fork hooks: the flag says they ran
            open({str(tmp_path / "child-started")!r}, "w").close()
            time.sleep(60)
            os._exit(0)
        while not os.path.exists({str(tmp_path / "child-started")!r}):   # a loaded machine may schedule it late
            time.sleep(0.01)
        print(os.getpid(), child, flush=True)
        os._exit(0)
    """)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dead, orphan = map(int, proc.stdout.readline().split())   # (the orphan keeps the pipe open: no communicate)
    proc.wait()
    try:
        assert read_holder(tmp_path)["pid"] == dead             # the file still names the dead holder ...
        with RunLock(tmp_path, timeout_s=0) as lock:           # ... but nobody holds the flock
            assert lock.held and read_holder(tmp_path)["pid"] == os.getpid()
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_the_lock_file_is_never_replaced(tmp_path):
    with RunLock(tmp_path):
        inode = os.stat(tmp_path / ".lock").st_ino
    with RunLock(tmp_path):
        assert os.stat(tmp_path / ".lock").st_ino == inode
