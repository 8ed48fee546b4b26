"""`livo export`: a dataset run as a folder any consumer can be pointed at (Hugging Face `datasets`, the
Hub viewer, diffusers' Diffusion-DPO script, SafetyDPO).

    DIR/data/<run>-<tag>-<shard>.parquet
                                     the complete shards' kept pairs (hard links, or copies across disks);
                                     never a rejected pair, a half-written file or a shard that kept nothing.
                                     <tag> is a hash of the run's absolute path: two runs whose folders share a
                                     name (night-0001 of two nightly roots) never share a file name
    DIR/README.md                    dataset card: two configs over the same files ("default": images as
                                     bytes, what Diffusion-DPO reads; "images": Image features, what the Hub
                                     viewer shows), counts per value, reject reasons, judge, base model
    DIR/livo_export.json             provenance: source runs, shard ids, row counts, sha256 of every file

A RUN folder itself is not a dataset: it also holds RUN/rejected/*.parquet (pairs the judge refused) and
JSON files; point trainers at RUN/shards or at an export, never at RUN. The export is built in a hidden
temporary folder and renamed into place when complete.

Sources are only read: every file is a new name in the new folder (a hard link is made, or a copy is
written with O_EXCL, so nothing is ever written through an existing name into a source), each run is held
with a shared lock for the whole export (a `livo dataset` still writing it refuses the export, and none
can start on it meanwhile), and the same run given twice is refused.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq

from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import atomic_write_text, check_writable, clean_tmp_files, tmp_path
from livo_core.lock import RunLock
from livo_core.shards import SHARD_SCHEMA, list_shards, read_marker

CARD_COLUMNS = ["value_id", "value", "category", "safety_classifier", "safety_classifier_version", "safety_threshold",
                "clip_model", "base_model", "config_hash", "prompt_source"]


def _link_or_copy(src: Path, dst: Path) -> str:
    """A new name `dst` for `src`'s bytes. Never opens an existing `dst` for writing: if `dst` were a link
    to a source shard, copying over it would rewrite that shard."""
    try:
        os.link(src, dst)
        return "hard link"
    except FileExistsError:
        raise
    except OSError:   # another file system, or links not allowed
        with open(src, "rb") as f, open(dst, "xb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
        return "copy"


def run_tag(run_dir: Path) -> str:
    """Short identity of a run folder (its absolute path), so two runs never map to the same export name."""
    return hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]


def _distinct_runs(run_dirs: list[Path]) -> list[Path]:
    seen: dict[tuple[int, int], Path] = {}
    for d in run_dirs:
        try:
            st = os.stat(d)
        except OSError:
            raise LivoError(f"{d} is not a livo dataset run (not found): pass a directory made by `livo dataset`") from None
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise LivoError(f"run {d} is given twice (also as {seen[key]}): give each run once")
        seen[key] = d
    return list(run_dirs)


def _with_all_columns(path: Path):
    import pyarrow as pa

    table = pq.read_table(path)
    for f in SHARD_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(SHARD_SCHEMA.names)


def _features(images: bool) -> list[dict]:
    out = []
    for f in SHARD_SCHEMA:
        if f.name in ("jpg_0", "jpg_1"):
            out.append({"name": f.name, "dtype": "image" if images else "binary"})
        else:
            dtype = {"string": "string", "double": "float64", "int64": "int64", "binary": "binary"}[str(f.type)]
            out.append({"name": f.name, "dtype": dtype})
    return out


def export_runs(run_dirs: list[Path], out: Path, name: str | None = None) -> dict:
    """Export the complete shards of `run_dirs` to `out` (a new or empty folder). Returns the export record."""

    out = Path(out)
    run_dirs = _distinct_runs([Path(d) for d in run_dirs])
    check_writable(out, "--out")
    for d in run_dirs:
        r = d.resolve()
        if out.resolve() == r or r in out.resolve().parents:
            raise LivoError(f"--out {out} is inside the run {d}: export to a folder outside every source run")
    if out.is_dir() and any(out.iterdir()):
        raise LivoError(f"--out {out} is not empty: export into a new folder")
    with ExitStack() as held:
        for d in run_dirs:   # no `livo dataset` writes a source while we read it
            held.enter_context(RunLock(d, purpose="livo export", create=False, shared=True))
        return _export(run_dirs, out, name)


def _export(run_dirs: list[Path], out: Path, name: str | None) -> dict:
    import yaml

    shards, problems = list_shards(run_dirs, verify=True)
    shards = [s for s in shards if s.rows]
    if not shards:
        raise LivoError(f"no complete shard with kept pairs in {', '.join(map(str, run_dirs))}: build data with `livo dataset` first")

    if out.parent.is_dir():   # what a killed export of this folder left beside it
        clean_tmp_files(out.parent, recursive=False, pattern=f".{out.name}.tmp-*")
    tmp = tmp_path(out)
    (tmp / "data").mkdir(parents=True)
    try:
        files, per_value, rejected = [], Counter(), defaultdict(Counter)
        info: dict[str, set] = defaultdict(set)
        how = set()
        for s in shards:
            target = tmp / "data" / f"{s.run_dir.name}-{run_tag(s.run_dir)}-{s.shard_id}.parquet"
            if set(SHARD_SCHEMA.names) <= set(pq.read_schema(s.path).names):
                how.add(_link_or_copy(s.path, target))
            else:   # a shard written before an optional column existed: every export file has the full schema
                pq.write_table(_with_all_columns(s.path), target)
                how.add("rewritten (columns added)")
            kill_point("export.file")
            meta = read_marker(s.run_dir, s.shard_id)
            table = pq.read_table(s.path, columns=CARD_COLUMNS)
            for row in table.to_pylist():
                per_value[row["value_id"]] += 1
                for c in CARD_COLUMNS[1:]:
                    if row[c] is not None:
                        info[f"{row['value_id']}|{c}"].add(str(row[c]))
            for reason, n in (meta.get("rejected") or {}).items():
                rejected[s.shard_id.rsplit("-", 1)[0]][reason] += n
            files.append({"file": f"data/{target.name}", "run": str(s.run_dir.resolve()), "shard": s.shard_id,
                          "rows": s.rows, "sha256": s.sha256})
        values = sorted(per_value)

        def field(value_id: str, column: str) -> str:
            return ", ".join(sorted(info.get(f"{value_id}|{column}", []))) or "-"

        record = {"name": name or out.name, "pairs": sum(per_value.values()), "pairs_per_value": dict(sorted(per_value.items())),
                  "rejected_per_value": {v: dict(c) for v, c in sorted(rejected.items())}, "files": files,
                  "skipped": problems, "sources": sorted({str(Path(d).resolve()) for d in run_dirs}),
                  "file_method": sorted(how)}
        configs = [{"config_name": "default", "default": True, "data_files": [{"split": "train", "path": "data/*.parquet"}]},
                   {"config_name": "images", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
        dataset_info = [{"config_name": "default", "features": _features(images=False)},
                        {"config_name": "images", "features": _features(images=True)}]
        header = yaml.safe_dump({"configs": configs, "dataset_info": dataset_info, "tags": ["livo", "preference", "text-to-image"]},
                                sort_keys=False)
        rows = "\n".join(
            f"| {v} | {field(v, 'category')} | {per_value[v]} | {', '.join(f'{r}: {n}' for r, n in sorted(rejected.get(v, {}).items())) or '-'} | "
            f"{field(v, 'safety_classifier')} ({field(v, 'safety_classifier_version')}, threshold {field(v, 'safety_threshold')}) |"
            for v in values)
        principles = "\n".join(f"- `{v}`: {field(v, 'value')}" for v in values)
        models = {c: sorted({x for v in values for x in info.get(f'{v}|{c}', [])}) for c in ("base_model", "clip_model", "config_hash", "prompt_source")}
        nudenet = any("nudenet" in field(v, "safety_classifier") for v in values)
        card = CARD.format(header=header, name=record["name"], pairs=record["pairs"], shards=len(files), rows=rows,
                           principles=principles, base_model=", ".join(models["base_model"]) or "-",
                           clip_model=", ".join(models["clip_model"]) or "-", config_hash=", ".join(models["config_hash"]) or "-",
                           prompt_source=", ".join(models["prompt_source"]) or "-",
                           nudenet=NUDENET_NOTE if nudenet else "", out=out)
        held = sorted(p.name for p in (tmp / "data").iterdir())
        held_rows = sum(pq.ParquetFile(tmp / "data" / n).metadata.num_rows for n in held)
        if held != sorted(f["file"].removeprefix("data/") for f in files) or held_rows != record["pairs"]:
            raise LivoError(f"the export in {tmp} holds {len(held)} files / {held_rows} pairs where its card counts "
                            f"{len(files)} / {record['pairs']}: report this; nothing was written to {out}")
        atomic_write_text(tmp / "README.md", card)
        atomic_write_text(tmp / "livo_export.json", json.dumps(record, indent=1))
        try:
            if out.is_dir():
                out.rmdir()   # empty (checked above)
            tmp.rename(out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise LivoError(f"--out {out} was filled by another process during this export: export into a new "
                                "folder") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


NUDENET_NOTE = """
**NudeNet.** The nudity judgements were made with NudeNet (https://github.com/notAI-tech/NudeNet), which is
licensed under the AGPL-3.0; its detector's scores are stored in `safety_score_0/1`.
"""

CARD = """---
{header}---

# {name}

A LiVO preference dataset made by [livo](https://github.com/) ("Embedding an Ethical Mind: Aligning
Text-to-Image Synthesis via Lightweight Value Optimization", ACM MM 2024): {pairs} pairs in {shards} file(s).
Each row is one pair of images for the same prompt and seed: `jpg_0` is the **aligned** image (label_0 = 1),
`jpg_1` the **violating** one, `caption` the user prompt, `value` the value principle the value encoder reads
as "<value>, <caption>". The Pick-a-Pic columns come first, so Diffusion-DPO style loaders read it unchanged.

| value | kind | pairs | rejected by the judge | safety classifier |
|---|---|---|---|---|
{rows}

Value principles:
{principles}

Images rendered by: {base_model}. CLIP judge: {clip_model}. Prompt source: {prompt_source}. Run config hash: {config_hash}.
{nudenet}
## Loading

```python
from datasets import load_dataset
ds = load_dataset("{out}", split="train")                # default config: images as PNG bytes
ds = load_dataset("{out}", "images", split="train")      # Image features (the Hub viewer's view)
```

Diffusion-DPO (diffusers' `examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`, unchanged):

```bash
accelerate launch train_diffusion_dpo.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
  --dataset_name {out} --dataset_split_name train --output_dir dpo-out ...
```

SafetyDPO reads Pick-a-Pic-style data only from a folder whose name contains "pickapic": export into such
a folder (e.g. `livo export RUN --out my-pickapic-livo`).
"""
