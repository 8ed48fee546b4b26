"""Operations: the run-directory lock, the model registry and its promotion rule (fast, no models)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import latest_artifact

from livo_core.errors import LivoError
from livo_core.lock import RunLock, read_holder
from livo_core.registry import MetricRule, ModelRegistry, PromotionRule, promote_if_not_worse

PY = sys.executable
PROJECT = Path(__file__).resolve().parent.parent   # the checkout: prefect.yaml, a process worker's working_dir
# Subprocesses (CLI runs, server, worker) render and train with one torch thread, as the fixture below.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


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


# --------------------------------------------------------------------------- dataset runs: failures, Dask, two at once
def _rows_by_pair(run) -> dict[str, tuple]:
    """pair_id -> (shard, aligned image bytes, violating image bytes) of every kept and rejected row."""
    from helpers import shard_rows

    rows = {}
    for r in shard_rows(run, ["pair_id", "shard_id", "jpg_0", "jpg_1"]):
        assert r["pair_id"] not in rows
        rows[r["pair_id"]] = (r["shard_id"], r["jpg_0"], r["jpg_1"])
    return rows


def test_a_failed_shard_is_reported_and_a_retry_rebuilds_only_it(prefect_harness, tiny_config, tmp_path, monkeypatch,
                                                                  one_torch_thread):
    from flows.cli import main
    from flows.dataset import dataset_flow

    config = tiny_config()
    run = tmp_path / "run"
    monkeypatch.setenv("LIVO_FAIL_SHARDS", "gender-equality-00000")
    with pytest.raises(LivoError) as err:
        dataset_flow(config=config, run_dir=str(run))
    message = str(err.value)
    assert message.startswith("1 shard(s) failed (gender-equality-00000: RuntimeError: shard gender-equality-00000 "
                              "made to fail by LIVO_FAIL_SHARDS") and f"livo resume {run}" in message
    stats = json.loads((run / "stats.json").read_text())
    assert [r["shard"] for r in stats["shards"] if r["status"] == "failed"] == ["gender-equality-00000"]
    report = latest_artifact("livo-dataset-failed")
    assert "gender-equality-00000" in report and "LIVO_FAIL_SHARDS" in report
    assert "bloody-inappropriate-00000" not in report
    done = {p: p.stat().st_mtime_ns for p in [*run.glob("*/*.parquet"), *run.glob("markers/*.complete.json")]}
    assert len([p for p in done if p.name.endswith(".complete.json")]) == 3   # 3 complete shards

    # Retry (the fault is gone): only the failed shard is rendered; the others are not touched.
    monkeypatch.delenv("LIVO_FAIL_SHARDS")
    assert main(["resume", str(run)]) == 0
    statuses = {r["shard"]: r["status"] for r in json.loads((run / "stats.json").read_text())["shards"]}
    assert statuses == {"bloody-inappropriate-00000": "cached", "bloody-inappropriate-00001": "cached",
                        "gender-equality-00000": "built", "gender-equality-00001": "cached"}
    assert {p: p.stat().st_mtime_ns for p in done} == done

    # The recovered dataset equals one that never failed: same pairs, same image bytes.
    clean = tmp_path / "clean"
    dataset_flow(config=config, run_dir=str(clean))
    assert _rows_by_pair(run) == _rows_by_pair(clean) and len(_rows_by_pair(run)) == 8


@pytest.mark.slow
def test_dask_task_runner_gives_the_same_pairs_and_images(prefect_harness, tiny_config, tmp_path, monkeypatch,
                                                          one_torch_thread):
    from flows.cli import main

    # The Dask worker processes report their task runs to the same Prefect API as this process.
    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config()))
    assert main(["dataset", "--out", str(tmp_path / "thread"), "--config", str(config_file)]) == 0
    assert main(["dataset", "--out", str(tmp_path / "dask"), "--config", str(config_file),
                 "--task-runner", "dask", "--dask-workers", "2"]) == 0
    thread, dask = _rows_by_pair(tmp_path / "thread"), _rows_by_pair(tmp_path / "dask")
    assert len(thread) == 8 and thread == dask
    statuses = [r["status"] for r in json.loads((tmp_path / "dask" / "stats.json").read_text())["shards"]]
    assert statuses == ["built"] * 4


@pytest.mark.slow
def test_two_runs_on_one_run_dir_the_second_is_refused_naming_the_first(prefect_harness, tiny_config, tmp_path,
                                                                        one_torch_thread):
    from flows.dataset import dataset_flow

    config = tiny_config()
    run = tmp_path / "run"
    # A real first run: `livo dataset` in its own process, on the session's Prefect API.
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    env = {**os.environ, **ONE_THREAD, "PREFECT_API_URL": prefect_harness}
    first = subprocess.Popen([PY, "-m", "flows.cli", "dataset", "--out", str(run), "--config", str(config_file)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while read_holder(run).get("pid") != first.pid:   # wait until the first run holds its lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        with pytest.raises(LivoError) as err:
            dataset_flow(config=config, run_dir=str(run))
        message = str(err.value)
        assert message.startswith(f"{run} is locked by pid {first.pid} on {socket.gethostname()} (livo dataset, since ")
        assert "wait for that run to finish or stop it" in message
    finally:
        out, errs = first.communicate(timeout=600)
    assert first.returncode == 0, errs[-2000:]
    assert json.loads((run / "stats.json").read_text())["summary"]["shards_complete"] == 4


# --------------------------------------------------------------------------- a real Prefect server, deployments, a worker
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, with its children (SIGTERM, then SIGKILL)."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free port with its own PREFECT_HOME; yields (api_url, env for clients)."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **ONE_THREAD, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": url,
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "10"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([PY, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300   # 3-7 s on an idle machine; much longer on a busy one
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).json() is True:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not become healthy in 300 s"
            time.sleep(1)
        yield url, env
    finally:
        _stop(server)
        log.close()
    assert server.returncode is not None


def _deployments(url: str) -> dict[str, dict]:
    import httpx

    found = httpx.post(f"{url}/deployments/filter", json={"offset": 0, "limit": 50}, timeout=60).raise_for_status().json()
    flows = {f["id"]: f["name"] for f in httpx.post(f"{url}/flows/filter", json={"offset": 0, "limit": 50},
                                                    timeout=60).raise_for_status().json()}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in found}


@pytest.mark.slow
def test_deployments_on_a_real_server_and_a_nightly_run_picked_up_by_a_worker(prefect_server, toyworld_model, tmp_path):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from livo_core.registry import ModelRegistry
    from helpers import small_nightly

    url, env = prefect_server
    # prefect.yaml declares the deployments ...
    done = subprocess.run([PY, "-m", "flows.cli", "deploy", "--prefect-yaml", str(PROJECT / "prefect.yaml")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    from_yaml = _deployments(url)
    assert {"livo-dataset/dataset", "livo-heldout/heldout", "livo-nightly/nightly"} <= set(from_yaml)
    nightly = from_yaml["livo-nightly/nightly"]
    assert nightly["entrypoint"] == "flows.nightly.nightly_flow" and nightly["parameters"]["root"] == "runs/nightly"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 3 * * *"]
    assert nightly["work_pool_name"] == "livo" and nightly["job_variables"] == {"working_dir": str(PROJECT)}
    assert nightly["global_concurrency_limit"]["limit"] == 1

    # ... and `livo deploy` creates (updates) the same ones, with the work pool made if missing.
    root = tmp_path / "nightly"
    done = subprocess.run([PY, "-m", "flows.cli", "deploy", "--work-pool", "livo-test", "--root", str(root),
                           "--nightly-cron", "15 2 * * *"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "livo: deployment livo-nightly/nightly" in done.stdout and "prefect worker start --pool livo-test" in done.stdout
    deployed = _deployments(url)
    nightly = deployed["livo-nightly/nightly"]
    assert nightly["work_pool_name"] == "livo-test" and nightly["entrypoint"] == "flows.nightly.nightly_flow"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["15 2 * * *"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC" and nightly["parameters"]["root"] == str(root)
    assert nightly["global_concurrency_limit"]["limit"] == 1 and len(nightly["schedules"]) == 1

    # A worker of that pool picks up a triggered nightly run and runs it as a subprocess.
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([PY, "-m", "prefect", "worker", "start", "--pool", "livo-test", "--type", "process"],
                              env=env, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            run = run_deployment("livo-nightly/nightly", parameters={"root": str(root), "overrides": small_nightly(toyworld_model)},
                                 timeout=1500, poll_interval=3)
    finally:
        _stop(worker)
        worker_log.close()
    assert run.state.is_completed(), (run.state, (tmp_path / "worker.log").read_text()[-4000:])

    registry = ModelRegistry(root / "models")
    assert registry.current() == "v0001" and registry.decisions()[-1]["reason"] == "no production version yet"
    report = latest_artifact("livo-nightly-comparison", api_url=url)
    assert "**v0001 promoted** to production" in report and "heldout_loss" in report
