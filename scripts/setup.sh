#!/usr/bin/env bash
# Create .venv with the exact versions of constraints.txt and install livo in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/livo ] || ! .venv/bin/python -c "import livo_core, flows, prefect, diffusers, open_clip" 2>/dev/null; then
  python3 -m venv .venv
  # torch's pin must be in the same pip command as the rest, or pip replaces it (see docs/install.md).
  .venv/bin/pip install -q -c constraints.txt -e ".[test,dask]" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import livo_core, flows, prefect, diffusers, open_clip, nudenet" 
