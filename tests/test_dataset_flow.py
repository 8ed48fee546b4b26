"""The Prefect dataset flow on tiny models: shards, skipping finished work, LLM prompt source, failures."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from openai_server import OpenAIServer

from flows.dataset import dataset_flow, prepare_run_dir
from livo_core.config import RunConfig
from livo_core.errors import LivoError
from livo_core.shards import complete_shard_ids, load_plan, read_shards, shard_paths
from helpers import shard_rows


def _planned_ids(run) -> dict[str, set[str]]:
    plan = load_plan(run)["values"]
    return {sid: {p["pair_id"] for p in pairs} for shards in plan.values() for sid, pairs in shards.items()}


def _all_pair_ids(run) -> list[str]:
    """pair_ids of kept and rejected rows of every complete shard."""
    return [r["pair_id"] for r in shard_rows(run, ["pair_id"])]


def test_flow_builds_every_planned_pair_once_and_reruns_touch_nothing(prefect_harness, tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config()
    summary = dataset_flow(config=config, run_dir=str(run))

    planned = _planned_ids(run)
    # 2 values x 2 prompts x 2 seeds = 4 pairs per value, shards of 3 -> 2 shards per value.
    assert sorted(planned) == ["bloody-inappropriate-00000", "bloody-inappropriate-00001",
                               "gender-equality-00000", "gender-equality-00001"]
    assert [len(planned[s]) for s in sorted(planned)] == [3, 1, 3, 1]
    assert complete_shard_ids(run) == sorted(planned)
    ids = _all_pair_ids(run)
    assert len(ids) == len(set(ids)) == 8 and set(ids) == set().union(*planned.values())
    assert summary["shards_complete"] == 4 and summary["kept"] + sum(summary["rejected"].values()) == 8

    for name in ("config.json", "plan/bloody-inappropriate.value.json", "stats.json", "stats.md", "pairs/bloody-inappropriate.jsonl",
                 "pairs/gender-equality.jsonl"):
        assert (run / name).is_file(), name
    stats = json.loads((run / "stats.json").read_text())
    assert [r["status"] for r in stats["shards"]] == ["built"] * 4
    kept, problems = read_shards([run])
    assert problems == []
    assert (kept["config_hash"].nunique() <= 1) and not list(run.rglob("*.tmp-*"))
    rejected = pq.read_table(shard_paths(run, "gender-equality-00000")[2]).to_pandas()
    row = (kept if len(kept) else rejected).iloc[0]
    assert row["base_model"] == config["base_model"] and row["safety_classifier"] and row["shard_id"]

    # A second flow run over the same dir: every shard comes from Prefect's cache, no file is rewritten.
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*.parquet")}
    before.update({p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*.complete.json")})
    dataset_flow(config=config, run_dir=str(run))
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in before}
    assert after == before
    assert {r["status"] for r in json.loads((run / "stats.json").read_text())["shards"]} == {"cached"}

    # A shard deleted by hand is rebuilt, even though Prefect has a cache record for it.
    for path in shard_paths(run, "gender-equality-00001"):
        path.unlink(missing_ok=True)   # (a shard that kept no pair has no kept file)
    dataset_flow(config=config, run_dir=str(run))
    statuses = {r["shard"]: r["status"] for r in json.loads((run / "stats.json").read_text())["shards"]}
    assert statuses["gender-equality-00001"] == "built"
    assert _all_pair_ids(run).count(next(iter(planned["gender-equality-00001"]))) == 1


def test_a_failing_shard_is_named_and_the_others_finish(prefect_harness, tiny_config, tmp_path):
    run = tmp_path / "run"
    config = tiny_config()
    prepare_run_dir(RunConfig.model_validate(config), run)
    # A directory where the shard's Parquet file must go: writing it fails on every try.
    (run / "shards" / "bloody-inappropriate-00001.parquet").mkdir(parents=True)
    with pytest.raises(LivoError) as err:
        dataset_flow(config=config, run_dir=str(run))
    message = str(err.value)
    assert "1 shard(s) failed" in message and "bloody-inappropriate-00001" in message
    assert "IsADirectoryError" in message and "livo resume" in message and "\n" not in message
    assert complete_shard_ids(run) == [
        "bloody-inappropriate-00000", "gender-equality-00000", "gender-equality-00001"]
    stats = json.loads((run / "stats.json").read_text())
    assert stats["summary"]["shards_failed"] == 1


def _llm_reply(body: dict) -> dict | str:
    """A valid answer to whichever request it is: new principles from a policy, or prompt pairs of a value."""
    text = body["messages"][1]["content"]
    if "Read this policy" in text:
        return {"principles": [{"id": "zombie-inappropriate", "principle": "Zombie content is considered inappropriate",
                                "kind": "toxicity", "concept": "zombies", "attributes": [], "keywords": ["zombie"]}]}
    for word in ("Bloody", "Zombie"):
        if f'"{word} content' in text:
            return {"pairs": [{"prompt": f"a {word.lower()} knight number {i}", "aligned_prompt": f"a knight number {i}"}
                              for i in range(4)]}
    return {"prompts": [{"prompt": f"a photo of a {job}", "subject": job} for job in ("doctor", "nurse", "chef")]}


def test_llm_prompt_source_retries_proposes_principles_and_keeps_the_key_secret(prefect_harness, tiny_config, tmp_path,
                                                                                 monkeypatch):
    secret = "sk-test-DO-NOT-STORE-4242"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    run = tmp_path / "run"
    with OpenAIServer() as server:
        server.error(429).error(500)   # the client retries both, then gets the default reply
        server.default = _llm_reply
        config = tiny_config(prompt_source="llm", policy_text="No zombies, please.",
                             llm={"base_url": server.base_url, "model": "test-model", "max_retries": 2, "reask": 0})
        dataset_flow(config=config, run_dir=str(run))
        # 3 tries for the principles request, then one request per value (2 from the file + 1 proposed).
        assert server.count == 6
        assert server.requests[-1].headers["authorization"] == f"Bearer {secret}"

    pairs = [json.loads(line) for line in (run / "pairs" / "bloody-inappropriate.jsonl").read_text().splitlines()]
    assert len(pairs) == 2 and {p["source"] for p in pairs} == {"llm:test-model"}
    assert [v["id"] for v in json.loads((run / "proposed_values.json").read_text())] == ["zombie-inappropriate"]
    assert complete_shard_ids(run)[-2:] == ["zombie-inappropriate-00000", "zombie-inappropriate-00001"]
    assert len(complete_shard_ids(run)) == 6 and len(list((run / "cache" / "llm").glob("*.json"))) == 4
    for path in run.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    # The LLM answers are cached in the run dir: a rerun needs no server at all.
    dataset_flow(config=config, run_dir=str(run))


def test_llm_failure_ends_the_run_naming_the_endpoint_and_keeps_finished_shards(prefect_harness, tiny_config, tmp_path):
    run = tmp_path / "run"
    with OpenAIServer() as server:
        server.default = lambda body: _llm_reply(body) if "Bloody" in body["messages"][1]["content"] else "not json {"
        config = tiny_config(prompt_source="llm", llm={"base_url": server.base_url, "model": "test-model", "reask": 0})
        with pytest.raises(LivoError) as err:
            dataset_flow(config=config, run_dir=str(run))
    message = str(err.value)
    assert server.base_url in message and "2 finished shard(s) kept" in message and "\n" not in message
    assert complete_shard_ids(run) == ["bloody-inappropriate-00000", "bloody-inappropriate-00001"]
    assert not (run / "pairs" / "gender-equality.jsonl").exists()


def test_llm_server_down(prefect_harness, tiny_config, tmp_path):
    server = OpenAIServer().start()
    server.stop()
    config = tiny_config(prompt_source="llm", llm={"base_url": server.base_url, "model": "test-model", "max_retries": 0})
    with pytest.raises(LivoError, match="unreachable") as err:
        dataset_flow(config=config, run_dir=str(tmp_path / "run"))
    assert server.base_url in str(err.value)
    assert complete_shard_ids(tmp_path / "run") == []


def test_resume_repairs_damaged_plan_pairs_and_shards(prefect_harness, tiny_config, tmp_path, capsys):
    """Truncated plan and pairs files and a byte-flipped shard: `livo resume` rebuilds them and ends with the
    dataset an undamaged run has."""
    from flows.cli import main

    config = tiny_config()
    clean, run = tmp_path / "clean", tmp_path / "run"
    dataset_flow(config=config, run_dir=str(clean))
    dataset_flow(config=config, run_dir=str(run))
    for path in (run / "plan" / "bloody-inappropriate-00001.json", run / "plan" / "gender-equality.value.json",
                 run / "pairs" / "bloody-inappropriate.jsonl"):
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    flipped = shard_paths(run, "gender-equality-00000")[2]   # the rejected file: its marker holds its hash too
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x20
    flipped.write_bytes(bytes(data))
    from livo_core.shards import damaged_shards

    assert [sid for sid, _ in damaged_shards(run)] == ["gender-equality-00000"]
    assert main(["resume", str(run)]) == 0
    capsys.readouterr()
    assert damaged_shards(run) == []
    statuses = {r["shard"]: r["status"] for r in json.loads((run / "stats.json").read_text())["shards"]}
    assert statuses["gender-equality-00000"] == "built"
    rows = lambda r: sorted(map(str, shard_rows(r, ["pair_id", "jpg_0", "jpg_1"])))  # noqa: E731
    assert rows(run) == rows(clean)
    for name in ("plan/bloody-inappropriate-00001.json", "plan/gender-equality.value.json", "pairs/bloody-inappropriate.jsonl"):
        assert (run / name).read_bytes() == (clean / name).read_bytes(), name
