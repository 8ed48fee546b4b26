"""Prompt pairs: template expansion of the shipped seeds, LLM pairs from a real loopback server, both sources."""

import json
import math
import re

import pytest
from openai_server import OpenAIServer

from livo_core.config import LLMConfig, RunConfig
from livo_core.errors import LivoError
from livo_core.llm import LLMClient
from livo_core.paths import DATA_DIR, TOYWORLD_DIR
from livo_core.prompts import (PromptPair, fix_articles, generate_pairs, llm_pairs, load_seeds,
                               propose_principles, template_pairs)
from livo_core.values import load_values

openai_server = pytest.fixture(OpenAIServer.fixture)
PAPER_VALUES = load_values(DATA_DIR / "values.yaml")
BY_ID = {v.id: v for v in PAPER_VALUES}


def _mentions(text, words):
    return [w for w in words if re.search(rf"\b{re.escape(w)}\b", text.lower())]


# ---------------------------------------------------------------------- template source
def test_shipped_seeds_make_well_formed_pairs_for_the_five_paper_values():
    seeds = load_seeds(DATA_DIR / "seeds.yaml")
    for value in PAPER_VALUES:
        pairs = template_pairs(value, seeds, 20, seed=0)
        assert len(pairs) == 20 and len({p.prompt for p in pairs}) == 20, value.id
        for p in pairs:
            assert (p.value_id, p.category, p.source) == (value.id, value.kind, "template")
            assert p.violating_prompt == p.prompt != p.aligned_prompt
            assert "{" not in p.prompt + p.aligned_prompt and " a a" not in p.aligned_prompt
            if value.kind == "toxicity":
                assert p.aligned_attribute is None
                assert _mentions(p.prompt, value.keywords), p.prompt          # names the concept ...
                assert not _mentions(p.aligned_prompt, value.keywords), p    # ... the aligned one does not
            else:
                assert p.aligned_attribute in value.attributes
                assert not _mentions(p.prompt, value.attributes), p.prompt   # neutral
                assert _mentions(p.aligned_prompt, [p.aligned_attribute]) == [p.aligned_attribute]
        if value.kind == "bias":   # no majority attribute set: cycles over all of them
            assert [p.aligned_attribute for p in pairs[:len(value.attributes)]] == value.attributes


def test_template_expansion_is_deterministic_per_seed():
    seeds = load_seeds(DATA_DIR / "seeds.yaml")
    value = BY_ID["bloody-inappropriate"]
    a, b = template_pairs(value, seeds, 8, seed=3), template_pairs(value, seeds, 8, seed=3)
    assert a == b and a != template_pairs(value, seeds, 8, seed=4)
    assert template_pairs(value, seeds, 4, seed=3) == a[:4]   # a larger n only adds pairs
    # Pinned: random.Random(str) is the same in every process and Python version >= 3.2.
    assert template_pairs(BY_ID["gender-equality"], seeds, 1, seed=0)[0].aligned_prompt == "a photo of a male architect"


def test_templates_take_turns_so_a_small_template_is_not_drowned():
    # toy world: "a bloody doctor" has 1 combination, "a bloody {subject} on a {background} background" 42
    from livo_core.paths import TOYWORLD_DIR
    from livo_core.values import load_values

    seeds = load_seeds(TOYWORLD_DIR / "seeds.yaml")
    value = next(v for v in load_values(TOYWORLD_DIR / "values.yaml") if v.id == "bloody-inappropriate")
    templates = seeds["templates"][value.id]
    pairs = template_pairs(value, seeds, 2 * len(templates), seed=0)
    # two turns: every template gives 2 prompts, or all it has
    combos = [math.prod(len(seeds["slots"][n]) for n in re.findall(r"{(\w+)}", t["user"])) for t in templates]
    doctor = [p.prompt for p in pairs if "doctor" in p.prompt]
    assert "a bloody doctor" in doctor
    assert len(doctor) == sum(min(2, c) for t, c in zip(templates, combos) if "doctor" in t["user"])


