"""The model-family seam (livo_core/families): detection from model_index.json, a clear error for an unsupported
family, and a second family defined here (SD 1.x under a renamed pipeline class) taken through dataset -> train
-> generate with one registration line, every stage reaching the model only through the family."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from diffusers import StableDiffusionPipeline

from livo_core.errors import LivoError
from livo_core.families import FAMILIES, family, family_for
from livo_core.families.sd import StableDiffusion
from livo_core.paths import TOYWORLD_DIR


class RenamedSDPipeline(StableDiffusionPipeline):
    """A pipeline class diffusers has never heard of (saved as such in model_index.json)."""


class RenamedSD(StableDiffusion):
    """The test-only family: SD 1.x's behaviour, its own pipeline class; counts every seam call."""

    name = "renamed-sd"
    pipeline_classes = ("RenamedSDPipeline",)
    calls: Counter = Counter()

    def pipeline_class(self):
        return RenamedSDPipeline


SEAM = ("load_pipeline", "load_parts", "encode_prompts", "attach_value_token", "pad_negative", "noised", "denoise", "generate")
for _name in SEAM:   # count, then do what SD does
    def _counted(self, *a, _name=_name, **kw):
        RenamedSD.calls[_name] += 1
        return getattr(StableDiffusion, _name)(self, *a, **kw)
    setattr(RenamedSD, _name, _counted)


@pytest.fixture
def renamed_world(tmp_path, monkeypatch):
    """The toy world's model saved under RenamedSDPipeline, and the family registered (the one line a new family adds)."""
    folder = tmp_path / "renamed" / "model"
    shutil.copytree(TOYWORLD_DIR / "model", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "RenamedSDPipeline"}))
    monkeypatch.setitem(FAMILIES, "renamed-sd", "test_families:RenamedSD")
    RenamedSD.calls.clear()
    return folder


def test_the_family_is_detected_from_the_model_folder(tiny_sd, renamed_world):
    assert family_for(str(tiny_sd)) is family("sd")
    assert type(family_for(str(renamed_world))).__name__ == "RenamedSD"


def test_an_unsupported_family_is_one_line_naming_the_supported_ones(tiny_sd, tmp_path):
    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(LivoError, match=r"is a KandinskyV22Pipeline, a model family livo does not support yet \(supported: "
                                        r".*StableDiffusionPipeline, StableDiffusionXLPipeline"):
        family_for(str(folder))
    shutil.rmtree(folder / "unet")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LivoError, match="lacks unet/"):
        family_for(str(folder))


@pytest.mark.slow
def test_a_second_family_runs_dataset_train_generate_through_the_seam(prefect_harness, renamed_world, tmp_path):
    from flows.dataset import dataset_flow
    from livo_core.infer import load_livo_pipeline
    from livo_core.shards import read_shards
    from livo_core.train import TrainConfig, train

    run = tmp_path / "run"
    dataset_flow(config={"base_model": str(renamed_world), "device": "cpu", "prompts_per_value": 2,
                         "images_per_prompt": 2, "values": ["bloody-inappropriate"]}, run_dir=str(run))
    kept, _ = read_shards([run])
    assert len(kept) > 0
    assert RenamedSD.calls["load_pipeline"] == 1 and RenamedSD.calls["generate"] >= 1 and RenamedSD.calls["encode_prompts"] >= 1

    cfg = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=2, learning_rate=1e-4, device="cpu")
    result = train(cfg, [run], tmp_path / "train", progress=False)      # base_model from the run's config.json
    assert result.steps == 2
    assert RenamedSD.calls["load_parts"] == 1
    assert RenamedSD.calls["denoise"] >= 4 and RenamedSD.calls["attach_value_token"] >= 2 and RenamedSD.calls["noised"] >= 2

    before = dict(RenamedSD.calls)
    pipe = load_livo_pipeline(str(renamed_world), tmp_path / "train", TOYWORLD_DIR / "values.yaml", device="cpu")
    assert isinstance(pipe.pipe, RenamedSDPipeline)
    out = pipe("a bloody red circle", num_images=2, steps=2, guidance_scale=5.0)
    assert out.value is not None and out.used_value_mask == [True, True] and len(out.images) == 2
    assert RenamedSD.calls["generate"] > before["generate"] and RenamedSD.calls["pad_negative"] > before.get("pad_negative", 0)
    assert torch.is_tensor(pipe.embeds_with_value(out.value.principle, ["a bloody red circle"]))
