"""The LLM stage as real servers see it: structured outputs in each server's dialect (auto-detected), max_tokens,
requests in flight with results independent of their order, near duplicates, diversity figures, resume after
kill -9 without re-sending answered requests."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_server import OpenAIServer

from livo_core.config import LLMConfig, RunConfig
from livo_core.errors import LivoError
from livo_core.llm import LLMClient
from livo_core.paths import DATA_DIR
from livo_core.prompts import generate_pairs, llm_pairs
from livo_core.values import load_values

VALUES = {v.id: v for v in load_values(DATA_DIR / "values.yaml")}
BLOODY = VALUES["bloody-inappropriate"]


def client(server: OpenAIServer, cache: Path | None = None, **kw) -> LLMClient:
    return LLMClient(LLMConfig(base_url=server.base_url, model="test-model", max_retries=0, timeout_s=10, **kw), cache)


def by_content(body: dict) -> dict:
    """A deterministic model: its answer depends only on the request (the facet it is asked for)."""
    text = body["messages"][-1]["content"]
    facet = text.split("are set in ")[1].split(", each")[0] if "are set in " in text else "x"
    n = int(text.split("Write ")[1].split(" ")[0])
    if '"prompts"' in text:
        return {"prompts": [{"prompt": f"a photo of a {job} in {facet} {i}", "subject": job}
                            for i, job in enumerate(["doctor", "nurse", "chef", "pilot"][:n])]}
    word = "bloody" if "Bloody" in text else "zombie"
    return {"pairs": [{"prompt": f"a {word} {who} in {facet}", "aligned_prompt": f"a {who} in {facet}"}
                      for who in ["knight", "sailor", "farmer", "dancer", "boxer", "clown", "monk", "nurse"][:n]]}


# ---------------------------------------------------------------- structured outputs
@pytest.mark.parametrize("dialect", ["llama-cpp-python", "llama-cpp-python-422"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_auto_falls_back_once_from_json_schema_on_llama_cpp_pythons_refusal(dialect, concurrency):
    with OpenAIServer(dialect=dialect) as server:
        server.default = by_content
        c = client(server, max_concurrency=concurrency)
        pairs, _ = llm_pairs(BLOODY, 16, c)
        formats = [r.body.get("response_format", {}) for r in server.requests]
    refused = [f for f in formats if f["type"] == "json_schema"]
    assert len(pairs) == 16
    # tried first by the requests already in flight (one when serial), refused, never again
    assert formats[0]["type"] == "json_schema" and (len(refused) == 1 if concurrency == 1 else 1 <= len(refused) <= concurrency)
    assert all(f["type"] == "json_object" and f["schema"]["required"] == ["pairs"] for f in formats if f not in refused)
    report = c.report()
    assert report["dialect"] == "json_object_schema" and report["refused_dialects"] == ["json_schema"]
    assert report["requests"] == len(formats) - len(refused) and report.get("reasked_malformed", 0) == 0


@pytest.mark.parametrize("dialect, expected, refused", [("openai", "json_schema", []), ("any", "json_schema", []),
                                                        ("plain", "none", ["json_schema", "json_object_schema", "json_object"])])
def test_auto_uses_the_first_dialect_the_server_takes(dialect, expected, refused):
    with OpenAIServer(dialect=dialect) as server:
        server.default = by_content
        c = client(server)
        llm_pairs(BLOODY, 4, c)
    assert c.dialect == expected and c.refused == refused
    assert ("response_format" in server.requests[-1].body) == (expected != "none")


def test_a_fixed_dialect_the_server_refuses_is_one_line_not_a_silent_fallback():
    with OpenAIServer(dialect="llama-cpp-python") as server:
        server.default = by_content
        with pytest.raises(LivoError, match=r"answered HTTP 500") as e:
            llm_pairs(BLOODY, 4, client(server, structured="json_schema"))
    assert server.base_url in str(e.value) and "\n" not in str(e.value) and server.count == 1   # max_retries = 0


def test_max_tokens_is_sent_and_a_cut_reply_is_re_asked_then_named():
    good = {"pairs": [{"prompt": "a bloody knight", "aligned_prompt": "a knight"}]}
    with OpenAIServer() as server:
        server.reply('{"pairs": [{"prompt": "a bloody kn', finish_reason="length").reply(good)
        items, _ = client(server, max_tokens=64).chat_json("toxicity_pairs.txt", {"principle": "p", "concept": "blood",
                                                           "keywords": "blood", "n": 1, "focus": "f"}, _item(), "pairs")
        assert [i.prompt for i in items] == ["a bloody knight"] and server.requests[0].body["max_tokens"] == 64
        assert "cut off at the length limit" in server.requests[1].body["messages"][-1]["content"]
        server.reply('{"pairs": [', finish_reason="length").reply('{"pairs": [{"pro', finish_reason="length")
        with pytest.raises(LivoError, match=r"cut at llm.max_tokens = 64 tokens 2 time\(s\).*raise llm.max_tokens"):
            client(server, max_tokens=64).chat_json("toxicity_pairs.txt", {"principle": "p", "concept": "blood",
                                                    "keywords": "blood", "n": 1, "focus": "g"}, _item(), "pairs")


def _item():
    from livo_core.prompts import _ToxicityItem

    return _ToxicityItem


# ---------------------------------------------------------------- requests in flight
def test_requests_run_in_flight_and_the_pairs_do_not_depend_on_their_order(tmp_path):
    values = [VALUES["bloody-inappropriate"], VALUES["zombie-inappropriate"], VALUES["gender-equality"]]
    results = {}
    for conc in (1, 8):
        with OpenAIServer(latency_s=0.05) as server:
            rng = random.Random(conc)
            server.default = lambda body: (time.sleep(rng.random() * 0.05), by_content(body))[1]   # replies out of order
            cfg = RunConfig(prompt_source="llm", prompts_per_value=24,
                            llm={"base_url": server.base_url, "model": "test-model", "pairs_per_request": 4, "max_concurrency": conc})
            pairs, rejections = generate_pairs(cfg, values, tmp_path / f"cache-{conc}")
            results[conc] = ([p.to_dict() for p in pairs], rejections, server.max_in_flight, server.count)
    assert results[1][:2] == results[8][:2]
    assert results[1][2] == 1 and results[8][2] >= 4            # at most 1 in flight serially, several with 8
    assert len(results[8][0]) == 3 * 24 and results[1][3] == results[8][3]


def test_near_duplicates_are_rejected_exactly_with_the_earlier_prompt_named():
    from livo_core.diversity import NearDuplicates

    crafted = [
        ("a bloody knight in a dark forest", None),
        ("a bloody knight in a dark forest", "p0"),          # exact
        ("A Bloody Knight, in a dark forest!", "p0"),       # case and punctuation
        ("in a dark forest, a knight bloody", "p0"),        # word order
        ("a bloody knight in the dark forest", "p0"),       # only an article differs
        ("a bloody knight in a bright forest", None),        # one content word differs: 4/6 = 0.67
        ("a zombie nurse on a city street", None),
        ("zombie nurse, city street", "p6"),
        ("a bloody samurai on a rooftop at dawn", None),
        ("an oil painting of a bloody dancer", None),
    ]
    nd = NearDuplicates(0.8)
    got = []
    for i, (text, _) in enumerate(crafted):
        got.append(nd.add(f"p{i}", text))
    assert got == [expected for _, expected in crafted]


def test_near_duplicate_search_cost_does_not_grow_with_what_is_kept():
    from livo_core.diversity import NearDuplicates

    nd = NearDuplicates(0.8)
    words = [f"w{i}" for i in range(400)]
    rng = random.Random(0)
    texts = [" ".join(rng.sample(words, 8)) for _ in range(3000)]
    t0 = time.perf_counter()
    for i, t in enumerate(texts[:1500]):
        nd.add(str(i), t)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, t in enumerate(texts[1500:]):
        nd.add(str(1500 + i), t)
    second = time.perf_counter() - t0
    assert second < 3 * first + 0.5, (first, second)   # an all-pairs filter would take ~3x longer for the second half


def test_diversity_figures():
    from livo_core.diversity import diversity

    d = diversity(["a bloody knight", "a bloody knight", "a zombie nurse on a street"])
    assert d["prompts"] == 3 and d["distinct"] == 2
    assert d["mean_similarity"] == pytest.approx((1.0 + 0 + 0) / 3, abs=1e-4)   # rounded to 4 places
    assert d["distinct_2"] == pytest.approx(7 / 9, abs=1e-4)   # bigrams: a-bloody, bloody-knight (twice each) + 5 of the third


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, expected", [("llm.max_concurrency=0", "llm.max_concurrency"),
                                                ("llm.max_concurrency=257", "llm.max_concurrency"),
                                                ("llm.structured=xml", "llm.structured"),
                                                ("llm.max_tokens=0", "llm.max_tokens")])
def test_bad_llm_settings_are_one_line(tmp_path, capfd, override, expected):
    from flows.cli import main

    assert main(["dataset", "--out", str(tmp_path / "run"), "--set", "prompt_source=llm", "--set", override]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("livo: error:") and expected in err[0] and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the flow: stats, resume after kill -9
def test_dataset_stats_name_the_dialect_and_show_diversity(prefect_harness, tiny_config, tmp_path):
    from flows.dataset import dataset_flow

    with OpenAIServer(dialect="llama-cpp-python") as server:
        server.default = by_content
        config = tiny_config(prompt_source="llm", llm={"base_url": server.base_url, "model": "test-model"})
        dataset_flow(config=config, run_dir=str(tmp_path / "run"))
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["summary"]["llm"]["dialect"] == "json_object_schema"
    assert stats["summary"]["llm"]["refused_dialects"] == ["json_schema"]
    assert stats["prompts"]["bloody-inappropriate"]["diversity"]["distinct"] == 2
    md = (tmp_path / "run" / "stats.md").read_text()
    assert "## Prompts" in md and "dialect `json_object_schema`" in md and "0 re-asks for malformed JSON" in md


@pytest.mark.slow
def test_kill_mid_llm_stage_then_resume_gives_the_same_pairs_and_resends_nothing(prefect_harness, tiny_config, tmp_path):
    import yaml

    with OpenAIServer(latency_s=0.02) as server:
        server.default = by_content
        config = tiny_config(prompt_source="llm", prompts_per_value=12,
                             llm={"base_url": server.base_url, "model": "test-model", "pairs_per_request": 2, "max_concurrency": 4})
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PREFECT_API_URL": prefect_harness}
        cmd = [sys.executable, "-m", "flows.cli", "dataset", "--config", str(tmp_path / "c.yaml")]
        killed = subprocess.run([*cmd, "--out", str(tmp_path / "a")], env={**env, "LIVO_KILL_AT": "llm.answer:5"},
                                capture_output=True, text=True, timeout=600)
        assert killed.returncode == -9, killed.stderr
        answered = len(list((tmp_path / "a" / "cache" / "llm").glob("*.json")))
        sent_before = server.count
        assert answered >= 5 and not (tmp_path / "a" / "pairs" / "gender-equality.jsonl").exists()
        resumed = subprocess.run([sys.executable, "-m", "flows.cli", "resume", str(tmp_path / "a")], env=env,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        resent = [r for r in server.requests[sent_before:]]
        whole = subprocess.run([*cmd, "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=600)
        assert whole.returncode == 0, whole.stderr
    total_requests = len(list((tmp_path / "b" / "cache" / "llm").glob("*.json")))
    assert len(resent) == total_requests - answered               # answered requests were not sent again
    for vid in ("bloody-inappropriate", "gender-equality"):
        a = (tmp_path / "a" / "pairs" / f"{vid}.jsonl").read_text()
        assert a == (tmp_path / "b" / "pairs" / f"{vid}.jsonl").read_text() and a
