"""Shards: the on-disk preference dataset, planned deterministically and written so that a killed run
never leaves a half shard behind.

Planning: each value's prompt pairs x `images_per_prompt` seeds become planned pairs, cut into shards of
`shard_size` named `<value_id>-00000`, `<value_id>-00001`, ... . The same config and prompt pairs always
give the same plan (same seeds, same pair ids), so a resumed run builds exactly the shards it planned.

A shard is one Parquet file of kept pairs (Pick-a-Pic layout: `jpg_0` aligned, `jpg_1` violating,
`label_0`=1) plus one Parquet file of rejected pairs with their `reject_reason`. Both are written to a
temporary name and renamed into place; the `.complete.json` marker (the shard's stats) is written LAST.
A shard counts as done only when its marker exists, and readers only ever return such shards.

    RUN/shards/<value_id>-00000.parquet          kept pairs
    RUN/shards/<value_id>-00000.complete.json    marker: stats + row counts + file size (written last)
    RUN/rejected/<value_id>-00000.parquet        rejected pairs (images kept, `reject_reason` set)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from livo_core.errors import LivoError

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
        if not tmp.is_file():
            continue
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    for folder in ("shards", "rejected"):
        for parquet in sorted((run_dir / folder).glob("*.parquet")):
            if parquet.is_file() and not is_complete(run_dir, parquet.name.removesuffix(".parquet")):
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


def load_pairs(run_dir: Path, value_id: str) -> list[PromptPair] | None:
    """A value's stored prompt pairs, or None when they were not made yet."""
    from livo_core.prompts import PromptPair

    path = pairs_path(run_dir, value_id)
    if not path.is_file():
        return None
    return [PromptPair.from_dict(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def load_plan(run_dir: Path) -> dict[str, Any]:
    """RUN/plan.json: {"config_hash", "values": {value_id: {shard_id: [planned pair dicts]}}}."""
    path = Path(run_dir) / "plan.json"
    return json.loads(path.read_text()) if path.is_file() else {"values": {}}


def save_value_plan(run_dir: Path, cfg: RunConfig, value_id: str, shards: dict[str, list[PlannedPair]]) -> None:
    """Add (or confirm) one value's shards in RUN/plan.json. A plan, once written, never changes."""
    plan = load_plan(run_dir)
    new = {sid: [asdict(p) for p in pairs] for sid, pairs in shards.items()}
    old = plan["values"].get(value_id)
    if old is not None and old != new:
        raise LivoError(f"{Path(run_dir) / 'plan.json'} plans value {value_id!r} differently than its prompt pairs and "
                        "config do; the run dir was edited by hand: start a new run with --out")
    if old is None:
        plan["config_hash"] = cfg.config_hash()
        plan["values"][value_id] = new
        atomic_write_text(Path(run_dir) / "plan.json", json.dumps(plan, indent=1))


def planned_pairs(run_dir: Path, shard_id: str) -> list[PlannedPair]:
    """The planned pairs of one shard, from RUN/plan.json."""
    value_id = shard_id.rsplit("-", 1)[0]
    try:
        return [PlannedPair(**p) for p in load_plan(run_dir)["values"][value_id][shard_id]]
    except KeyError:
        raise LivoError(f"shard {shard_id} is not in {Path(run_dir) / 'plan.json'}; plan the value first") from None


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
