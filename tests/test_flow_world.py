"""The flow-matching toy world's builder (livo_core/toyworld/flow_build.py): deterministic for a seed with one
thread, a loadable SD 3 folder of the sd3 family that renders 32 px scenes."""

from __future__ import annotations

import json

import pytest
import torch

from livo_core.families import family, family_for


@pytest.mark.slow
def test_a_short_flow_world_build_twice_gives_identical_weights(tmp_path, one_torch_thread):
    from livo_core.toyworld.flow_build import build_flow_world, weights_sha256

    a = build_flow_world(tmp_path / "a", steps=3, progress=False)
    b = build_flow_world(tmp_path / "b", steps=3, progress=False)
    assert a["weights_sha256"] == b["weights_sha256"] == weights_sha256(tmp_path / "a" / "model-sd3")
    assert json.loads((tmp_path / "a" / "build-sd3.json").read_text())["settings"]["steps"] == 3
    model = tmp_path / "a" / "model-sd3"
    assert family_for(str(model)) is family("sd3") and family("sd3").native_resolution(model) == 32
    pipe = family("sd3").load_pipeline(str(model), device="cpu")
    # built without T5 rows (the folder says so): 77 CLIP rows and the packed pooled row, not diffusers' 77 + 256
    assert family("sd3").encode_prompts(pipe, ["a red circle"]).shape == (1, 77 + 1, 256)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
