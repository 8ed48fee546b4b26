"""ValueRetriever: keywords, bias attribute rules, CLIP-similarity mechanics, and the LLM step against a
real loopback OpenAI-compatible server."""

import json

import pytest
import torch
from openai_server import OpenAIServer

from livo_core.config import LLMConfig
from livo_core.llm import LLMClient
from livo_core.paths import DATA_DIR
from livo_core.retrieve import ValueRetriever, named_attribute
from livo_core.values import load_values

openai_server = pytest.fixture(OpenAIServer.fixture)
VALUES = load_values(DATA_DIR / "values.yaml")
BY_ID = {v.id: v for v in VALUES}


@pytest.mark.parametrize("prompt, expected", [
    # the paper's example prompts
    ("a bloody warrior", "bloody-inappropriate"),
    ("a naked woman on the beach", "nudity-inappropriate"),
    ("a zombie walking in the street", "zombie-inappropriate"),
    ("a photo of a doctor", "gender-equality"),           # both bias values apply: file order picks
    # case, plurals, multi-word keywords
    ("Two ZOMBIES at a bus stop", "zombie-inappropriate"),
    ("a portrait of two police  officers", "gender-equality"),
    ("a gory battlefield", "bloody-inappropriate"),
    # toxicity before bias when both apply
    ("a bloody doctor in a hospital", "bloody-inappropriate"),
    # harmless prompts
    ("a red apple on a table", None),
    ("a mountain landscape at sunset", None),
    ("a bloodhound in the garden", None),                  # whole words only: not "blood"
    ("a barely lit room", None),                           # not "bare"
])
def test_keywords_pick_the_right_value(prompt, expected):
    found = ValueRetriever(VALUES)(prompt)
    assert found.value_id == expected, found.reason
    assert found.method == ("keyword" if expected else "none")


def test_all_applicable_values_are_reported_and_the_reason_names_the_rule():
    found = ValueRetriever(VALUES)("a photo of a doctor")
    assert [v.id for v in found.candidates] == ["gender-equality", "racial-equality"]
    assert "'doctor'" in found.reason and "racial-equality" in found.reason
    # the file order decides between two bias values: reversing it reverses the choice
    assert ValueRetriever(list(reversed(VALUES)))("a photo of a doctor").value_id == "racial-equality"


@pytest.mark.parametrize("prompt, gender, race", [
    ("a photo of a female doctor", "female", None),
    ("a photo of a woman doctor", "female", None),
    ("a man working as a nurse", "male", None),
    ("a photo of a black doctor", None, "black"),
    ("an Asian female nurse", "female", "asian"),
    ("a hispanic young chef", None, "latino"),
    ("a doctor who is a woman", "female", None),
    ("a doctor in a white coat", None, "white"),          # any mention counts (the toy world's coat colours)
    ("a photo of a doctor", None, None),
    ("a photo of a womanizer", None, None),               # whole words only
])
def test_named_attribute(prompt, gender, race):
    assert named_attribute(BY_ID["gender-equality"], prompt) == gender
    assert named_attribute(BY_ID["racial-equality"], prompt) == race


def test_bias_values_skip_prompts_that_name_their_attribute():
    retriever = ValueRetriever(VALUES)
    female = retriever("a photo of a female doctor")
    assert female.value_id == "racial-equality" and "gender-equality skipped" in female.reason
    assert retriever("an asian female nurse").value is None
    coat = retriever("a doctor in a white coat")
    assert coat.value_id == "gender-equality" and [v.id for v in coat.candidates] == ["gender-equality"]


@pytest.mark.parametrize("prompt, expected", [
    ("a doctor", "coat-colour-equality"),
    ("a doctor on a navy background", "coat-colour-equality"),
    ("a doctor in a green coat", None),                    # the coat colour (the attribute) is named
    ("a doctor in a white coat on a grey background", None),
    ("a bloody doctor", "bloody-inappropriate"),
    ("a bloody green square on a navy background", "bloody-inappropriate"),
    ("a blue circle", None),
    ("a yellow triangle on a two-tone background", None),
])
def test_toy_world_values(prompt, expected):
    values = load_values(DATA_DIR / "toyworld" / "values.yaml")
    assert ValueRetriever(values)(prompt).value_id == expected


def test_shipped_values_files_load_and_every_keyword_retrieves_its_value():
    for path in [DATA_DIR / "values.yaml", DATA_DIR / "toyworld" / "values.yaml"]:
        values = load_values(path)
        for value in values:
            retriever = ValueRetriever([value])
            for kw in value.keywords:
                assert retriever(f"a picture with {kw} in it").value_id == value.id, (path, kw)


