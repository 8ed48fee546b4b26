"""`livo demo --quick`: every stage of the demo on the real toy world model, through Prefect.

The quick run is too small for its numbers to mean much; what is checked is that every stage ran on real
data and wrote what it promises, and the facts that hold however little was trained (harmless prompts
get no value, so their images are the base model's, pixel for pixel).
"""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from livo_core.toyworld.demo import METHODS, QUICK, TRAINED


def test_demo_refuses_a_file_as_out(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["demo", "--out", str(f), "--quick"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_demo_of_a_world_not_built_names_the_build_command(tmp_path, capsys, monkeypatch):
    import flows.demo

    monkeypatch.setattr(flows.demo, "TOYWORLD_DIR", tmp_path)   # a toy world folder without model-sd3/
    assert main(["demo", "--out", str(tmp_path / "out"), "--family", "sd3"]) == 2
    err = capsys.readouterr().err
    assert "livo: error:" in err and "livo toyworld build --family sd3" in err and not (tmp_path / "out").exists()


def test_each_world_has_its_own_demo_settings(tmp_path):
    """The UNet world's demo runs as measured (FULL: its preset, guidance 5); the flow world renders at its own
    guidance, dataset and evaluation alike, with its own training preset."""
    from livo_core.toyworld.demo import FULL, WORLDS, dataset_config, demo_settings, demo_values
    from livo_core.train import load_train_config

    assert demo_settings("sd") == FULL and FULL.guidance_scale == 5.0
    flow = demo_settings("sd3")
    world = WORLDS["sd3"][2]
    assert flow.guidance_scale == world["guidance_scale"] != FULL.guidance_scale
    assert demo_settings("sd3", quick=True).guidance_scale == flow.guidance_scale
    assert (flow.value_condition, flow.livo_beta) == ("pooled", load_train_config(preset="toyworld-sd3").beta)
    for value in demo_values():
        cfg = dataset_config(flow, value, tmp_path, family="sd3")
        assert cfg["render"]["guidance_scale"] == flow.guidance_scale and cfg["base_model"].endswith("model-sd3")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_quick_demo_runs_every_stage(prefect_harness, toyworld_model, tmp_path, family):
    """The UNet world (sd) and the flow-matching world (sd3: an SD 3 transformer, velocity errors in the hinge)."""
    from flows.demo import demo_flow
    from livo_core.paths import TOYWORLD_DIR
    from livo_core.toyworld.demo import demo_settings, world_model

    if not (world_model(TOYWORLD_DIR, family) / "model_index.json").is_file():
        pytest.skip(f"the {family} toy world is not built: `livo toyworld build --family {family}`")
    out = tmp_path / "demo"
    returned = demo_flow(out_dir=str(out), quick=True, baselines=True, family=family)
    assert returned["settings"]["family"] == family
    data_config = json.loads((out / "data" / "bloody-inappropriate" / "config.json").read_text())
    assert data_config["base_model"] == str(world_model(TOYWORLD_DIR, family))
    assert data_config["render"]["guidance_scale"] == demo_settings(family, quick=True).guidance_scale

    for name in ("report.md", "metrics.json", "grid.png", "training_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_to_violation_below_10pct"] == returned["steps_to_violation_below_10pct"]
    for key in ("violation_rate_base", "violation_rate_livo", "fidelity_base", "fidelity_livo", "bias_d1_base",
                "bias_d1_livo", "unrelated_violation_rate_livo"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert set(metrics["results"]) == set(METHODS)

    # data: the real dataset flow wrote shards for both values
    assert len(metrics["datasets"]) == 2 and all(d["shards_complete"] >= 1 for d in metrics["datasets"].values())
    # training: every trained method ran the same step budget, with checkpoints evaluated along the way
    for method in TRAINED:
        assert metrics["training"][method]["steps"] == QUICK.train_steps
        curve = metrics["curves"][method]
        assert [p["step"] for p in curve] == list(range(0, QUICK.train_steps + 1, QUICK.eval_every))
        assert metrics["trainable_params"][method] > 0
    assert metrics["trainable_params"]["base"] == metrics["trainable_params"]["negative-prompt"] == 0

    # evaluation: values retrieved from the prompt; harmless prompts untouched by LiVO, changed by a negative prompt
    by_group = {}
    for r in metrics["retrievals"]:
        by_group.setdefault(r["group"], set()).add(r["retrieved"])
    assert by_group["harmless"] == {"not applicable"}
    assert by_group["toxicity"] == {metrics["eval"]["toxic_value"]} and by_group["bias"] == {metrics["eval"]["bias_value"]}
    assert metrics["unrelated_pixel_identical_livo"] == 1.0
    assert metrics["unrelated_pixel_identical_negative_prompt"] < 1.0

    report = (out / "report.md").read_text()
    assert all(m in report for m in METHODS) and "## Targets" in report
    # the demo went through the general evaluation stage: its store, per-prompt table and paper-style report
    assert (out / "eval" / "per_prompt.csv").is_file() and "tox. R" in (out / "eval" / "report.md").read_text()
    # the store holds each method's final images and, for the curves, each trained method's checkpoints
    steps = range(QUICK.eval_every, QUICK.train_steps + 1, QUICK.eval_every)
    checkpoints = {f"{m}-step-{st:06d}" for m in TRAINED for st in steps}
    assert {p.name for p in (out / "eval" / "images").iterdir()} == set(METHODS) | checkpoints

    from helpers import latest_artifact   # plain REST: prefect 3.8.8's own client gets a 422 on /artifacts/filter
    for key in ("livo-demo-metrics", "livo-demo-targets", "livo-demo-report"):
        assert latest_artifact(key)

