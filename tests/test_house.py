"""The house: every shipped preset and model config loads and validates, presets belong to model folders by
what the folder declares, the training flow (and its deployment) resolves the toy recipe on toy data,
`livo config show` lists every field, and a built wheel runs from an unrelated folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from livo_core.config import PRESETS, describe_config, load_job_config, preset_file
from livo_core.paths import DATA_DIR, TOYWORLD_DIR

ROOT = Path(__file__).resolve().parent.parent


def _model(kind: str):
    if kind == "dataset":
        from livo_core.config import RunConfig
        return RunConfig
    if kind == "train":
        from livo_core.train import TrainConfig
        return TrainConfig
    if kind == "evaluate":
        from livo_core.evaluate import EvalConfig
        return EvalConfig
    from livo_core.nightly import NightlyConfig
    return NightlyConfig


SHIPPED = [(kind, name) for kind, names in PRESETS.items() for name in names]


@pytest.mark.parametrize("kind, name", SHIPPED, ids=[f"{k}-{n}" for k, n in SHIPPED])
def test_every_shipped_preset_validates_and_names_files_that_exist(kind, name):
    assert preset_file(kind, name).is_file()
    cfg = load_job_config(_model(kind), kind, preset=name)
    # every path field the preset sets is absolute and exists (the one rule for relative paths)
    raw = json.dumps(cfg.model_dump(mode="json"))
    for value in [v for _, v, _, s in describe_config(cfg) if not s and isinstance(v, str) and str(DATA_DIR) in v]:
        assert Path(value).exists(), value
    if kind == "evaluate":   # shipped sets exist; a benchmark's own file (livo ships none) is the user's, found where livo runs
        for ps in cfg.prompt_sets:
            assert Path(ps.path).is_file() or not Path(ps.path).is_absolute(), ps.path
    assert "../" not in raw


def test_every_data_config_in_the_package_is_a_preset():
    shipped = {preset_file(k, n).name for k, n in SHIPPED}
    assert {p.name for p in (DATA_DIR / "configs").glob("*.toml")} == shipped


@pytest.mark.parametrize("name", sorted(p.stem for p in (DATA_DIR / "model_configs").glob("*.json")))
def test_every_model_config_builds_on_the_meta_device(name):
    import open_clip
    import torch

    from livo_core.families import family
    from livo_core.models import model_config

    cfg = model_config(name)
    with torch.device("meta"):   # shapes and arguments checked, no memory for weights (SD 1.5's is 3.4 GB)
        if "unet" in cfg or "family" in cfg:   # a diffusion model: built by its family, as build_random_model does
            modules = family(cfg.pop("family", "sd")).random_modules(cfg)
            towers = [m for k, m in modules.items() if k.startswith("text_encoder")]   # SDXL, SD3: two, side by side
            width = sum(m.config.hidden_size for m in towers)
            if "unet" in modules:
                assert modules["unet"].config.cross_attention_dim == width
            elif name.endswith("flux") or "flux" in name:   # FLUX: T5 tokens; pooled = CLIP-L's pooled output
                cfg_t = modules["transformer"].config
                assert cfg_t.joint_attention_dim == modules["text_encoder_2"].config.d_model
                assert cfg_t.pooled_projection_dim == modules["text_encoder"].config.hidden_size
            else:                # SD3: the CLIP rows are zero-padded into the joint width; pooled = both projections
                cfg_t = modules["transformer"].config
                assert cfg_t.joint_attention_dim >= width
                assert cfg_t.pooled_projection_dim == sum(m.config.projection_dim for m in towers)
        else:
            open_clip.CLIP(**cfg)


def test_a_model_folder_declares_its_training_preset(tmp_path):
    from livo_core.train import preset_for

    assert preset_for(str(TOYWORLD_DIR / "model")) == "toyworld"
    world = tmp_path / "my-world"                      # a world rebuilt elsewhere: its build.json says so
    (world / "model").mkdir(parents=True)
    (world / "build.json").write_text(json.dumps({"training_preset": "toyworld", "settings": {}}))
    assert preset_for(str(world / "model")) == "toyworld"
    other = tmp_path / "sd"
    other.mkdir()
    assert preset_for(str(other)) == "published" and preset_for("stable-diffusion-v1-5/stable-diffusion-v1-5") == "published"
    (other / "livo.json").write_text(json.dumps({"training_preset": "toyworld"}))
    assert preset_for(str(other)) == "toyworld"


def test_the_training_deployment_resolves_the_toy_recipe_on_toy_data(prefect_harness, tmp_path):
    """The deployment passes train_config = {} (its default); the flow resolves the preset the data's base
    model declares, exactly as `livo train` does: the toy recipe, not the paper's lr 1e-6 x 15,000 steps."""
    from flows.deployments import build_deployments
    from flows.training import train_value_encoder
    from helpers import synthetic_run
    from livo_core.train import load_train_config, resolve_train_config

    training = next(d for d in build_deployments(str(tmp_path / "nightly")) if d.name == "training")
    assert training.parameters["train_config"] == {}
    run = synthetic_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"base_model": str(TOYWORLD_DIR / "model")}))
    cfg, preset = resolve_train_config([run], None, training.parameters["train_config"])
    toy = load_train_config(preset="toyworld")
    assert preset == "toyworld" and (cfg.max_steps, cfg.learning_rate) == (toy.max_steps, toy.learning_rate) == (400, 8e-3)
    # the flow itself, with the deployment's parameters (2 steps so it is quick): the preset's lr is what trains
    params = {**training.parameters, "data_dirs": [str(run)], "out_dir": str(tmp_path / "out"), "train_config": {"max_steps": 2}}
    _make_trainable(run)
    train_value_encoder(**params)
    used = json.loads((tmp_path / "out" / "train_config.json").read_text())
    used = used.get("config", used)
    assert used["learning_rate"] == 8e-3 and used["max_steps"] == 2 and used["beta"] == 30.0


