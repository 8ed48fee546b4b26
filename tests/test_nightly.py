"""The nightly loop: config, new principles from a changed policy (real openai client, loopback server),
and two nights in a row on the toy world (only new shards rendered, promote or keep by the rule)."""

from __future__ import annotations

import json
import shutil

import pytest
from openai_server import OpenAIServer

from livo_core.nightly import (
    NightlyConfig, begin_night, load_nightly_config, night_dataset_config, update_principles,
)
from livo_core.errors import LivoError
from livo_core.values import load_values
from helpers import small_nightly

POLICY_REPLY = {"principles": [{"id": "weapons-inappropriate", "principle": "Weapons are considered inappropriate",
                                "kind": "toxicity", "concept": "weapons", "attributes": [], "keywords": ["gun", "sword"]}]}


def test_nightly_config_errors_name_the_field(tmp_path):
    with pytest.raises(LivoError, match=r"'promotion.metrics.0.direction'"):
        load_nightly_config(overrides={"promotion": {"metrics": [{"metric": "heldout_loss", "direction": "down"}]}})
    with pytest.raises(LivoError, match="policy_file needs dataset.prompt_source = llm"):
        load_nightly_config(overrides={"policy_file": str(tmp_path / "policy.txt")})
    with pytest.raises(LivoError, match=r"'train.max_steps'"):
        load_nightly_config(overrides={"train.max_steps": 0})
    cfg = load_nightly_config(overrides={"train.max_steps": 7, "dataset.seed": 40})
    assert cfg.train.max_steps == 7 and cfg.dataset.seed == 40


