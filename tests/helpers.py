"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def shard_rows(run: Path, columns: list[str]) -> list[dict]:
    """`columns` of every kept and rejected row of a run's complete shards (a shard that kept nothing has
    no kept file; one that rejected nothing has no rejected file)."""
    import pyarrow.parquet as pq

    from livo_core.shards import complete_shard_ids, shard_paths

    rows = []
    for shard_id in complete_shard_ids(run):
        kept, _, rejected = shard_paths(run, shard_id)
        for path in (kept, rejected):
            if path.is_file():
                rows += pq.read_table(path, columns=columns).to_pylist()
    return rows
