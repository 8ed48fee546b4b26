"""Import the official LiVO training data (github.com/achernarwang/LiVO) into livo shards.

The official layout (e.g. the released `livo_data/` with `0-career/`, `1-goodness/`, `2-badness/`):

    SRC/<type>/<scene>/metadata.jsonl     one JSON object per image: prompt, value, file_name, label
    SRC/<type>/<scene>/<file_name>        the image (label 1 = aligned, 0 = violating)

How pairs are made. The official trainer takes every aligned image of a scene as one example and draws a
random violating image of the same scene each time. Here pairing must be deterministic, so within a scene
aligned and violating images are each sorted by file name and aligned image i is paired with violating
image i mod V (V = violating images in the scene): every aligned image is used once, violating images
are reused when there are fewer of them, and left unused (counted in the stats) when there are more.
A scene with no aligned or no violating image gives no pair (counted).

Values. Each row's value text (e.g. "gender equality", "nudity considered inappropriate") is matched to a
value principle of `values_file`; the shard's `value` column then holds that file's principle sentence,
so training reads the same "<principle>, <prompt>" text that retrieval and inference use. With
`keep_value_text=True` the official wording is kept instead. A value that matches no principle gets a new
id (a slug of its text), keeps its text, and is listed under `new_values` in the stats.

Each pair's `group_id` is its scene: with `resample_violating = true` the trainer pairs an aligned image
with a random violating image of its scene at every step, as the official dataset's `__getitem__` does.
Columns the official data does not have (seeds, CLIP and safety scores, attributes, render prompts) are
null; `aligned_prompt` / `violating_prompt` hold the prompt recorded with each image; `prompt_source` is
"livo-official". Images are stored as their original file bytes (JPEG or PNG), checked to decode.

The import is resumable: the plan is a pure function of SRC, so shards that are already complete are
skipped when the same import runs again into the same RUN.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from livo_core.errors import LivoError
from livo_core.paths import data_path
from livo_core.faults import kill_point
from livo_core.files import atomic_write_text, clean_tmp_files
from livo_core.shards import is_complete, make_pair_id, write_shard
from livo_core.values import ValuePrinciple, load_values

PROMPT_SOURCE = "livo-official"
REQUIRED_FIELDS = ("prompt", "value", "file_name", "label")


@dataclass(frozen=True)
class OfficialImage:
    """One row of a scene's metadata.jsonl, with where its image lies."""
    path: Path
    prompt: str
    value: str
    label: int            # 1 = aligned, 0 = violating


@dataclass(frozen=True)
class OfficialPair:
    """One aligned/violating pair, before its images are read."""
    value_id: str
    category: str
    value: str            # the text the value encoder reads
    scene: str            # "<type>/<scene>"
    aligned: OfficialImage
    violating: OfficialImage

    @property
    def pair_id(self) -> str:
        # The generated pairs' recipe; the official data has no seeds or render prompts, so the image
        # paths stand in for the two render prompts, the seed is 0 and the "model" is the data source.
        return make_pair_id(self.value_id, self.aligned.prompt, f"{self.scene}/{self.aligned.path.name}",
                            f"{self.scene}/{self.violating.path.name}", 0, PROMPT_SOURCE)


