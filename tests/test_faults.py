"""Fault injection: `livo train` and `livo nightly` SIGKILLed right after each of their steps, then run again,
lose nothing and duplicate nothing (issue: kill -9 anywhere). Kill points: livo_core/faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def livo(*args, api_url: str, kill_at: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **ONE_THREAD, "PREFECT_API_URL": api_url}
    env.pop("LIVO_KILL_AT", None)
    if kill_at:
        env["LIVO_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


@pytest.fixture
def two_shard_run(tmp_path, tiny_sd):
    from helpers import make_run

    run = make_run(tmp_path / "data", tiny_sd, n_pairs=8)
    make_run(run, tiny_sd, n_pairs=8, seed=5, shard_id="no-red-00001")
    return run


@pytest.mark.slow
def test_train_killed_after_each_checkpoint_log_and_cache_write_resumes_exactly(prefect_harness, two_shard_run, tmp_path):
    common = ["train", "--data", str(two_shard_run), "--set", "max_steps=6", "--set", "checkpoint_every=2",
              "--set", "batch_size=4", "--set", "learning_rate=1e-3", "--set", "device=cpu", "--set", "log_every=1"]
    clean = livo(*common, "--out", str(tmp_path / "clean"), api_url=prefect_harness)
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = [*common, "--out", str(tmp_path / "killed")]
    steps = [  # (where the kill lands, what is on disk after it)
        ("train.piece:1", "one cache piece of two written, mid-precompute"),
        ("train.log:3", "log rows 1-3, checkpoint 2: the killed run logged past its checkpoint"),
        ("train.checkpoint:1", "checkpoint 4 renamed into place, nothing logged after it"),
        ("train.log:1", "one more row past checkpoint 4"),
    ]
    first = True
    for kill_at, what in steps:
        r = livo(*out, *([] if first else ["--resume", "latest"]), api_url=prefect_harness, kill_at=kill_at)
        assert r.returncode == -9, f"{kill_at} ({what}): {r.stderr[-1500:]}"
        first = False
    done = livo(*out, "--resume", "latest", api_url=prefect_harness)
    assert done.returncode == 0, done.stderr[-2000:]

    a = pd.read_csv(tmp_path / "clean" / "train_log.csv")
    b = pd.read_csv(tmp_path / "killed" / "train_log.csv")
    assert list(b["step"]) == [1, 2, 3, 4, 5, 6]          # every row exactly once
    assert a.equals(b)                                     # the uninterrupted run's loss sequence, bit for bit
    rows = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert not _temporaries(tmp_path / "killed")


STEPS = ["data", "heldout", "train", "evaluate", "register", "decide", "prune"]


@pytest.mark.slow
def test_nightly_killed_after_each_step_finishes_each_night_once(prefect_harness, toyworld_model, tmp_path):
    from helpers import small_nightly

    from livo_core.registry import ModelRegistry

    config = small_nightly(toyworld_model, keep_versions=1)
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(config))
    args = ["nightly", "--root", str(tmp_path / "root"), "--config", str(tmp_path / "nightly.yaml")]
    registry = ModelRegistry(tmp_path / "root" / "models")

    first = livo(*args, api_url=prefect_harness)                       # night 1, uninterrupted: production v0001
    assert first.returncode == 0, first.stderr[-2000:]
    for step in STEPS:                                                 # night 2, killed after every step in turn
        r = livo(*args, api_url=prefect_harness, kill_at=f"nightly.{step}")
        assert r.returncode == -9, f"nightly.{step}: {r.stderr[-1500:]}"
        assert registry.current() in registry.versions()              # `current` always names a complete version
    last = livo(*args, api_url=prefect_harness)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "night-0002" in last.stdout

    nights = [json.loads(p.read_text()) for p in sorted((tmp_path / "root" / "nights").glob("night-*.json"))]
    assert [(n["night"], n["status"]) for n in nights] == [("night-0001", "done"), ("night-0002", "done")]
    assert [d["key"] for d in registry.decisions()] == ["night-0001", "night-0002"]   # one decision per night
    keys = [registry.lineage(v)["key"] for v in registry.versions()]
    assert len(keys) == len(set(keys))                                                # one version per night
    assert nights[1]["candidate"] == "v0002" and registry.current() in ("v0001", "v0002")
    assert not _temporaries(tmp_path / "root" / "models") and not _temporaries(tmp_path / "root" / "nights")
    # a third night (uninterrupted) runs on as usual
    third = livo(*args, api_url=prefect_harness)
    assert third.returncode == 0 and "night-0003" in third.stdout
    assert [d["key"] for d in registry.decisions()] == ["night-0001", "night-0002", "night-0003"]
