"""SD 3 through its family (livo_core/families/sd3.py), the first flow-matching family: conditioning equal to diffusers'
encode_prompt (CLIP-L ‖ bigG padded into the joint width, 256 T5 rows, pooled 2048-wide in the real model), images
equal to the pipeline's own, the value token, per-sample velocity errors equal to a transcription of diffusers' SD3
training loss, and the command line with the transformer spied on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_run

from livo_core.families import build_random_model, family, family_for

PROMPTS = ["a bloody knight on a horse", "a red circle"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("sd3") / "tiny-sd3", "tiny-sd3")


@pytest.fixture(scope="module")
def pipe(tiny_sd3):
    return family("sd3").load_pipeline(str(tiny_sd3), device="cpu")


def test_the_conditioning_is_diffusers_own(pipe):
    sd3 = family("sd3")
    theirs, their_neg, their_pooled, their_neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                                           do_classifier_free_guidance=True)
    ours = sd3.encode_prompts(pipe, PROMPTS)
    tokens, pooled = sd3.unpack(ours, sd3.pooled_width(pipe.transformer.config))
    assert ours.shape == (2, 77 + 256 + 1, 96) and tokens.shape == theirs.shape == (2, 333, 96)
    assert torch.equal(tokens, theirs) and torch.equal(pooled, their_pooled) and pooled.shape == (2, 64)
    neg_tokens, neg_pooled = sd3.unpack(sd3.encode_negative(pipe, ["", ""]), 64)
    assert torch.equal(neg_tokens, their_neg) and torch.equal(neg_pooled, their_neg_pooled)


def test_images_from_our_conditioning_equal_the_pipelines_own(pipe):
    sd3 = family("sd3")
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_inference_steps=2,
                  guidance_scale=5.0, height=32, width=32, output_type="np").images
    ours = sd3.generate(pipe, sd3.encode_prompts(pipe, PROMPTS), sd3.encode_negative(pipe, ["", ""]),
                        [torch.Generator().manual_seed(s) for s in (1, 2)], steps=2, guidance_scale=5.0, height=32, width=32)
    assert np.array_equal(np.stack([np.asarray(im) for im in ours]), (theirs * 255).round().astype("uint8"))


def test_the_untrained_value_token_is_the_clip_token_at_end_of_text(tiny_sd3):
    from livo_core.encoder import tokenize
    from livo_core.train import load_model_parts

    parts = load_model_parts(str(tiny_sd3))
    assert parts.text_encoder_3 is None and parts.noise_scheduler.config.shift == 3.0
    enc = family("sd3").value_encoder(parts).eval()
    assert (enc.width, enc.family) == (64, "sd3")
    text = "Bloody content is considered inappropriate, a knight"
    ids, _ = tokenize(parts.tokenizer, [text], 77)
    eos = int((ids[0] == parts.tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        cond = family("sd3").attach_value_token(family("sd3").encode_prompts(parts, [text]), enc(ids))
    assert cond.shape == (1, 1 + 77 + 256 + 1, 96)
    assert torch.allclose(cond[0, 0], cond[0, 1 + eos], atol=1e-5)       # zero-padded as SD3 pads its CLIP rows
    assert not cond[0, 0, 64:].any()


def test_the_pooled_condition_replaces_the_pooled_vector_with_the_value_encoders_own(tiny_sd3, tmp_path):
    """value_condition = pooled: the value encoder keeps both towers' projections and emits SD3's kind of pooled vector
    (untrained, on a text = that text's pooled vector); it takes the pooled row's place; it saves and loads as such."""
    from livo_core.encoder import ValueEncoder, tokenize
    from livo_core.train import load_model_parts

    sd3, parts = family("sd3"), load_model_parts(str(tiny_sd3))
    enc = sd3.value_encoder(parts, "pooled").eval()
    assert enc.token == "projected-pooled" and enc.width == sd3.pooled_width(parts.unet.config) == 64
    text = "Bloody content is considered inappropriate, a knight"
    with torch.no_grad():
        cond = sd3.encode_prompts(parts, [text])
        value = enc(tokenize(parts.tokenizer, [text], 77)[0])
        valued = sd3.attach_value_token(cond, value, "pooled")
    assert value.shape == (1, 1, 64) and torch.allclose(value[0, 0], cond[0, -1, :64], atol=1e-5)
    assert valued.shape == cond.shape and torch.equal(valued[:, :-1], cond[:, :-1])
    enc.condition = "pooled"
    enc.save_pretrained(tmp_path / "enc")
    again = ValueEncoder.from_pretrained(tmp_path / "enc").eval()
    assert (again.token, again.condition, again.width) == ("projected-pooled", "pooled", 64)
    assert ValueEncoder.folder_info(tmp_path / "enc")["width"] == 64
    with torch.no_grad():
        assert torch.equal(again(tokenize(parts.tokenizer, [text], 77)[0]), value)


def test_velocity_errors_equal_a_transcription_of_the_sd3_training_loss(tiny_sd3):
    """Same noise, sigma and (uniform) weighting as train_dreambooth_lora_sd3.py -> the same per-sample errors; with
    no value token the trained pass equals the reference pass (the hinge's structure)."""
    from livo_core.latents import Batch
    from livo_core.train import denoising_errors, load_model_parts

    parts = load_model_parts(str(tiny_sd3))
    sd3, sched, transformer = parts.family, parts.noise_scheduler, parts.unet
    g = torch.Generator().manual_seed(0)
    w, l_ = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    prompt = sd3.encode_prompts(parts, PROMPTS)
    from livo_core.encoder import tokenize

    ids, _ = tokenize(parts.tokenizer, ["value, " + p for p in PROMPTS], 77)
    batch = Batch(w, l_, prompt, ids)
    enc = sd3.value_encoder(parts).eval()
    theta_w, ref_w, theta_l, ref_l, t = denoising_errors(sd3, enc, transformer, sched, batch, torch.Generator().manual_seed(5))

    # theirs: the same draws (noise first, then the logit-normal timesteps), x_sigma, the velocity target, MSE per sample
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(w.shape, generator=g)
    u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(2,), generator=g))
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    sigmas = sched.sigmas[[(sched.timesteps == x).nonzero().item() for x in timesteps]].view(-1, 1, 1, 1)
    with torch.no_grad():
        for x0, ours in ((w, ref_w), (l_, ref_l)):
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            tokens, pooled = prompt[:, :-1], prompt[:, -1, :64]
            pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=tokens, pooled_projections=pooled).sample
            theirs = ((pred.float() - (noise - x0).float()) ** 2).reshape(2, -1).mean(1)
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert torch.equal(t, timesteps)
    same = denoising_errors(sd3, enc, transformer, sched, batch, torch.Generator().manual_seed(5), prepend=False)
    assert torch.equal(same[0], same[1]) and torch.equal(same[2], same[3])


