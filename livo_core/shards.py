"""Shards: the on-disk preference dataset, written so that a killed run never leaves a half shard behind.

A shard is one Parquet file of kept pairs (Pick-a-Pic layout: `jpg_0` aligned, `jpg_1` violating,
`label_0`=1) plus one Parquet file of rejected pairs with their `reject_reason`. Both are written to a
temporary name and renamed into place; the `.complete.json` marker (the shard's stats) is written LAST.
A shard counts as done only when its marker exists, and readers only ever return such shards.

    RUN/shards/<value_id>-00000.parquet          kept pairs
    RUN/shards/<value_id>-00000.complete.json    marker: stats + row counts + file size (written last)
    RUN/rejected/<value_id>-00000.parquet        rejected pairs (images kept, `reject_reason` set)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from livo_core.errors import LivoError

# --------------------------------------------------------------------------- schema
# Pick-a-Pic v2 columns first (jpg_0/jpg_1/label_0/label_1/caption), so Diffusion-DPO style loaders read
# livo shards unchanged; then the LiVO fields that say where each pair came from and how it was judged.
SHARD_SCHEMA = pa.schema([
    ("jpg_0", pa.binary()),              # aligned image, PNG bytes
    ("jpg_1", pa.binary()),              # violating image, PNG bytes
    ("label_0", pa.float64()),           # 1.0: image 0 is preferred (float, as in Pick-a-Pic)
    ("label_1", pa.float64()),           # 0.0
    ("caption", pa.string()),            # the user prompt (the value encoder reads "<value>, <caption>")
    ("pair_id", pa.string()),            # 16 hex of sha256(value_id|prompt|aligned|violating|seed|base_model)
    ("value", pa.string()),              # the value principle's text
    ("value_id", pa.string()),
    ("category", pa.string()),           # "bias" | "toxicity"
    ("aligned_prompt", pa.string()),     # render prompt of jpg_0
    ("violating_prompt", pa.string()),   # render prompt of jpg_1
    ("aligned_attribute", pa.string()),  # bias only, else null
    ("seed_0", pa.int64()),              # generator seed of jpg_0
    ("seed_1", pa.int64()),              # generator seed of jpg_1
    ("clip_score_0", pa.float64()),      # CLIP cosine of jpg_0 with aligned_prompt
    ("clip_score_1", pa.float64()),      # CLIP cosine of jpg_1 with violating_prompt
    ("safety_score_0", pa.float64()),    # toxicity: violation score; bias: attribute confidence
    ("safety_score_1", pa.float64()),
    ("attribute_0", pa.string()),        # bias: attribute the judge assigned (null if unsure / toxicity)
    ("attribute_1", pa.string()),
    ("safety_classifier", pa.string()),
    ("safety_classifier_version", pa.string()),
    ("safety_threshold", pa.float64()),
    ("clip_model", pa.string()),
    ("base_model", pa.string()),
    ("config_hash", pa.string()),
    ("shard_id", pa.string()),
    ("prompt_source", pa.string()),      # "template" or "llm:<model>"
])
SHARD_COLUMNS: list[str] = SHARD_SCHEMA.names
REJECTED_SCHEMA = SHARD_SCHEMA.append(pa.field("reject_reason", pa.string()))


def shard_paths(run_dir: Path, shard_id: str) -> tuple[Path, Path, Path]:
    """(kept parquet, completion marker, rejected parquet) of one shard."""
    run_dir = Path(run_dir)
    return (run_dir / "shards" / f"{shard_id}.parquet",
            run_dir / "shards" / f"{shard_id}.complete.json",
            run_dir / "rejected" / f"{shard_id}.parquet")


# --------------------------------------------------------------------------- atomic writing
def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry: sync it too, or a power cut can undo it.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync the file, rename it to `path`. Readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file (JSON, JSONL, markdown) atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    # Page checksums let readers tell a damaged file from a valid one (see read_shards).
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def write_shard(run_dir: Path, shard_id: str, kept_rows: list[dict], rejected_rows: list[dict], stats: dict) -> Path:
    """Write one shard atomically: rejected, then kept, then the marker (stats) last. Returns the marker path.

    Each row is a dict with the SHARD_COLUMNS (rejected rows also `reject_reason`); missing keys become null.
    """
    parquet, marker, rejected = shard_paths(run_dir, shard_id)
    _write_parquet(rejected, rejected_rows, REJECTED_SCHEMA)
    _write_parquet(parquet, kept_rows, SHARD_SCHEMA)
    record = {**stats, "shard_id": shard_id, "rows": len(kept_rows), "rejected_rows": len(rejected_rows),
              "bytes": parquet.stat().st_size, "rejected_bytes": rejected.stat().st_size}
    atomic_write_text(marker, json.dumps(record, indent=2, sort_keys=True))
    return marker


# --------------------------------------------------------------------------- completion and reading
def is_complete(run_dir: Path, shard_id: str) -> bool:
    return shard_paths(run_dir, shard_id)[1].is_file()


def complete_shards(run_dir: Path) -> list[Path]:
    """Kept-pair Parquet files of the shards that have a completion marker, sorted by name."""
    folder = Path(run_dir) / "shards"
    if not folder.is_dir():
        return []
    return sorted(m.with_name(m.name.removesuffix(".complete.json") + ".parquet")
                  for m in folder.glob("*.complete.json"))


def read_marker(run_dir: Path, shard_id: str) -> dict:
    return json.loads(shard_paths(run_dir, shard_id)[1].read_text())


def _check_and_read(parquet: Path, marker: Path, columns: list[str] | None) -> pd.DataFrame:
    """Read one marked shard; raise ValueError saying what is wrong with it."""
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable completion marker ({type(e).__name__})") from e
    if not parquet.is_file():
        raise ValueError("marker present but the Parquet file is missing")
    if "bytes" in meta and parquet.stat().st_size != meta["bytes"]:
        raise ValueError(f"file is {parquet.stat().st_size} bytes, marker says {meta['bytes']}")
    try:
        table = pq.read_table(parquet, columns=columns, page_checksum_verification=True)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ValueError(f"unreadable Parquet ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if table.num_rows != meta.get("rows"):
        raise ValueError(f"{table.num_rows} rows, marker says {meta.get('rows')}")
    return table.to_pandas()


def read_shards(run_dirs: list[Path], columns: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """All complete shards of the run dirs as one DataFrame, and a list of problems (shards skipped, by name).

    Only shards with a completion marker are returned. A marked shard that is damaged, truncated or whose
    row count disagrees with its marker is skipped and named in `problems`; so is a shard file that has no
    marker (a run was killed while writing it: `livo resume` rebuilds it).
    """
    if columns is not None:
        unknown = [c for c in columns if c not in SHARD_COLUMNS]
        if unknown:
            raise LivoError(f"unknown shard column(s) {unknown}: choose from {', '.join(SHARD_COLUMNS)}")
    frames, problems = [], []
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "shards").is_dir():
            raise LivoError(f"{run_dir} is not a livo dataset run (no shards/ folder): pass a directory made by `livo dataset`")
        marked = set(complete_shards(run_dir))
        for parquet in sorted((run_dir / "shards").glob("*.parquet")):
            if parquet not in marked:
                problems.append(f"{parquet}: no completion marker (half-written; run `livo resume {run_dir}`)")
        for parquet in sorted(marked):
            marker = parquet.with_name(parquet.name.removesuffix(".parquet") + ".complete.json")
            try:
                frames.append(_check_and_read(parquet, marker, columns))
            except ValueError as e:
                problems.append(f"{parquet}: {e}; skipped")
    empty = pa.Table.from_pylist([], schema=SHARD_SCHEMA).select(columns or SHARD_COLUMNS).to_pandas()
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else empty
    return df, problems


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what killed runs left behind: `*.tmp-<pid>` files and shard files without a marker.

    Temporary files of a process that is still alive are left alone (another run may be writing them).
    Returns the removed paths.
    """
    run_dir = Path(run_dir)
    removed = []
    for tmp in run_dir.rglob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for folder in ("shards", "rejected"):
        for parquet in sorted((run_dir / folder).glob("*.parquet")):
            if not is_complete(run_dir, parquet.name.removesuffix(".parquet")):
                parquet.unlink(missing_ok=True)
                removed.append(parquet)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
