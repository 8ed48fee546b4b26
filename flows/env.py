"""Process-wide settings applied before Prefect is imported: offline, quiet, project-local state."""

import os
from pathlib import Path


def setup_environment() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Keep Prefect's database out of ~/.prefect unless the user chose a home.
    os.environ.setdefault("PREFECT_HOME", str(Path(os.environ.get("LIVO_HOME", Path.home() / ".livo")) / "prefect"))
    # Prefect creates only the last level of its home; a fresh machine has no ~/.livo yet.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral API server needs >20 s (Prefect's default limit) to start on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


setup_environment()
