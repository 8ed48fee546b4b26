"""Shared test fixtures: offline/quiet environment, a Prefect test harness, tiny random-weight models.

The environment is set at import time, before any test imports prefect, onnxruntime or the HF hub, and
is inherited by subprocesses (CLI tests). Every test runs offline: a missing model fails fast, nothing
phones home, and Prefect keeps its state in a throwaway folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="livo-tests-"))
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)

os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "ORT_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_STATE / "prefect"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "LIVO_CACHE": str(_STATE / "cache"),          # offline CLIP tokenizer lands here
    "HF_DATASETS_CACHE": str(_STATE / "hf-datasets"),   # `datasets` caches what it loads
    "TOKENIZERS_PARALLELISM": "false",
})
# A real key must never be used by a test; tests that need one set a fake value themselves.
os.environ.pop("OPENAI_API_KEY", None)

ROOT = Path(__file__).resolve().parent.parent
TOYWORLD_MODEL = ROOT / "livo_core" / "data" / "toyworld" / "model"


@pytest.fixture(scope="session")
def prefect_harness() -> str:
    """A temporary Prefect database and API for the whole session (~6.5 s, once). Request it in flow tests.

    Yields the API URL: pass it as PREFECT_API_URL to a `livo` subprocess so it uses this server instead of
    starting its own (which costs 10-30 s per process).
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):   # generous: the 2 cores are shared
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Folder of a random-weight StableDiffusionPipeline (livo_core/data/model_configs/tiny-sd.json), ~17 MB."""
    from livo_core.families import build_random_model

    return build_random_model(tmp_path_factory.mktemp("tiny_sd"), "tiny-sd")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """`local-dir:<folder>` name of a random-weight open_clip model (livo_core/data/model_configs/tiny-clip.json)."""
    from livo_core.models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def toyworld_model() -> Path:
    """The toy world's trained SD folder (the default config's base model); skips the test until it is built."""
    if not (TOYWORLD_MODEL / "model_index.json").is_file():
        pytest.skip(f"toy world model not built yet ({TOYWORLD_MODEL} missing): run `livo toyworld build`")
    return TOYWORLD_MODEL


# Two values (one toxicity, one bias) with their own seed templates: small, offline, independent of the
# toy world's data. Judged by CLIP-based classifiers, which run on any open_clip model.
_TEST_VALUES = """
values:
  - id: bloody-inappropriate
    principle: "Bloody content is considered inappropriate"
    kind: toxicity
    concept: blood
    classifier: {name: clip_concept, threshold: 0.5}
    keywords: [bloody, blood, gore]
  - id: gender-equality
    principle: "Gender equality: people of every gender should be equally represented"
    kind: bias
    concept: gender bias
    attributes: [male, female]
    majority_attribute: male
    classifier: {name: clip_attribute, threshold: 0.5}
    keywords: [doctor, nurse]
"""
_TEST_SEEDS = """
slots:
  subject: [a warrior, a knight, a dog, a robot]
  setting: [in a forest, on a city street]
  career: [doctor, nurse, pilot, chef]
templates:
  bloody-inappropriate:
    - {user: "a bloody {subject} {setting}", aligned: "a {subject} {setting}"}
  gender-equality:
    - {user: "a photo of a {career}", aligned: "a photo of a {attribute} {career}"}
"""


@pytest.fixture
def tiny_config(tmp_path, tiny_sd, tiny_clip):
    """make(**overrides) -> a RunConfig dict on the tiny models: 2 values x 2 prompts x 2 seeds, shards of 3.

    Random models make the judge reject most pairs; clip_min_score=-1 lets the CLIP check pass.
    """
    (tmp_path / "values.yaml").write_text(_TEST_VALUES)
    (tmp_path / "seeds.yaml").write_text(_TEST_SEEDS)

    def make(**overrides) -> dict:
        config = {
            "base_model": str(tiny_sd), "device": "cpu",
            "values_file": str(tmp_path / "values.yaml"), "seeds_file": str(tmp_path / "seeds.yaml"),
            "prompts_per_value": 2, "images_per_prompt": 2, "shard_size": 3, "seed": 0,
            "render": {"steps": 2, "height": 32, "width": 32, "batch_size": 4, "guidance_scale": 2.0},
            "judge": {"clip_model": tiny_clip, "clip_min_score": -1.0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                config[key] = {**config.get(key, {}), **value}
            else:
                config[key] = value
        return config

    return make


@pytest.fixture
def one_torch_thread():
    """One torch thread for this test: on 2 cores shared with other jobs, 2 threads ran ~10x slower (FINDINGS)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world_pairs(tmp_path_factory, tiny_sd):
    """A dataset run of 8 real toy-world pairs (clean vs bloody, same seed), base model = tiny SD."""
    import json

    from livo_core.render import image_to_bytes
    from livo_core.shards import write_shard
    from livo_core.toyworld.world import render

    run = tmp_path_factory.mktemp("pairs")
    rows = []
    for i, subject in enumerate(["blue circle", "green square", "purple triangle", "white circle"]):
        for seed in range(2):
            rows.append({"jpg_0": image_to_bytes(render(f"a {subject}", seed)),
                         "jpg_1": image_to_bytes(render(f"a bloody {subject}", seed)), "label_0": 1.0, "label_1": 0.0,
                         "caption": f"a bloody {subject}", "pair_id": f"p{i}{seed}", "value": "no blood",
                         "value_id": "bloody", "category": "toxicity", "base_model": str(tiny_sd)})
    write_shard(run, "bloody-00000", rows, [], {})
    (run / "config.json").write_text(json.dumps({"base_model": str(tiny_sd)}))
    return run
