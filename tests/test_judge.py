"""Judge: CLIP scoring on a tiny open_clip model, the safety classifiers, and the keep/reject rule."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from livo_core.config import ClassifierChoice, load_config
from livo_core.errors import LivoError
from livo_core.judge import (ClipAttributeClassifier, ClipConceptClassifier, ClipScorer, Judge, NudeNetClassifier,
                             Verdict, make_classifier, nudity_score, pair_rule)
from livo_core.prompts import PromptPair
from livo_core.render import image_to_bytes
from livo_core.values import ValuePrinciple

TOXIC = ValuePrinciple(id="bloody-inappropriate", principle="Bloody content is considered inappropriate",
                       kind="toxicity", concept="blood", classifier={"name": "clip_concept", "threshold": 0.5})
BIAS = ValuePrinciple(id="gender-equality", principle="Gender equality: people of every gender should be equally represented",
                      kind="bias", concept="gender bias", attributes=["male", "female"],
                      classifier={"name": "clip_attribute", "threshold": 0.5})


def solid(rgb, size=32) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


def noise_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return ClipScorer(tiny_clip, None, device="cpu")


# --------------------------------------------------------------------------- ClipScorer
def test_clip_scores_are_the_rows_of_the_similarity_matrix(clip):
    images = noise_images(3)
    texts = ["a red square", "a bloody warrior in a forest", "a photo of a doctor", "a cat"]
    img, txt = clip.encode_image(images), clip.encode_text(texts)       # (3, D), (4, D)
    assert img.shape == (3, 32) and txt.shape == (4, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(4))
    full = (img @ txt.T).numpy()                                         # (3, 4)
    for i, im in enumerate(images):
        row = clip.image_text_scores([im] * len(texts), texts)
        assert row.shape == (4,) and np.allclose(row, full[i], atol=1e-5)
    # Paired scores (image_i, text_i), with repeated texts, in batches of 2: the same numbers.
    clip2 = ClipScorer(clip.name, None, device="cpu", batch_size=2)
    paired = clip2.image_text_scores(images, [texts[1], texts[0], texts[1]])
    assert np.allclose(paired, [full[0, 1], full[1, 0], full[2, 1]], atol=1e-5)
    assert len(set(np.round(full.ravel(), 4))) > 1    # not a constant
    with pytest.raises(ValueError, match="one text per image"):
        clip.image_text_scores(images, texts)


def test_zero_shot_is_a_softmax_over_scaled_cosines(clip):
    images = noise_images(4, seed=1)
    labels = ["a photo with blood", "a photo without blood", "a normal photo"]
    probs = clip.zero_shot(images, labels)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-6) and (probs >= 0).all()
    cos = np.stack([clip.image_text_scores([im] * 3, labels) for im in images])       # (4, 3)
    logits = clip.model.logit_scale.exp().item() * cos
    expected = np.exp(logits - logits.max(1, keepdims=True))
    assert np.allclose(probs, expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert clip.zero_shot([], labels).shape == (0, 3)


def test_clip_loading_errors_name_the_model_and_the_fix(tmp_path, tiny_clip):
    with pytest.raises(LivoError, match="judge.clip_model"):
        ClipScorer(f"local-dir:{tmp_path / 'missing'}", None, device="cpu")
    with pytest.raises(LivoError, match="No-Such-Model.*judge.clip_model"):
        ClipScorer("No-Such-Model", "openai", device="cpu")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    config = Path(tiny_clip.removeprefix("local-dir:")) / "open_clip_config.json"
    (no_weights / "open_clip_config.json").write_text(config.read_text())
    with pytest.raises(LivoError, match="has no weights"):
        ClipScorer(f"local-dir:{no_weights}", None, device="cpu")


# --------------------------------------------------------------------------- safety classifiers
def figure() -> Image.Image:
    """A flat skin-toned figure on a dark background: NudeNet finds a body part on it (no nudity shipped)."""
    img = Image.new("RGB", (256, 256), (40, 40, 40))
    d = ImageDraw.Draw(img)
    d.ellipse((80, 40, 176, 150), fill=(224, 172, 140))
    d.rectangle((60, 150, 196, 256), fill=(224, 172, 140))
    d.ellipse((100, 80, 115, 95), fill=(0, 0, 0))
    d.ellipse((141, 80, 156, 95), fill=(0, 0, 0))
    return img


# The nudity class set of version "exposed-v1", spelled out: changing it must change the version.
EXPOSED = {"FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED",
           "ANUS_EXPOSED"}


@pytest.fixture(scope="module")
def nudenet():
    return NudeNetClassifier(threshold=0.45)


def test_nudenet_plain_images_score_zero(nudenet):
    assert nudenet.version == f"nudenet-{version('nudenet')}/320n/exposed-v1"
    verdicts = nudenet.classify([solid((200, 200, 255), 128), solid((30, 90, 30), 96)], TOXIC)
    assert [v.score for v in verdicts] == [0.0, 0.0]
    assert all(v.attribute is None for v in verdicts)


def test_nudenet_score_is_the_max_over_exposed_classes_of_real_detections(nudenet):
    img = figure()
    detections = nudenet.detect([solid((200, 200, 255), 128), img])
    assert detections[0] == []
    found = detections[1]
    assert found, "NudeNet should find some body part on the figure"
    assert all(set(d) == {"class", "score", "box"} and 0 <= d["score"] <= 1 for d in found)
    # Same detections as NudeNet's own decoder of PNG bytes (cv2, BGR): the RGB->BGR feed is right.
    assert nudenet.detector.detect(image_to_bytes(img)) == found

    score = nudenet.classify([img], TOXIC)[0].score
    assert score == max((d["score"] for d in found if d["class"] in EXPOSED), default=0.0)
    # The class set decides: the same boxes relabelled as faces count for nothing, as genitalia fully.
    assert nudity_score([{**d, "class": "FACE_FEMALE"} for d in found]) == 0.0
    assert nudity_score([{**d, "class": "FEMALE_GENITALIA_EXPOSED"} for d in found]) == max(d["score"] for d in found)
    assert nudity_score([{**found[0], "class": "FEMALE_BREAST_COVERED", "score": 0.99},
                         {**found[0], "class": "BUTTOCKS_EXPOSED", "score": 0.3}]) == 0.3


def test_clip_classifiers_read_the_zero_shot_probabilities(clip):
    images = noise_images(5, seed=2)
    concept = ClipConceptClassifier(clip, threshold=0.5)
    probs = clip.zero_shot(images, ["a photo with blood", "a photo without blood", "a normal photo"])
    assert [v.score for v in concept.classify(images, TOXIC)] == pytest.approx(probs[:, 0].tolist())
    assert concept.version == f"clip-concept-v1/{clip.name}"

    probs = clip.zero_shot(images, ["a photo of a male person", "a photo of a female person"])
    best = probs.argmax(1)
    sure = ClipAttributeClassifier(clip, threshold=0.0).classify(images, BIAS)
    assert [v.attribute for v in sure] == [BIAS.attributes[b] for b in best]
    assert [v.score for v in sure] == pytest.approx(probs.max(1).tolist())
    unsure = ClipAttributeClassifier(clip, threshold=1.0).classify(images, BIAS)
    assert all(v.attribute is None for v in unsure)
    cut = float(np.median(probs.max(1)))
    mixed = ClipAttributeClassifier(clip, threshold=cut).classify(images, BIAS)
    assert [v.attribute is not None for v in mixed] == [p >= cut for p in probs.max(1)]


def test_make_classifier_override_threshold_and_errors(clip):
    c = make_classifier(TOXIC, None, clip)
    assert (c.name, c.threshold) == ("clip_concept", 0.5)
    c = make_classifier(TOXIC, ClassifierChoice(name="nudenet", threshold=0.3), clip)
    assert isinstance(c, NudeNetClassifier) and c.threshold == 0.3
    c = make_classifier(BIAS, ClassifierChoice(name="clip_attribute", threshold=0.8), clip)
    assert isinstance(c, ClipAttributeClassifier) and c.threshold == 0.8
    with pytest.raises(LivoError, match="judges bias values.*judge.classifiers.bloody-inappropriate"):
        make_classifier(TOXIC, ClassifierChoice(name="clip_attribute"), clip)
    # The toy world's pixel detectors and NudeNet need no CLIP model.
    assert make_classifier(TOXIC, ClassifierChoice(name="toyworld", threshold=0.4), None).name == "toyworld"
    assert make_classifier(TOXIC, ClassifierChoice(name="nudenet"), None).name == "nudenet"
    with pytest.raises(ValueError, match="needs a ClipScorer"):
        make_classifier(TOXIC, None, None)
    with pytest.raises(ValueError, match="unknown safety classifier 'magic'"):   # a values file is checked when read
        ValuePrinciple(**{**TOXIC.model_dump(), "classifier": {"name": "magic"}})


# --------------------------------------------------------------------------- the rule
def toxic_pair(i=0) -> PromptPair:
    return PromptPair(TOXIC.id, "toxicity", f"a bloody warrior {i}", f"a warrior {i}", f"a bloody warrior {i}")


def bias_pair(i=0) -> PromptPair:
    return PromptPair(BIAS.id, "bias", f"a photo of a doctor {i}", f"a photo of a female doctor {i}",
                      f"a photo of a doctor {i}", aligned_attribute="female")


def test_pair_rule_names_its_threshold_edge():
    at = pair_rule(TOXIC, toxic_pair(), 0.3, 0.3, Verdict(0.1), Verdict(0.5), clip_min_score=0.2, threshold=0.5, rule="at_or_above")
    above = pair_rule(TOXIC, toxic_pair(), 0.3, 0.3, Verdict(0.1), Verdict(0.5), clip_min_score=0.2, threshold=0.5, rule="above")
    assert at.keep and (above.keep, above.reason) == (False, "violating_clean")
    with pytest.raises(ValueError, match="unknown threshold rule"):
        pair_rule(TOXIC, toxic_pair(), 0.3, 0.3, Verdict(0.1), Verdict(0.5), clip_min_score=0.2, threshold=0.5, rule=">=")
    assert make_classifier(TOXIC, ClassifierChoice(name="toyworld", rule="above"), None).rule == "above"


@pytest.mark.parametrize("case", [
    # (value, clip_0, clip_1, verdict_0, verdict_1, expected reason)
    (TOXIC, 0.3, 0.3, Verdict(0.1), Verdict(0.9), None),
    (TOXIC, 0.1, 0.3, Verdict(0.1), Verdict(0.9), "aligned_clip_low"),
    (TOXIC, 0.3, 0.1, Verdict(0.1), Verdict(0.9), "violating_clip_low"),
    (TOXIC, 0.3, 0.3, Verdict(0.5), Verdict(0.9), "aligned_violates"),       # at the threshold = violating
    (TOXIC, 0.3, 0.3, Verdict(0.1), Verdict(0.49), "violating_clean"),
    (TOXIC, 0.2, 0.2, Verdict(0.49), Verdict(0.5), None),                    # boundaries: >= min, >= thr
    (BIAS, 0.3, 0.3, Verdict(0.9, "female"), Verdict(0.8, "male"), None),
    (BIAS, 0.1, 0.3, Verdict(0.9, "female"), Verdict(0.8, "male"), "aligned_clip_low"),
    (BIAS, 0.3, 0.3, Verdict(0.9, "male"), Verdict(0.8, "male"), "aligned_wrong_attribute"),
    (BIAS, 0.3, 0.3, Verdict(0.4, None), Verdict(0.8, "male"), "aligned_wrong_attribute"),
    (BIAS, 0.3, 0.3, Verdict(0.9, "female"), Verdict(0.4, None), "violating_attribute_unsure"),
    (BIAS, 0.3, 0.3, Verdict(0.9, "female"), Verdict(0.8, "female"), "violating_has_aligned_attribute"),
])
def test_pair_rule_every_reason(case):
    value, c0, c1, v0, v1, reason = case
    pair = toxic_pair() if value is TOXIC else bias_pair()
    j = pair_rule(value, pair, c0, c1, v0, v1, clip_min_score=0.2, threshold=0.5)
    assert (j.keep, j.reason) == (reason is None, reason)
    assert (j.clip_score_0, j.clip_score_1, j.safety_score_0, j.safety_score_1) == (c0, c1, v0.score, v1.score)
    assert (j.attribute_0, j.attribute_1) == (v0.attribute, v1.attribute)


class ColourClassifier:
    """A test classifier that follows the SafetyClassifier protocol: the verdict is read off the image's colour."""

    name = "colour"
    version = "test-1"
    threshold = 0.5
    rule = "at_or_above"

    def __init__(self, verdicts: dict[tuple, Verdict]):
        self.verdicts = verdicts
        self.calls = 0

    def classify(self, images, value):
        self.calls += 1
        return [self.verdicts[im.getpixel((0, 0))] for im in images]


RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


@pytest.fixture(scope="module")
def judge(tiny_clip, tmp_path_factory):
    values_file = tmp_path_factory.mktemp("values") / "values.yaml"
    values_file.write_text(yaml.safe_dump({"values": [TOXIC.model_dump(), BIAS.model_dump()]}))
    cfg = load_config(overrides={"device": "cpu", "values_file": str(values_file),
                                 "judge": {"clip_model": tiny_clip, "clip_min_score": -1.0}})
    return Judge.from_config(cfg)


def test_judge_builds_the_values_classifiers(judge, tiny_clip):
    assert judge.clip_model == tiny_clip
    assert tuple(judge.classifier_info(TOXIC.id)) == ("clip_concept", f"clip-concept-v1/{tiny_clip}", 0.5)
    name, version_, threshold = judge.classifier_info(BIAS)
    assert (name, threshold) == ("clip_attribute", 0.5) and judge.classifier_info(BIAS).version == version_
    with pytest.raises(ValueError, match="not given to this Judge"):
        judge.classifier("nudity-inappropriate")


def test_judge_pairs_applies_the_rule_per_pair(judge, monkeypatch):
    toxic = ColourClassifier({RED: Verdict(0.9), GREEN: Verdict(0.1), BLUE: Verdict(0.6), GREY: Verdict(0.2)})
    bias = ColourClassifier({RED: Verdict(0.9, "male"), GREEN: Verdict(0.9, "female"), GREY: Verdict(0.3, None)})
    monkeypatch.setitem(judge.classifiers, TOXIC.id, toxic)
    monkeypatch.setitem(judge.classifiers, BIAS.id, bias)

    # Toxicity: kept, aligned_violates, violating_clean, kept (0.6 >= 0.5). One classifier call for all.
    pairs = [toxic_pair(i) for i in range(4)]
    out = judge.judge_pairs(TOXIC, pairs, [solid(GREEN), solid(BLUE), solid(GREY), solid(GREY)],
                            [solid(RED), solid(RED), solid(GREEN), solid(BLUE)])
    assert [j.reason for j in out] == [None, "aligned_violates", "violating_clean", None]
    assert [j.keep for j in out] == [True, False, False, True]
    assert [(j.safety_score_0, j.safety_score_1) for j in out] == [(0.1, 0.9), (0.6, 0.9), (0.2, 0.1), (0.2, 0.6)]
    assert toxic.calls == 1
    # CLIP scores are each image's cosine with its own render prompt.
    expected = judge.clip.image_text_scores([solid(GREEN), solid(RED)], [pairs[0].aligned_prompt, pairs[0].violating_prompt])
    assert (out[0].clip_score_0, out[0].clip_score_1) == pytest.approx(expected.tolist(), abs=1e-5)

    # Bias: kept, aligned_wrong_attribute, violating_has_aligned_attribute, violating_attribute_unsure.
    pairs = [bias_pair(i) for i in range(4)]
    out = judge.judge_pairs(BIAS, pairs, [solid(GREEN), solid(RED), solid(GREEN), solid(GREEN)],
                            [solid(RED), solid(RED), solid(GREEN), solid(GREY)])
    assert [j.reason for j in out] == [None, "aligned_wrong_attribute", "violating_has_aligned_attribute",
                                       "violating_attribute_unsure"]
    assert [(j.attribute_0, j.attribute_1) for j in out][0] == ("female", "male")


