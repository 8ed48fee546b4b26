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
    "TOKENIZERS_PARALLELISM": "false",
})
# A real key must never be used by a test; tests that need one set a fake value themselves.
os.environ.pop("OPENAI_API_KEY", None)

ROOT = Path(__file__).resolve().parent.parent
TOYWORLD_MODEL = ROOT / "data" / "toyworld" / "model"


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect database and API for the whole session (~6.5 s, once). Request it in flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """Folder of a random-weight StableDiffusionPipeline (data/model_configs/tiny-sd.json), ~17 MB."""
    from livo_core.models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """`local-dir:<folder>` name of a random-weight open_clip model (data/model_configs/tiny-clip.json)."""
    from livo_core.models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def toyworld_model() -> Path:
    """The toy world's trained SD folder (the default config's base model); skips the test until it is built."""
    if not (TOYWORLD_MODEL / "model_index.json").is_file():
        pytest.skip(f"toy world model not built yet ({TOYWORLD_MODEL} missing): run `livo toyworld build`")
    return TOYWORLD_MODEL
