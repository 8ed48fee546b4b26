"""SD 2.x through the SD family: v-prediction, a zero-terminal-SNR schedule and a text width of its own, trained
and generated through the seam (its real shape, SD 2.1's, is validated on the meta device in test_house.py)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_run

from livo_core.families import build_random_model, family, family_for


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("sd2") / "tiny-sd2", "tiny-sd2")


@pytest.mark.slow
def test_sd2_trains_on_velocity_with_zero_terminal_snr_and_generates(tiny_sd2, tmp_path):
    from livo_core.infer import load_livo_pipeline
    from livo_core.paths import TOYWORLD_DIR
    from livo_core.train import TrainConfig, load_model_parts, train

    assert family_for(str(tiny_sd2)) is family("sd")
    parts = load_model_parts(str(tiny_sd2))
    sched = parts.noise_scheduler
    assert sched.config.prediction_type == "v_prediction" and float(sched.alphas_cumprod[-1]) < 1e-6   # SNR 0 at t = 999
    latents, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([999, 10])
    noisy, target = parts.family.noised(sched, latents, noise, t)
    assert torch.allclose(target, sched.get_velocity(latents, noise, t))   # the target is the velocity, not the noise

    run = make_run(tmp_path / "run", tiny_sd2, n_pairs=8)
    cfg = TrainConfig(max_steps=3, batch_size=4, learning_rate=1e-4, min_snr_gamma=5.0, device="cpu")
    result = train(cfg, [run], tmp_path / "out", progress=False)
    assert result.steps == 3 and math.isfinite(result.last_metrics["loss"])   # snr 0 weighs 1, never NaN

    pipe = load_livo_pipeline(str(tiny_sd2), tmp_path / "out", TOYWORLD_DIR / "values.yaml", device="cpu")
    assert pipe.family.token_width(pipe.pipe) == 48 == pipe.value_encoder.config.hidden_size
    out = pipe("a bloody red circle", num_images=2, steps=2, guidance_scale=5.0, height=32, width=32)
    assert out.used_value_mask == [True, True] and len(out.images) == 2


def test_livo_model_random_builds_any_shape_config(tmp_path, capsys):
    from flows.cli import main

    assert main(["model", "random", "tiny-sd2", "--out", str(tmp_path / "m")]) == 0
    assert "sd family" in capsys.readouterr().out and family_for(str(tmp_path / "m")).folder_token_width(tmp_path / "m") == 48
    assert main(["model", "random", "tiny-clip", "--out", str(tmp_path / "c")]) != 0
    assert "unknown shape config 'tiny-clip'" in capsys.readouterr().err and not (tmp_path / "c").exists()
