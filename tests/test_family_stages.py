"""The evaluation stage on every registered family (tiny random-weight models): base, livo, a negative prompt where the
family renders an unconditional branch, a fine-tuned denoiser folder; SLD refused where diffusers has none, before
anything is written; a LoRA of another family refused from its header."""

from __future__ import annotations

import pytest

from livo_core.errors import LivoError
from livo_core.families import build_random_model, family
from livo_core.paths import TOYWORLD_DIR

FAMILY_CONFIGS = {"sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def model(request, tmp_path_factory):
    """(family name, model folder, an untrained value encoder folder of that family)."""
    from livo_core.train import load_model_parts

    folder = tmp_path_factory.mktemp(request.param)
    model = build_random_model(folder / "model", FAMILY_CONFIGS[request.param])
    family(request.param).value_encoder(load_model_parts(str(model))).save_pretrained(folder / "encoder")
    return request.param, model, folder / "encoder"


def _config(model_dir, encoder, methods, **kw):
    from livo_core.evaluate import load_eval_config

    return load_eval_config(overrides={
        "base_model": str(model_dir), "encoder": str(encoder), "values_file": str(TOYWORLD_DIR / "values.yaml"),
        "device": "cpu", "prompt_sets": [{"name": "t", "path": str(TOYWORLD_DIR.parent / "eval" / "toyworld-heldout-toxicity.jsonl"),
                                          "group": "toxicity", "value_id": "bloody-inappropriate", "limit": 2}],
        "methods": methods, "images_per_prompt": 1, "inference": {"steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32},
        "fid": False, "clip_score_model": None, "grids": 0, "quality": "toyworld", **kw})


@pytest.mark.slow
def test_evaluate_base_livo_negative_and_a_denoiser_folder(model, tmp_path):
    from livo_core.evaluate import Evaluation
    from livo_core.train import load_model_parts

    name, model_dir, encoder = model
    denoiser = tmp_path / "denoiser"
    load_model_parts(str(model_dir)).unet.save_pretrained(str(denoiser))          # the same weights, as a method
    methods = [{"name": "base", "kind": "base"}, {"name": "livo", "kind": "livo"},
               {"name": "copy", "kind": "unet", "unet": str(denoiser)}]
    if family(name).uses_negative:
        methods.append({"name": "negative-prompt", "kind": "negative-prompt", "negative_prompt": "blood"})
    ev = Evaluation(_config(model_dir, encoder, methods), tmp_path / "out")
    ev.check()
    results = ev.run(progress=False)
    assert set(results) == {m["name"] for m in methods}
    assert results["livo"]["retrieval_accuracy"] == 1.0 and 0 <= results["livo"]["violation_rate"] <= 1
    base, copy = (sorted((tmp_path / "out" / "images" / m).rglob("*.png")) for m in ("base", "copy"))
    assert [p.read_bytes() for p in base] == [p.read_bytes() for p in copy]   # a denoiser folder of the same weights


def test_sld_is_refused_before_anything_is_written(model, tmp_path):
    from livo_core.evaluate import Evaluation

    name, model_dir, encoder = model
    ev = Evaluation(_config(model_dir, encoder, [{"name": "base", "kind": "base"}, {"name": "sld", "kind": "sld", "sld": "strong"}]),
                    tmp_path / "out")
    with pytest.raises(LivoError, match="SLD .* SD 1.x / 2.x only"):
        ev.check()
    assert not (tmp_path / "out").exists()


def test_a_lora_of_another_family_is_refused_from_its_header(model, tmp_path):
    import torch
    from safetensors.torch import save_file

    from livo_core.evaluate import Evaluation

    name, model_dir, encoder = model
    lora = tmp_path / "lora"
    lora.mkdir()
    other = "transformer" if name == "sdxl" else "unet"   # a LoRA made for the other kind of denoiser
    save_file({f"{other}.blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 768)}, str(lora / "pytorch_lora_weights.safetensors"))
    ev = Evaluation(_config(model_dir, encoder, [{"name": "base", "kind": "base"}, {"name": "l", "kind": "unet", "unet": str(lora)}]),
                    tmp_path / "out")
    with pytest.raises(LivoError, match=rf"the LoRA in .* is for a .* model .* but .* is a {name} model"):
        ev.check()


@pytest.mark.slow
def test_gradient_checkpointing_through_the_frozen_denoiser_changes_no_number(model, tmp_path, monkeypatch):
    """gradient_checkpointing = true recomputes the denoiser's (and the towers') activations in backward: the same
    losses and the same trained encoder as without, on every family."""
    import json

    import torch
    from helpers import make_run

    from livo_core.encoder import ValueEncoder
    from livo_core.train import TrainConfig, train

    name, model_dir, _ = model
    run = make_run(tmp_path / "run", model_dir, n_pairs=4)
    checkpointed = []
    original = torch.utils.checkpoint.checkpoint

    def counting(fn, *a, **kw):   # diffusers' blocks recompute through this function
        checkpointed.append(type(getattr(fn, "__self__", fn)).__name__)
        return original(fn, *a, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    logs, encoders = [], []
    for ckpt in (False, True):
        out = tmp_path / f"out-{ckpt}"
        cfg = TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-4, device="cpu", gradient_checkpointing=ckpt)
        train(cfg, [run], out, progress=False)
        logs.append([json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()])
        encoders.append(ValueEncoder.from_pretrained(out))
    assert checkpointed                                      # the frozen denoiser's blocks were recomputed
    assert logs[0] == pytest.approx(logs[1], rel=1e-5)
    for a, b in zip(encoders[0].parameters(), encoders[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_a_lora_on_the_denoiser_is_an_evaluation_method(model, tmp_path):
    """A diffusers LoRA (peft) of the family's own denoiser, saved as diffusers saves it, loads as a `kind = "unet"`
    method: its header passes the family check and its images differ from base's (its B matrices are not zero)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from livo_core.evaluate import Evaluation
    from livo_core.train import load_model_parts

    name, model_dir, encoder = model
    backbone = family(name)
    denoiser = load_model_parts(str(model_dir)).unet
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v"]))
    torch.manual_seed(0)
    for param_name, p in denoiser.named_parameters():
        if "lora_B" in param_name:
            p.data.normal_(0, 0.5)
    backbone.pipeline_class().save_lora_weights(str(tmp_path / "lora"), **{
        f"{backbone.denoiser_component}_lora_layers": get_peft_model_state_dict(denoiser)})
    methods = [{"name": "base", "kind": "base"}, {"name": "lora", "kind": "unet", "unet": str(tmp_path / "lora")}]
    ev = Evaluation(_config(model_dir, encoder, methods), tmp_path / "out")
    ev.check()
    ev.run(progress=False)
    base, lora = (sorted((tmp_path / "out" / "images" / m).rglob("*.png")) for m in ("base", "lora"))
    assert len(base) == len(lora) == 2 and [p.read_bytes() for p in base] != [p.read_bytes() for p in lora]


@pytest.mark.slow
def test_diffusion_dpo_trains_the_familys_own_denoiser(model, world_pairs, tmp_path):
    """The Diffusion-DPO baseline (trains = unet) on any family's denoiser, UNet or transformer (flow-matching
    errors in the same sigmoid loss): its first loss is log 2 (policy = reference), weights change, and the trained
    denoiser loads as an evaluation method of that family."""
    import math

    import torch

    from livo_core.baselines import train_unet_dpo
    from livo_core.evaluate import Evaluation
    from livo_core.train import TrainConfig

    name, model_dir, encoder = model
    cfg = TrainConfig(base_model=str(model_dir), loss="dpo", trains="unet", learning_rate=1e-3, batch_size=2,
                      max_steps=2, checkpoint_every=2, log_every=1, device="cpu")
    res = train_unet_dpo(cfg, [world_pairs], tmp_path / "dpo", progress=False)
    assert res.steps == 2 and math.isclose(float((tmp_path / "dpo" / "train_log.csv").read_text().splitlines()[1].split(",")[1]),
                                           math.log(2), abs_tol=1e-5)
    base = family(name).load_denoiser(model_dir / family(name).denoiser_component, "cpu", torch.float32)
    trained = family(name).load_denoiser(tmp_path / "dpo" / "unet", "cpu", torch.float32)
    assert type(trained) is type(base) and any(not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters()))
    ev = Evaluation(_config(model_dir, encoder, [{"name": "base", "kind": "base"},
                                                 {"name": "dpo", "kind": "unet", "unet": str(tmp_path / "dpo" / "unet")}]),
                    tmp_path / "out")
    ev.check()
    assert set(ev.run(progress=False)) == {"base", "dpo"}
