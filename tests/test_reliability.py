"""Reliability under faults: two trainers sharing a cache, a full disk, keys in configs, Ctrl-C / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.cli import main
from livo_core.shards import complete_shard_ids

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _rows(run: Path) -> list[str]:
    from helpers import shard_rows

    return sorted(f"{r['pair_id']}:{hash(r['jpg_0'])}:{hash(r['jpg_1'])}" for r in shard_rows(run, ["pair_id", "jpg_0", "jpg_1"]))


# --------------------------------------------------------------------------- a cache shared by two trainers
@pytest.mark.slow
def test_two_trainers_sharing_a_cache_at_once_both_finish_and_the_cache_holds_both(prefect_harness, tiny_sd, tmp_path):
    from helpers import make_run

    from livo_core.latents import load_piece

    a = make_run(tmp_path / "a", tiny_sd, n_pairs=8)                      # A's data ...
    make_run(a, tiny_sd, n_pairs=8, seed=3, shard_id="no-red-00001")
    b = make_run(tmp_path / "b", tiny_sd, n_pairs=8, seed=9)              # ... and B's: the cache must hold all three shards
    cache = tmp_path / "cache"
    env = {**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "train", "--data", str(d), "--out", str(tmp_path / f"out-{d.name}"),
                               "--set", f"cache_dir={cache}", "--set", "max_steps=2", "--set", "batch_size=2", "--set", "device=cpu"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in (a, b)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    metas = sorted(p.name.removesuffix(".json") for p in folder.glob("*.json"))
    assert len(metas) == 3 and all(load_piece(folder, m, verify=True) is not None for m in metas)
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- a full disk
def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_and_resume_finishes_the_same_dataset(prefect_harness, tiny_config, tmp_path,
                                                                            capfd, monkeypatch):
    config = tiny_config(prompts_per_value=3, shard_size=1)        # 12 small shards
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    clean = tmp_path / "clean"
    assert main(["dataset", "--out", str(clean), "--config", str(tmp_path / "config.yaml")]) == 0
    size = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file())

    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, f"{size // 2 // 1024}k")         # room for about half of the run
    if not mounted:   # no privilege to mount here: the same ENOSPC, raised by the writer after a few files
        import errno

        import livo_core.files as files

        real, calls = files.atomic_write, {"n": 0}

        def full_disk(path, write):
            calls["n"] += 1
            if calls["n"] > 25:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, write)

        monkeypatch.setattr(files, "atomic_write", full_disk)
        disk.mkdir(exist_ok=True)
    run = disk / "run"
    capfd.readouterr()
    try:
        code = main(["dataset", "--out", str(run), "--config", str(tmp_path / "config.yaml")])
        err = capfd.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("livo: error:")]
        assert code != 0 and len(lines) == 1 and "no space left on the device" in lines[0], err[-3000:]
        assert "Traceback" not in err
        done = complete_shard_ids(run)
        assert 0 < len(done) < 12, done
        # space is freed: the run is finished by `livo resume`, and equals the uninterrupted one
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        else:
            monkeypatch.setattr(files, "atomic_write", real)
        assert main(["resume", str(run)]) == 0
        assert len(complete_shard_ids(run)) == 12 and _rows(run) == _rows(clean)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# --------------------------------------------------------------------------- a key in a config
@pytest.mark.slow
def test_a_key_in_a_config_field_reaches_no_output_file_or_prefect_parameter(prefect_harness, tiny_config, tmp_path):
    import httpx

    key = "sk-proj-Vb7Nq2Xw9Kd4Tr6Ys1Lm3Hg8Fp5Jc0Az"
    runs = tmp_path / "runs"
    outputs = []
    for field, value in (("llm.api_key", key), ("llm.api_key_env", key), ("policy_text", f"use {key} please"),
                         ("base_model", key)):
        config = tiny_config()
        section, _, name = field.rpartition(".")
        (config.setdefault(section, {}) if section else config)[name] = value
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "--out", str(runs / name), "--config",
                            str(tmp_path / "c.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness})
        assert r.returncode == 2 and f"'{field}'" in r.stderr, r.stderr
        outputs.append(r.stdout + r.stderr)
        r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "--out", str(runs / f"set-{name}"), "--set",
                            f"{field}={value}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness})
        assert r.returncode == 2
        outputs.append(r.stdout + r.stderr)
    assert all(key not in o for o in outputs)
    assert not runs.exists() or not any(key.encode() in p.read_bytes() for p in runs.rglob("*") if p.is_file())
    # Prefect saw no flow run with the key in its parameters (the runs were refused before any flow started)
    found = httpx.post(f"{prefect_harness}/flow_runs/filter", json={"limit": 200}, timeout=60).raise_for_status().json()
    assert key not in json.dumps(found)


# --------------------------------------------------------------------------- Ctrl-C and SIGTERM
def _start(args: list[str], env_extra: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD, **env_extra})


def _wait_for(predicate, proc, what: str, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _sigterm_and_check(proc: subprocess.Popen) -> str:
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("livo: interrupted (SIGTERM)"), err[-3000:]
    assert "Traceback" not in err and not [ln for ln in lines if "Crash detected" in ln or "ConnectError" in ln]
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[c.cmdline() for c in alive]}"
    return lines[-1]


@pytest.mark.slow
def test_sigterm_stops_dataset_and_train_in_one_line_leaving_no_process_and_both_resume(prefect_harness, tiny_config,
                                                                                       tiny_sd, tmp_path):
    # No PREFECT_API_URL: livo starts its own ephemeral Prefect server, which must not outlive it.
    env = {"PREFECT_API_URL": "", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    config = tiny_config(prompts_per_value=4, shard_size=1, render={"steps": 8})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = _start(["dataset", "--out", str(run), "--config", str(tmp_path / "c.yaml")], env)
    _wait_for(lambda: len(complete_shard_ids(run)) >= 1, proc, "a complete shard")
    line = _sigterm_and_check(proc)
    assert f"livo resume {run}" in line
    assert len(complete_shard_ids(run)) < 16
    r = subprocess.run([sys.executable, "-m", "flows.cli", "resume", str(run)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness})
    assert r.returncode == 0 and len(complete_shard_ids(run)) == 16, r.stderr[-2000:]

    from helpers import make_run

    data = make_run(tmp_path / "data", tiny_sd, n_pairs=8)
    out = tmp_path / "train"
    args = ["train", "--data", str(data), "--out", str(out), "--set", "max_steps=400", "--set", "checkpoint_every=5",
            "--set", "batch_size=2", "--set", "device=cpu"]
    proc = _start(args, env)
    _wait_for(lambda: (out / "checkpoints" / "step-000005" / "state.json").is_file(), proc, "a checkpoint")
    line = _sigterm_and_check(proc)
    assert "--resume latest" in line
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args[:-6], "--set", "max_steps=12", "--set", "checkpoint_every=5",
                        "--set", "batch_size=2", "--set", "device=cpu", "--resume", "latest"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness})
    assert r.returncode == 0, r.stderr[-2000:]
    import pandas as pd

    assert list(pd.read_csv(out / "train_log.csv")["step"]) == list(range(1, 13))
