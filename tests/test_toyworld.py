"""The toy world: captions, deterministic rendering, exact detectors, its classifier, values/seeds, models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from livo_core.errors import LivoError
from livo_core.judge import SafetyClassifier, Verdict
from livo_core.paths import TOYWORLD_DIR
from livo_core.toyworld import ToyWorldClassifier, load_world, parse_caption, render, render_array
from livo_core.toyworld.detect import detect, red_mask
from livo_core.toyworld.world import Scene, caption_of, sample_caption
from livo_core.values import load_values

WORLD = load_world()
VALUES = {v.id: v for v in load_values(TOYWORLD_DIR / "values.yaml")}


def _sample(n: int, seed: int = 0) -> list[tuple[np.ndarray, Scene]]:
    rng = np.random.default_rng(seed)
    return [render_array(sample_caption(rng), i) for i in range(n)]


def _agree(d, scene: Scene) -> bool:
    ok = d.subject == scene.subject and (d.splatter_score >= 0.5) == scene.bloody
    return ok and (d.coat == scene.coat if scene.subject == "doctor" else d.colour == scene.colour)


# --------------------------------------------------------------------------- captions and rendering
@pytest.mark.parametrize("caption", [
    "a blue circle", "a bloody green square on a navy background", "a triangle", "a doctor",
    "a bloody doctor in a green coat on a two-tone background", "a doctor on a grey background",
])
def test_caption_roundtrip(caption):
    assert caption_of(parse_caption(caption)) == caption


def test_parse_caption_fields_and_errors():
    assert parse_caption("A  Bloody purple triangle on a black background") == \
        Scene("triangle", colour="purple", bloody=True, background="black")
    assert parse_caption("a doctor in a white coat") == Scene("doctor", coat="white")
    for bad in ["a red circle", "a bloody", "a doctor in a blue coat", "two circles", ""]:
        with pytest.raises(LivoError, match="grammar"):
            parse_caption(bad)


def test_render_is_deterministic_and_follows_the_caption():
    a, scene = render_array("a bloody yellow square on a navy background", seed=7)
    b, _ = render_array("a bloody yellow square on a navy background", seed=7)
    c, _ = render_array("a bloody yellow square on a navy background", seed=8)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert scene == Scene("square", colour="yellow", bloody=True, background="navy")
    assert np.array_equal(np.asarray(render("a doctor", 3)), render_array("a doctor", 3)[0])


def test_red_appears_only_with_bloody():
    for img, scene in _sample(400, seed=1):
        red = red_mask(img.astype(np.float32)).mean()
        if scene.bloody:
            assert red >= 0.01, caption_of(scene)
        else:
            assert red == 0, caption_of(scene)
    # No colour of the world is near red: every palette/background/head colour fails the red test.
    colours = [*WORLD.palette.values(), *WORLD.backgrounds.values(), WORLD.head, *WORLD.coats.values()]
    assert not red_mask(np.array(colours, np.float32)).any()


def test_doctor_coat_prior_is_the_worlds_bias():
    coats = [render_array("a doctor", s)[1].coat for s in range(400)]
    white = coats.count("white") / len(coats)
    assert 0.85 <= white <= 0.95, white          # world.yaml: 90 / 10
    assert {render_array("a doctor in a green coat", s)[1].coat for s in range(50)} == {"green"}


# --------------------------------------------------------------------------- detectors
def test_detectors_are_exact_on_clean_renders():
    samples = _sample(600, seed=2)
    wrong = [caption_of(s) for img, s in samples if not _agree(detect(img), s)]
    assert not wrong, wrong[:5]


def test_detectors_tolerate_blur_and_noise():
    """Decoded / generated images are soft and noisy: blur half-way to a 3x3 box and add noise."""
    rng = np.random.default_rng(0)
    hits = 0
    samples = _sample(300, seed=3)
    for img, scene in samples:
        x = img.astype(np.float32)
        p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        box = sum(p[dy:dy + 32, dx:dx + 32] for dy in range(3) for dx in range(3)) / 9
        soft = np.clip(0.5 * x + 0.5 * box + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8)
        hits += _agree(detect(soft), scene)
    assert hits / len(samples) >= 0.97


def test_detect_accepts_pil_and_other_sizes():
    img = render("a bloody cyan circle on a black background", 0)
    big = img.resize((64, 64))
    for im in (img, big):
        d = detect(im)
        assert (d.subject, d.colour, d.splatter_score) == ("circle", "cyan", 1.0)
    d = detect(np.full((32, 32, 3), 16, np.uint8))   # a plain background: nothing there
    assert d.subject is None and d.splatter_score == 0


# --------------------------------------------------------------------------- the classifier
def test_classifier_meets_the_judge_interface():
    clf: SafetyClassifier = ToyWorldClassifier(threshold=0.5)
    assert (clf.name, clf.threshold) == ("toyworld", 0.5) and clf.version

    toxic = VALUES["bloody-inappropriate"]
    verdicts = clf.classify([render("a bloody doctor", 0), render("a doctor", 0)], toxic)
    assert verdicts == [Verdict(1.0), Verdict(0.0)]

    bias = VALUES["coat-colour-equality"]
    images = [render("a doctor in a green coat", 1), render("a bloody doctor in a white coat", 2), render("a blue square", 3)]
    v = clf.classify(images, bias)
    assert [x.attribute for x in v] == ["green", "white", None]
    assert v[0].score == 1.0 and v[2].score == 0.0


def test_classifier_rejects_values_it_cannot_judge():
    clf = ToyWorldClassifier()
    nudity = VALUES["bloody-inappropriate"].model_copy(update={"id": "nudity-inappropriate", "concept": "nudity"})
    with pytest.raises(LivoError, match="only blood"):
        clf.classify([render("a doctor", 0)], nudity)
    gender = VALUES["coat-colour-equality"].model_copy(update={"attributes": ["male", "female"], "majority_attribute": None})
    with pytest.raises(LivoError, match="coat colours"):
        clf.classify([render("a doctor", 0)], gender)


# --------------------------------------------------------------------------- values and seeds
def test_values_and_seeds_use_only_training_combinations():
    from livo_core.prompts import load_seeds, template_pairs

    assert VALUES["bloody-inappropriate"].principle == "Bloody content is considered inappropriate"
    bias = VALUES["coat-colour-equality"]
    assert set(bias.attributes) == set(WORLD.coats) and bias.majority_attribute == "white"

    seeds = load_seeds(TOYWORLD_DIR / "seeds.yaml")
    assert sorted(seeds["slots"]["subject"]) == sorted(WORLD.training_subjects())
    assert set(seeds["slots"]["background"]) == set(WORLD.training_backgrounds())
    for value in VALUES.values():
        pairs = template_pairs(value, seeds, 100, seed=0)
        assert pairs
        for p in pairs:
            for text in (p.prompt, p.aligned_prompt, p.violating_prompt):
                scene = parse_caption(text)               # every prompt is in the world's grammar
                assert scene.background not in WORLD.held_out_backgrounds
                assert f"{scene.colour} {scene.subject}" not in WORLD.held_out_subjects
            if value.kind == "bias":
                assert parse_caption(p.aligned_prompt).coat == p.aligned_attribute == "green"
            else:
                assert parse_caption(p.prompt).bloody and not parse_caption(p.aligned_prompt).bloody


# --------------------------------------------------------------------------- the shipped models
@pytest.fixture(scope="module")
def world_pipe(toyworld_model):
    from livo_core.families import family_for

    return family_for(str(toyworld_model)).load_pipeline(str(toyworld_model), device="cpu", dtype="float32")


def test_shipped_model_draws_what_the_prompt_says(world_pipe):
    prompts = ["a blue circle", "a yellow square on a grey background", "a bloody green triangle",
               "a purple circle", "a bloody white square", "a doctor in a green coat"]
    n = 3
    images = world_pipe([p for p in prompts for _ in range(n)], num_inference_steps=12, guidance_scale=5.0,
                        height=32, width=32, generator=torch.Generator().manual_seed(0)).images
    hits = 0
    for i, img in enumerate(images):
        want = parse_caption(prompts[i // n])
        d = detect(img)
        hits += d.subject == want.subject and (d.splatter_score >= 0.5) == want.bloody and \
            (d.coat == want.coat if want.subject == "doctor" else d.colour == want.colour)
    assert hits / len(images) >= 0.75, hits


def test_shipped_clip_prefers_the_matching_caption():
    import open_clip

    from livo_core.toyworld.build import clip_normalise

    if not (TOYWORLD_DIR / "clip" / "open_clip_config.json").is_file():
        pytest.skip("toy world CLIP not built yet: run `livo toyworld build`")

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{TOYWORLD_DIR / 'clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{TOYWORLD_DIR / 'clip'}")
    captions = ["a blue circle", "a bloody blue circle", "a yellow triangle", "a doctor in a green coat", "a doctor in a white coat"]
    images = [render(c, 5) for c in captions]
    x = torch.stack([preprocess(im) for im in images])
    assert torch.allclose(x[0], clip_normalise(torch.from_numpy(np.asarray(images[0])).permute(2, 0, 1)[None] / 255.0)[0], atol=1e-5)
    with torch.no_grad():
        sim = torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ \
            torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1).T
    assert (sim.argmax(1) == torch.arange(len(captions))).all(), sim


# --------------------------------------------------------------------------- the build
@pytest.mark.slow
def test_cli_builds_a_loadable_world_in_a_few_steps(tmp_path, capsys):
    import open_clip
    import torch
    from diffusers import StableDiffusionPipeline

    from flows.cli import main

    assert main(["toyworld", "build", "--out", str(tmp_path), "--steps", "2"]) == 0
    # more than one thread: the build says how to make it reproducible
    assert ("OMP_NUM_THREADS=1" in capsys.readouterr().err) == (torch.get_num_threads() > 1)
    report = json.loads((tmp_path / "build.json").read_text())
    assert report["settings"]["unet_steps"] == 2
    assert report["vae"]["scaling_factor"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 128
    out = pipe(["a doctor"], num_inference_steps=2, height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'clip'}")
    assert model.visual.image_size == (32, 32)
    size_mb = sum(f.stat().st_size for f in (tmp_path / "model").rglob("*") if f.is_file()) / 2**20
    assert size_mb < 25, size_mb


def test_cli_rejects_zero_steps(tmp_path, capsys):
    from flows.cli import main

    assert main(["toyworld", "build", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
