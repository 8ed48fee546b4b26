"""Operations: the run-directory lock, the model registry and its promotion rule (fast, no models)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from livo_core.errors import LivoError
from livo_core.lock import RunLock, read_holder
from livo_core.registry import MetricRule, ModelRegistry, PromotionRule, promote_if_not_worse

PY = sys.executable


def _hold_lock_in_subprocess(directory, seconds: float, purpose: str = "holder test") -> subprocess.Popen:
    """A real second process that takes the lock, prints 'locked', and holds it for `seconds`."""
    code = textwrap.dedent(f"""
        import time
        from livo_core.lock import RunLock
        with RunLock({str(directory)!r}, purpose={purpose!r}):
            print("locked", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --------------------------------------------------------------------------- lock
def test_second_process_is_refused_with_the_holder_named(tmp_path):
    proc = _hold_lock_in_subprocess(tmp_path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LivoError) as err:
            RunLock(tmp_path, timeout_s=0).acquire()
        message = str(err.value)
        assert time.monotonic() - t0 < 2
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "holder test" in message
        assert str(tmp_path) in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()
    # The kernel released the killed holder's flock: the lock is free at once.
    with RunLock(tmp_path) as lock:
        assert lock.held and read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) == {}   # released: the file no longer names a holder


def test_second_run_waits_for_the_first_within_its_timeout(tmp_path):
    proc = _hold_lock_in_subprocess(tmp_path, 1.5)
    t0 = time.monotonic()
    with RunLock(tmp_path, timeout_s=30, poll_s=0.1):
        waited = time.monotonic() - t0
    proc.wait()
    assert 0.5 < waited < 25

    proc = _hold_lock_in_subprocess(tmp_path, 30)
    try:
        t0 = time.monotonic()
        with pytest.raises(LivoError, match="waited 1 s"):
            RunLock(tmp_path, timeout_s=1, poll_s=0.1).acquire()
        assert 0.9 < time.monotonic() - t0 < 5
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_dead_process_kept_by_its_child_is_taken_over(tmp_path):
    # The holder forks a child (which inherits the flock) and dies: the lock file names a dead pid,
    # yet the flock is still held by the orphaned child.
    code = textwrap.dedent(f"""
        import os, sys, time
        from livo_core.lock import RunLock
        lock = RunLock({str(tmp_path)!r}, purpose="forking holder").acquire()
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(os.getpid(), child, flush=True)
        os._exit(0)
    """)
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    dead, orphan = map(int, proc.stdout.readline().split())   # (the orphan keeps the pipe open: no communicate)
    proc.wait()
    assert read_holder(tmp_path)["pid"] == dead
    with pytest.raises(BlockingIOError):   # the flock really is still held (by the orphan)
        import fcntl
        with open(tmp_path / ".lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with RunLock(tmp_path, timeout_s=0) as lock:
            assert lock.held and read_holder(tmp_path)["pid"] == os.getpid()
    finally:
        os.kill(orphan, 9)


def test_lock_in_one_process_excludes_a_second_lock_in_the_same_process(tmp_path):
    with RunLock(tmp_path, purpose="first"):
        with pytest.raises(LivoError, match="first"):
            RunLock(tmp_path).acquire()


# --------------------------------------------------------------------------- promotion rule
RULE = PromotionRule(metrics=[MetricRule(metric="heldout_loss", direction="min", tolerance=0.01),
                              MetricRule(metric="heldout_pref_acc", direction="max", tolerance=0.0)])


def test_promotion_rule_directions_and_tolerance():
    prod = {"heldout_loss": 1.00, "heldout_pref_acc": 0.60}
    assert promote_if_not_worse({"heldout_loss": 0.9, "heldout_pref_acc": 0.7}, prod, RULE)[0]
    # Worse loss but within tolerance, same accuracy: not worse.
    ok, reason = promote_if_not_worse({"heldout_loss": 1.005, "heldout_pref_acc": 0.60}, prod, RULE)
    assert ok and "heldout_loss" in reason
    # Loss beyond tolerance.
    ok, reason = promote_if_not_worse({"heldout_loss": 1.02, "heldout_pref_acc": 0.9}, prod, RULE)
    assert not ok and reason.startswith("worse on heldout_loss 1.02 vs 1") and "not worse on heldout_pref_acc" in reason
    # Higher-is-better metric dropped.
    ok, reason = promote_if_not_worse({"heldout_loss": 0.5, "heldout_pref_acc": 0.59}, prod, RULE)
    assert not ok and "worse on heldout_pref_acc" in reason
    # Missing or NaN counts as worse; no production promotes.
    assert not promote_if_not_worse({"heldout_loss": float("nan"), "heldout_pref_acc": 1.0}, prod, RULE)[0]
    assert not promote_if_not_worse({"heldout_pref_acc": 1.0}, prod, RULE)[0]
    assert promote_if_not_worse({"heldout_loss": 9.0}, None, RULE) == (True, "no production version yet")


# --------------------------------------------------------------------------- registry
def _fake_encoder(folder, tag: str):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode())
    return folder


def test_registry_versions_current_pointer_and_pruning(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.versions() == [] and reg.current() is None
    names = []
    for i in range(4):
        v = reg.add_version(_fake_encoder(tmp_path / f"enc{i}", f"w{i}"), {"heldout_loss": 1.0 - i / 10},
                            {"datasets": [{"run_dir": f"d{i}", "shards": [f"s{i}"], "config_hash": f"h{i}"}],
                             "parent": names[-1] if names else None})
        names.append(v)
    assert names == ["v0001", "v0002", "v0003", "v0004"] == reg.versions()
    assert (reg.encoder_dir("v0002") / "model.safetensors").read_bytes() == b"w1"
    assert reg.lineage("v0003")["parent"] == "v0002" and reg.metrics("v0004")["heldout_loss"] == pytest.approx(0.7)

    reg.set_current("v0002")
    assert reg.current() == "v0002" and (reg.root / "current").read_text() == "v0002\n"
    assert not list(reg.root.glob("current.tmp-*"))
    reg.record_decision({"candidate": "v0004", "production": "v0002", "promoted": False, "reason": "worse"})
    assert reg.metrics("v0004")["decision"]["reason"] == "worse" and reg.decisions()[-1]["promoted"] is False

    # Keep 2: v0003, v0004 stay as the newest; v0002 stays because it is production; v0001 goes.
    assert reg.prune(2) == ["v0001"]
    assert reg.versions() == ["v0002", "v0003", "v0004"]
    # Numbers keep growing after pruning (a version name is never reused).
    assert reg.add_version(_fake_encoder(tmp_path / "enc9", "w9"), {}, {}) == "v0005"

    with pytest.raises(LivoError, match="no version 'v0001'"):
        reg.set_current("v0001")
    (reg.root / "current").write_text("v0001\n")
    with pytest.raises(LivoError, match="not a complete version"):
        reg.current()
    with pytest.raises(LivoError, match="not a value encoder folder"):
        reg.add_version(tmp_path, {}, {})
