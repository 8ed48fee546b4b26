"""Stable Diffusion 1.5's real architecture (random weights, built from livo_core/data/model_configs/sd15.json, no download):
dataset -> train 2 steps -> generate, at a small resolution, checking SD 1.5's shapes end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.cli import main

pytestmark = pytest.mark.sd15


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    """A random-weight SD 1.5-shaped pipeline folder (fp16 on disk, as the released fp16 weights: 2 GB)."""
    from livo_core.families import build_random_model

    return build_random_model(tmp_path_factory.mktemp("sd15") / "sd15", config="sd15", dtype=torch.float16)


def test_sd15_shape_dataset_train_generate(prefect_harness, sd15, tiny_clip, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_config = json.loads((sd15 / "unet" / "config.json").read_text())
    assert unet_config["block_out_channels"] == [320, 640, 1280, 1280] and unet_config["cross_attention_dim"] == 768
    text = json.loads((sd15 / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]) == (768, 12, 3072)

    from helpers import trainable_random_run

    config = trainable_random_run(tmp_path, sd15, tiny_clip, ["a warrior", "a knight"], device="cpu", dtype="float32",
                                  size=64, steps=1, guidance=1.0, shard_size=2)
    run = tmp_path / "run"
    # one shard of SD 1.5-rendered pairs at the asked size
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from livo_core.shards import complete_shard_ids, shard_paths

    (shard_id,) = complete_shard_ids(run)
    img = Image.open(io.BytesIO(pq.read_table(shard_paths(run, shard_id)[0], columns=["jpg_0"]).column("jpg_0")[0].as_py()))
    assert img.size == (64, 64)

    # train 2 steps: the theta pass sees 78 tokens of width 768
    seen = []
    handle = UNet2DConditionModel.forward
    def spy(self, sample, timestep, encoder_hidden_states, *a, **kw):
        seen.append(tuple(encoder_hidden_states.shape))
        return handle(self, sample, timestep, encoder_hidden_states, *a, **kw)
    UNet2DConditionModel.forward = spy
    try:
        out = tmp_path / "train"
        assert main(["train", "--data", str(run), "--out", str(out), "--set", "max_steps=2", "--set", "batch_size=1",
                     "--set", "device=cpu", "--set", "checkpoint_every=2", "--set", "mixed_precision=no"]) == 0
    finally:
        UNet2DConditionModel.forward = handle
    assert (2, 78, 768) in seen and (2, 77, 768) in seen    # theta: cat(w, l) with the value token; ref: without
    encoder = CLIPTextModel.from_pretrained(str(out / "value_encoder"))
    assert encoder.config.hidden_size == 768 and sum(p.numel() for p in encoder.parameters()) == 123_060_480   # ViT-L/14 text tower

    png = tmp_path / "gen.png"
    assert main(["generate", "a bloody warrior", "--encoder", str(out), "--out", str(png), "--config", str(config),
                 "--num-images", "1", "--set", "render.steps=1"]) == 0
    assert Image.open(png).size == (64, 64)
