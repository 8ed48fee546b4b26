"""Write one benchmark's results into its own marked section of docs/bench.md (other sections stay)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "bench.md"


def write_section(name: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between <!-- NAME:start --> and <!-- NAME:end --> (appended if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\n{body}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.DOTALL)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")


def machine() -> str:
    """CPU model and core count of this machine (from /proc/cpuinfo), for the docs."""
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"
