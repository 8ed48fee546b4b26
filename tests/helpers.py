"""Small helpers shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


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
