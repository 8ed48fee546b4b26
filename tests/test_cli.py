"""`livo dataset` / `livo resume` as a user runs them: real subprocesses, SIGKILL mid-run, bad input."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from livo_core.dataset import prepare_run_dir
from livo_core.config import RunConfig
from livo_core.shards import SHARD_COLUMNS, complete_shard_ids, complete_shards, load_plan, read_shards, shard_paths
from helpers import shard_rows

ROOT = Path(__file__).resolve().parent.parent
# One torch thread in `livo` subprocesses: on 2 cores shared with other jobs, 2 threads ran ~10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def livo(*args: str, api_url: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `livo` command against the session's Prefect server (a fresh process would start its own)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": api_url})


def snapshot(folder: Path) -> dict[Path, tuple[int, str]]:
    """mtime and content hash of every file under `folder`."""
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pair_ids(run: Path) -> list[str]:
    """pair_ids of the kept and rejected rows of every complete shard."""
    return [r["pair_id"] for r in shard_rows(run, ["pair_id"])]


@pytest.mark.slow
def test_livo_dataset_on_the_embedded_default(toyworld_model, prefect_harness, tmp_path):
    run = tmp_path / "run"
    result = livo("dataset", "--out", str(run), api_url=prefect_harness)
    assert result.returncode == 0, result.stderr[-3000:]
    shards = complete_shards(run)
    assert len(shards) >= 2
    df = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)   # plain pandas
    assert list(df.columns) == SHARD_COLUMNS
    assert len(df) > 0 and df["pair_id"].is_unique
    assert pq.read_table(shards[0]).schema.names == SHARD_COLUMNS            # plain pyarrow
    assert set(df["label_0"]) == {1.0} and df["jpg_0"].map(lambda b: b[:4] == b"\x89PNG").all()
    same, problems = read_shards([run])
    assert problems == [] and len(same) == len(df)
    # Captured (not a terminal): livo's plain progress lines, no cursor escapes, no library progress bars.
    output = result.stdout + result.stderr
    assert "\x1b[" not in output and "\r" not in output
    for noise in ("Loading pipeline components", "Loading weights", "it/s]", "Writing model shards", "Traceback"):
        assert noise not in output, noise
    assert "livo: dataset bloody-inappropriate: 1/1 shards (100%)" in result.stderr


@pytest.mark.slow
def test_sigkill_then_resume(prefect_harness, tiny_config, tmp_path):
    config = tiny_config(prompts_per_value=4, shard_size=2, render={"steps": 8})   # 2 values x 4 shards
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "dataset", "--out", str(run),
                             "--config", str(tmp_path / "config.yaml")], cwd=ROOT, start_new_session=True,
                            env={**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while not complete_shard_ids(run):
            assert proc.poll() is None, f"livo dataset ended before a shard was complete: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no shard complete after 400 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)   # the run and anything it started, as `kill -9` of a session
        proc.wait()
    done = complete_shard_ids(run)
    assert 1 <= len(done) < 8, f"the kill should land mid-run, {len(done)} of 8 shards were complete"
    finished = {}
    for sid in done:
        for path in filter(Path.is_file, shard_paths(run, sid)):
            finished[path] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())

    result = livo("resume", str(run), api_url=prefect_harness)
    assert result.returncode == 0, result.stderr[-3000:]
    for path, (mtime, digest) in finished.items():   # byte-identical and not rewritten
        assert (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()) == (mtime, digest), path
    planned = {sid for shards in load_plan(run)["values"].values() for sid in shards}
    assert len(planned) == 8 and set(complete_shard_ids(run)) == planned
    assert not list(run.rglob("*.tmp-*"))
    ids = pair_ids(run)
    assert len(ids) == len(set(ids)) == 16
    _, problems = read_shards([run])
    assert problems == []


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def existing_run(tiny_config, tmp_path):
    """A run dir made with the tiny config (config.json plus a shard file), and that config's file."""
    config = tiny_config()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    prepare_run_dir(RunConfig.model_validate(config), run)
    (run / "shards").mkdir()
    (run / "shards" / "x.parquet").write_bytes(b"someone's data")
    return run, path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("livo: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("extra, expected", [
    (["--values", "no-such-value"], "unknown value id 'no-such-value'"),
    (["--base-model", "/no/such/model"], "base_model folder /no/such/model does not exist"),
    (["--set", "judge.clip_model=local-dir:/no/such/clip"], "judge.clip_model folder /no/such/clip does not exist"),
    (["--set", "render.steps=0"], "invalid config field 'render.steps'"),
    (["--set", "policy_text=no zombies"], "policy_text needs prompt_source=llm"),
    (["--set", "seed=5"], "holds a dataset made with another config"),
])
def test_bad_input_is_one_line_and_overwrites_nothing(existing_run, capsys, extra, expected):
    run, config = existing_run
    before = snapshot(run)
    assert main(["dataset", "--out", str(run), "--config", str(config), *extra]) == 2
    assert expected in _error_line(capsys)
    assert snapshot(run) == before


def test_empty_prompt_list_and_unreadable_config(tiny_config, tmp_path, capsys):
    # Every template gives aligned == user prompt, so no prompt pair can be made.
    (tmp_path / "empty-seeds.yaml").write_text(yaml.safe_dump({
        "slots": {"x": ["a"]}, "templates": {"bloody-inappropriate": [{"user": "{x} cat", "aligned": "{x} cat"}]}}))
    config = tiny_config(seeds_file=str(tmp_path / "empty-seeds.yaml"), values=["bloody-inappropriate"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["dataset", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "no prompt pairs were produced for value 'bloody-inappropriate'" in _error_line(capsys)
    assert not (tmp_path / "run").exists()

    (tmp_path / "broken.yaml").write_text("render: {steps: [unclosed\n")
    assert main(["dataset", "--out", str(tmp_path / "run"), "--config", str(tmp_path / "broken.yaml")]) == 2
    assert "is unreadable" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_resume_needs_a_run_dir(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _error_line(capsys)
    (tmp_path / "notarun").mkdir()
    assert main(["resume", str(tmp_path / "notarun")]) == 2
    assert "not a livo dataset run" in _error_line(capsys)
    (tmp_path / "notarun" / "config.json").write_text("{not json")
    assert main(["resume", str(tmp_path / "notarun")]) == 2
    assert "config.json is unreadable" in _error_line(capsys)