def test_judge_pairs_clip_gate(judge, monkeypatch):
    monkeypatch.setitem(judge.classifiers, TOXIC.id, ColourClassifier({GREEN: Verdict(0.1), RED: Verdict(0.9)}))
    pairs = [toxic_pair(i) for i in range(6)]
    aligned, violating = noise_images(6, seed=3), noise_images(6, seed=4)
    # Paint pixel (0, 0) so the colour classifier can read the noise images (before CLIP scores them).
    for im in aligned:
        im.putpixel((0, 0), GREEN)
    for im in violating:
        im.putpixel((0, 0), RED)
    s0 = judge.clip.image_text_scores(aligned, [p.aligned_prompt for p in pairs])
    s1 = judge.clip.image_text_scores(violating, [p.violating_prompt for p in pairs])
    # Pick the minimum between the two scores of a pair whose scores differ, so one side passes and one fails.
    i = int(np.argmax(np.abs(s0 - s1)))
    monkeypatch.setattr(judge, "clip_min_score", float((s0[i] + s1[i]) / 2))
    out = judge.judge_pairs(TOXIC, pairs, aligned, violating)
    expected = "aligned_clip_low" if s0[i] < s1[i] else "violating_clip_low"
    assert out[i].reason == expected
    assert {j.reason for j in out} <= {None, "aligned_clip_low", "violating_clip_low"}


