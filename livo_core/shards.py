"""Shards: the on-disk preference dataset, planned deterministically and written so that a killed run
never leaves a half shard behind.

Planning: each value's prompt pairs x `images_per_prompt` seeds become planned pairs, cut into shards of
`shard_size` named `<value_id>-00000`, `<value_id>-00001`, ... . The same config and prompt pairs always
give the same plan (same seeds, same pair ids), so a resumed run builds exactly the shards it planned.

A shard is one Parquet file of kept pairs (Pick-a-Pic layout: `jpg_0` aligned, `jpg_1` violating,
`label_0`=1) plus one Parquet file of rejected pairs with their `reject_reason`. Both are written to a
hidden temporary name and renamed into place; the `.complete.json` marker (the shard's stats, each file's
size and sha256) is written LAST, in its own folder: RUN/shards holds nothing but kept-pair Parquet files. A shard counts as done only when its marker exists, and readers only
ever return shards whose files match their marker byte for byte and have the shard schema.

    RUN/plan/<shard_id>.json                     the shard's planned pairs (its task reads only this)
    RUN/plan/<value_id>.value.json               a value's shard list + digests (written after its shards' plans)
    RUN/shards/<value_id>-00000.parquet          kept pairs (no file when the shard kept none)
    RUN/markers/<value_id>-00000.complete.json   marker: stats, row counts, sizes, sha256 (written last;
                                                 runs made before this layout keep them in RUN/shards)
    RUN/rejected/<value_id>-00000.parquet        rejected pairs (images kept, `reject_reason` set)

Point consumers (Diffusion-DPO, `datasets`) at RUN/shards or at a `livo export`, never at RUN itself:
RUN also holds the rejected pairs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from livo_core.errors import LivoError
from livo_core.files import atomic_write, atomic_write_text, clean_tmp_files, sha256_file

if TYPE_CHECKING:  # type hints only: shards.py stays importable without the model stack
    from livo_core.config import RunConfig
    from livo_core.prompts import PromptPair
    from livo_core.values import ValuePrinciple

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
    ("group_id", pa.string()),           # pairs of one group may swap violating images (an imported scene); else null
])
SHARD_COLUMNS: list[str] = SHARD_SCHEMA.names
# Columns added after the first shards were written: a shard without them reads them as null.
OPTIONAL_COLUMNS = ("group_id",)
REJECTED_SCHEMA = SHARD_SCHEMA.append(pa.field("reject_reason", pa.string()))


def shard_paths(run_dir: Path, shard_id: str) -> tuple[Path, Path, Path]:
    """(kept parquet, completion marker, rejected parquet) of one shard."""
    run_dir = Path(run_dir)
    legacy = run_dir / "shards" / f"{shard_id}.complete.json"
    return (run_dir / "shards" / f"{shard_id}.parquet",
            legacy if legacy.is_file() else run_dir / "markers" / f"{shard_id}.complete.json",
            run_dir / "rejected" / f"{shard_id}.parquet")


# --------------------------------------------------------------------------- writing
# Shards written by this code carry a content hash in their marker; older markers (format 1) have none.
MARKER_FORMAT = 2


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    # Page checksums let readers tell a damaged file from a valid one (see read_shards).
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, write_page_checksum=True))


def write_shard(run_dir: Path, shard_id: str, kept_rows: list[dict], rejected_rows: list[dict], stats: dict) -> Path:
    """Write one shard atomically: rejected, then kept, then the marker (stats) last. Returns the marker path.

    Each row is a dict with the SHARD_COLUMNS (rejected rows also `reject_reason`); missing keys become null.
    A shard that kept no pair gets NO kept Parquet file (a 0-row file breaks `datasets` and Diffusion-DPO
    loaders); its marker says `"rows": 0, "file": null`. The marker records each file's size and sha256.
    """
    parquet, marker, rejected = shard_paths(run_dir, shard_id)
    parquet.parent.mkdir(parents=True, exist_ok=True)   # RUN/shards exists even when no shard kept a pair
    record = {**stats, "shard_id": shard_id, "rows": len(kept_rows), "rejected_rows": len(rejected_rows),
              "format": MARKER_FORMAT}
    if rejected_rows:
        _write_parquet(rejected, rejected_rows, REJECTED_SCHEMA)
        record.update(rejected_file=rejected.name, rejected_bytes=rejected.stat().st_size, rejected_sha256=sha256_file(rejected))
    else:
        rejected.unlink(missing_ok=True)
        record.update(rejected_file=None, rejected_bytes=0, rejected_sha256=None)
    if kept_rows:
        _write_parquet(parquet, kept_rows, SHARD_SCHEMA)
        record.update(file=parquet.name, bytes=parquet.stat().st_size, sha256=sha256_file(parquet))
    else:
        parquet.unlink(missing_ok=True)
        record.update(file=None, bytes=0, sha256=None)
    atomic_write_text(marker, json.dumps(record, indent=2, sort_keys=True))
    return marker


# --------------------------------------------------------------------------- completion and reading
def is_complete(run_dir: Path, shard_id: str) -> bool:
    return shard_paths(run_dir, shard_id)[1].is_file()


def marker_paths(run_dir: Path) -> list[Path]:
    found = {}
    for folder in (Path(run_dir) / "shards", Path(run_dir) / "markers"):   # older runs: markers beside the shards
        if folder.is_dir():
            found.update({m.name: m for m in folder.glob("*.complete.json")})
    return [found[k] for k in sorted(found)]


def complete_shards(run_dir: Path) -> list[Path]:
    """Kept-pair Parquet files of the shards that have a completion marker and kept pairs, sorted by name."""
    out = []
    for m in marker_paths(run_dir):
        parquet = m.parent.parent / "shards" / (m.name.removesuffix(".complete.json") + ".parquet")
        try:
            rows = json.loads(m.read_text()).get("rows")
        except (OSError, ValueError):
            rows = None
        if rows != 0:   # 0-row shards have no file; an unreadable marker is reported by list_shards
            out.append(parquet)
    return out


def complete_shard_ids(run_dir: Path) -> list[str]:
    """Ids of every shard with a completion marker (those that kept no pair too), sorted."""
    return [m.name.removesuffix(".complete.json") for m in marker_paths(run_dir)]


def read_marker(run_dir: Path, shard_id: str) -> dict:
    return json.loads(shard_paths(run_dir, shard_id)[1].read_text())


@dataclass(frozen=True)
class Shard:
    """One complete shard, as its marker describes it."""

    run_dir: Path
    shard_id: str
    rows: int                 # kept pairs (0: no Parquet file)
    path: Path | None         # the kept-pair Parquet file (None when rows == 0)
    bytes: int
    sha256: str | None        # content hash of `path` (None in markers written before format 2)

    @property
    def key(self) -> str:
        """What identifies this shard's content: its hash, or (older markers) run, id and size."""
        return self.sha256 or hashlib.sha256(f"{self.run_dir.resolve()}|{self.shard_id}|{self.bytes}".encode()).hexdigest()


