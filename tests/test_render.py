"""Renderer on a tiny random-weight SD pipeline: determinism, batch independence, fp32 on CPU, progress."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from livo_core.errors import LivoError
from livo_core.render import Renderer, bytes_to_image, image_to_bytes

# 64x64 images (8x8 latents): large enough that batch-size-dependent CPU kernels can flip a pixel.
SETTINGS = dict(steps=2, guidance_scale=5.0, height=64, width=64, batch_size=4, progress=False)
PROMPTS = [f"a photo of object number {i} on a table" for i in range(6)]
SEEDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture(scope="module")
def renderer(tiny_sd):
    return Renderer(str(tiny_sd), device="cpu")


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_fp32_on_cpu_and_rgb_images_of_the_asked_size(renderer):
    assert renderer.device.type == "cpu" and renderer.dtype == torch.float32
    images = renderer.render(PROMPTS[:2], SEEDS[:2], **{**SETTINGS, "height": 32, "width": 48})
    assert [(im.mode, im.size) for im in images] == [("RGB", (48, 32))] * 2


def test_an_image_depends_only_on_its_prompt_and_seed_not_on_its_batch(renderer):
    full = renderer.render(PROMPTS, SEEDS, **SETTINGS)            # batches [0..3], [4,5]+padding
    again = renderer.render(PROMPTS, SEEDS, **SETTINGS)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(full, again))

    # The same (prompt, seed) at other positions, with other neighbours, in a short padded batch, alone.
    order = [5, 2, 0, 3, 1]
    shuffled = renderer.render([PROMPTS[i] for i in order], [SEEDS[i] for i in order], **SETTINGS)
    alone = renderer.render([PROMPTS[2]], [SEEDS[2]], **SETTINGS)
    for img, i in zip(shuffled, order):
        assert (pixels(img) == pixels(full[i])).all(), f"image {i} changed with its batch"
    assert (pixels(alone[0]) == pixels(full[2])).all()

    # ...while the seed and the prompt do matter.
    other_seed = renderer.render([PROMPTS[2]], [999], **SETTINGS)
    other_prompt = renderer.render(["a bloody warrior in a forest"], [SEEDS[2]], **SETTINGS)
    assert np.abs(pixels(other_seed[0]) - pixels(full[2])).max() > 10
    assert np.abs(pixels(other_prompt[0]) - pixels(full[2])).max() > 0


def test_same_images_as_the_plain_pipeline_call(renderer):
    # The renderer encodes each distinct prompt once and the negative prompt once; the result must be
    # exactly what StableDiffusionPipeline.__call__ gives for the same batch with one generator per image.
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # two seeds per prompt, as in a dataset
    seeds = [1, 2, 1, 2]
    ours = renderer.render(prompts, seeds, negative_prompt="blurry", **SETTINGS)
    with torch.inference_mode():
        plain = renderer.pipe(prompts, negative_prompt=["blurry"] * 4, num_inference_steps=2, guidance_scale=5.0,
                              height=64, width=64, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(ours, plain))


def test_negative_prompt_and_no_guidance_paths(renderer):
    base = renderer.render(PROMPTS[:1], SEEDS[:1], **SETTINGS)[0]
    negative = renderer.render(PROMPTS[:1], SEEDS[:1], negative_prompt="a red car", **SETTINGS)[0]
    assert np.abs(pixels(base) - pixels(negative)).max() > 0
    # guidance_scale <= 1: no classifier-free guidance, no negative branch; still deterministic.
    no_cfg = [renderer.render(PROMPTS[:1], SEEDS[:1], **{**SETTINGS, "guidance_scale": 1.0})[0] for _ in range(2)]
    assert (pixels(no_cfg[0]) == pixels(no_cfg[1])).all()
    assert np.abs(pixels(no_cfg[0]) - pixels(base)).max() > 0


def test_progress_bar_counts_images(renderer, capsys):
    renderer.render(PROMPTS[:5], SEEDS[:5], **{**SETTINGS, "height": 32, "width": 32, "progress": True})
    err = capsys.readouterr().err
    assert "render" in err and "5/5" in err
    renderer.render(PROMPTS[:1], SEEDS[:1], **{**SETTINGS, "height": 32, "width": 32})
    assert capsys.readouterr().err == ""


def test_bad_input(renderer, tmp_path):
    with pytest.raises(ValueError, match="one seed per prompt"):
        renderer.render(PROMPTS[:2], SEEDS[:1], **SETTINGS)
    assert renderer.render([], [], **SETTINGS) == []
    with pytest.raises(LivoError, match="does not exist"):
        Renderer(str(tmp_path / "no-such-model"), device="cpu")


def test_image_bytes_round_trip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    png = image_to_bytes(img)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    back = bytes_to_image(png)
    assert back.size == (40, 24) and (np.asarray(back) == np.asarray(img)).all()  # lossless
    jpeg = image_to_bytes(img, format="JPEG")
    assert jpeg[:2] == b"\xff\xd8" and bytes_to_image(jpeg).size == (40, 24)
