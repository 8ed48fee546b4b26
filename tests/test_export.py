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