class ShardError(ValueError):
    """A marked shard whose files do not match its marker (damaged, truncated, edited, foreign schema)."""


def _shard_of(marker: Path) -> Shard:
    """The marker's shard after the cheap checks (marker readable, file present, size); raises ShardError."""
    try:
        meta = json.loads(marker.read_text())
        rows = int(meta["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"unreadable completion marker ({type(e).__name__})") from None
    run_dir = marker.parent.parent
    shard_id = marker.name.removesuffix(".complete.json")
    parquet = run_dir / "shards" / f"{shard_id}.parquet"
    if rows == 0:
        return Shard(run_dir, shard_id, 0, None, 0, None)
    if not parquet.is_file():
        raise ShardError("marker present but the Parquet file is missing")
    size = parquet.stat().st_size
    if "bytes" in meta and size != meta["bytes"]:
        raise ShardError(f"file is {size} bytes, marker says {meta['bytes']}")
    return Shard(run_dir, shard_id, rows, parquet, size, meta.get("sha256"))


def _check_schema(schema: pa.Schema) -> None:
    want = {f.name: f.type for f in SHARD_SCHEMA}
    have = {f.name: f.type for f in schema}
    missing = [n for n in want if n not in have and n not in OPTIONAL_COLUMNS]
    if missing:
        raise ShardError(f"not a livo shard: column(s) {', '.join(missing)} missing")
    wrong = [f"{n} is {have[n]}, not {t}" for n, t in want.items() if n in have and have[n] != t]
    if wrong:
        raise ShardError(f"not a livo shard: {'; '.join(wrong)}")


def verify_shard(shard: Shard) -> None:
    """Full check of a shard's file: content hash (every byte), schema, row count; raises ShardError."""
    if shard.path is None:
        return
    if shard.sha256 is not None and sha256_file(shard.path) != shard.sha256:
        raise ShardError("content does not match the marker's sha256 (the file was changed or damaged)")
    try:
        meta = pq.read_metadata(shard.path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise ShardError(f"unreadable Parquet ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    _check_schema(meta.schema.to_arrow_schema())
    if meta.num_rows != shard.rows:
        raise ShardError(f"{meta.num_rows} rows, marker says {shard.rows}")


def list_shards(run_dirs: list[Path], verify: bool = True) -> tuple[list[Shard], list[str]]:
    """The complete, usable shards of `run_dirs` (sorted by run, then id) and the problems found (by name).

    A marked shard that fails the checks (missing file, size, and with verify=True content hash, schema,
    row count) is left out and named; so is a Parquet file without a marker (a killed write: `livo resume`
    rebuilds it). verify=False skips the per-byte hash (a caller that verifies later, shard by shard).
    """
    shards, problems = [], []
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "shards").is_dir():
            raise LivoError(f"{run_dir} is not a livo dataset run (no shards/ folder): pass a directory made by `livo dataset`")
        markers = marker_paths(run_dir)
        marked = {m.name.removesuffix(".complete.json") for m in markers}
        for parquet in sorted((run_dir / "shards").glob("*.parquet")):
            if parquet.stem not in marked:
                problems.append(f"{parquet}: no completion marker (half-written; run `livo resume {run_dir}`)")
        for marker in markers:
            shard_id = marker.name.removesuffix(".complete.json")
            try:
                shard = _shard_of(marker)
                if verify:
                    verify_shard(shard)
            except ShardError as e:
                problems.append(f"{run_dir / 'shards' / shard_id}.parquet: {e}; skipped")
                continue
            shards.append(shard)
    return shards, problems


def _as_frame(table: pa.Table, columns: list[str] | None) -> pd.DataFrame:
    for name in OPTIONAL_COLUMNS:   # shards written before an optional column existed
        if name not in table.column_names and (columns is None or name in columns):
            table = table.append_column(name, pa.nulls(table.num_rows, SHARD_SCHEMA.field(name).type))
    return table.select(columns or SHARD_COLUMNS).to_pandas()


def read_shard(shard: Shard, columns: list[str] | None = None, verify: bool = True) -> pd.DataFrame:
    """One shard's kept pairs (all columns, or `columns`); raises ShardError if it is damaged."""
    if shard.path is None:
        return _empty(columns)
    if verify:
        verify_shard(shard)
    want = None if columns is None else [c for c in columns if c not in OPTIONAL_COLUMNS or c in pq.read_schema(shard.path).names]
    try:
        table = pq.read_table(shard.path, columns=want, page_checksum_verification=True)
    except Exception as e:
        raise ShardError(f"unreadable Parquet ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return _as_frame(table, columns)


def iter_shard_batches(shard: Shard, columns: list[str], batch_size: int):
    """The shard's rows `batch_size` at a time (pyarrow record batches as DataFrames): bounded memory."""
    if shard.path is None:
        return
    names = pq.read_schema(shard.path).names
    pf = pq.ParquetFile(shard.path, page_checksum_verification=True)
    for batch in pf.iter_batches(batch_size=batch_size, columns=[c for c in columns if c in names]):
        yield _as_frame(pa.Table.from_batches([batch]), columns)


def _empty(columns: list[str] | None) -> pd.DataFrame:
    return pa.Table.from_pylist([], schema=SHARD_SCHEMA).select(columns or SHARD_COLUMNS).to_pandas()


def read_shards(run_dirs: list[Path], columns: list[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """All complete shards of the run dirs as one DataFrame, and a list of problems (shards skipped, by name).

    Holds everything in memory: for small data, tests and reports. Training streams shard by shard instead
    (`list_shards` + `iter_shard_batches`). Only shards with a completion marker that pass `verify_shard`
    are returned; a damaged one, or a shard file without a marker, is skipped and named in `problems`.
    """
    if columns is not None:
        unknown = [c for c in columns if c not in SHARD_COLUMNS]
        if unknown:
            raise LivoError(f"unknown shard column(s) {unknown}: choose from {', '.join(SHARD_COLUMNS)}")
    shards, problems = list_shards(run_dirs, verify=False)
    frames = []
    for shard in shards:
        try:
            frame = read_shard(shard, columns)
        except ShardError as e:
            problems.append(f"{shard.run_dir / 'shards' / shard.shard_id}.parquet: {e}; skipped")
            continue
        if len(frame):
            frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if frames else _empty(columns)
    return df, problems


def _verify_rejected(marker: Path) -> None:
    """The rejected-pairs file of a marked shard matches the marker's size and sha256 (format 2 markers)."""
    meta = json.loads(marker.read_text())
    if not meta.get("rejected_sha256"):
        return
    rejected = marker.parent.parent / "rejected" / f"{marker.name.removesuffix('.complete.json')}.parquet"
    if not rejected.is_file():
        raise ShardError("marker present but the rejected-pairs file is missing")
    if rejected.stat().st_size != meta["rejected_bytes"] or sha256_file(rejected) != meta["rejected_sha256"]:
        raise ShardError("rejected-pairs file does not match the marker's sha256 (changed or damaged)")


def damaged_shards(run_dir: Path) -> list[tuple[str, str]]:
    """(shard id, reason) of every marked shard of a run that fails the full check (kept and rejected files)."""
    bad = []
    for marker in marker_paths(run_dir):
        try:
            verify_shard(_shard_of(marker))
            _verify_rejected(marker)
        except ShardError as e:
            bad.append((marker.name.removesuffix(".complete.json"), str(e)))
    return bad


def discard_shard(run_dir: Path, shard_id: str) -> None:
    """Remove a shard's marker (first: the shard stops counting as complete) and its files, to rebuild it."""
    parquet, marker, rejected = shard_paths(run_dir, shard_id)
    marker.unlink(missing_ok=True)
    parquet.unlink(missing_ok=True)
    rejected.unlink(missing_ok=True)


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what killed runs left behind: temporary files of dead processes and shard files without a marker.

    Temporary files of a process that is still alive are left alone (another run may be writing them).
    Returns the removed paths.
    """
    run_dir = Path(run_dir)
    removed = clean_tmp_files(run_dir)
    for folder in ("shards", "rejected"):
        for parquet in sorted((run_dir / folder).glob("*.parquet")):
            if parquet.is_file() and not is_complete(run_dir, parquet.name.removesuffix(".parquet")):
                parquet.unlink(missing_ok=True)
                removed.append(parquet)
    return removed


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class PlannedPair:
    """One candidate preference pair: both images are rendered with the same seed, from two prompts.

    Sharing the seed keeps layout and style alike, so the pair differs mainly in the value's concept.
    """

    pair_id: str
    value_id: str
    category: str
    prompt: str                 # user prompt (shard `caption`)
    aligned_prompt: str
    violating_prompt: str
    aligned_attribute: str | None
    seed: int
    source: str                 # prompt source: "template" or "llm:<model>"


def pair_seed(base_seed: int, value_id: str, prompt: str, index: int) -> int:
    """Seed of the `index`-th image pair of a prompt: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{base_seed}|{value_id}|{prompt}|{index}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def make_pair_id(value_id: str, prompt: str, aligned: str, violating: str, seed: int, base_model: str) -> str:
    return hashlib.sha256(f"{value_id}|{prompt}|{aligned}|{violating}|{seed}|{base_model}".encode()).hexdigest()[:16]


def plan_value(cfg: RunConfig, value_id: str, pairs: list[PromptPair]) -> dict[str, list[PlannedPair]]:
    """Prompt pairs of one value -> {shard_id: planned pairs}, `shard_size` pairs per shard, in order."""
    planned, seen = [], set()
    for pair in pairs:
        for i in range(cfg.images_per_prompt):
            seed = pair_seed(cfg.seed, value_id, pair.prompt, i)
            pid = make_pair_id(value_id, pair.prompt, pair.aligned_prompt, pair.violating_prompt, seed, cfg.base_model)
            if pid in seen:  # the same prompt pair listed twice would only repeat the same images
                continue
            seen.add(pid)
            planned.append(PlannedPair(pid, value_id, pair.category, pair.prompt, pair.aligned_prompt,
                                       pair.violating_prompt, pair.aligned_attribute, seed, pair.source))
    size = cfg.shard_size
    return {f"{value_id}-{k:05d}": planned[start:start + size] for k, start in enumerate(range(0, len(planned), size))}


def pairs_path(run_dir: Path, value_id: str) -> Path:
    return Path(run_dir) / "pairs" / f"{value_id}.jsonl"


def save_pairs(run_dir: Path, value_id: str, pairs: list[PromptPair]) -> None:
    """Store a value's prompt pairs (once written, a resumed run reads them instead of asking again)."""
    atomic_write_text(pairs_path(run_dir, value_id), "".join(json.dumps(asdict(p)) + "\n" for p in pairs))


class DamagedFile(LivoError):
    """A run file (prompt pairs, plan) that exists but cannot be read back."""


def load_pairs(run_dir: Path, value_id: str) -> list[PromptPair] | None:
    """A value's stored prompt pairs, or None when they were not made yet; DamagedFile if unreadable."""
    from livo_core.prompts import PromptPair

    path = pairs_path(run_dir, value_id)
    if not path.is_file():
        return None
    try:
        return [PromptPair.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
    except (ValueError, TypeError, KeyError) as e:
        raise DamagedFile(f"{path} is damaged ({type(e).__name__})") from None


# The plan: one small file per shard (a shard task reads only its own: per-shard cost does not grow with
# the dataset), then one index per value, written last, with a digest of each shard's plan.
def shard_plan_path(run_dir: Path, shard_id: str) -> Path:
    return Path(run_dir) / "plan" / f"{shard_id}.json"


def value_plan_path(run_dir: Path, value_id: str) -> Path:
    return Path(run_dir) / "plan" / f"{value_id}.value.json"


def _digest(pairs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(pairs, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_value_plan(run_dir: Path, cfg: RunConfig, value_id: str, shards: dict[str, list[PlannedPair]]) -> None:
    """Write (or confirm, or repair) one value's plan. A plan, once written, never changes.

    `shards` is the plan computed from the value's prompt pairs and the config (`plan_value`): a missing or
    damaged plan file is rewritten from it; a plan that disagrees with it means the run dir was edited.
    """
    run_dir = Path(run_dir)
    new = {sid: [asdict(p) for p in pairs] for sid, pairs in shards.items()}
    digests = {sid: _digest(pairs) for sid, pairs in new.items()}
    index_path = value_plan_path(run_dir, value_id)
    index = _read_json(index_path)
    if index is not None and index.get("shards") != digests:
        raise LivoError(f"{index_path} plans value {value_id!r} differently than its prompt pairs and config do; "
                        f"the run dir was edited by hand: start a new run with --out")
    for sid, pairs in new.items():
        old = _read_json(shard_plan_path(run_dir, sid))
        if old is None or _digest(old.get("pairs", [])) != digests[sid]:   # new, or damaged: (re)write it
            atomic_write_text(shard_plan_path(run_dir, sid), json.dumps(
                {"shard_id": sid, "value_id": value_id, "config_hash": cfg.config_hash(), "pairs": pairs}, indent=1))
    if index is None:
        atomic_write_text(index_path, json.dumps({"value_id": value_id, "config_hash": cfg.config_hash(),
                                                  "pairs": sum(map(len, new.values())), "shards": digests}, indent=1))


def planned_pairs(run_dir: Path, shard_id: str) -> list[PlannedPair]:
    """The planned pairs of one shard, from its own plan file."""
    path = shard_plan_path(run_dir, shard_id)
    data = _read_json(path)
    if data is None:
        if path.exists():
            raise DamagedFile(f"{path} is damaged; `livo resume {run_dir}` rewrites it from the prompt pairs")
        raise LivoError(f"shard {shard_id} is not in {Path(run_dir) / 'plan'}; plan the value first")
    return [PlannedPair(**p) for p in data["pairs"]]


def planned_shards(run_dir: Path, value_id: str) -> list[str] | None:
    """The shard ids of a planned value (None when the value was not planned yet)."""
    index = _read_json(value_plan_path(run_dir, value_id))
    return None if index is None else list(index["shards"])


def pairs_from_plan(run_dir: Path, value_id: str) -> list[PromptPair] | None:
    """Rebuild a value's prompt pairs from its plan (for a damaged pairs file); None if the plan is incomplete."""
    from livo_core.prompts import PromptPair

    shard_ids = planned_shards(run_dir, value_id)
    if shard_ids is None:
        return None
    seen: dict[tuple, PromptPair] = {}
    for sid in shard_ids:
        data = _read_json(shard_plan_path(run_dir, sid))
        if data is None:
            return None
        for p in data["pairs"]:
            pair = PromptPair(value_id=p["value_id"], category=p["category"], prompt=p["prompt"],
                              aligned_prompt=p["aligned_prompt"], violating_prompt=p["violating_prompt"],
                              aligned_attribute=p["aligned_attribute"], source=p["source"])
            seen.setdefault(tuple(asdict(pair).values()), pair)
    return list(seen.values())


def load_plan(run_dir: Path) -> dict[str, Any]:
    """The whole plan as {"values": {value_id: {shard_id: [planned pair dicts]}}} (reads every plan file)."""
    run_dir = Path(run_dir)
    plan: dict[str, Any] = {"values": {}}
    for index_path in sorted((run_dir / "plan").glob("*.value.json")):
        index = _read_json(index_path) or {}
        value_id = index.get("value_id", index_path.name.removesuffix(".value.json"))
        plan["values"][value_id] = {sid: (_read_json(shard_plan_path(run_dir, sid)) or {}).get("pairs")
                                    for sid in index.get("shards", {})}
        plan["config_hash"] = index.get("config_hash")
    return plan


def migrate_legacy_plan(run_dir: Path) -> bool:
    """Runs made before per-shard plan files kept one RUN/plan.json: split it into plan/ (once). True if done."""
    run_dir = Path(run_dir)
    legacy = _read_json(run_dir / "plan.json")
    if legacy is None or (run_dir / "plan").is_dir():
        return False
    from types import SimpleNamespace

    cfg = SimpleNamespace(config_hash=lambda: legacy.get("config_hash"))
    for value_id, shards in legacy.get("values", {}).items():
        save_value_plan(run_dir, cfg, value_id, {sid: [PlannedPair(**p) for p in pairs] for sid, pairs in shards.items()})
    (run_dir / "plan.json").unlink()
    return True


# --------------------------------------------------------------------------- building one shard
def build_shard(cfg: RunConfig, run_dir: Path, shard_id: str, renderer, judge, values: dict[str, ValuePrinciple]) -> dict:
    """Render, judge and write one planned shard. Returns its stats (also stored in its marker).

    renderer: livo_core.render.Renderer; judge: livo_core.judge.Judge; values: value id -> ValuePrinciple.
    """
    import torch

    from livo_core.render import image_to_bytes

    pairs = planned_pairs(run_dir, shard_id)
    value = values[pairs[0].value_id]
    t0 = time.perf_counter()
    # One batched render for the whole shard: n aligned prompts then n violating ones, same seeds.
    prompts = [p.aligned_prompt for p in pairs] + [p.violating_prompt for p in pairs]
    seeds = [p.seed for p in pairs] * 2
    r = cfg.render
    images = renderer.render(prompts, seeds, steps=r.steps, guidance_scale=r.guidance_scale, height=r.height,
                             width=r.width, batch_size=r.batch_size, negative_prompt=r.negative_prompt, progress=False)
    render_s = time.perf_counter() - t0
    aligned, violating = images[:len(pairs)], images[len(pairs):]

    with torch.inference_mode():   # judging needs no gradients (and some classifiers mix in parameters)
        judgements = judge.judge_pairs(value, [_as_prompt_pair(p) for p in pairs], aligned, violating)
    name, version, threshold = judge.classifier_info(value.id)
    common = {"label_0": 1.0, "label_1": 0.0, "value": value.principle, "safety_classifier": name,
              "safety_classifier_version": version, "safety_threshold": float(threshold),
              "clip_model": judge.clip_model, "base_model": cfg.base_model,
              "config_hash": cfg.config_hash(), "shard_id": shard_id}
    kept, rejected = [], []
    for p, img0, img1, j in zip(pairs, aligned, violating, judgements):
        row = {**common, "jpg_0": image_to_bytes(img0), "jpg_1": image_to_bytes(img1), "caption": p.prompt,
               "pair_id": p.pair_id, "value_id": p.value_id, "category": p.category,
               "aligned_prompt": p.aligned_prompt, "violating_prompt": p.violating_prompt,
               "aligned_attribute": p.aligned_attribute, "seed_0": p.seed, "seed_1": p.seed,
               "prompt_source": p.source, "clip_score_0": j.clip_score_0, "clip_score_1": j.clip_score_1,
               "safety_score_0": j.safety_score_0, "safety_score_1": j.safety_score_1,
               "attribute_0": j.attribute_0, "attribute_1": j.attribute_1}
        if j.keep:
            kept.append(row)
        else:
            rejected.append({**row, "reject_reason": j.reason})
    seconds = time.perf_counter() - t0
    stats = {"value_id": value.id, "planned": len(pairs), "kept": len(kept),
             "rejected": dict(sorted(Counter(r["reject_reason"] for r in rejected).items())),
             "seconds": round(seconds, 3), "render_seconds": round(render_s, 3),
             "images_per_s": round(len(prompts) / render_s, 2) if render_s > 0 else None,
             "config_hash": cfg.config_hash()}
    write_shard(run_dir, shard_id, kept, rejected, stats)
    return read_marker(run_dir, shard_id)


def _as_prompt_pair(p: PlannedPair) -> PromptPair:
    from livo_core.prompts import PromptPair

    return PromptPair(value_id=p.value_id, category=p.category, prompt=p.prompt, aligned_prompt=p.aligned_prompt,
                      violating_prompt=p.violating_prompt, aligned_attribute=p.aligned_attribute, source=p.source)
