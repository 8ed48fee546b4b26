"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path: "nothing created or changed" is an equality."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pair_row(i: int, shard_id: str = "v-00000", pair_id: str | None = None) -> dict:
    """One synthetic kept row of the shard schema (random bytes as images): shard tests without rendering."""
    import os

    return {"jpg_0": os.urandom(3000), "jpg_1": os.urandom(3000), "label_0": 1.0, "label_1": 0.0,
            "caption": f"prompt {i}", "pair_id": pair_id or f"{i:016x}", "value": "a principle", "value_id": "v",
            "category": "toxicity", "aligned_prompt": f"clean {i}", "violating_prompt": f"prompt {i}",
            "aligned_attribute": None, "seed_0": i, "seed_1": i, "clip_score_0": 0.3, "clip_score_1": 0.3,
            "safety_score_0": 0.0, "safety_score_1": 0.9, "attribute_0": None, "attribute_1": None,
            "safety_classifier": "toyworld", "safety_classifier_version": "1", "safety_threshold": 0.5,
            "clip_model": "local-dir:x", "base_model": "m", "config_hash": "h", "shard_id": shard_id,
            "prompt_source": "template"}


def synthetic_run(run: Path, shards: int = 2, rows: int = 3, tag: str = "a") -> Path:
    """A dataset run folder of `shards` complete shards with `rows` synthetic pairs each (ids unique per tag)."""
    from livo_core.shards import write_shard

    for k in range(shards):
        sid = f"v-{k:05d}"
        kept = [pair_row(i, sid, pair_id=f"{tag}-{k}-{i}") for i in range(rows)]
        write_shard(run, sid, kept, [], {"kept": rows, "rejected": {}})
    (run / ".lock").touch()   # as `livo dataset` leaves it
    return run


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


def trainable_random_run(w: Path, base_model: Path, clip_model: str, subjects: list[str], *, device: str, dtype: str,
                         size: int, steps: int, guidance: float, shard_size: int) -> Path:
    """`livo dataset` on a random-weight SD into w/run (one value: bloody, one prompt per subject, one image
    each), then every shard made trainable: random weights draw no blood, so the judge's verdict is not what
    such a test is about and rejected rows are written back as kept. Returns the config file (w/c.yaml)."""
    import pyarrow.parquet as pq
    import yaml

    from flows.cli import main
    from livo_core.shards import complete_shard_ids, shard_paths, write_shard

    classifier = {"name": "clip_concept", "threshold": 0.0}
    (w / "values.yaml").write_text(yaml.safe_dump({"values": [{
        "id": "bloody-inappropriate", "principle": "bloody content is considered inappropriate", "kind": "toxicity",
        "concept": "blood", "classifier": classifier, "keywords": ["bloody"]}]}))
    (w / "seeds.yaml").write_text(yaml.safe_dump({"slots": {"s": subjects}, "templates": {
        "bloody-inappropriate": [{"user": "a bloody {s}", "aligned": "{s}"}]}}))
    config = {"base_model": str(base_model), "device": device, "dtype": dtype, "values_file": str(w / "values.yaml"),
              "seeds_file": str(w / "seeds.yaml"), "prompts_per_value": len(subjects), "images_per_prompt": 1,
              "shard_size": shard_size,
              "render": {"steps": steps, "height": size, "width": size, "batch_size": 4, "guidance_scale": guidance},
              "judge": {"clip_model": clip_model, "clip_min_score": -1.0, "classifiers": {"bloody-inappropriate": classifier}}}
    (w / "c.yaml").write_text(yaml.safe_dump(config))
    run = w / "run"
    assert main(["dataset", "--out", str(run), "--config", str(w / "c.yaml")]) == 0
    for shard_id in complete_shard_ids(run):
        kept, _, rejected = shard_paths(run, shard_id)
        if not kept.is_file():
            rows = pq.read_table(rejected).drop(["reject_reason"]).to_pylist()
            write_shard(run, shard_id, rows, [], {"value_id": "bloody-inappropriate"})
    return w / "c.yaml"


# --------------------------------------------------------------------------- a synthetic training run
PRINCIPLE = "No red blobs in images."
ALIGNED_PROMPT, VIOLATING_PROMPT = "plain blue", "red blobs on blue"
CAPTIONS = [VIOLATING_PROMPT, "red blobs on a blue wall", "blue with red blobs", "red stains on blue"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_pair(rng: np.random.Generator, size: int) -> tuple[Image.Image, Image.Image]:
    """Aligned: a blue image. Violating: the same with three red blobs. Both with their own pixel noise."""
    blue = Image.new("RGB", (size, size), (0, 60, 200))
    red = blue.copy()
    draw = ImageDraw.Draw(red)
    for _ in range(3):
        (x, y), r = rng.integers(0, size, 2), int(rng.integers(size // 5, size // 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 0, 0))

    def noisy(img):
        return Image.fromarray(np.clip(np.asarray(img, np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8))

    return noisy(blue), noisy(red)


def make_run(run_dir: Path, base_model: Path, n_pairs: int = 16, size: int = 32, captions=CAPTIONS, seed: int = 0,
             shard_id: str = "no-red-00000") -> Path:
    """A livo dataset run of one complete shard, written with the real shard writer."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_pairs):
        aligned, violating = synthetic_pair(rng, size)
        caption = captions[i % len(captions)]
        rows.append({"jpg_0": _png(aligned), "jpg_1": _png(violating), "label_0": 1.0, "label_1": 0.0,
                     "caption": caption, "pair_id": f"{seed:08x}{i:08x}", "value": PRINCIPLE, "value_id": "no-red",
                     "category": "toxicity", "aligned_prompt": ALIGNED_PROMPT, "violating_prompt": caption,
                     "base_model": str(base_model), "seed_0": i, "seed_1": i})
    from livo_core.shards import write_shard

    write_shard(run_dir, shard_id, rows, [], {"value_id": "no-red"})
    (run_dir / "config.json").write_text(json.dumps({"base_model": str(base_model)}))
    return run_dir


# --------------------------------------------------------------------------- Prefect and nightly
def latest_artifact(key: str, api_url: str | None = None) -> str:
    """The newest artifact with `key` on the Prefect API (the current one unless `api_url` is given).

    Plain REST: prefect 3.8.8's client sends null offset/filters, which its own server answers with 422.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = (api_url or PREFECT_API_URL.value()).rstrip("/") + "/artifacts/filter"
    found = httpx.post(url, json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1,
                                  "offset": 0}, timeout=60).raise_for_status().json()
    assert found, f"no artifact {key}"
    return str(found[0]["data"])


def small_nightly(world_model, **extra) -> dict:
    """Overrides for a tiny night on the toy world (its model folder given): one value, 8 candidate pairs, a few
    training steps."""
    overrides = {
        "dataset": {"base_model": str(world_model), "judge": {"clip_model": f"local-dir:{world_model.parent / 'clip'}"},
                    "values": ["bloody-inappropriate"], "prompts_per_value": 4, "images_per_prompt": 2,
                    "shard_size": 4, "device": "cpu", "render": {"steps": 10, "batch_size": 16}},
        "train": {"learning_rate": 1e-3, "max_steps": 8, "batch_size": 4, "checkpoint_every": 100, "device": "cpu",
                  "log_every": 4},
        "heldout": {"prompts_per_value": 4, "repeats": 2},
        "promotion": {"metrics": [{"metric": "heldout_loss", "direction": "min", "tolerance": 0.0}]},
    }
    overrides.update(extra)
    return overrides