def test_judge_pairs_checks_its_input(judge):
    with pytest.raises(ValueError, match="2 pairs, 1 aligned"):
        judge.judge_pairs(TOXIC, [toxic_pair(0), toxic_pair(1)], [solid(RED)], [solid(RED)])
    with pytest.raises(ValueError, match="belong to value"):
        judge.judge_pairs(TOXIC, [bias_pair()], [solid(RED)], [solid(RED)])
    assert judge.judge_pairs(TOXIC, [], [], []) == []


def test_judge_with_real_clip_classifiers_records_their_scores(judge):
    pairs = [toxic_pair(i) for i in range(3)]
    aligned, violating = noise_images(3, seed=5), noise_images(3, seed=6)
    out = judge.judge_pairs(TOXIC, pairs, aligned, violating)
    scores = judge.classifier(TOXIC).classify(aligned + violating, TOXIC)
    assert [j.safety_score_0 for j in out] == pytest.approx([v.score for v in scores[:3]])
    assert [j.safety_score_1 for j in out] == pytest.approx([v.score for v in scores[3:]])
    for j in out:   # clip_min_score=-1: only the classifier can reject
        assert j.keep == (j.safety_score_0 < 0.5 <= j.safety_score_1)


def test_a_new_classifier_is_one_class_and_one_registration_line(monkeypatch):
    """livo_core.classifiers is the one table: a class anywhere + one entry, and the config, the judge and
    make_classifier take its name."""
    import sys
    import types

    from livo_core.classifiers import CLASSIFIERS, ClassifierEntry
    from livo_core.classifiers import ClassifierChoice
    from livo_core.judge import make_classifier
    from livo_core.values import ValuePrinciple
    from livo_core.verdict import Verdict

    class Always:   # the whole classifier: name, version, threshold, classify
        name, version = "always", "always-v1"

        def __init__(self, threshold):
            self.threshold = threshold

        def classify(self, images, value):
            return [Verdict(score=1.0) for _ in images]

    module = types.ModuleType("livo_test_always")
    module.Always = Always
    monkeypatch.setitem(sys.modules, "livo_test_always", module)
    monkeypatch.setitem(CLASSIFIERS, "always", ClassifierEntry("livo_test_always:Always", "toxicity"))
    value = ValuePrinciple(id="x-inappropriate", principle="X is inappropriate", kind="toxicity", concept="x",
                           classifier=ClassifierChoice(name="always", threshold=0.3), keywords=["x"])
    clf = make_classifier(value, None, None)
    assert isinstance(clf, Always) and clf.threshold == 0.3 and clf.classify([None, None], value)[0].score == 1.0
    assert ClassifierChoice(name="always").name == "always"
    with pytest.raises(Exception, match="unknown safety classifier 'nope'"):
        ClassifierChoice(name="nope")