def test_small_seeds_expand_every_combination_once_and_skip_the_majority_attribute():
    seeds = {"slots": {"career": ["doctor", "engineer"], "place": ["at work", "outdoors"]},
             "templates": {"gender-equality": [
                 {"user": "a {career} {place}", "aligned": "a {attribute} {career} {place}"},
                 {"user": "a {career} at work", "aligned": "a {attribute} {career} at work"},  # repeats user prompts
             ]}}
    value = BY_ID["gender-equality"].model_copy(update={"attributes": ["male", "female", "nonbinary"],
                                                        "majority_attribute": "male"})
    pairs = template_pairs(value, seeds, 100, seed=0)
    assert sorted(p.prompt for p in pairs) == ["a doctor at work", "a doctor outdoors",
                                               "an engineer at work", "an engineer outdoors"]
    assert [p.aligned_attribute for p in pairs] == ["female", "nonbinary", "female", "nonbinary"]
    assert all(p.aligned_prompt.startswith(f"a {p.aligned_attribute} ") for p in pairs)


def test_seeds_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(LivoError, match="seeds file .*nope.yaml not found"):
        load_seeds(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("templates: {x: [{user: 'a {thing}', aligned: 'a'}]}")
    with pytest.raises(LivoError, match=r"bad.yaml: template 'a \{thing\}' of 'x' uses \{thing\} but there is no slot"):
        load_seeds(bad)
    bad.write_text("slots: [1, 2]")
    with pytest.raises(LivoError, match="bad.yaml is invalid"):
        load_seeds(bad)
    bad.write_text("templates: {x: [{user: 'a {", )
    with pytest.raises(LivoError, match="bad.yaml is not valid YAML"):
        load_seeds(bad)
    seeds = load_seeds(DATA_DIR / "seeds.yaml")
    zebra = BY_ID["zombie-inappropriate"].model_copy(update={"id": "zebra-inappropriate"})
    with pytest.raises(LivoError, match=r"seeds file .*seeds.yaml has no templates for value 'zebra-inappropriate'"):
        template_pairs(zebra, seeds, 4, 0)


def test_bias_template_must_name_the_attribute():
    seeds = {"slots": {"career": ["doctor"]}, "templates": {"gender-equality": [{"user": "a {career}", "aligned": "a tall {career}"}]}}
    with pytest.raises(LivoError, match=r"must name \{attribute\}"):
        template_pairs(BY_ID["gender-equality"], seeds, 2, 0)


@pytest.mark.skipif(not (TOYWORLD_DIR / "seeds.yaml").is_file() or not (TOYWORLD_DIR / "values.yaml").is_file(),
                    reason="toy world seeds/values not written yet")
def test_toyworld_seeds_expand():
    seeds = load_seeds(TOYWORLD_DIR / "seeds.yaml")
    for value in load_values(TOYWORLD_DIR / "values.yaml"):
        pairs = template_pairs(value, seeds, 4, seed=0)
        assert pairs and all(p.prompt != p.aligned_prompt for p in pairs)


def test_fix_articles():
    assert fix_articles("A owl and a engineer, a uniform, a doctor, vitamin A and B") == \
        "An owl and an engineer, a uniform, a doctor, vitamin A and B"
    assert fix_articles("an black doctor, an hour, an MRI, a CEO, a indian nurse") == \
        "a black doctor, an hour, an MRI, a CEO, an indian nurse"


def test_prompt_pair_jsonl_roundtrip():
    p = PromptPair("gender-equality", "bias", "a doctor", "a female doctor", "a doctor", "female", "llm:m")
    assert PromptPair.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(LivoError, match="unknown field"):
        PromptPair.from_dict({**p.to_dict(), "extra": 1})


# ---------------------------------------------------------------------- LLM source
def _client(server, tmp_path=None, **kw):
    return LLMClient(LLMConfig(base_url=server.base_url, model="test-model", api_key_env="LIVO_TEST_LLM_KEY",
                               max_retries=0, timeout_s=5, **kw), tmp_path)


def test_llm_toxicity_pairs_are_validated_and_deduplicated(openai_server):
    openai_server.reply({"pairs": [
        {"prompt": "a bloody  warrior in a forest", "aligned_prompt": "a warrior in a forest"},
        {"prompt": "a bloody warrior in a forest", "aligned_prompt": "a warrior in the woods"},   # duplicate
        {"prompt": "a gory butcher shop", "aligned_prompt": "a gory butcher shop"},               # unchanged
        {"prompt": "a blood-soaked knight", "aligned_prompt": "a knight with no blood"},           # names it
        {"prompt": "", "aligned_prompt": "x"},                                                    # empty
        {"prompt": "a blood-covered boxer in a ring", "aligned_prompt": "a boxer in a ring"},
    ]})
    pairs, rejections = llm_pairs(BY_ID["bloody-inappropriate"], 2, _client(openai_server, pairs_per_request=8))
    assert [(p.prompt, p.aligned_prompt) for p in pairs] == [
        ("a bloody warrior in a forest", "a warrior in a forest"), ("a blood-covered boxer in a ring", "a boxer in a ring")]
    assert all(p.source == "llm:test-model" and p.violating_prompt == p.prompt and p.category == "toxicity" for p in pairs)
    reasons = [r["reason"] for r in rejections]
    assert len(reasons) == 4 and all(r["value_id"] == "bloody-inappropriate" for r in rejections)
    assert "invalid field 'prompt'" in reasons[0]
    assert set(reasons[1:]) == {"near duplicate of r0q0i0 ('a bloody warrior in a forest')", "aligned prompt equals the prompt",
                                "aligned prompt still names the concept ('blood')"}
    assert openai_server.count == 1


def test_llm_asks_for_what_is_missing_in_rounds_each_request_its_own_facet(openai_server):
    openai_server.reply({"pairs": [{"prompt": "a zombie nurse", "aligned_prompt": "a nurse"}]})           # round 1: 2 requests
    openai_server.reply({"pairs": [{"prompt": "A zombie nurse!", "aligned_prompt": "a nurse"},            # near duplicate
                                   {"prompt": "a zombie pilot", "aligned_prompt": "a pilot"}]})
    openai_server.reply({"pairs": [{"prompt": "a zombie pilot", "aligned_prompt": "a pilot"}]})          # round 2: 2 requests,
    openai_server.reply({"pairs": [{"prompt": "pilot, zombie", "aligned_prompt": "a pilot"}]})           #   nothing new: stop
    pairs, rejections = llm_pairs(BY_ID["zombie-inappropriate"], 3, _client(openai_server, pairs_per_request=2, max_concurrency=1))
    assert [p.prompt for p in pairs] == ["a zombie nurse", "a zombie pilot"]
    assert openai_server.count == 4
    assert [r["reason"].split(" (")[0] for r in rejections] == ["near duplicate of r0q0i0", "near duplicate of r0q1i1",
                                                                 "near duplicate of r0q1i1"]
    asked = [r.body["messages"][-1]["content"] for r in openai_server.requests]
    facets = [a.split("are set in ")[1].split(", each")[0] for a in asked]
    assert len(set(facets)) == 4                        # every request its own slice of the space
    assert "Write 2 pairs" in asked[0] and "Write 1 pairs" in asked[1] and "Write 2 pairs" in asked[2]


def test_llm_bias_prompts_get_an_attribute_inserted(openai_server):
    value = BY_ID["racial-equality"]
    openai_server.reply({"prompts": [
        {"prompt": "a photo of a doctor in a hospital", "subject": "doctor"},
        {"prompt": "an engineer at a desk", "subject": "engineer"},
        {"prompt": "a photo of an Asian chef", "subject": "chef"},        # not neutral
        {"prompt": "a pilot in a cockpit", "subject": "captain"},         # subject not in prompt
        {"prompt": "a judge in a courtroom"},                              # no subject
    ]})
    pairs, rejections = llm_pairs(value, 2, _client(openai_server))
    assert [(p.aligned_prompt, p.aligned_attribute) for p in pairs] == [
        ("a photo of a white doctor in a hospital", "white"), ("a black engineer at a desk", "black")]
    assert all(p.prompt == p.violating_prompt and p.category == "bias" for p in pairs)
    # n reached after two good items: the rest are not looked at
    assert rejections == [{"value_id": "racial-equality", "reason": "invalid field 'subject': Field required",
                           "item": {"prompt": "a judge in a courtroom"}}]
    assert "white, black, indian, asian, latino" in openai_server.requests[0].body["messages"][-1]["content"]


def test_llm_bias_rejects_non_neutral_prompts(openai_server):
    openai_server.reply({"prompts": [{"prompt": "a photo of an Asian chef", "subject": "chef"},
                                     {"prompt": "a pilot in a cockpit", "subject": "captain"},
                                     {"prompt": "an indian judge", "subject": "judge"}]})
    pairs, rejections = llm_pairs(BY_ID["racial-equality"], 1, _client(openai_server))
    assert pairs == [] and openai_server.count == 1
    assert [r["reason"] for r in rejections] == ["prompt is not neutral: it names the attribute 'asian'",
                                                 "subject 'captain' does not occur in the prompt",
                                                 "prompt is not neutral: it names the attribute 'indian'"]


# ---------------------------------------------------------------------- generate_pairs
def test_generate_pairs_from_templates():
    cfg = RunConfig(values_file=DATA_DIR / "values.yaml", seeds_file=DATA_DIR / "seeds.yaml", prompts_per_value=3, seed=7)
    pairs, rejections = generate_pairs(cfg, PAPER_VALUES, cache_dir=None)
    assert len(pairs) == 15 and rejections == []
    assert [p.value_id for p in pairs[::3]] == [v.id for v in PAPER_VALUES]


def test_generate_pairs_from_llm_uses_the_cache_on_rerun(openai_server, tmp_path):
    def answer(body):
        text = body["messages"][-1]["content"]
        if '{"prompts": [' in text:   # bias_prompts.txt
            return {"prompts": [{"prompt": "a photo of a nurse", "subject": "nurse"},
                                {"prompt": "a teacher in a classroom", "subject": "teacher"}]}
        return {"pairs": [{"prompt": "a nude man on a beach", "aligned_prompt": "a man in a shirt on a beach"},
                          {"prompt": "a naked woman in a bedroom", "aligned_prompt": "a woman in pajamas in a bedroom"}]}

    openai_server.default = answer
    cfg = RunConfig(prompt_source="llm", prompts_per_value=2,
                    llm=LLMConfig(base_url=openai_server.base_url, model="test-model", api_key_env="LIVO_TEST_LLM_KEY"))
    values = [BY_ID["gender-equality"], BY_ID["nudity-inappropriate"]]
    pairs, rejections = generate_pairs(cfg, values, tmp_path / "llm")
    assert openai_server.count == 2 and rejections == []
    assert [p.aligned_prompt for p in pairs] == ["a photo of a male nurse", "a female teacher in a classroom",
                                                 "a man in a shirt on a beach", "a woman in pajamas in a bedroom"]
    assert {p.source for p in pairs} == {"llm:test-model"}
    again, _ = generate_pairs(cfg, values, tmp_path / "llm")
    assert again == pairs and openai_server.count == 2   # every answer came from the cache


def test_generate_pairs_with_nothing_usable_names_the_value(openai_server):
    openai_server.default = lambda body: {"pairs": [{"prompt": "a zombie", "aligned_prompt": "a zombie"}]}
    cfg = RunConfig(prompt_source="llm", prompts_per_value=2,
                    llm=LLMConfig(base_url=openai_server.base_url, model="test-model", api_key_env="LIVO_TEST_LLM_KEY"))
    with pytest.raises(LivoError, match="no prompt pairs were produced for value 'zombie-inappropriate': "
                                        "all 1 items were rejected .*aligned prompt equals the prompt"):
        generate_pairs(cfg, [BY_ID["zombie-inappropriate"]], None)


# ---------------------------------------------------------------------- principles from a policy
def test_propose_principles(openai_server):
    openai_server.reply({"principles": [
        {"id": "weapons-inappropriate", "principle": "Weapons are considered inappropriate", "kind": "toxicity",
         "concept": "weapons", "attributes": [], "keywords": ["gun", "rifle"]},
        {"id": "age-equality", "principle": "Age equality: people of every age should be equally represented",
         "kind": "bias", "concept": "age bias", "attributes": ["young", "middle-aged", "old"], "keywords": ["person"]},
        {"id": "bloody-inappropriate", "principle": "Blood is bad", "kind": "toxicity", "concept": "blood"},  # exists
        {"id": "Bad Id", "principle": "Smoking is considered inappropriate", "kind": "toxicity", "concept": "smoking"},
        {"id": "x-equality", "principle": "x equality", "kind": "bias", "concept": "x", "attributes": ["one"]},
    ]})
    found = propose_principles(_client(openai_server), "No weapons. Show people of all ages.", PAPER_VALUES)
    assert [(v.id, v.kind, v.classifier.name, v.source) for v in found] == [
        ("weapons-inappropriate", "toxicity", "clip_concept", "llm:test-model"),
        ("age-equality", "bias", "clip_attribute", "llm:test-model")]
    sent = openai_server.requests[0].body["messages"][-1]["content"]
    assert "No weapons. Show people of all ages." in sent and "- bloody-inappropriate:" in sent
