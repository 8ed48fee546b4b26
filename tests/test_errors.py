"""Bad input and faults, table-driven: every case ends with exactly ONE stderr line `livo: error: ...`, a
non-zero exit, no traceback, and nothing created or overwritten (a snapshot of the whole folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import snapshot
from openai_server import OpenAIServer

from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-proj-Zq8RtW3vYx5Lm0Np7Kc2Hb9Jd4Fg6Ss1"   # shaped like a real key; never valid anywhere


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_sd, tiny_clip):
    """Everything the cases need, in one folder: configs, a dataset run, a trained encoder, broken inputs."""
    from helpers import make_run

    from livo_core.train import TrainConfig, train

    w = tmp_path_factory.mktemp("world")
    (w / "values.yaml").write_text(yaml.safe_dump({"values": [{
        "id": "bloody-inappropriate", "principle": "Bloody content is considered inappropriate", "kind": "toxicity",
        "concept": "blood", "classifier": {"name": "clip_concept", "threshold": 0.5}, "keywords": ["bloody"]}]}))
    (w / "seeds.yaml").write_text(yaml.safe_dump({"slots": {"s": ["a knight", "a dog"]}, "templates": {
        "bloody-inappropriate": [{"user": "a bloody {s}", "aligned": "{s}"}]}}))
    config = {"base_model": str(tiny_sd), "device": "cpu", "values_file": str(w / "values.yaml"),
              "seeds_file": str(w / "seeds.yaml"), "prompts_per_value": 2, "images_per_prompt": 1, "shard_size": 2,
              "render": {"steps": 1, "height": 32, "width": 32, "batch_size": 2},
              "judge": {"clip_model": tiny_clip, "clip_min_score": -1.0}}
    (w / "config.yaml").write_text(yaml.safe_dump(config))
    (w / "not-a-model").mkdir()
    (w / "not-a-model" / "README").write_text("just a folder")
    (w / "empty-clip").mkdir()
    (w / "clip-no-weights").mkdir()
    (w / "clip-no-weights" / "open_clip_config.json").write_text("{}")
    (w / "empty-values.yaml").write_text("values:\n")
    (w / "latin1-values.yaml").write_bytes("values:\n  - id: caf\xe9\n".encode("latin-1"))
    (w / "a-file").write_text("in the way")
    (w / "empty-run" / "shards").mkdir(parents=True)
    data = make_run(w / "data", tiny_sd, n_pairs=4)
    trained = train(TrainConfig(max_steps=1, batch_size=2, device="cpu", checkpoint_every=1), [data], w / "trained",
                    progress=False)
    broken = w / "broken-encoder"
    broken.mkdir()
    for f in trained.value_encoder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (w / "key-config.yaml").write_text(yaml.safe_dump({**config, "llm": {"api_key": KEY}}))
    (w / "key-in-env-name.yaml").write_text(yaml.safe_dump({**config, "llm": {"api_key_env": KEY}}))
    return w


def llm_config(world: Path, server: OpenAIServer, name: str, **llm) -> str:
    config = yaml.safe_load((world / "config.yaml").read_text())
    config.update(prompt_source="llm", llm={"base_url": server.base_url, "model": "test-model", **llm})
    (world / name).write_text(yaml.safe_dump(config))
    return str(world / name)


# (case id, argv with {w} for the world folder, what the line must say)
CASES = [
    ("dataset: base model is not a diffusers folder",
     "dataset --out {w}/new --config {w}/config.yaml --base-model {w}/not-a-model", "not a diffusers model folder"),
    ("dataset: base model missing", "dataset --out {w}/new --config {w}/config.yaml --base-model {w}/nope", "does not exist"),
    ("dataset: --device cuda without a GPU", "dataset --out {w}/new --config {w}/config.yaml --device cuda", "no CUDA GPU"),
    ("dataset: CLIP folder empty", "dataset --out {w}/new --config {w}/config.yaml --set judge.clip_model=local-dir:{w}/empty-clip",
     "has no open_clip_config.json"),
    ("dataset: CLIP folder without weights",
     "dataset --out {w}/new --config {w}/config.yaml --set judge.clip_model=local-dir:{w}/clip-no-weights", "has no weights"),
    ("dataset: --out is a file", "dataset --out {w}/a-file --config {w}/config.yaml", "is a file"),
    ("dataset: --out under a file", "dataset --out {w}/a-file/run --config {w}/config.yaml", "is a file, not a folder"),
    ("dataset: values file with empty values:", "dataset --out {w}/new --config {w}/config.yaml --set values_file={w}/empty-values.yaml",
     "needs a list of value principles"),
    ("dataset: values file not UTF-8", "dataset --out {w}/new --config {w}/config.yaml --set values_file={w}/latin1-values.yaml",
     "is not UTF-8"),
    ("dataset: override that is bad YAML", "dataset --out {w}/new --config {w}/config.yaml --set render.steps=[1", "not valid YAML"),
    ("dataset: an API key in a config field", "dataset --out {w}/new --config {w}/key-config.yaml", "llm.api_key"),
    ("dataset: an API key pasted into llm.api_key_env", "dataset --out {w}/new --config {w}/key-in-env-name.yaml", "llm.api_key_env"),
    ("dataset: an API key in --set", "dataset --out {w}/new --config {w}/config.yaml --set policy_text=" + KEY, "policy_text"),
    ("resume: not a run", "resume {w}/data-missing", "does not exist"),
    ("train: no complete shards", "train --data {w}/empty-run --out {w}/new", "no complete shards"),
    ("train: not a dataset run", "train --data {w}/not-a-model --out {w}/new", "not a livo dataset run"),
    ("train: missing base model", "train --data {w}/data --out {w}/new --set base_model={w}/nope", "does not exist"),
    ("train: base model not a diffusers folder", "train --data {w}/data --out {w}/new --set base_model={w}/not-a-model",
     "not a diffusers model folder"),
    ("train: --device cuda without a GPU", "train --data {w}/data --out {w}/new --set device=cuda", "no CUDA GPU"),
    ("train: --resume of a folder that is no checkpoint", "train --data {w}/data --out {w}/new --resume {w}/not-a-model",
     "is not a livo checkpoint"),
    ("train: the same --data twice", "train --data {w}/data --data {w}/data --out {w}/new", "more than once"),
    ("train: --out is a file", "train --data {w}/data --out {w}/a-file", "is a file"),
    ("train: --out holds another run", "train --data {w}/data --out {w}/trained --set learning_rate=0.5", "another training run"),
    ("train: --out holds this run already", "train --data {w}/data --out {w}/trained --set max_steps=1 --set batch_size=2 "
     "--set device=cpu --set checkpoint_every=1 --preset published", "--resume latest"),
    ("train: bad training config", "train --data {w}/data --out {w}/new --set learnig_rate=1", "'learnig_rate'"),
    ("generate: --encoder is a dataset run", "generate 'a bloody knight' --encoder {w}/data --out {w}/new.png --config {w}/config.yaml",
     "no value encoder in"),
    ("generate: truncated encoder weights", "generate 'a bloody knight' --encoder {w}/broken-encoder --out {w}/new.png "
     "--config {w}/config.yaml", "cannot be loaded"),
    ("generate: --out under a file", "generate 'a bloody knight' --encoder {w}/trained --out {w}/a-file/x.png --config {w}/config.yaml",
     "is a file, not a folder"),
    ("generate: --device cuda without a GPU", "generate 'a bloody knight' --encoder {w}/trained --out {w}/new.png "
     "--config {w}/config.yaml --device cuda", "no CUDA GPU"),
    ("nightly: bad config", "nightly --root {w}/new --set train.max_step=2", "'train.max_step'"),
    ("import-livo-data: missing source", "import-livo-data {w}/nope --out {w}/new", "not found"),
    ("an unknown subcommand", "fly", "invalid choice"),
]


def _check(world, capfd, argv: list[str], expected: str, before: dict) -> str:
    code = main(argv)
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("livo: error: "), (code, err[-3000:])
    assert expected in lines[0], lines[0]
    assert "Traceback" not in out + err and KEY not in out + err
    assert snapshot(world) == before, "a failed command created or changed files"
    return lines[0]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, capfd, case, argv, expected):
    import shlex

    if "cuda" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible: --device cuda is valid here")
    before = snapshot(world)
    try:
        _check(world, capfd, shlex.split(argv.format(w=world)), expected, before)
    except SystemExit as e:   # argparse's own errors exit through sys.exit (still one line)
        out, err = capfd.readouterr()
        assert e.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("livo: error: ") and expected in err, err
        assert snapshot(world) == before


@pytest.mark.parametrize("status", [429, 500])
def test_llm_errors_after_retries_are_one_line_naming_the_endpoint(world, capfd, prefect_harness, status):
    with OpenAIServer() as server:
        for _ in range(3):
            server.error(status, "overloaded")
        cfg = llm_config(world, server, f"llm-{status}.yaml", max_retries=1)
        before = snapshot(world)
        line = _check(world, capfd, ["dataset", "--out", str(world / "new"), "--config", cfg], server.base_url, before)
        assert server.count == 2   # the first try and one retry (llm.max_retries = 1)
    assert str(status) in line


def test_llm_endpoint_down_is_one_line(world, capfd, prefect_harness):
    server = OpenAIServer().start()
    server.stop()
    cfg = llm_config(world, server, "llm-down.yaml", max_retries=0)
    before = snapshot(world)
    line = _check(world, capfd, ["dataset", "--out", str(world / "new"), "--config", cfg], server.base_url, before)
    assert "unreachable" in line


def test_the_real_entry_point_prints_one_line_in_a_fresh_process(world):
    """The installed `livo` in a new process (library imports, Prefect's logging setup and all)."""
    for argv, expected in ((["dataset", "--out", str(world / "new"), "--config", str(world / "config.yaml"),
                             "--base-model", str(world / "not-a-model")], "not a diffusers"),
                           (["train", "--data", str(world / "data"), "--data", str(world / "data"), "--out", str(world / "new")],
                            "more than once")):
        r = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("livo: error: ") and expected in lines[0], r.stderr
        assert not (world / "new").exists()


def test_an_unexpected_error_is_one_line_and_verbose_raises_it(capfd):
    import errno

    from flows import console

    assert console.report(RuntimeError("boom\nsecond line")) == 1
    err = capfd.readouterr().err
    assert err == "livo: error: unexpected RuntimeError: boom; rerun with --verbose for the traceback and please report it\n"
    assert console.report(OSError(errno.ENOSPC, "No space left on device", "/data/x.parquet")) == 1
    assert "no space left on the device writing /data/x.parquet" in capfd.readouterr().err
    console._state["verbose"] = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            console.report(RuntimeError("boom"))
    finally:
        console._state["verbose"] = False