def _make_trainable(run: Path) -> None:
    """Synthetic rows carry random bytes: give them real 32x32 PNGs so the trainer can encode them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from livo_core.files import sha256_file
    from livo_core.shards import SHARD_SCHEMA

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(buf, format="PNG")
    for path in sorted((run / "shards").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for r in rows:
            r["jpg_0"] = r["jpg_1"] = buf.getvalue()
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), path)
        marker = run / "markers" / f"{path.stem}.complete.json"
        meta = json.loads(marker.read_text())
        meta.update(sha256=sha256_file(path), bytes=path.stat().st_size)
        marker.write_text(json.dumps(meta))


@pytest.mark.parametrize("kind", ["dataset", "train", "evaluate", "nightly"])
def test_config_show_lists_every_field_with_its_description(kind, capsys):
    from flows.cli import main

    assert main(["config", "show", kind]) == 0
    out = capsys.readouterr().out
    cfg = load_job_config(_model(kind), kind)
    for key, _, help_text, section in describe_config(cfg):
        assert help_text, f"{kind} field {key} has no description"
        assert (f"# [{key}]" if section else f"\n{key} = ") in out, key


@pytest.mark.slow
def test_a_built_wheel_runs_the_readme_job_from_an_unrelated_folder(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(wheels)],
                   check=True, capture_output=True, timeout=600)
    wheel = next(wheels.glob("livo-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import livo_core.paths as p; print(p.DATA_DIR)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target)), where             # the wheel's copy, not the checkout
    r = subprocess.run([sys.executable, "-m", "flows.cli", "dataset", "--out", "run", "--set", "prompts_per_value=2",
                        "--set", "images_per_prompt=1"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((work / "run" / "shards").glob("*.parquet")) or list((work / "run" / "markers").glob("*.json"))
    show = subprocess.run([sys.executable, "-m", "flows.cli", "config", "show", "dataset"], cwd=work, env=env,
                          capture_output=True, text=True, check=True).stdout
    assert f"values_file = \"{target}" in show


def test_one_toy_recipe_for_train_the_demo_and_the_nightly():
    """The nightly's train section starts from the preset its base model declares, as livo train and the demo do."""
    from livo_core.nightly import load_nightly_config
    from livo_core.train import load_train_config

    toy = load_train_config(preset="toyworld")
    night = load_nightly_config().train
    assert (night.max_steps, night.learning_rate, night.beta, night.lr_scheduler) == \
        (toy.max_steps, toy.learning_rate, toy.beta, toy.lr_scheduler) == (400, 8e-3, 30.0, "cosine")
    assert load_nightly_config(overrides={"train.max_steps": 7}).train.max_steps == 7   # overrides still win
    published = load_train_config(preset="published")
    other = load_nightly_config(overrides={"dataset.base_model": "someone/sd-model"}).train   # declares no preset
    assert (other.max_steps, other.learning_rate) == (published.max_steps, published.learning_rate)
