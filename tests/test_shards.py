"""Shard I/O: atomic writing, completion markers, checked reading, cleanup of killed runs, planning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livo_core.config import RunConfig
from livo_core.errors import LivoError
from livo_core.shards import (
    SHARD_COLUMNS, SHARD_SCHEMA, DamagedFile, clean_partial, complete_shards, damaged_shards, is_complete,
    list_shards, load_pairs, load_plan, make_pair_id, migrate_legacy_plan, pair_seed, pairs_from_plan, plan_value,
    planned_pairs, read_marker, read_shards, save_pairs, save_value_plan, shard_paths, write_shard,
)
from livo_core.files import sha256_file
from helpers import pair_row as _row


def _write(run, shard_id="v-00000", kept=3, rejected=1):
    rows = [_row(i, shard_id) for i in range(kept)]
    rej = [{**_row(100 + i, shard_id), "reject_reason": "clip_score"} for i in range(rejected)]
    return write_shard(run, shard_id, rows, rej, {"kept": kept, "rejected": {"clip_score": rejected}}), rows


def test_write_and_read_roundtrip(tmp_path):
    marker, rows = _write(tmp_path)
    parquet, marker2, rejected = shard_paths(tmp_path, "v-00000")
    assert marker == marker2 and is_complete(tmp_path, "v-00000")
    assert complete_shards(tmp_path) == [parquet]
    # Readable by plain pyarrow / pandas (no livo needed), in the documented column order.
    assert pq.read_schema(parquet).names == SHARD_COLUMNS == SHARD_SCHEMA.names
    assert pq.read_table(rejected).column("reject_reason").to_pylist() == ["clip_score"]
    df, problems = read_shards([tmp_path])
    assert problems == [] and len(df) == 3
    assert df["jpg_0"].tolist() == [r["jpg_0"] for r in rows]
    assert (df["label_0"] == 1.0).all() and df["aligned_attribute"].isna().all()
    meta = read_marker(tmp_path, "v-00000")
    assert meta["rows"] == 3 and meta["rejected_rows"] == 1 and meta["bytes"] == parquet.stat().st_size
    assert not list(tmp_path.rglob("*.tmp-*"))
    only, _ = read_shards([tmp_path], columns=["pair_id", "caption"])
    assert list(only.columns) == ["pair_id", "caption"]


def test_read_skips_and_names_bad_shards(tmp_path):
    _write(tmp_path, "v-00000")
    _write(tmp_path, "v-00001")
    _write(tmp_path, "v-00002")
    _write(tmp_path, "v-00003")
    # 1: a flipped byte inside the data (page checksum catches it)
    p1 = shard_paths(tmp_path, "v-00001")[0]
    data = bytearray(p1.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p1.write_bytes(bytes(data))
    # 2: marker disagrees with the file's row count (marker of another write)
    m2 = shard_paths(tmp_path, "v-00002")[1]
    meta = json.loads(m2.read_text())
    pq.write_table(pq.read_table(shard_paths(tmp_path, "v-00002")[0]).slice(0, 2), shard_paths(tmp_path, "v-00002")[0])
    meta["bytes"] = shard_paths(tmp_path, "v-00002")[0].stat().st_size
    meta["sha256"] = sha256_file(shard_paths(tmp_path, "v-00002")[0])
    m2.write_text(json.dumps(meta))
    # 3: truncated file
    p3 = shard_paths(tmp_path, "v-00003")[0]
    p3.write_bytes(p3.read_bytes()[:500])
    # 4: a shard file without marker (killed between rename and marker)
    pq.write_table(pa.Table.from_pylist([_row(9, "v-00004")], schema=SHARD_SCHEMA), tmp_path / "shards" / "v-00004.parquet")

    df, problems = read_shards([tmp_path])
    assert sorted(df["shard_id"].unique()) == ["v-00000"] and len(df) == 3
    text = "\n".join(problems)
    assert len(problems) == 4, text
    for sid in ("v-00001", "v-00002", "v-00003", "v-00004"):
        assert sid in text
    assert "2 rows, marker says 3" in text and "no completion marker" in text


def test_read_rejects_unknown_columns_and_non_runs(tmp_path):
    _write(tmp_path)
    with pytest.raises(LivoError, match="unknown shard column"):
        read_shards([tmp_path], columns=["jpg_9"])
    with pytest.raises(LivoError, match="not a livo dataset run"):
        read_shards([tmp_path / "nope"])


def test_failed_write_leaves_no_marker_and_no_temp_file(tmp_path):
    bad = {**_row(0), "seed_0": "not a number"}
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        write_shard(tmp_path, "v-00000", [bad], [], {})
    assert not is_complete(tmp_path, "v-00000")
    assert not list(tmp_path.rglob("*.tmp-*"))
    assert not shard_paths(tmp_path, "v-00000")[0].exists()


def test_clean_partial(tmp_path):
    _write(tmp_path, "v-00000")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    shards = tmp_path / "shards"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (shards / f".v-00001.parquet.tmp-{dead_pid}-0").write_bytes(b"half")
    (tmp_path / "rejected" / f"v-00001.parquet.tmp-{dead_pid}").write_bytes(b"half")   # an older naming
    (shards / "v-00002.parquet").write_bytes(b"orphan without marker")
    (tmp_path / "rejected" / "v-00002.parquet").write_bytes(b"orphan")
    live = shards / f".v-00003.parquet.tmp-{os.getppid()}-3"   # a live process may still be writing this one
    live.write_bytes(b"in progress")

    removed = clean_partial(tmp_path)
    assert len(removed) == 4
    assert live.exists()
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != live}
    assert after == before


# --------------------------------------------------------------------------- planning
def _pairs(n: int, value_id: str = "bloody-inappropriate"):
    from livo_core.prompts import PromptPair

    return [PromptPair(value_id=value_id, category="toxicity", prompt=f"a bloody thing {i}",
                       aligned_prompt=f"a thing {i}", violating_prompt=f"a bloody thing {i}") for i in range(n)]


def test_plan_is_deterministic_and_chunked(tmp_path):
    cfg = RunConfig(images_per_prompt=3, shard_size=4, seed=7)
    plan = plan_value(cfg, "bloody-inappropriate", _pairs(3))
    assert list(plan) == ["bloody-inappropriate-00000", "bloody-inappropriate-00001", "bloody-inappropriate-00002"]
    assert [len(v) for v in plan.values()] == [4, 4, 1]
    assert plan == plan_value(cfg, "bloody-inappropriate", _pairs(3))
    flat = [p for v in plan.values() for p in v]
    assert len({p.pair_id for p in flat}) == 9 and len({p.seed for p in flat}) == 9
    first = flat[0]
    assert first.seed == pair_seed(7, "bloody-inappropriate", "a bloody thing 0", 0)
    assert first.pair_id == make_pair_id("bloody-inappropriate", "a bloody thing 0", "a thing 0", "a bloody thing 0",
                                         first.seed, cfg.base_model)
    # A different base seed or base model gives other seeds / pair ids.
    other = plan_value(RunConfig(images_per_prompt=3, shard_size=4, seed=8), "bloody-inappropriate", _pairs(3))
    assert {p.seed for v in other.values() for p in v}.isdisjoint({p.seed for p in flat})
    # Duplicate prompt pairs do not make duplicate planned pairs.
    assert sum(map(len, plan_value(cfg, "bloody-inappropriate", _pairs(3) * 2).values())) == 9


def test_pairs_and_plan_files(tmp_path):
    cfg = RunConfig(images_per_prompt=2, shard_size=3)
    pairs = _pairs(4)
    assert load_pairs(tmp_path, "bloody-inappropriate") is None
    save_pairs(tmp_path, "bloody-inappropriate", pairs)
    assert load_pairs(tmp_path, "bloody-inappropriate") == pairs
    shards = plan_value(cfg, "bloody-inappropriate", pairs)
    save_value_plan(tmp_path, cfg, "bloody-inappropriate", shards)
    save_value_plan(tmp_path, cfg, "bloody-inappropriate", shards)   # same plan again: fine
    assert planned_pairs(tmp_path, "bloody-inappropriate-00001") == shards["bloody-inappropriate-00001"]
    with pytest.raises(LivoError, match="plans value"):
        save_value_plan(tmp_path, cfg, "bloody-inappropriate", plan_value(cfg, "bloody-inappropriate", pairs[:2]))
    with pytest.raises(LivoError, match="not in"):
        planned_pairs(tmp_path, "bloody-inappropriate-00099")
    # One plan file per shard: a shard reads only its own.
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == [
        "bloody-inappropriate-00000.json", "bloody-inappropriate-00001.json", "bloody-inappropriate-00002.json",
        "bloody-inappropriate.value.json"]
    assert load_plan(tmp_path)["values"]["bloody-inappropriate"]["bloody-inappropriate-00002"] == [
        {k: v for k, v in p.__dict__.items()} for p in shards["bloody-inappropriate-00002"]]


def test_damaged_plan_and_pairs_files_are_repaired(tmp_path):
    cfg = RunConfig(images_per_prompt=2, shard_size=3)
    pairs = _pairs(4)
    save_pairs(tmp_path, "bloody-inappropriate", pairs)
    shards = plan_value(cfg, "bloody-inappropriate", pairs)
    save_value_plan(tmp_path, cfg, "bloody-inappropriate", shards)
    before = {p.name: p.read_bytes() for p in (tmp_path / "plan").iterdir()}
    # A truncated shard plan: reading it says so; planning again rewrites it from the pairs.
    one = tmp_path / "plan" / "bloody-inappropriate-00001.json"
    one.write_bytes(one.read_bytes()[:40])
    with pytest.raises(DamagedFile, match="livo resume"):
        planned_pairs(tmp_path, "bloody-inappropriate-00001")
    save_value_plan(tmp_path, cfg, "bloody-inappropriate", plan_value(cfg, "bloody-inappropriate", pairs))
    assert {p.name: p.read_bytes() for p in (tmp_path / "plan").iterdir()} == before
    # A truncated pairs file: DamagedFile, and the plan gives the same pairs back.
    path = tmp_path / "pairs" / "bloody-inappropriate.jsonl"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DamagedFile):
        load_pairs(tmp_path, "bloody-inappropriate")
    assert pairs_from_plan(tmp_path, "bloody-inappropriate") == pairs


def test_legacy_plan_json_is_split_into_plan_files(tmp_path):
    cfg = RunConfig(images_per_prompt=2, shard_size=3)
    shards = plan_value(cfg, "bloody-inappropriate", _pairs(4))
    legacy = {"config_hash": cfg.config_hash(),
              "values": {"bloody-inappropriate": {sid: [p.__dict__ for p in pairs] for sid, pairs in shards.items()}}}
    (tmp_path / "plan.json").write_text(json.dumps(legacy))
    assert migrate_legacy_plan(tmp_path) and not (tmp_path / "plan.json").exists()
    assert planned_pairs(tmp_path, "bloody-inappropriate-00001") == shards["bloody-inappropriate-00001"]
    assert not migrate_legacy_plan(tmp_path)


def test_a_shard_that_kept_nothing_has_no_parquet_file(tmp_path):
    _write(tmp_path, "v-00000", kept=0, rejected=2)
    _write(tmp_path, "v-00001", kept=2, rejected=0)
    assert not shard_paths(tmp_path, "v-00000")[0].exists() and shard_paths(tmp_path, "v-00000")[2].exists()
    assert not shard_paths(tmp_path, "v-00001")[2].exists()
    assert read_marker(tmp_path, "v-00000")["rows"] == 0 and read_marker(tmp_path, "v-00000")["file"] is None
    assert complete_shards(tmp_path) == [shard_paths(tmp_path, "v-00001")[0]]
    shards, problems = list_shards([tmp_path])
    assert problems == [] and [s.rows for s in shards] == [0, 2]
    df, problems = read_shards([tmp_path])
    assert problems == [] and len(df) == 2


def test_a_renamed_column_or_foreign_file_is_not_a_shard(tmp_path):
    _write(tmp_path, "v-00000")
    _write(tmp_path, "v-00001")
    # A consistent marker over a file whose column `value` was renamed: the schema check refuses it.
    parquet, marker, _ = shard_paths(tmp_path, "v-00000")
    table = pq.read_table(parquet)
    pq.write_table(table.rename_columns(["principle" if c == "value" else c for c in table.column_names]), parquet)
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "bytes": parquet.stat().st_size, "sha256": sha256_file(parquet)}))
    # Non-image bytes in a foreign schema.
    parquet1, marker1, _ = shard_paths(tmp_path, "v-00001")
    pq.write_table(pa.table({"jpg_0": [b"not an image"]}), parquet1)
    meta1 = json.loads(marker1.read_text())
    marker1.write_text(json.dumps({**meta1, "rows": 1, "bytes": parquet1.stat().st_size, "sha256": sha256_file(parquet1)}))
    df, problems = read_shards([tmp_path])
    assert len(df) == 0 and len(problems) == 2
    assert "value missing" in problems[0] or "value" in problems[0]
    assert {sid for sid, _ in damaged_shards(tmp_path)} == {"v-00000", "v-00001"}


def test_flipping_any_byte_of_a_shard_is_detected(tmp_path):
    # The marker holds the file's sha256: every single-byte flip anywhere in the file is caught.
    _write_small(tmp_path)
    parquet = shard_paths(tmp_path, "v-00000")[0]
    original = parquet.read_bytes()
    missed = []
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        parquet.write_bytes(bytes(data))
        shards, problems = list_shards([tmp_path])
        if shards:
            missed.append(i)
    parquet.write_bytes(original)
    assert len(original) > 1000 and missed == []
    assert [s.shard_id for s in list_shards([tmp_path])[0]] == ["v-00000"]


def _write_small(run):
    rows = [{**_row(i), "jpg_0": b"\x89PNG tiny %d" % i, "jpg_1": b"\x89PNG tiny %d" % (i + 10)} for i in range(2)]
    write_shard(run, "v-00000", rows, [], {})