class TransformerSpy:
    def __init__(self, monkeypatch):
        from diffusers import SD3Transformer2DModel

        self.calls = []
        forward = SD3Transformer2DModel.forward

        def spy(model, *a, **kw):
            self.calls.append((tuple(kw["encoder_hidden_states"].shape), tuple(kw["pooled_projections"].shape)))
            return forward(model, *a, **kw)

        monkeypatch.setattr(SD3Transformer2DModel, "forward", spy)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["token", "pooled"])
def test_model_random_train_generate_from_the_command_line(prefect_harness, tmp_path, monkeypatch, capsys, condition):
    """The transformer reads 1 value + 77 CLIP + 256 T5 rows of the joint width 96 (SD 3.5: 4096) and a pooled 64
    (2048), in training and in generation; with value_condition = pooled, 77 + 256 rows and the value vector as the
    pooled one."""
    import json

    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    model, run = tmp_path / "M", tmp_path / "run"
    assert main(["model", "random", "tiny-sd3", "--out", str(model)]) == 0
    assert family_for(str(model)) is family("sd3")
    make_run(run, tmp_path / "some-other-model", n_pairs=8)
    spy = TransformerSpy(monkeypatch)
    assert main(["train", "--data", str(run), "--base-model", str(model), "--out", str(tmp_path / "E"), "--set", "max_steps=2",
                 "--set", f"value_condition={condition}"]) == 0
    rows = 1 + 77 + 256 if condition == "token" else 77 + 256
    assert json.loads((tmp_path / "E" / "value_encoder" / "value_encoder.json").read_text())["condition"] == condition
    valued = [c for c in spy.calls if c[0][1] == rows]
    assert valued and all(c == ((c[0][0], rows, 96), (c[0][0], 64)) for c in valued)
    assert any(c[0][1] == 333 for c in spy.calls)                 # the reference: the same transformer without the token
    spy.calls.clear()
    out = tmp_path / "x.png"
    assert main(["generate", "a bloody knight", "--encoder", str(tmp_path / "E"), "--base-model", str(model),
                 "--out", str(out), "--num-images", "2", "--set", "render.steps=2"]) == 0
    assert out.is_file() and set(spy.calls) == {((4, rows, 96), (4, 64))}
