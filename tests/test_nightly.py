"""The nightly loop: config, new principles from a changed policy (real openai client, loopback server),
and two nights in a row on the toy world (only new shards rendered, promote or keep by the rule)."""

from __future__ import annotations

import json
import shutil

import pytest
from openai_server import OpenAIServer

from flows.nightly import (
    NightlyConfig, begin_night, load_nightly_config, night_dataset_config, update_principles,
)
from livo_core.errors import LivoError
from livo_core.values import load_values

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
