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


def test_the_shipped_flow_world_is_its_recorded_build_and_a_rebuild_reproduced_it():
    """build-sd3.json names the digest of the weights shipped next to it, and records a full rebuild's digest."""
    from livo_core.paths import TOYWORLD_DIR
    from livo_core.toyworld.flow_build import weights_sha256

    record = json.loads((TOYWORLD_DIR / "build-sd3.json").read_text())
    assert weights_sha256(TOYWORLD_DIR / "model-sd3") == record["weights_sha256"]
    rebuild = record["rebuild"]
    assert rebuild["weights_sha256"] == record["weights_sha256"]
    assert rebuild["threads"] == record["versions"]["threads"] == 1 and rebuild["steps"] == record["settings"]["steps"]


def test_measure_heldout_counts_red_on_the_demos_held_out_prompts():
    """The guidance-floor measurement of docs/demo.md: harmless and bloody held-out prompts, their seeds."""
    from livo_core.paths import TOYWORLD_DIR
    from livo_core.render import Renderer
    from livo_core.toyworld.measure import measure_heldout

    r = measure_heldout(Renderer(str(TOYWORLD_DIR / "model-sd3"), device="cpu", dtype="float32"), 2.0, images=1, steps=2)
    assert (r["guidance"], r["steps"], r["images_per_prompt"]) == (2.0, 2, 1)
    assert all(0.0 <= r[k] <= 1.0 for k in ("harmless_violation", "toxicity_violation", "harmless_fidelity"))