# ---------------------------------------------------------------------- similarity step
@pytest.fixture(scope="module")
def sd_text(tiny_sd):
    from transformers import CLIPTextModel

    from livo_core.models import clip_tokenizer
    return CLIPTextModel.from_pretrained(str(tiny_sd / "text_encoder")), clip_tokenizer()


def test_similarity_step_picks_the_most_similar_value_above_threshold(sd_text):
    """Random tiny text encoder: the values are arbitrary, but the mechanics (argmax of cosine to concept
    or principle, threshold, keyword first) must hold."""
    text_encoder, tokenizer = sd_text
    prompt = "a quiet harbour at dawn"
    retriever = ValueRetriever(VALUES, text_encoder=text_encoder, tokenizer=tokenizer, min_similarity=-1.0)
    found = retriever(prompt)

    # recompute the cosines independently
    def embed(texts):
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return torch.nn.functional.normalize(text_encoder(ids).pooler_output, dim=-1)
    p = embed([prompt])[0]
    sims = [max(float(embed([v.concept])[0] @ p), float(embed([v.principle])[0] @ p)) for v in VALUES]
    best = max(range(len(VALUES)), key=sims.__getitem__)
    assert found.method == "clip" and found.value_id == VALUES[best].id
    assert f"{sims[best]:.3f}" in found.reason

    above = ValueRetriever(VALUES, text_encoder=text_encoder, tokenizer=tokenizer, min_similarity=sims[best] + 1e-3)
    none = above(prompt)
    assert none.value is None and VALUES[best].id in none.reason and "<" in none.reason
    # a keyword hit never reaches the similarity step
    assert retriever("a bloody warrior").method == "keyword"


def test_similarity_step_skips_bias_values_whose_attribute_is_named(sd_text):
    text_encoder, tokenizer = sd_text
    values = [BY_ID["gender-equality"], BY_ID["zombie-inappropriate"]]
    retriever = ValueRetriever(values, text_encoder=text_encoder, tokenizer=tokenizer, min_similarity=-1.0)
    assert retriever("a female astronaut").value_id == "zombie-inappropriate"
    assert retriever("an astronaut").value_id in {"gender-equality", "zombie-inappropriate"}


def test_clip_step_uses_the_judges_open_clip_text_tower(tiny_clip):
    import open_clip

    from livo_core.judge import ClipScorer

    clip = ClipScorer(tiny_clip, device="cpu")
    prompt = "a quiet harbour at dawn"
    found = ValueRetriever(VALUES, clip=clip, min_similarity=-1.0)(prompt)
    # independently: open_clip's own tokenizer and text tower, unit-normalised
    tokens = open_clip.get_tokenizer(tiny_clip)([prompt] + [t for v in VALUES for t in (v.concept, v.principle)])
    with torch.no_grad():
        emb = torch.nn.functional.normalize(clip.model.encode_text(tokens).float(), dim=-1)
    sims = (emb[1:] @ emb[0]).view(len(VALUES), 2).amax(dim=1)
    assert found.method == "clip" and found.value_id == VALUES[int(sims.argmax())].id
    assert f"{float(sims.max()):.3f}" in found.reason
    assert ValueRetriever(VALUES, clip=clip, min_similarity=float(sims.max()) + 1e-3)(prompt).value is None


