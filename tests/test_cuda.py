"""The CUDA paths at Stable Diffusion 1.5's real architecture (random weights, no download): fp16 renders,
fp16 training with the value encoder kept in fp32, gradient checkpointing. Skipped without a CUDA GPU (CI has
none); run on a GPU machine with `bash scripts/gpu_check.sh`, which also times the training step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.cli import main

pytestmark = [pytest.mark.cuda, pytest.mark.sd15,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> Path:
    from livo_core.families import build_random_model

    return build_random_model(tmp_path_factory.mktemp("sd15") / "sd15", config="sd15", dtype=torch.float16)


@pytest.fixture(scope="module")
def cuda_run(sd15, tiny_clip, tmp_path_factory, prefect_harness):
    """A dataset rendered on the GPU in fp16 at 256 px, every pair made trainable (random weights draw nothing)."""
    from helpers import trainable_random_run

    w = tmp_path_factory.mktemp("cuda")
    trainable_random_run(w, sd15, tiny_clip, ["a warrior", "a knight", "a dog", "a robot"], device="cuda",
                         dtype="float16", size=256, steps=2, guidance=7.5, shard_size=4)
    return w


def _train(run: Path, out: Path, *extra: str) -> tuple[list[dict], int]:
    torch.cuda.reset_peak_memory_stats()
    assert main(["train", "--data", str(run), "--out", str(out), "--set", "max_steps=3", "--set", "batch_size=2",
                 "--set", "device=cuda", "--set", "checkpoint_every=3", *extra]) == 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return rows, torch.cuda.max_memory_allocated()


def test_fp16_renders_are_images(cuda_run):
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from livo_core.shards import list_shards

    shards, problems = list_shards([cuda_run / "run"])
    assert shards and not problems
    table = pq.read_table(shards[0].path, columns=["jpg_0", "jpg_1"])
    for column in ("jpg_0", "jpg_1"):
        img = np.asarray(Image.open(io.BytesIO(table.column(column)[0].as_py())))
        assert img.shape == (256, 256, 3) and img.std() > 0   # fp16 NaNs decode to one flat colour


def test_fp16_training_keeps_the_encoder_fp32_and_checkpointing_saves_memory(cuda_run, tmp_path):
    from transformers import CLIPTextModel

    plain, plain_peak = _train(cuda_run / "run", tmp_path / "plain", "--set", "mixed_precision=fp16")
    ckpt, ckpt_peak = _train(cuda_run / "run", tmp_path / "ckpt", "--set", "mixed_precision=fp16",
                             "--set", "gradient_checkpointing=true")
    for rows in (plain, ckpt):
        assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the same data, seeds and order: checkpointing recomputes, it does not change the step's numbers
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-2, abs=1e-3)
    assert ckpt_peak < plain_peak, (ckpt_peak, plain_peak)
    encoder = CLIPTextModel.from_pretrained(str(tmp_path / "plain" / "value_encoder"))
    assert next(encoder.parameters()).dtype == torch.float32


def test_fp16_generate_on_cuda(cuda_run, tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "train"
    _train(cuda_run / "run", out)
    png = tmp_path / "gen.png"
    assert main(["generate", "a bloody warrior", "--encoder", str(out), "--out", str(png), "--config",
                 str(cuda_run / "c.yaml"), "--num-images", "1", "--device", "cuda", "--set", "render.steps=2"]) == 0
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (256, 256) and img.std() > 0


@pytest.mark.parametrize("config", ["sdxl", "sd35-medium", "flux-dev"])
def test_every_family_at_real_width_trains_in_bf16_with_checkpointing(config, tiny_clip, tmp_path, prefect_harness):
    """SDXL, SD 3.5 Medium, FLUX.1-dev shapes on the GPU: a bf16 dataset at 256 px, 3 bf16 training steps with
    gradient checkpointing through the frozen denoiser (finite losses, the encoder kept fp32, less memory than
    without), a bf16 render."""
    import numpy as np
    from PIL import Image

    from helpers import trainable_random_run
    from livo_core.encoder import ValueEncoder
    from livo_core.families import build_random_model

    model = build_random_model(tmp_path / config, config, dtype=torch.bfloat16)
    c = trainable_random_run(tmp_path, model, tiny_clip, ["a warrior", "a knight", "a dog", "a robot"], device="cuda",
                             dtype="bfloat16", size=256, steps=2, guidance=3.5, shard_size=4)
    plain, plain_peak = _train(tmp_path / "run", tmp_path / "plain", "--set", "mixed_precision=bf16")
    ckpt, ckpt_peak = _train(tmp_path / "run", tmp_path / "ckpt", "--set", "mixed_precision=bf16",
                             "--set", "gradient_checkpointing=true")
    for rows in (plain, ckpt):
        assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    assert ckpt_peak < plain_peak, (ckpt_peak, plain_peak)
    print(f"{config}: peak CUDA memory of a bf16 train step {plain_peak / 2**30:.2f} GB, checkpointed {ckpt_peak / 2**30:.2f} GB")
    enc = ValueEncoder.from_pretrained(tmp_path / "plain")
    assert next(enc.parameters()).dtype == torch.float32
    png = tmp_path / "gen.png"
    assert main(["generate", "a bloody warrior", "--encoder", str(tmp_path / "plain"), "--out", str(png), "--config", str(c),
                 "--num-images", "1", "--device", "cuda", "--set", "render.steps=2"]) == 0
    assert np.asarray(Image.open(png).convert("RGB")).shape[:2] == (256, 256)
