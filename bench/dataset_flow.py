"""Dataset flow cost per shard at 10, 160 and 640 shards: does a shard cost the same in a big dataset?

Each N runs `livo dataset` (the real flow, one Prefect task per shard) in a fresh process on the tiny random
SD with 1 denoising step and 1 pair per shard, so what is left is the per-shard overhead (plan, Prefect task
bookkeeping, judge, writing) -- the part that used to grow with the dataset (every shard read the whole
plan.json). livo starts its own Prefect API server per run (SQLite, as a local `prefect server`); the bench
reports, in the steady state between the first and the last shard's marker, the flow process's CPU ms per
shard, the server's, wall ms, the one-off start and finish apart, and how often the client had to retry a
request the server answered with HTTP 503 (SQLite busy), from the Prefect client's own log. Each shard count
runs --repeats times, interleaved; the table shows medians.

    .venv/bin/python bench/dataset_flow.py [--shards 10,160,640] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VALUES = """
values:
  - id: bloody-inappropriate
    principle: "Bloody content is considered inappropriate"
    kind: toxicity
    concept: blood
    classifier: {name: clip_concept, threshold: 0.5}
    keywords: [bloody]
"""
SEEDS = """
slots:
  subject: [a warrior, a knight, a dog, a robot]
templates:
  bloody-inappropriate:
    - {user: "a bloody {subject}", aligned: "{subject}"}
"""


class Retries(logging.Handler):
    """Counts the Prefect client's retries of 503 answers (its debug log line)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record):
        if "retryable status code 503" in record.getMessage():
            self.count += 1


def one_run(n_shards: int, work: str, queue) -> None:
    import os

    import psutil
    import torch

    from flows import env  # noqa: F401
    from flows.console import quiet

    quiet(False)
    torch.set_num_threads(1)
    from flows.server import ensure_api

    ensure_api()
    from flows.dataset import dataset_flow
    from livo_core.config import load_config

    retries = Retries()
    client_log = logging.getLogger("prefect.client")
    client_log.setLevel(logging.DEBUG)
    client_log.addHandler(retries)
    w = Path(work)
    cfg = load_config(overrides={
        "base_model": str(w / "tiny_sd"), "device": "cpu", "values_file": str(w / "values.yaml"), "seeds_file": str(w / "seeds.yaml"),
        **shards_for(n_shards), "seed": n_shards,
        "render": {"steps": 1, "height": 32, "width": 32, "batch_size": 2, "guidance_scale": 1.0},
        "judge": {"clip_model": f"local-dir:{w / 'tiny_clip'}", "clip_min_score": -1.0}})
    me = psutil.Process()
    server = [c for c in me.children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]

    def cpu(p):
        t = p.cpu_times()
        return t.user + t.system

    # Steady state: CPU and wall time between the first and the last shard's marker, over the shards in
    # between -- the flow's one-off start (models, plan, Prefect flow run) is left out, so what is compared
    # across N is what one more shard costs. CPU times are sampled every 50 ms (cheap: /proc/PID/stat); the
    # markers' mtimes, read after the run, say when each shard finished (no directory listing while it runs).
    run_dir = w / f"run-{n_shards}"
    samples, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.05):
            samples.append((time.time(), cpu(me), cpu(server[0]) if server else 0.0))

    watcher = threading.Thread(target=watch, daemon=True)
    c0, s0, t0 = cpu(me), cpu(server[0]) if server else 0.0, time.perf_counter()
    watcher.start()
    summary = dataset_flow(config=cfg.model_dump(mode="json"), run_dir=str(run_dir))
    stop.set()
    watcher.join()
    wall, c1, s1 = time.perf_counter() - t0, cpu(me), cpu(server[0]) if server else 0.0
    done = sorted(m.stat().st_mtime for m in (run_dir / "markers").glob("*.complete.json"))

    def at(t):   # the sample nearest to time t
        return min(samples, key=lambda x: abs(x[0] - t))

    (ta, ca, sa), (tb, cb, sb) = at(done[0]), at(done[-1])
    queue.put({"shards": summary["shards"], "wall_s": wall, "client_cpu_s": c1 - c0, "server_cpu_s": s1 - s0 if server else None,
               "steady_shards": len(done) - 1, "steady_wall_s": tb - ta, "steady_client_cpu_s": cb - ca,
               "steady_server_cpu_s": sb - sa if server else None, "retries_503": retries.count, "pid": os.getpid()})


