"""SDXL through its family (livo_core/families/sdxl.py): conditioning equal to diffusers' own encode_prompt, the
two-tower value token, and the command line (model random -> train -> generate) with the denoiser spied on."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_run

from livo_core.errors import LivoError
from livo_core.families import build_random_model, family, family_for

PROMPTS = ["a bloody knight on a horse", "a red circle"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", "tiny-sdxl")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return family("sdxl").load_pipeline(str(tiny_sdxl), device="cpu")


def test_the_conditioning_is_diffusers_own(pipe):
    """Tokens, pooled vector and SDXL's zero negative equal StableDiffusionXLPipeline.encode_prompt's."""
    sdxl = family("sdxl")
    theirs, their_neg, their_pooled, their_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    ours = sdxl.encode_prompts(pipe, PROMPTS)
    tokens, pooled = sdxl.unpack(ours, sdxl.pooled_width(pipe.unet.config))
    assert ours.shape == (2, 77 + 1, 64) and torch.equal(tokens, theirs) and torch.equal(pooled, their_pooled)
    negative = sdxl.encode_negative(pipe, ["", ""])
    neg_tokens, neg_pooled = sdxl.unpack(negative, 32)
    assert torch.equal(neg_tokens, their_neg) and torch.equal(neg_pooled, their_neg_pooled) and not negative.any()
    # a negative prompt is encoded as diffusers does
    _, their_neg, _, their_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                           negative_prompt=["blood", "blood"])
    neg_tokens, neg_pooled = sdxl.unpack(sdxl.encode_negative(pipe, ["blood", "blood"]), 32)
    assert torch.equal(neg_tokens, their_neg) and torch.equal(neg_pooled, their_neg_pooled)


def test_images_from_our_conditioning_equal_the_pipelines_own(pipe):
    sdxl = family("sdxl")
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np")
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    cond, negative = sdxl.encode_prompts(pipe, PROMPTS), sdxl.encode_negative(pipe, ["", ""])
    ours = sdxl.generate(pipe, cond, negative, [torch.Generator().manual_seed(s) for s in (1, 2)], steps=2,
                         guidance_scale=5.0, height=32, width=32)
    import numpy as np

    assert np.array_equal(np.stack([np.asarray(im) for im in ours]), (theirs * 255).round().astype("uint8"))


def test_the_untrained_value_token_is_the_prompt_token_at_end_of_text(pipe, tiny_sdxl, tmp_path):
    """Both towers' penultimate rows at the end-of-text token: before training, the value token of a text is exactly
    the token SDXL puts at that position of the text's own conditioning (same statistics); it survives a save."""
    from livo_core.encoder import ValueEncoder, tokenize
    from livo_core.train import load_model_parts

    parts = load_model_parts(str(tiny_sdxl))
    enc = family("sdxl").value_encoder(parts).eval()
    assert (enc.width, enc.token, enc.family) == (64, "penultimate-eos", "sdxl")
    text = "Bloody content is considered inappropriate, a knight"
    ids, _ = tokenize(parts.tokenizer, [text], 77)
    token = enc(ids)                                                       # (1, 1, 64)
    eos = int((ids[0] == parts.tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        prompt = family("sdxl").encode_prompts(parts, [text])
        assert torch.allclose(token[0, 0], prompt[0, eos], atol=1e-5)
        enc.save_pretrained(tmp_path / "enc")
        again = ValueEncoder.from_pretrained(tmp_path / "enc")
        assert torch.equal(again(ids), token) and again.family == "sdxl"
    info = json.loads((tmp_path / "enc" / "value_encoder.json").read_text())
    assert info == {"family": "sdxl", "token": "penultimate-eos", "towers": 2, "width": 64, "condition": "token"}


class DenoiserSpy:
    """Records the conditioning every UNet call reads: token rows and width, the added conditioning's shapes."""

    def __init__(self, monkeypatch):
        from diffusers import UNet2DConditionModel

        self.calls = []
        forward = UNet2DConditionModel.forward

        def spy(unet, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=None, **kw):
            added = tuple(sorted((k, tuple(v.shape)) for k, v in (added_cond_kwargs or {}).items()))
            self.calls.append((tuple(encoder_hidden_states.shape), added))
            return forward(unet, sample, timestep, encoder_hidden_states, *a, added_cond_kwargs=added_cond_kwargs, **kw)

        monkeypatch.setattr(UNet2DConditionModel, "forward", spy)


@pytest.mark.slow
def test_model_random_train_generate_from_the_command_line(prefect_harness, tmp_path, monkeypatch, capsys):
    """`livo model random tiny-sdxl`, `livo train --base-model` on a dataset run made for another model, `livo
    generate`: the denoiser reads 1 value + 77 prompt tokens of 32 + 32 = 64 (SDXL: 768 + 1280), a pooled 32 (1280)
    and 6 time ids, in training and in generation."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    model, run = tmp_path / "M", tmp_path / "run"
    assert main(["model", "random", "tiny-sdxl", "--out", str(model)]) == 0
    assert "sdxl family" in capsys.readouterr().out and family_for(str(model)) is family("sdxl")
    make_run(run, tmp_path / "some-other-model", n_pairs=8)       # rendered with another model: --base-model says which
    spy = DenoiserSpy(monkeypatch)
    assert main(["train", "--data", str(run), "--base-model", str(model), "--out", str(tmp_path / "E"), "--set", "max_steps=2"]) == 0
    trained = [c for c in spy.calls if c[0][1] == 1 + 77]
    assert trained and all(c == ((c[0][0], 78, 64), (("text_embeds", (c[0][0], 32)), ("time_ids", (c[0][0], 6)))) for c in trained)
    assert any(c[0][1] == 77 for c in spy.calls)                  # the reference pass: the same model without the token
    spy.calls.clear()
    out = tmp_path / "x.png"
    assert main(["generate", "a bloody knight", "--encoder", str(tmp_path / "E"), "--base-model", str(model),
                 "--out", str(out), "--num-images", "2", "--set", "render.steps=2"]) == 0
    assert out.is_file() and spy.calls
    # classifier-free guidance: the negative (zeros, padded to 78) and the valued conditioning in one batch of 2 x 2
    assert set(spy.calls) == {((4, 78, 64), (("text_embeds", (4, 32)), ("time_ids", (4, 6))))}


def test_an_encoder_of_another_family_is_refused_before_weights_load(pipe, tiny_sdxl, tmp_path, capsys):
    from flows.cli import main
    from livo_core.encoder import ValueEncoder
    from livo_core.families import check_encoder_fits
    from livo_core.train import load_model_parts

    family("sdxl").value_encoder(load_model_parts(str(tiny_sdxl))).save_pretrained(tmp_path / "xl-enc")
    tiny_sd = build_random_model(tmp_path / "tiny-sd", "tiny-sd")
    with pytest.raises(LivoError, match=r"trained for a sdxl model \(64-wide value token\) but .* is a sd model \(32-wide tokens\)"):
        check_encoder_fits(tmp_path / "xl-enc", str(tiny_sd))
    assert main(["generate", "a bloody knight", "--encoder", str(tmp_path / "xl-enc"), "--base-model", str(tiny_sd),
                 "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained for a sdxl model" in err and not (tmp_path / "x.png").exists()
    sd_enc = ValueEncoder.from_text_encoder(load_model_parts(str(tiny_sd)).text_encoder)
    sd_enc.save_pretrained(tmp_path / "sd-enc")
    with pytest.raises(LivoError, match=r"trained for a sd model \(32-wide value token\) but .* is a sdxl model \(64-wide tokens\)"):
        check_encoder_fits(tmp_path / "sd-enc", str(tiny_sdxl))


def test_sld_and_the_official_layout_are_refused_for_sdxl(pipe):
    from livo_core.infer import LiVOPipeline

    with pytest.raises(LivoError, match="SLD .* SD 1.x / 2.x only, not for SDXL"):
        family("sdxl").safe_pipeline(pipe)
    with pytest.raises(LivoError, match="official token layout is the authors' SD 1.x construction"):
        LiVOPipeline(pipe, None, [], layout="official")