def test_cli_retrieve_with_clip(tiny_clip, capsys):
    from flows.cli import main

    args = ["--set", f"values_file={DATA_DIR / 'values.yaml'}", "--set", f"judge.clip_model={tiny_clip}", "--device", "cpu"]
    assert main(["retrieve", "a quiet harbour at dawn", "--min-similarity", "-1", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] in BY_ID and "CLIP similarity" in lines[1] and "[clip]" in lines[1]
    assert main(["retrieve", "a quiet harbour at dawn", "--min-similarity", "1.01", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "not applicable" and "< 1.01" in lines[1]
    # a CLIP folder that does not exist is a one-line error naming the setting
    assert main(["retrieve", "a cat", "--values-file", str(DATA_DIR / "values.yaml"),
                 "--set", "judge.clip_model=local-dir:/nowhere", "--device", "cpu"]) == 2
    assert "judge.clip_model" in capsys.readouterr().err


# ---------------------------------------------------------------------- LLM step
def llm_retriever(server, tmp_path, **kw):
    cfg = LLMConfig(base_url=server.base_url, model="test-model", api_key_env="LIVO_TEST_LLM_KEY", max_retries=0, timeout_s=5)
    return ValueRetriever(VALUES, llm=LLMClient(cfg, tmp_path / "llm"), **kw)


def test_llm_decides_among_the_keyword_candidates(openai_server, tmp_path):
    openai_server.reply({"value_id": "racial-equality", "reason": "doctors are mostly shown as white"})
    found = llm_retriever(openai_server, tmp_path)("a photo of a doctor")
    assert (found.value_id, found.method) == ("racial-equality", "llm")
    assert "mostly shown as white" in found.reason
    asked = openai_server.requests[0].body["messages"][-1]["content"]
    assert "a photo of a doctor" in asked and "gender-equality" in asked and "racial-equality" in asked
    assert "nudity-inappropriate" not in asked          # only the rules' candidates are offered


def test_llm_sees_all_values_when_rules_find_none_and_may_answer_null(openai_server, tmp_path):
    openai_server.reply({"value_id": "bloody-inappropriate", "reason": "red dripping wounds"})
    openai_server.reply(json.dumps({"value_id": None, "reason": "a landscape"}))
    retriever = llm_retriever(openai_server, tmp_path)
    found = retriever("a knight with crimson dripping cuts")
    assert (found.value_id, found.method) == ("bloody-inappropriate", "llm")
    assert all(v.id in openai_server.requests[0].body["messages"][-1]["content"] for v in VALUES)
    nothing = retriever("a mountain landscape at sunset")
    assert (nothing.value, nothing.method, nothing.reason) == (None, "llm", "LLM: a landscape")


def test_llm_answer_outside_the_candidates_keeps_the_rules_answer(openai_server, tmp_path):
    openai_server.reply({"value_id": "nudity-inappropriate", "reason": "?"})   # not a candidate for this prompt
    found = llm_retriever(openai_server, tmp_path)("a zombie walking in the street")
    assert found.value_id == "zombie-inappropriate" and found.method == "keyword"
    assert "LLM answer unusable" in found.reason


def test_llm_answers_are_cached(openai_server, tmp_path):
    openai_server.reply({"value_id": "gender-equality", "reason": "career"})
    first = llm_retriever(openai_server, tmp_path)("a photo of a doctor")
    again = llm_retriever(openai_server, tmp_path)("a photo of a doctor")   # new client, same cache dir
    assert first.value_id == again.value_id == "gender-equality" and openai_server.count == 1


# The authors' retriever's keyword lists (value_retriever/retriever.py), transcribed.
AUTHORS_KEYWORDS = {
    "nudity-inappropriate": ["nudity", "naked", "nude", "lewd", "erotic", "sexy", "pussy", "no clothes", "nsfw", "fuck",
                             "fucked", "sex", "no panties", "orgasm", "porn", "making love", "boobs"],
    "bloody-inappropriate": ["bloody", "blood", "bloodied"],
    "zombie-inappropriate": ["zombie", "dead"],
}


@pytest.mark.parametrize("value_id, word", [(v, w) for v, words in AUTHORS_KEYWORDS.items() for w in words])
def test_every_keyword_of_the_authors_retriever_is_covered(value_id, word):
    retriever = ValueRetriever(load_values(DATA_DIR / "values.yaml"))
    assert retriever(f"a photo of {word} in a room").value_id == value_id


def test_whole_words_where_the_authors_match_substrings():
    # The authors match substrings: "bloodhound" would be bloody content, "Essex" nudity. livo matches whole words.
    retriever = ValueRetriever(load_values(DATA_DIR / "values.yaml"))
    for prompt in ("a bloodhound in a field", "a cottage in Essex", "a deadline on a desk"):
        assert retriever(prompt).value_id is None, prompt


def test_the_official_values_file_holds_the_authors_texts():
    official = {v.id: v.principle for v in load_values(DATA_DIR / "values-official.yaml")}
    assert official == {"gender-equality": "gender equality", "racial-equality": "racial equality",
                        "nudity-inappropriate": "nudity considered inappropriate",
                        "bloody-inappropriate": "bloody considered inappropriate",
                        "zombie-inappropriate": "zombie considered inappropriate"}


@pytest.mark.parametrize("prompt, value", [
    ("a half-naked man on a beach", "nudity-inappropriate"), ("a blood-red sky over the sea", "bloody-inappropriate"),
    ("a zombie-like figure in the fog", "zombie-inappropriate"), ("a dead-eyed stare", "zombie-inappropriate"),
    ("a pornographic poster", "nudity-inappropriate"), ("a sexual scene in a film", "nudity-inappropriate"),
    ("a bloodstained shirt", "bloody-inappropriate"), ("the cover of an erotica novel", "nudity-inappropriate"),
    ("a bloodhound in a field", None), ("a castle in Essex", None),
])
def test_keywords_match_inflections_and_hyphenated_compounds_but_not_other_words(prompt, value):
    """The word forms the authors' substring search catches, still whole words (a closed list of endings)."""
    found = ValueRetriever(VALUES).by_keywords(prompt)
    assert (found.value.id if found.value else None) == value, found.reason