def shards_for(n: int) -> dict:
    """Config giving n one-pair shards (n + 1 for odd n): 2 prompts (the seed list has 4) of n / 2 images each."""
    return {"prompts_per_value": 2, "images_per_prompt": (n + 1) // 2, "shard_size": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="10,160,640")
    ap.add_argument("--repeats", type=int, default=3, help="runs per shard count; the table shows their median")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.shards.split(",")]
    if min(sizes) < 2:
        ap.error("every shard count must be >= 2 (the steady state lies between the first and the last shard)")

    from livo_core.families import build_random_model
    from livo_core.models import build_tiny_clip

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        build_random_model(w / "tiny_sd", "tiny-sd")
        build_tiny_clip(w / "tiny_clip")
        (w / "values.yaml").write_text(VALUES)
        (w / "seeds.yaml").write_text(SEEDS)
        for _ in range(args.repeats):   # interleaved, so a slow spell of the machine hits every N
            for n in sizes:
                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                proc = ctx.Process(target=one_run, args=(n, tmp, queue))
                proc.start()
                r = {**queue.get(), "asked": n}
                proc.join()
                shutil.rmtree(w / f"run-{n}")
                k = r["steady_shards"]
                r["client_cpu_ms_per_shard"] = 1000 * r["steady_client_cpu_s"] / k
                r["server_cpu_ms_per_shard"] = 1000 * r["steady_server_cpu_s"] / k if r["steady_server_cpu_s"] is not None else None
                r["wall_ms_per_shard"] = 1000 * r["steady_wall_s"] / k
                r["startup_s"] = r["wall_s"] - r["steady_wall_s"]
                runs.append(r)
                print(f"{r['shards']:5d} shards: flow CPU {r['client_cpu_ms_per_shard']:.0f} ms/shard, server CPU "
                      f"{r['server_cpu_ms_per_shard']:.0f} ms/shard, wall {r['wall_ms_per_shard']:.0f} ms/shard "
                      f"(steady state over {k} shards; start and finish {r['startup_s']:.1f} s), "
                      f"503 retries {r['retries_503']}", flush=True)
    # per N: the median of its runs (the retries: every run's count)
    results = []
    for n in sizes:
        mine = [r for r in runs if r["asked"] == n]
        row = {key: statistics.median(r[key] for r in mine) for key in
               ("client_cpu_ms_per_shard", "server_cpu_ms_per_shard", "wall_ms_per_shard", "startup_s")}
        results.append({"shards": mine[0]["shards"], **row, "retries_503": [r["retries_503"] for r in mine]})

    per = [r["client_cpu_ms_per_shard"] for r in results]
    spread = (max(per) - min(per)) / min(per)
    print(json.dumps({"results": results, "runs": runs, "spread": spread}))
    if args.write_doc:
        import torch

        from doc_section import machine, write_section

        rows = "\n".join(f"| {r['shards']} | {r['client_cpu_ms_per_shard']:.0f} | {r['server_cpu_ms_per_shard']:.0f} | "
                         f"{r['wall_ms_per_shard']:.0f} | {r['startup_s']:.1f} | {', '.join(map(str, r['retries_503']))} |" for r in results)
        write_section("dataset-flow", "Dataset flow: cost per shard vs the number of shards", "\n".join([
            f"- command: `.venv/bin/python bench/dataset_flow.py {' '.join(sys.argv[1:])}`",
            f"- machine: {machine()}, 1 torch thread, torch {torch.__version__}",
            "- workload: `dataset_flow` on the tiny random SD, 1 denoising step, 1 pair per shard (the per-shard overhead is what "
            f"is measured), one Prefect task per shard, livo's own local Prefect API server (SQLite); median of {args.repeats} "
            "interleaved runs per shard count, each in a fresh process",
            "",
            "| shards | flow CPU ms/shard | server CPU ms/shard | wall ms/shard | start + finish (s) | HTTP 503 retries (each run) |",
            "|---|---|---|---|---|---|",
            rows,
            "",
            "- per shard = steady state: time between the first and the last shard's marker over the shards in between "
            "(the flow's one-off start -- models, plan, the Prefect flow run -- and its finish are the start + finish column)",
            f"- flow CPU per shard spread across shard counts: **{100 * spread:.1f}%** (goal <= 20%)",
        ]))


if __name__ == "__main__":
    main()
