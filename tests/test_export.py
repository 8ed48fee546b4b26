"""What consumers read: `datasets` on RUN/shards (shards that kept nothing included) and on a `livo export`."""

from __future__ import annotations

import json

import datasets
import pyarrow.parquet as pq
import pytest
import torch

THREADS = torch.get_num_threads()

from flows.cli import main
from flows.dataset import dataset_flow
from livo_core.shards import complete_shard_ids, read_marker, read_shards


@pytest.fixture(scope="module")
def run(prefect_harness, toyworld_model, tmp_path_factory):
    """The README's dataset (the embedded toy world) with one pair per shard: the judge rejects a few pairs,
    so some shards keep nothing (the case that broke `datasets`)."""
    from livo_core.config import load_config

    run = tmp_path_factory.mktemp("export") / "run"
    torch.set_num_threads(1)
    try:
        config = load_config(overrides={"shard_size": 1, "device": "cpu", "render.batch_size": 2})
        dataset_flow(config=config.model_dump(mode="json"), run_dir=str(run))
    finally:
        torch.set_num_threads(THREADS)
    return run


def kept_ids(run) -> list[str]:
    df, problems = read_shards([run])
    assert problems == []
    return sorted(df["pair_id"])


@pytest.mark.slow
def test_datasets_reads_run_shards_with_empty_shards(run):
    rows = {sid: read_marker(run, sid)["rows"] for sid in complete_shard_ids(run)}
    assert 0 in rows.values() and any(rows.values()), rows       # some shards kept nothing, some kept pairs
    ds = datasets.load_dataset("parquet", data_dir=str(run / "shards"), split="train")
    assert sorted(ds["pair_id"]) == kept_ids(run)


@pytest.mark.slow
def test_export_holds_exactly_the_kept_pairs_and_loads_both_configs(run, tmp_path, capsys):
    kept = kept_ids(run)
    shards = run / "shards"
    (shards / ".junk-00000.parquet.tmp-12345-0").write_bytes(b"half a file")      # a killed writer's temporary
    pq.write_table(pq.read_table(next(shards.glob("*.parquet"))), shards / "orphan-00000.parquet")   # no marker
    try:
        out = tmp_path / "my-pickapic-export"
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert "exported" in capsys.readouterr().out
        names = sorted(p.name for p in (out / "data").iterdir())
        assert not [n for n in names if "orphan" in n or "tmp" in n]
        assert len(names) == sum(1 for sid in complete_shard_ids(run) if read_marker(run, sid)["rows"])
        ds = datasets.load_dataset(str(out), split="train")
        assert sorted(ds["pair_id"]) == kept
        assert isinstance(ds[0]["jpg_0"], bytes) and set(ds["label_0"]) == {1.0}
        images = datasets.load_dataset(str(out), "images", split="train")
        assert images[0]["jpg_0"].size == (32, 32)
        card = (out / "README.md").read_text()
        assert "| bloody-inappropriate |" in card and "Diffusion-DPO" in card and "toyworld" in card
        record = json.loads((out / "livo_export.json").read_text())
        assert record["pairs"] == len(kept) and record["skipped"]       # the orphan is named
        # a second export into the same folder is refused; nothing half-made is left on failure
        assert main(["export", str(run), "--out", str(out)]) == 2
        assert "not empty" in capsys.readouterr().err
    finally:
        (shards / ".junk-00000.parquet.tmp-12345-0").unlink()
        (shards / "orphan-00000.parquet").unlink()


# ---------------------------------------------------------------- sources are only read (synthetic runs, fast)
def _hashes(*runs) -> dict:
    from livo_core.files import sha256_file

    return {str(p): sha256_file(p) for run in runs for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_two_runs_with_the_same_folder_name_export_apart_and_stay_untouched(tmp_path):
    from helpers import synthetic_run

    a = synthetic_run(tmp_path / "A" / "night-0001", tag="a")
    b = synthetic_run(tmp_path / "B" / "night-0001", tag="b")
    before = _hashes(a, b)
    out = tmp_path / "D"
    assert main(["export", str(a), str(b), "--out", str(out)]) == 0
    assert _hashes(a, b) == before                                  # neither source was written
    ds = datasets.load_dataset(str(out), split="train")
    assert sorted(ds["pair_id"]) == sorted(f"{t}-{k}-{i}" for t in "ab" for k in range(2) for i in range(3))
    record = json.loads((out / "livo_export.json").read_text())
    assert record["pairs"] == 12 and len(record["files"]) == len(list((out / "data").iterdir())) == 4


def test_the_same_run_twice_and_an_out_inside_a_run_are_refused(tmp_path, capsys):
    from helpers import synthetic_run

    a = synthetic_run(tmp_path / "A")
    assert main(["export", str(a), str(tmp_path / "A" / "."), "--out", str(tmp_path / "D")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["export", str(a), "--out", str(a / "export")]) == 2
    assert "inside the run" in capsys.readouterr().err
    assert not (tmp_path / "D").exists() and not (a / "export").exists()


def test_a_run_being_written_is_not_exported(tmp_path, capsys):
    from helpers import synthetic_run
    from livo_core.lock import RunLock

    a = synthetic_run(tmp_path / "A")
    with RunLock(a, purpose="livo dataset"):                       # a dataset flow still writing it
        assert main(["export", str(a), "--out", str(tmp_path / "D")]) == 2
    err = capsys.readouterr().err
    assert "livo dataset" in err and err.count("\n") == 1 and not (tmp_path / "D").exists()
    assert main(["export", str(a), "--out", str(tmp_path / "D")]) == 0   # finished: exported


def test_kill_mid_export_then_rerun_leaves_no_temporary(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import synthetic_run

    a = synthetic_run(tmp_path / "A", shards=3)
    before = _hashes(a)
    cmd = [sys.executable, "-m", "flows.cli", "export", str(a), "--out", str(tmp_path / "D")]
    killed = subprocess.run(cmd, env={**os.environ, "LIVO_KILL_AT": "export.file:2"}, capture_output=True, text=True)
    assert killed.returncode == -9
    assert [p.name for p in tmp_path.glob(".D.tmp-*")] and not (tmp_path / "D").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "D"]   # the killed export's temporary is gone
    assert _hashes(a) == before and len(list((tmp_path / "D" / "data").iterdir())) == 3
