"""FLUX through its family (livo_core/families/flux.py): conditioning equal to diffusers' encode_prompt (512 T5 tokens,
CLIP-L's pooled vector), images equal to the pipeline's own, per-sample velocity errors equal to a transcription of
diffusers' FLUX training loss (2 x 2 packing, timestep / 1000, distilled guidance), both value conditions (token and
pooled), and the command line with the transformer spied on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_run

from livo_core.families import build_random_model, family, family_for

PROMPTS = ["a bloody knight on a horse", "a red circle"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("flux") / "tiny-flux", "tiny-flux")


@pytest.fixture(scope="module")
def pipe(tiny_flux):
    return family("flux").load_pipeline(str(tiny_flux), device="cpu")


def test_the_conditioning_is_diffusers_own(pipe):
    flux = family("flux")
    with torch.no_grad():   # as ours (autograd on picks other CPU kernels: last-digit differences)
        theirs, their_pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
    ours = flux.encode_prompts(pipe, PROMPTS)
    tokens, pooled = flux.unpack(ours, flux.pooled_width(pipe.transformer.config))
    assert ours.shape == (2, 512 + 1, 48) and torch.equal(tokens, theirs) and torch.equal(pooled, their_pooled)
    assert pooled.shape == (2, 32) and not text_ids.any()          # every text token's RoPE id is 0


def test_images_from_our_conditioning_equal_the_pipelines_own(pipe):
    flux = family("flux")
    theirs = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], num_inference_steps=2,
                  guidance_scale=3.5, height=32, width=32, output_type="np").images
    ours = flux.generate(pipe, flux.encode_prompts(pipe, PROMPTS), None, [torch.Generator().manual_seed(s) for s in (1, 2)],
                         steps=2, guidance_scale=3.5, height=32, width=32)
    assert np.array_equal(np.stack([np.asarray(im) for im in ours]), (theirs * 255).round().astype("uint8"))


def test_velocity_errors_equal_a_transcription_of_the_flux_training_loss(tiny_flux):
    """train_dreambooth_lora_flux.py: pack the noisy latents, timestep / 1000, guidance 3.5, unpack the prediction,
    target noise - x0, uniform weighting -> the same per-sample errors as livo's reference pass."""
    from diffusers import FluxPipeline

    from livo_core.encoder import tokenize
    from livo_core.latents import Batch
    from livo_core.train import denoising_errors, load_model_parts

    parts = load_model_parts(str(tiny_flux))
    flux, sched, transformer = parts.family, parts.noise_scheduler, parts.unet
    g = torch.Generator().manual_seed(0)
    w, l_ = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    prompt = flux.encode_prompts(parts, PROMPTS)
    ids, _ = tokenize(parts.tokenizer, ["value, " + p for p in PROMPTS], 77)
    enc = flux.value_encoder(parts).eval()
    _, ref_w, _, ref_l, t = denoising_errors(flux, enc, transformer, sched, Batch(w, l_, prompt, ids), torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    noise = torch.randn(w.shape, generator=g)
    u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(2,), generator=g))
    timesteps = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    sigmas = sched.sigmas[[(sched.timesteps == x).nonzero().item() for x in timesteps]].view(-1, 1, 1, 1)
    vae_scale_factor = 8
    with torch.no_grad():
        for x0, ours in ((w, ref_w), (l_, ref_l)):
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            packed = FluxPipeline._pack_latents(noisy, 2, 16, 4, 4)
            img_ids = FluxPipeline._prepare_latent_image_ids(2, 2, 2, "cpu", noisy.dtype)
            pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((2,), 3.5),
                               pooled_projections=prompt[:, -1, :32], encoder_hidden_states=prompt[:, :-1],
                               txt_ids=torch.zeros(512, 3), img_ids=img_ids).sample
            pred = FluxPipeline._unpack_latents(pred, height=4 * vae_scale_factor, width=4 * vae_scale_factor,
                                                vae_scale_factor=vae_scale_factor)
            theirs = ((pred.float() - (noise - x0).float()) ** 2).reshape(2, -1).mean(1)
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    assert torch.equal(t, timesteps)


def test_the_two_value_conditions(pipe):
    """token: zero-padded to T5's width and prepended; pooled: in place of CLIP-L's pooled vector of the prompt."""
    flux = family("flux")
    cond, token = flux.encode_prompts(pipe, PROMPTS), torch.randn(2, 1, 32)
    as_token = flux.attach_value_token(cond, token)
    assert as_token.shape == (2, 1 + 512 + 1, 48) and torch.equal(as_token[:, 0, :32], token[:, 0])
    assert not as_token[:, 0, 32:].any() and torch.equal(as_token[:, 1:], cond)
    as_pooled = flux.attach_value_token(cond, token, "pooled")
    assert as_pooled.shape == cond.shape and torch.equal(as_pooled[:, :-1], cond[:, :-1])
    assert torch.equal(flux.unpack(as_pooled, 32)[1], token[:, 0])


class TransformerSpy:
    def __init__(self, monkeypatch):
        from diffusers import FluxTransformer2DModel

        self.calls = []
        forward = FluxTransformer2DModel.forward

        def spy(model, *a, **kw):
            g = kw.get("guidance")
            self.calls.append((tuple(kw["encoder_hidden_states"].shape), tuple(kw["pooled_projections"].shape),
                               None if g is None else tuple(g.shape)))
            return forward(model, *a, **kw)

        monkeypatch.setattr(FluxTransformer2DModel, "forward", spy)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["token", "pooled"])
def test_model_random_train_generate_from_the_command_line(prefect_harness, tmp_path, monkeypatch, capsys, condition):
    """The transformer reads 512 T5 rows (+ 1 value token, or the value token as the pooled vector) of T5's width
    48 (FLUX: 4096), a pooled 32 (768) and the distilled guidance, in training and in generation."""
    from flows.cli import main

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    model, run = tmp_path / "M", tmp_path / "run"
    assert main(["model", "random", "tiny-flux", "--out", str(model)]) == 0
    assert family_for(str(model)) is family("flux")
    make_run(run, tmp_path / "some-other-model", n_pairs=8)
    spy = TransformerSpy(monkeypatch)
    assert main(["train", "--data", str(run), "--base-model", str(model), "--out", str(tmp_path / "E"), "--set", "max_steps=2",
                 "--set", f"value_condition={condition}"]) == 0
    rows = 1 + 512 if condition == "token" else 512
    assert all(c[1][1:] == (32,) and c[2] == (c[0][0],) and c[0][2] == 48 for c in spy.calls)
    assert any(c[0][1] == rows for c in spy.calls) and any(c[0][1] == 512 for c in spy.calls)
    spy.calls.clear()
    out = tmp_path / "x.png"
    assert main(["generate", "a bloody knight", "--encoder", str(tmp_path / "E"), "--base-model", str(model),
                 "--out", str(out), "--num-images", "2", "--set", "render.steps=2"]) == 0
    assert out.is_file() and set(spy.calls) == {((2, rows, 48), (2, 32), (2,))}   # no unconditional branch
