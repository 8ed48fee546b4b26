"""`livo export`: a dataset run as a folder any consumer can be pointed at (Hugging Face `datasets`, the
Hub viewer, diffusers' Diffusion-DPO script, SafetyDPO).

    DIR/data/<run>-<shard>.parquet   the complete shards' kept pairs (hard links, or copies across disks);
                                     never a rejected pair, a half-written file or a shard that kept nothing
    DIR/README.md                    dataset card: two configs over the same files ("default": images as
                                     bytes, what Diffusion-DPO reads; "images": Image features, what the Hub
                                     viewer shows), counts per value, reject reasons, judge, base model
    DIR/livo_export.json             provenance: source runs, shard ids, row counts, sha256 of every file

A RUN folder itself is not a dataset: it also holds RUN/rejected/*.parquet (pairs the judge refused) and
JSON files; point trainers at RUN/shards or at an export, never at RUN. The export is built in a hidden
temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from livo_core.errors import LivoError
from livo_core.files import atomic_write_text, check_writable, tmp_path
from livo_core.shards import SHARD_SCHEMA, list_shards, read_marker

CARD_COLUMNS = ["value_id", "value", "category", "safety_classifier", "safety_classifier_version", "safety_threshold",
                "clip_model", "base_model", "config_hash", "prompt_source"]


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:   # another file system, or links not allowed
        shutil.copy2(src, dst)
        return "copy"


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
    import yaml

    out = Path(out)
    check_writable(out, "--out")
    if out.is_dir() and any(out.iterdir()):
        raise LivoError(f"--out {out} is not empty: export into a new folder")
    shards, problems = list_shards([Path(d) for d in run_dirs], verify=True)
    shards = [s for s in shards if s.rows]
    if not shards:
        raise LivoError(f"no complete shard with kept pairs in {', '.join(map(str, run_dirs))}: build data with `livo dataset` first")

    tmp = tmp_path(out)
    (tmp / "data").mkdir(parents=True)
    try:
        files, per_value, rejected = [], Counter(), defaultdict(Counter)
        info: dict[str, set] = defaultdict(set)
        how = set()
        for s in shards:
            target = tmp / "data" / f"{s.run_dir.name}-{s.shard_id}.parquet"
            if set(SHARD_SCHEMA.names) <= set(pq.read_schema(s.path).names):
                how.add(_link_or_copy(s.path, target))
            else:   # a shard written before an optional column existed: every export file has the full schema
                pq.write_table(_with_all_columns(s.path), target)
                how.add("rewritten (columns added)")
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
        atomic_write_text(tmp / "README.md", card)
        atomic_write_text(tmp / "livo_export.json", json.dumps(record, indent=1))
        if out.is_dir():
            out.rmdir()   # empty (checked above)
        tmp.rename(out)
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