# --------------------------------------------------------------------------- reading the layout
def read_scene(scene_dir: Path, root: Path | None = None) -> list[OfficialImage]:
    """The rows of `scene_dir/metadata.jsonl`, checked: fields present, label 0/1, image file present and
    inside `root` (the source folder; default scene_dir): a file_name never reads a file from elsewhere."""
    meta = scene_dir / "metadata.jsonl"
    inside = Path(root or scene_dir).resolve()
    if not meta.is_file():
        raise LivoError(f"no metadata.jsonl in {scene_dir}: the official layout is SRC/<type>/<scene>/metadata.jsonl "
                        "with the images next to it; point SRC at the folder that holds the <type> folders")
    rows, seen = [], {}
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LivoError(f"{meta} is not UTF-8 text (byte {e.start}: {e.reason}): save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LivoError(f"{where} is not valid JSON ({e.msg}): fix or remove that line") from None
        if not isinstance(row, dict):
            raise LivoError(f"{where} must be a JSON object with {', '.join(REQUIRED_FIELDS)}")
        missing = [f for f in REQUIRED_FIELDS if f not in row]
        if missing:
            raise LivoError(f"{where} lacks {', '.join(missing)}: every row needs {', '.join(REQUIRED_FIELDS)}")
        label = row["label"]
        if isinstance(label, (bool, str)) or label not in (0, 1):
            raise LivoError(f"{where}: label must be 1 (aligned) or 0 (violating), got {label!r}")
        if not isinstance(row["prompt"], str) or not isinstance(row["value"], str) or not str(row["value"]).strip():
            raise LivoError(f"{where}: prompt and value must be non-empty text")
        path = scene_dir / str(row["file_name"])
        if not path.resolve().is_relative_to(inside):
            raise LivoError(f"{where}: file_name {row['file_name']!r} points outside the source folder {inside}: "
                            "give a path relative to its scene folder")
        if path in seen:   # a repeated row would make duplicate pairs (or an image both aligned and violating)
            raise LivoError(f"{where} repeats file_name {row['file_name']!r} of line {seen[path]}: keep one row per image")
        seen[path] = n
        if not path.is_file():
            raise LivoError(f"{where}: image {path} not found: put the image next to metadata.jsonl or fix file_name")
        rows.append(OfficialImage(path=path, prompt=row["prompt"], value=row["value"].strip(), label=int(label)))
    return rows


def scene_dirs(src: Path) -> list[tuple[str, Path]]:
    """("<type>/<scene>", folder) for every scene, sorted by type then scene."""
    src = Path(src)
    if not src.is_dir():
        raise LivoError(f"official LiVO data folder {src} not found: pass the extracted folder (e.g. livo_data/)")
    if (src / "metadata.jsonl").is_file():
        raise LivoError(f"{src} is a single scene folder: pass the folder two levels up, which holds <type>/<scene>/")
    types = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    scenes = [(f"{t.name}/{s.name}", s) for t in types
              for s in sorted(p for p in t.iterdir() if p.is_dir() and not p.name.startswith("."))]
    if not scenes:
        raise LivoError(f"{src} holds no <type>/<scene>/ folders: the official layout is SRC/<type>/<scene>/metadata.jsonl")
    return scenes


# --------------------------------------------------------------------------- values
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def slug(text: str) -> str:
    """A value id from free text: "Nudity considered inappropriate" -> "nudity-considered-inappropriate"."""
    return "-".join(_words(text))[:48].strip("-")


def match_value(text: str, values: list[ValuePrinciple]) -> ValuePrinciple | None:
    """The principle an official value text means, or None.

    Tried in order, the first rule that singles out one principle wins: same words as the principle
    sentence; slug equal to the id; the principle sentence starts with the text ("gender equality" ->
    "Gender equality: people of every gender..."); every word of the id is in the text
    ("nudity considered inappropriate" -> nudity-inappropriate).
    """
    words = _words(text)
    rules = [
        lambda v: _words(v.principle) == words or any(_words(a) == words for a in v.aliases),
        lambda v: v.id == slug(text),
        lambda v: bool(words) and _words(v.principle)[:len(words)] == words,
        lambda v: set(v.id.split("-")) <= set(words),
    ]
    for rule in rules:
        hits = [v for v in values if rule(v)]
        if len(hits) == 1:
            return hits[0]
    return None


def _category_hint(type_name: str) -> str | None:
    name = type_name.lower()
    if "bias" in name:          # "bias", "debias"
        return "bias"
    if "tox" in name:           # "toxicity", "detox"
        return "toxicity"
    return None


# --------------------------------------------------------------------------- planning
def plan_pairs(src: Path, values: list[ValuePrinciple], keep_value_text: bool = False) -> tuple[list[OfficialPair], dict]:
    """Read every scene and pair its images (see the module docstring). Returns (pairs, stats)."""
    stats = {"scenes": 0, "aligned_images": 0, "violating_images": 0, "pairs": 0,
             "violating_reused": 0, "violating_unused": 0, "aligned_unpaired": 0,
             "scenes_without_pairs": [], "value_map": {}, "new_values": {}, "pairs_per_value": {}}
    by_id = {v.id: v for v in values}
    unknown_texts: dict[str, str] = {}     # official text -> new id
    pairs: list[OfficialPair] = []
    pending: list[tuple[str, list[OfficialImage], list[OfficialImage]]] = []
    type_kinds: dict[str, set[str]] = {}   # type folder -> kinds of its known values (for unknown values)
    matched: dict[str, ValuePrinciple | None] = {}

    def lookup(text: str) -> ValuePrinciple | None:   # a dataset repeats a handful of value texts 86k times
        if text not in matched:
            matched[text] = match_value(text, values)
        return matched[text]

    for scene, folder in scene_dirs(src):
        rows = read_scene(folder, src)
        stats["scenes"] += 1
        aligned = sorted((r for r in rows if r.label == 1), key=lambda r: r.path.name)
        violating = sorted((r for r in rows if r.label == 0), key=lambda r: r.path.name)
        stats["aligned_images"] += len(aligned)
        stats["violating_images"] += len(violating)
        for r in rows:
            v = lookup(r.value)
            if v is not None:
                stats["value_map"][r.value] = v.id
                type_kinds.setdefault(scene.split("/")[0], set()).add(v.kind)
        if not aligned or not violating:
            stats["scenes_without_pairs"].append(scene)
            stats["aligned_unpaired"] += len(aligned)
            stats["violating_unused"] += len(violating)
            continue
        stats["violating_reused"] += max(0, len(aligned) - len(violating))
        stats["violating_unused"] += max(0, len(violating) - len(aligned))
        pending.append((scene, aligned, violating))

    for scene, aligned, violating in pending:
        type_name = scene.split("/")[0]
        for i, a in enumerate(aligned):
            v = lookup(a.value)
            if v is not None:
                value_id, category, text = v.id, v.kind, (a.value if keep_value_text else v.principle)
            else:
                value_id = unknown_texts.get(a.value) or _new_id(a.value, by_id, unknown_texts)
                unknown_texts[a.value] = value_id
                kinds = type_kinds.get(type_name, set())
                category = _category_hint(type_name) or (next(iter(kinds)) if len(kinds) == 1 else None)
                if category is None:
                    raise LivoError(f"cannot tell whether value {a.value!r} (in {scene}) is bias or toxicity: add it to "
                                    "the values file, or name its type folder bias/ or toxicity/")
                text = a.value
                stats["value_map"][a.value] = value_id
                stats["new_values"][value_id] = {"text": a.value, "category": category}
            pairs.append(OfficialPair(value_id=value_id, category=category, value=text, scene=scene,
                                     aligned=a, violating=violating[i % len(violating)]))

    if not pairs:
        raise LivoError(f"no aligned/violating pair in {src}: every scene lacks label-1 or label-0 images")
    stats["pairs"] = len(pairs)
    for p in pairs:
        stats["pairs_per_value"][p.value_id] = stats["pairs_per_value"].get(p.value_id, 0) + 1
    return pairs, stats


def _new_id(text: str, known: dict, taken: dict[str, str]) -> str:
    base = slug(text) or "value"
    if base in known or base in taken.values():
        base = f"{base}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return base


# --------------------------------------------------------------------------- writing
def check_image(path: Path) -> None:
    """Decode every pixel (a truncated file passes a header check): a LivoError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise LivoError(f"image {path} is not a readable image ({type(e).__name__}): replace or remove it and its "
                        "metadata.jsonl row") from None


def check_images(paths: list[Path], threads: int | None = None) -> None:
    """check_image on every path, decoded in parallel (PIL releases the GIL while decoding)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(check_image, sorted(set(paths))):
            pass


def _image_bytes(path: Path) -> bytes:
    return path.read_bytes()   # decoded once in the check phase (check_images), before the run folder exists


def _row(p: OfficialPair, shard_id: str, config_hash: str) -> dict:
    return {
        "jpg_0": _image_bytes(p.aligned.path), "jpg_1": _image_bytes(p.violating.path),
        "label_0": 1.0, "label_1": 0.0,
        "caption": p.aligned.prompt, "pair_id": p.pair_id,
        "value": p.value, "value_id": p.value_id, "category": p.category,
        "aligned_prompt": p.aligned.prompt, "violating_prompt": p.violating.prompt,
        "config_hash": config_hash, "shard_id": shard_id,
        "prompt_source": PROMPT_SOURCE,
        "group_id": p.scene,   # training's resample_violating draws a fresh violating image of the same scene
    }   # seeds, CLIP/safety scores, attributes, classifier fields: absent in the official data -> null.
    # base_model too: that column names the model that RENDERED the images, which the data does not record.


def import_livo_data(src: Path, out_run: Path, values_file: Path = data_path("values.yaml"),
                     base_model: str | None = None, pairs_per_shard: int = 512,
                     keep_value_text: bool = False) -> dict:
    """Convert the official LiVO layout at `src` into a livo dataset run at `out_run`; return the stats.

    Writes RUN/shards/<value_id>-NNNNN.parquet (+ completion markers), RUN/config.json (the run config the
    trainer reads; `base_model` is null unless given) and RUN/import.json (these stats).
    """
    from livo_core.config import load_config

    src, out_run = Path(src), Path(out_run)
    if pairs_per_shard < 1:
        raise LivoError(f"pairs_per_shard must be at least 1, got {pairs_per_shard}")
    values = load_values(Path(values_file))
    pairs, stats = plan_pairs(src, values, keep_value_text)
    check_images([im.path for p in pairs for im in (p.aligned, p.violating)])   # before anything is written

    overrides = {"values_file": str(Path(values_file).resolve()), "out_dir": str(out_run),
                 "shard_size": pairs_per_shard, "values": sorted({p.value_id for p in pairs} & {v.id for v in values})}
    if base_model:
        overrides["base_model"] = base_model
    cfg = load_config(None, overrides)
    import_settings = {"source": str(src.resolve()), "base_model": base_model, "values_file": overrides["values_file"],
                       "pairs_per_shard": pairs_per_shard, "keep_value_text": keep_value_text}
    config_hash = hashlib.sha256(json.dumps({"config": cfg.config_hash(), **import_settings},
                                            sort_keys=True).encode()).hexdigest()[:16]

    record = out_run / "import.json"
    if record.is_file():
        before = json.loads(record.read_text())
        if before.get("config_hash") != config_hash:
            raise LivoError(f"{out_run} holds a different import ({before.get('source')}); choose a new --out folder")
    elif out_run.is_dir() and any(out_run.iterdir()):
        raise LivoError(f"output folder {out_run} is not empty: choose a new --out folder")
    out_run.mkdir(parents=True, exist_ok=True)
    clean_tmp_files(out_run)   # what a killed import was writing (shards/, markers/)
    # The trainer takes base_model from RUN/config.json. The official images were rendered by SD 1.5, but
    # which model to train on is the user's call: record it only when given, else leave it null so the
    # trainer asks for it (training config `base_model`).
    run_config = cfg.model_dump(mode="json")
    run_config["base_model"] = base_model
    atomic_write_text(out_run / "config.json", json.dumps(run_config, indent=2, sort_keys=True))
    # Written first with the settings (a killed import is recognised and resumed), again at the end with stats.
    atomic_write_text(record, json.dumps({"config_hash": config_hash, **import_settings}, indent=2, sort_keys=True))

    by_value: dict[str, list[OfficialPair]] = {}
    for p in pairs:
        by_value.setdefault(p.value_id, []).append(p)
    written = skipped = 0
    for value_id, value_pairs in sorted(by_value.items()):
        for n, start in enumerate(range(0, len(value_pairs), pairs_per_shard)):
            shard_id = f"{value_id}-{n:05d}"
            if is_complete(out_run, shard_id):
                skipped += 1        # resumed import: this shard was finished before
                continue
            chunk = value_pairs[start:start + pairs_per_shard]
            rows = [_row(p, shard_id, config_hash) for p in chunk]
            write_shard(out_run, shard_id, rows, [], {"source": PROMPT_SOURCE, "pairs": len(rows),
                                                      "config_hash": config_hash})
            written += 1
            kill_point("import.shard")
    stats.update({"shards_written": written, "shards_skipped": skipped, "config_hash": config_hash, **import_settings})
    atomic_write_text(record, json.dumps(stats, indent=2, sort_keys=True))
    return stats
