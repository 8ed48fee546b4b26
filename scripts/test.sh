#!/usr/bin/env bash
# Set up (if needed) and run the tests offline.
#   bash scripts/test.sh            the whole suite (CI): also builds the real LLM server once (scripts/llm_server.sh)
#   bash scripts/test.sh --fast     the inner loop: unit tests and a CPU smoke test of each entry point
#                                   (-m "not slow and not sd15 and not real_width and not llm_server and not cuda"; docs/bench.md)
#   bash scripts/test.sh ARGS...    pytest with ARGS (e.g. tests/test_llm.py -x); the LLM server tests run if built
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ORT_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
if [ $# -eq 0 ]; then
  bash scripts/llm_server.sh >/dev/null     # ~4 min the first time; tests/test_llm_server.py must then run
  export LIVO_REQUIRE_LLM_SERVER=1
  set -- --durations=25
elif [ "$1" = "--fast" ]; then
  shift
  set -- -m "not slow and not sd15 and not real_width and not llm_server and not cuda" --durations=10 "$@"
fi
.venv/bin/python -m pytest -q "$@"
