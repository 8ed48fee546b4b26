"""Dataset flow cost per shard at 10, 160 and 640 shards: does a shard cost the same in a big dataset?

Each N runs `livo dataset` (the real flow, one Prefect task per shard) in a fresh process on the tiny random
SD with 1 denoising step and 1 pair per shard, so what is left is the per-shard overhead (plan, Prefect task
bookkeeping, judge, writing) -- the part that used to grow with the dataset (every shard read the whole
plan.json). livo starts its own Prefect API server per run (SQLite, as a local `prefect server`); the bench
reports the flow process's CPU seconds per shard, the server's, wall seconds, and how often the client had
to retry a request the server answered with HTTP 503 (SQLite busy), from the Prefect client's own log.

    .venv/bin/python bench/dataset_flow.py [--shards 10,160,640] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import tempfile
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
        "prompts_per_value": 4, "images_per_prompt": (n_shards + 3) // 4, "shard_size": 1, "seed": n_shards,
        "render": {"steps": 1, "height": 32, "width": 32, "batch_size": 2, "guidance_scale": 1.0},
        "judge": {"clip_model": f"local-dir:{w / 'tiny_clip'}", "clip_min_score": -1.0}})
    me = psutil.Process()
    server = [c for c in me.children(recursive=True) if "uvicorn" in " ".join(c.cmdline())]
    c0 = me.cpu_times()
    s0 = server[0].cpu_times() if server else None
    t0 = time.perf_counter()
    summary = dataset_flow(config=cfg.model_dump(mode="json"), run_dir=str(w / f"run-{n_shards}"))
    wall = time.perf_counter() - t0
    c1 = me.cpu_times()
    s1 = server[0].cpu_times() if server else None
    queue.put({"shards": summary["shards"], "wall_s": wall, "client_cpu_s": (c1.user + c1.system) - (c0.user + c0.system),
               "server_cpu_s": ((s1.user + s1.system) - (s0.user + s0.system)) if server else None,
               "retries_503": retries.count, "pid": os.getpid()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="10,160,640")
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.shards.split(",")]

    from livo_core.models import build_tiny_clip, build_tiny_sd

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        build_tiny_sd(w / "tiny_sd")
        build_tiny_clip(w / "tiny_clip")
        (w / "values.yaml").write_text(VALUES)
        (w / "seeds.yaml").write_text(SEEDS)
        for n in sizes:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=one_run, args=(n, tmp, queue))
            proc.start()
            r = queue.get()
            proc.join()
            r["client_cpu_ms_per_shard"] = 1000 * r["client_cpu_s"] / r["shards"]
            r["server_cpu_ms_per_shard"] = 1000 * r["server_cpu_s"] / r["shards"] if r["server_cpu_s"] is not None else None
            r["wall_ms_per_shard"] = 1000 * r["wall_s"] / r["shards"]
            results.append(r)
            print(f"{r['shards']:5d} shards: flow CPU {r['client_cpu_ms_per_shard']:.0f} ms/shard, server CPU "
                  f"{r['server_cpu_ms_per_shard']:.0f} ms/shard, wall {r['wall_ms_per_shard']:.0f} ms/shard, "
                  f"503 retries {r['retries_503']}", flush=True)

    per = [r["client_cpu_ms_per_shard"] for r in results]
    spread = (max(per) - min(per)) / min(per)
    print(json.dumps({"results": results, "spread": spread}))
    if args.write_doc:
        import torch

        from doc_section import machine, write_section

        rows = "\n".join(f"| {r['shards']} | {r['client_cpu_ms_per_shard']:.0f} | {r['server_cpu_ms_per_shard']:.0f} | "
                         f"{r['wall_ms_per_shard']:.0f} | {r['retries_503']} |" for r in results)
        write_section("dataset-flow", "Dataset flow: cost per shard vs the number of shards", "\n".join([
            f"- command: `.venv/bin/python bench/dataset_flow.py {' '.join(sys.argv[1:])}`",
            f"- machine: {machine()}, 1 torch thread, torch {torch.__version__}",
            "- workload: `dataset_flow` on the tiny random SD, 1 denoising step, 1 pair per shard (the per-shard overhead is what "
            "is measured), one Prefect task per shard, livo's own local Prefect API server (SQLite)",
            "",
            "| shards | flow CPU ms/shard | server CPU ms/shard | wall ms/shard | HTTP 503 retries |",
            "|---|---|---|---|---|",
            rows,
            "",
            f"- flow CPU per shard spread across shard counts: **{100 * spread:.1f}%** (goal <= 20%)",
        ]))


if __name__ == "__main__":
    main()
