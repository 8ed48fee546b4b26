"""LLMClient against a real loopback OpenAI-compatible server, through the real openai client."""

import json
import time

import pytest
from openai_server import OpenAIServer
from pydantic import BaseModel

from livo_core.config import LLMConfig
from livo_core.errors import LivoError
from livo_core.llm import LLMClient, parse_json_object

openai_server = pytest.fixture(OpenAIServer.fixture)
SECRET = "sk-test-DO-NOT-LEAK-4242"


class Pair(BaseModel):
    prompt: str
    aligned_prompt: str


def cfg_for(server, **kw) -> LLMConfig:
    return LLMConfig(base_url=server.base_url, model="test-model", api_key_env="LIVO_TEST_LLM_KEY",
                     max_retries=kw.pop("max_retries", 2), timeout_s=kw.pop("timeout_s", 5), **kw)


GOOD = {"pairs": [{"prompt": "a bloody knight", "aligned_prompt": "a knight"}]}


def test_items_parsed_and_malformed_items_dropped_with_reasons(openai_server, tmp_path):
    openai_server.reply("```json\n" + json.dumps({"pairs": [
        {"prompt": "a bloody knight", "aligned_prompt": "a knight"},
        {"prompt": "a gory pirate"},                     # missing field
        "just a string",                                  # not an object
        {"prompt": "a blood-soaked viking", "aligned_prompt": "a viking"},
    ]}) + "\n```")
    items, rejections = LLMClient(cfg_for(openai_server), tmp_path).chat_json(
        "toxicity_pairs.txt", {"principle": "p", "concept": "blood", "keywords": "blood", "n": 4, "focus": "a forest, shown as a photograph"},
        Pair, "pairs")
    assert [i.prompt for i in items] == ["a bloody knight", "a blood-soaked viking"]
    assert [r["item"] for r in rejections] == [{"prompt": "a gory pirate"}, "just a string"]
    assert "aligned_prompt" in rejections[0]["reason"] and "not a JSON object" in rejections[1]["reason"]
    sent = openai_server.requests[0].body
    fmt = sent["response_format"]   # the reply's schema, in OpenAI's dialect (the loopback server takes every dialect)
    assert sent["model"] == "test-model" and fmt["type"] == "json_schema" and sent["max_tokens"] == 2048
    schema = fmt["json_schema"]["schema"]
    assert schema["required"] == ["pairs"] and set(schema["properties"]["pairs"]["items"]["required"]) == {"prompt", "aligned_prompt"}
    assert "blood" in sent["messages"][-1]["content"] and "{{" not in sent["messages"][-1]["content"]


def test_429_then_500_then_success_is_retried_by_the_client(openai_server):
    openai_server.error(429).error(500).reply(GOOD)
    items, _ = LLMClient(cfg_for(openai_server, max_retries=2)).chat_json(
        "retrieve.txt", {"candidates": "-", "prompt": "x"}, Pair, "pairs")
    assert len(items) == 1 and openai_server.count == 3


