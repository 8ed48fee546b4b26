"""TEST HOOK: named points where a test can kill the process, to prove that no kill loses or duplicates work.

    LIVO_KILL_AT=train.log:3            SIGKILL right after the 3rd training log row is written
    LIVO_KILL_AT=nightly.register       SIGKILL right after the nightly registered its candidate

Points (POINTS below; a name not in it is an error, so a typo cannot make a test pass without killing):
train.log, train.checkpoint, train.piece (a cache piece written), nightly.<step> (see flows/nightly.py),
export.file (a file linked into the export's temporary folder), evaluate.image (an evaluation image stored),
evaluate.judged (a verdict cached), import.shard (an imported shard written), llm.answer (an LLM answer cached).
Unset (always, outside tests) it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset({
    "train.log", "train.checkpoint", "train.piece",
    "nightly.data", "nightly.heldout", "nightly.train", "nightly.evaluate", "nightly.register", "nightly.decide",
    "nightly.prune", "export.file", "evaluate.image", "evaluate.judged", "import.shard",
    "llm.answer",
})

_hits: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process if LIVO_KILL_AT names this point (and this is its N-th hit, N default 1)."""
    spec = os.environ.get("LIVO_KILL_AT")
    if not spec:
        return
    if name not in POINTS:
        raise RuntimeError(f"kill_point({name!r}) is not in livo_core.faults.POINTS")
    _hits[name] = _hits.get(name, 0) + 1
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point not in POINTS:
            raise RuntimeError(f"LIVO_KILL_AT names {point!r}, not a kill point: one of {', '.join(sorted(POINTS))}")
        if point == name and _hits[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
