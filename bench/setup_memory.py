"""Peak memory of `bash scripts/setup.sh` on a fresh clone: the whole process tree's RSS, sampled every 0.2 s.

    .venv/bin/python bench/setup_memory.py [--variant default,no-cache] [--write-doc]

Each variant clones the repository into a temporary folder and runs its setup there (a new .venv: the
full install). "no-cache" sets PIP_NO_CACHE_DIR=1 (pip neither reads nor writes its wheel cache). The peak
is the largest sum of RSS over setup.sh and every process under it; the process that held the most at that
moment is named. Page cache (files the kernel keeps in memory) is not counted: it is reclaimable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def tree_rss(proc: psutil.Process) -> tuple[int, str, int]:
    total, top, top_rss = 0, "", 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, "", 0
    for p in procs:
        try:
            rss = p.memory_info().rss
            total += rss
            if rss > top_rss:
                top, top_rss = " ".join(p.cmdline()[:4])[:80], rss
        except psutil.Error:
            continue
    return total, top, top_rss


def used_memory() -> int:
    """The machine's memory in use that it cannot reclaim (MemTotal - MemAvailable): counts tmpfs files too."""
    vm = psutil.virtual_memory()
    return vm.total - vm.available


def measure(variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "livo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ}
        if variant == "no-cache":
            env["PIP_NO_CACHE_DIR"] = "1"
        t0 = time.perf_counter()
        proc = subprocess.Popen(["bash", "scripts/setup.sh"], cwd=clone, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ps = psutil.Process(proc.pid)
        peak = {"total": 0, "top": "", "top_rss": 0, "pip": 0, "used": 0}
        used0 = used_memory()
        stop = threading.Event()

        def watch():
            while not stop.wait(0.2):
                total, top, top_rss = tree_rss(ps)
                if total > peak["total"]:
                    peak.update(total=total, top=top, top_rss=top_rss)
                if "pip" in top:   # while pip runs (the last step is an import check, not pip)
                    peak["pip"] = max(peak["pip"], total)
                peak["used"] = max(peak["used"], used_memory() - used0)

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        _, err = proc.communicate()
        stop.set()
        t.join()
        if proc.returncode != 0:
            raise SystemExit(f"setup failed ({variant}): {err.decode()[-2000:]}")
        venv = sum(f.stat().st_size for f in (clone / ".venv").rglob("*") if f.is_file())
        return {"variant": variant, "seconds": time.perf_counter() - t0, "peak_gib": peak["total"] / 2**30,
                "pip_peak_gib": peak["pip"] / 2**30, "used_gib": peak["used"] / 2**30,
                "top": peak["top"], "top_gib": peak["top_rss"] / 2**30, "venv_gib": venv / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="default,no-cache")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    rows = []
    for v in args.variant.split(","):
        r = measure(v)
        rows.append(r)
        print(f"{v}: peak {r['peak_gib']:.2f} GiB (largest process {r['top_gib']:.2f} GiB: {r['top']}), while pip ran "
              f"{r['pip_peak_gib']:.2f} GiB; machine's unreclaimable memory +{r['used_gib']:.2f} GiB, "
              f"{r['seconds']:.0f} s, venv {r['venv_gib']:.1f} GiB", flush=True)
    if args.write_doc:
        from doc_section import machine, write_section

        write_section("setup-memory", "Setup: peak memory of `bash scripts/setup.sh` (fresh clone)", "\n".join([
            f"- command: `.venv/bin/python bench/setup_memory.py {' '.join(sys.argv[1:])}`",
            f"- machine: {machine()}",
            "",
            "| variant | peak RSS of the process tree (GiB) | largest process at that peak (GiB) | peak while pip ran (GiB) | "
            "machine's unreclaimable memory, rise (GiB) | seconds | .venv (GiB) |",
            "|---|---|---|---|---|---|---|",
            *[f"| {r['variant']} | {r['peak_gib']:.2f} | {r['top_gib']:.2f} (`{r['top']}`) | {r['pip_peak_gib']:.2f} | "
              f"{r['used_gib']:.2f} | {r['seconds']:.0f} | {r['venv_gib']:.1f} |" for r in rows],
        ]))


if __name__ == "__main__":
    main()