def test_exhausted_retries_name_the_endpoint(openai_server):
    openai_server.error(503).error(503)
    with pytest.raises(LivoError, match=r"http://127\.0\.0\.1:\d+/v1 \(model test-model\) answered HTTP 503"):
        LLMClient(cfg_for(openai_server, max_retries=1)).chat_json("retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert openai_server.count == 2


def test_not_json_is_reasked_then_fails_naming_the_endpoint(openai_server, tmp_path):
    openai_server.reply("Sure! Here are some prompts: a knight, a viking").reply("still {not json")
    client = LLMClient(cfg_for(openai_server, reask=1), tmp_path)
    with pytest.raises(LivoError) as e:
        client.chat_json("retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert f"{openai_server.base_url} (model test-model)" in str(e.value) and "\n" not in str(e.value)
    assert openai_server.count == 2
    reask = openai_server.requests[1].body["messages"]
    assert reask[-2] == {"role": "assistant", "content": "Sure! Here are some prompts: a knight, a viking"}
    assert '{"pairs": [...]}' in reask[-1]["content"]
    assert list(tmp_path.iterdir()) == []   # unusable replies are not cached


def test_reask_recovers(openai_server):
    openai_server.reply("not json").reply(GOOD)
    items, _ = LLMClient(cfg_for(openai_server, reask=1)).chat_json("retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert items[0].aligned_prompt == "a knight" and openai_server.count == 2


def test_server_down_fails_fast_naming_the_endpoint():
    server = OpenAIServer().start()
    server.stop()
    client = LLMClient(cfg_for(server, max_retries=1, timeout_s=2))
    t0 = time.perf_counter()
    with pytest.raises(LivoError, match=rf"LLM endpoint {server.base_url} \(model test-model\) unreachable: .*"
                                        r"check llm.base_url or that the server is running"):
        client.chat_json("retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert time.perf_counter() - t0 < 5


def test_a_timeout_names_the_setting_to_raise_not_the_network(openai_server):
    openai_server.reply(GOOD, delay_s=1.5)
    with pytest.raises(LivoError, match=r"did not answer within llm.timeout_s = 0.3 s.*raise llm.timeout_s") as e:
        LLMClient(cfg_for(openai_server, max_retries=0, timeout_s=0.3)).chat_json(
            "retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert "unreachable" not in str(e.value)


def test_cache_hit_makes_no_request_and_never_holds_the_key(openai_server, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVO_TEST_LLM_KEY", SECRET)
    openai_server.reply(GOOD)
    variables = {"candidates": "- a", "prompt": "a knight"}
    first = LLMClient(cfg_for(openai_server), tmp_path).chat_json("retrieve.txt", variables, Pair, "pairs")
    assert openai_server.count == 1
    assert openai_server.requests[0].headers["authorization"] == f"Bearer {SECRET}"

    again = LLMClient(cfg_for(openai_server), tmp_path).chat_json("retrieve.txt", variables, Pair, "pairs")
    assert openai_server.count == 1 and again[0] == first[0]

    # Another request (other variables or temperature) is a cache miss.
    openai_server.reply(GOOD)
    LLMClient(cfg_for(openai_server, temperature=0.0), tmp_path).chat_json("retrieve.txt", variables, Pair, "pairs")
    assert openai_server.count == 2

    files = list(tmp_path.glob("*.json"))
    assert len(files) == 2 and all(len(f.stem) == 64 for f in files)
    for f in files:
        text = f.read_text()
        assert SECRET not in text and "authorization" not in text.lower()
        assert json.loads(text)["request"]["model"] == "test-model"


def test_rejected_key_message_never_quotes_the_key(openai_server, monkeypatch):
    monkeypatch.setenv("LIVO_TEST_LLM_KEY", SECRET)
    openai_server.error(401, f"Incorrect API key provided: {SECRET}")
    with pytest.raises(LivoError) as e:
        LLMClient(cfg_for(openai_server)).chat_json("retrieve.txt", {"candidates": "", "prompt": ""}, Pair, "pairs")
    assert "LIVO_TEST_LLM_KEY" in str(e.value) and SECRET not in str(e.value)
    assert openai_server.count == 1   # 401 is not retried


def test_key_required_for_openai_but_not_for_local_servers(monkeypatch):
    monkeypatch.delenv("LIVO_TEST_LLM_KEY", raising=False)
    with pytest.raises(LivoError, match="api.openai.com.*set the environment variable LIVO_TEST_LLM_KEY"):
        LLMClient(LLMConfig(api_key_env="LIVO_TEST_LLM_KEY"))
    LLMClient(LLMConfig(base_url="http://localhost:8000/v1", api_key_env="LIVO_TEST_LLM_KEY"))


def test_single_object_reply_with_key_none(openai_server):
    class Choice(BaseModel):
        value_id: str | None
        reason: str

    openai_server.reply({"value_id": None, "reason": "a landscape"})
    items, rejections = LLMClient(cfg_for(openai_server)).chat_json(
        "retrieve.txt", {"candidates": "- bloody-inappropriate: ...", "prompt": "a lake"}, Choice, None)
    assert items == [Choice(value_id=None, reason="a landscape")] and rejections == []


def test_unknown_template_is_a_livo_error(openai_server):
    with pytest.raises(LivoError, match="nope.txt not found"):
        LLMClient(cfg_for(openai_server)).chat_json("nope.txt", {}, Pair, "pairs")
    assert openai_server.count == 0


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('Here you go:\n{"a": [1, 2]}\nEnjoy!', {"a": [1, 2]}),
    ("[1, 2]", None),
    ("no json here", None),
])
def test_parse_json_object(text, expected):
    assert parse_json_object(text) == expected