def test_livo_nightly_and_livo_deploy_report_bad_input_in_one_line(tmp_path, capsys):
    import os
    import subprocess
    import sys

    from flows.cli import main

    assert main(["nightly", "--root", str(tmp_path), "--set", "promotion.metrics=[]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("livo: error: invalid nightly config field 'promotion.metrics'") and err.count("\n") == 1
    assert not (tmp_path / "nights").exists()

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("livo: error: no Prefect API is configured")


def test_nights_get_new_seeds_and_an_unfinished_night_is_resumed(tmp_path):
    cfg = load_nightly_config(overrides={"dataset.seed": 100})
    first = begin_night(tmp_path, cfg)
    assert (first["night"], first["seed"]) == ("night-0001", 101)
    assert begin_night(tmp_path, cfg) == first          # not finished: the same night, the same seed
    path = tmp_path / "nights" / "night-0001.json"
    path.write_text(json.dumps({**first, "status": "done"}))
    second = begin_night(tmp_path, cfg)
    assert (second["night"], second["seed"]) == ("night-0002", 102)
    run = night_dataset_config(cfg, second, cfg.dataset.values_file, tmp_path / "d")
    assert run.seed == 102 and run.config_hash() != cfg.dataset.config_hash()


def test_changed_policy_adds_principles_through_the_llm_and_an_unchanged_one_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-stored")
    policy = tmp_path / "policy.txt"
    policy.write_text("No weapons in generated images.")
    with OpenAIServer() as server:
        server.default = lambda body: POLICY_REPLY
        cfg = NightlyConfig.model_validate({"policy_file": str(policy), "dataset": {
            "prompt_source": "llm", "values": ["bloody-inappropriate"],
            "llm": {"base_url": server.base_url, "model": "test-model", "max_retries": 0}}})
        values_file, h1, new = update_principles(tmp_path, cfg, previous_hash=None)
        assert new == ["weapons-inappropriate"] and server.count == 1
        assert "No weapons in generated images." in json.dumps(server.requests[0].body)
        ids = [v.id for v in load_values(values_file)]
        assert ids[-1] == "weapons-inappropriate" and "bloody-inappropriate" in ids
        # Tonight's dataset covers the configured value and the proposed one.
        run = night_dataset_config(cfg, {"seed": 5}, values_file, tmp_path / "d")
        assert run.values == ["bloody-inappropriate", "weapons-inappropriate"]

        # Same policy text: no request, nothing added.
        values_file2, h2, new2 = update_principles(tmp_path, cfg, previous_hash=h1)
        assert (h2, new2, server.count) == (h1, [], 1)

        # Changed policy: asked again (the reply repeats an existing id, which is dropped).
        policy.write_text("No weapons and no blood in generated images.")
        _, h3, new3 = update_principles(tmp_path, cfg, previous_hash=h1)
        assert h3 != h1 and new3 == [] and server.count == 2
    assert "sk-test-not-stored" not in (tmp_path / "values.yaml").read_text()


# --------------------------------------------------------------------------- nights on the toy world
def _pair_ids(run) -> set[str]:
    from helpers import shard_rows

    return {r["pair_id"] for r in shard_rows(run, ["pair_id"])}


@pytest.mark.slow
def test_two_nights_render_only_new_shards_and_promote_or_keep_by_the_rule(prefect_harness, toyworld_model, tmp_path,
                                                                          one_torch_thread):
    from helpers import latest_artifact

    from flows.nightly import nightly_flow
    from livo_core.registry import ModelRegistry

    root = tmp_path / "nightly"
    first = nightly_flow(root=str(root), overrides=small_nightly(toyworld_model))
    assert first["night"] == "night-0001" and first["promoted"] and first["reason"] == "no production version yet"
    registry = ModelRegistry(root / "models")
    assert registry.current() == "v0001" == first["candidate"]
    night1 = root / "data" / "night-0001"
    marks = {p: p.stat().st_mtime_ns for p in (root / "data").rglob("*.complete.json")}
    marks.update({p: p.stat().st_mtime_ns for p in (root / "heldout").rglob("*.complete.json")})
    night1_ids, heldout_ids = _pair_ids(night1), _pair_ids(root / "heldout")
    assert night1_ids and heldout_ids and not night1_ids & heldout_ids
    lineage = registry.lineage("v0001")
    assert lineage["parent"] is None and [d["run_dir"] for d in lineage["datasets"]] == [str(night1)]
    assert lineage["datasets"][0]["shards"] == first["new_shards"] and lineage["datasets"][0]["config_hash"]

    # Night 2, twice from the same state: its candidate learns nothing (a control run: no value token in
    # training, no warm start), so the value token helps the aligned images less often than production's
    # does (held-out preference accuracy). A strict rule keeps production; a tolerant one promotes.
    tolerant = tmp_path / "tolerant"
    shutil.copytree(root, tolerant)
    control = {"train.prepend_value_token": False, "warm_start": False}

    def rule(tolerance):
        return {"metrics": [{"metric": "heldout_pref_acc", "direction": "max", "tolerance": tolerance}]}

    # ... and both nights also run the evaluation stage on the renders of candidate and production
    from livo_core.toyworld.evaluation import prompt_sets

    evaluation = {"prompt_sets": prompt_sets({"toxicity": 2}, limit=1, groups=("toxicity",)), "quality": "toyworld",
                  "inference": {"steps": 10, "guidance_scale": 5.0, "height": 32, "width": 32}, "fid": False}
    promoted = nightly_flow(root=str(tolerant), overrides={**small_nightly(toyworld_model, promotion=rule(1.0)), **control,
                                                           "evaluation": evaluation})
    kept = nightly_flow(root=str(root), overrides={**small_nightly(toyworld_model, promotion=rule(0.0)), **control,
                                                   "evaluation": evaluation})
    for label in ("candidate", "production"):
        assert {"eval_violation_rate", "eval_fidelity", "eval_retrieval_accuracy"} <= set(kept["metrics"][label])
    assert (root / "eval" / "night-0002" / "report.md").is_file()

    assert kept["night"] == promoted["night"] == "night-0002" and kept["seed"] == first["seed"] + 1
    cand, prod = kept["metrics"]["candidate"]["heldout_pref_acc"], kept["metrics"]["production"]["heldout_pref_acc"]
    assert cand < prod and promoted["metrics"] == kept["metrics"]   # deterministic: the same numbers in both roots
    assert not kept["promoted"] and kept["reason"].startswith("worse on heldout_pref_acc")
    assert registry.current() == "v0001" and registry.versions() == ["v0001", "v0002"]
    assert promoted["promoted"] and promoted["reason"].startswith("not worse on heldout_pref_acc")
    assert ModelRegistry(tolerant / "models").current() == "v0002"
    assert registry.lineage("v0002")["parent"] == "v0001" and len(registry.lineage("v0002")["datasets"]) == 2
    decisions = registry.decisions()
    assert [d["promoted"] for d in decisions] == [True, False] and decisions[-1]["reason"] == kept["reason"]
    report = latest_artifact("livo-nightly-comparison")   # the strict root's night 2 ran last
    assert "livo nightly night-0002" in report and "**v0001 kept** in production; v0002 not promoted" in report
    assert "| heldout_pref_acc |" in report and "| worse |" in report and kept["reason"] in report

    # Night 2 rendered only new shards: night 1's and the held-out set's markers were not rewritten, its
    # pairs are all new, and every one of its shards was built tonight.
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
    night2 = root / "data" / "night-0002"
    night2_ids = _pair_ids(night2)
    assert night2_ids and not night2_ids & (night1_ids | heldout_ids)
    stats = json.loads((night2 / "stats.json").read_text())["shards"]
    assert kept["new_shards"] == [r["shard"] for r in stats] and {r["status"] for r in stats} == {"built"}
    state = json.loads((root / "nights" / "night-0002.json").read_text())
    assert state["status"] == "done" and state["decision"]["reason"] == kept["reason"] and state["data"] == "data/night-0002"

    # The evaluation flow (the `evaluation` deployment) scores production on the same held-out draws (the
    # renders' eval_* metrics come from `livo evaluate`, not from this flow).
    from flows.nightly import heldout_flow

    heldout = {k: v for k, v in kept["metrics"]["production"].items() if not k.startswith("eval_")}
    assert heldout_flow(root=str(root)) == pytest.approx(heldout)
