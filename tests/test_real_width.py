"""SDXL, SD 3.5 Medium and FLUX.1-dev at their real widths (random weights, fewer blocks: livo_core/data/model_configs/
sdxl.json, sd35-medium.json, flux-dev.json): dataset -> train 2 steps -> generate at 64 px on the CPU, with the
denoiser spied on to check every width, token count and added conditioning of the real model. Peak memory of these
runs: docs/bench.md (bench/family_step.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flows.cli import main

pytestmark = pytest.mark.real_width

# config -> (denoiser class, the conditioning it must read in training: tokens (rows, width), pooled / added widths)
REAL = {
    "sdxl": ("UNet2DConditionModel", (1 + 77, 2048), {"text_embeds": 1280, "time_ids": 6}),
    "sd35-medium": ("SD3Transformer2DModel", (1 + 77 + 256, 4096), {"pooled_projections": 2048}),
    "flux-dev": ("FluxTransformer2DModel", (1 + 512, 4096), {"pooled_projections": 768, "guidance": None}),
}


class Spy:
    """Every call of a diffusers denoiser class: (token rows, width) and the widths of its pooled / added inputs."""

    def __init__(self, monkeypatch, class_name: str):
        import diffusers

        cls = getattr(diffusers, class_name)
        self.calls, forward = [], cls.forward

        def spy(model, *a, **kw):
            tokens = kw.get("encoder_hidden_states", a[2] if len(a) > 2 else None)
            added = dict(kw.get("added_cond_kwargs") or {})
            added.update({k: kw[k] for k in ("pooled_projections", "guidance") if kw.get(k) is not None})
            self.calls.append((tuple(tokens.shape[1:]), {k: (v.shape[-1] if v.dim() > 1 else None) for k, v in added.items()}))
            return forward(model, *a, **kw)

        monkeypatch.setattr(cls, "forward", spy)


@pytest.mark.parametrize("config", sorted(REAL))
def test_real_width_dataset_train_generate(config, prefect_harness, tiny_clip, tmp_path, monkeypatch):
    from helpers import trainable_random_run

    from livo_core.families import build_random_model

    monkeypatch.setenv("PREFECT_API_URL", prefect_harness)
    model = build_random_model(tmp_path / config, config, dtype=torch.bfloat16)   # bf16 on disk; fp32 on the CPU
    c = trainable_random_run(tmp_path, model, tiny_clip, ["a warrior", "a knight"], device="cpu", dtype="float32",
                             size=64, steps=1, guidance=1.0, shard_size=2)
    denoiser, tokens, added = REAL[config]
    spy = Spy(monkeypatch, denoiser)
    out = tmp_path / "train"
    assert main(["train", "--data", str(tmp_path / "run"), "--out", str(out), "--set", "max_steps=2", "--set", "batch_size=1",
                 "--set", "device=cpu", "--set", "checkpoint_every=2", "--set", "mixed_precision=no"]) == 0
    assert (tokens, added) in spy.calls                                          # theta: with the value token
    assert ((tokens[0] - 1, tokens[1]), added) in spy.calls                      # ref: the same model without it
    png = tmp_path / "gen.png"
    assert main(["generate", "a bloody warrior", "--encoder", str(out), "--out", str(png), "--config", str(c),
                 "--num-images", "1", "--set", "render.steps=1"]) == 0
    assert Image.open(png).size == (64, 64)
