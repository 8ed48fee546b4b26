"""`livo train` under `accelerate launch` with two CPU processes (gloo): disjoint pairs per global batch, only
the main process writes, `--resume latest` exact under two processes, the same encoder on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data: Path, out: Path, api_url: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    # accelerate's torch.distributed launcher (`--multi_gpu` is its name; on CPU livo's Accelerator uses gloo)
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_port()), "-m", "flows.cli", "train", "--data", str(data),
           "--out", str(out), "--set", "device=cpu", "--set", "batch_size=3", "--set", "checkpoint_every=2",
           "--set", "learning_rate=1e-3", "--set", "log_every=1", *extra]
    trace_dir = Path(tempfile.mkdtemp(prefix="livo-trace-"))   # each rank writes its own file there
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIVO_TRACE_RANKS": str(trace_dir), "PREFECT_API_URL": api_url}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    traces = sorted((json.loads(f.read_text()) for f in trace_dir.glob("rank-*.json")), key=lambda t: t["rank"])
    return r, traces


def _encoder_sha(folder: Path) -> str:
    import hashlib

    from livo_core.encoder import ValueEncoder

    weights = ValueEncoder.from_pretrained(folder).state_dict()
    return hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()


@pytest.mark.slow
def test_two_processes_train_disjoint_pairs_write_once_and_resume_exactly(prefect_harness, tiny_sd, tmp_path):
    from helpers import make_run

    from livo_core.train import Sampler

    data = make_run(tmp_path / "data", tiny_sd, n_pairs=14)
    whole, traces = launch(data, tmp_path / "whole", prefect_harness, "--set", "max_steps=4")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert [(t["rank"], t["of"]) for t in traces] == [(0, 2), (1, 2)]
    # every step: the two processes took the two halves of one global batch of the shared sample stream
    sampler, position = Sampler(14, 0), 0
    for step, (a, b) in enumerate(zip(traces[0]["pairs"], traces[1]["pairs"])):
        batch, position = sampler.take(6, position)
        assert a == list(batch[:3]) and b == list(batch[3:]) and not set(a) & set(b), step
    # the same encoder on both ranks, and it is the one the main process saved
    assert traces[0]["encoder_sha256"] == traces[1]["encoder_sha256"] == _encoder_sha(tmp_path / "whole" / "value_encoder")
    log = pd.read_csv(tmp_path / "whole" / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4]                                    # written once, by the main process
    assert whole.stdout.count("livo: trained 4 steps") == 1
    ckpt = tmp_path / "whole" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == ["lr_scheduler.pt", "optimizer.pt", "rng-0.pt", "rng-1.pt",
                                                       "state.json", "value_encoder"]

    # the same run in two parts: 2 steps, then --resume latest to 4, both under two processes
    half, _ = launch(data, tmp_path / "split", prefect_harness, "--set", "max_steps=2")
    assert half.returncode == 0, half.stderr[-3000:]
    rest, traces2 = launch(data, tmp_path / "split", prefect_harness, "--set", "max_steps=4", "--resume", "latest")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert [t["steps_from"] for t in traces2] == [2, 2]
    split = pd.read_csv(tmp_path / "split" / "train_log.csv")
    assert list(split["step"]) == [1, 2, 3, 4] and np.array_equal(split["loss"].values, log["loss"].values)
    assert _encoder_sha(tmp_path / "split" / "value_encoder") == traces[0]["encoder_sha256"]
