"""livo_core: the LiVO library. One module per stage, in the order data flows:

values -> prompts -> render -> judge -> shards -> encoder/loss -> train -> retrieve/infer -> metrics

No Prefect import lives here; `flows/` wires these stages into Prefect flows.
"""

import os as _os

# Offline and quiet by default: these must be set before onnxruntime / HF hub are imported.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("DO_NOT_TRACK", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Library progress bars ("Loading weights", "Loading pipeline components") interleave with livo's own
# progress and fill logs with cursor escapes; `--verbose` (LIVO_VERBOSE=1) keeps them.
if not _os.environ.get("LIVO_VERBOSE"):
    _os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
