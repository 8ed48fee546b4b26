"""Training memory at scale: peak RSS of `livo train` (max_steps=2) at N = 1,000 / 4,000 / 16,000 pairs.

Synthetic shards of 256x256 PNG pairs are written with livo's own shard writer (one run; the smaller N
are hard-linked subsets of its shards). Each N trains in a fresh process, from an empty cache, on the
micro SD (livo_core/data/model_configs/micro-sd.json: the smallest SD-shaped model, so compute does not hide what is
measured). A thread samples /proc/self/status every 20 ms:

    anon   RssAnon: heap, tensors, Python objects -- what must not grow with N
    file   RssFile: pages of memory-mapped files (the latent cache, libraries), reclaimable by the kernel

The goal: peak anon RSS flat within 15% across N. The slope per pair is fitted and extrapolated to the
paper's 86k pairs; the cache's size on disk per pair is reported at 256 px and computed for 512 px SD 1.5.

    .venv/bin/python bench/train_memory.py [--sizes 1000,4000,16000] [--size 256] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def write_run(run: Path, n_pairs: int, size: int, base_model: str, per_shard: int = 250) -> None:
    """A dataset run of n_pairs synthetic pairs, written shard by shard with livo's writer (bounded memory)."""
    from train_step import make_pairs

    from livo_core.shards import write_shard

    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"base_model": base_model}))
    for k, start in enumerate(range(0, n_pairs, per_shard)):
        pairs = make_pairs(min(per_shard, n_pairs - start), size, seed=k)
        rows = [{"jpg_0": a, "jpg_1": b, "label_0": 1.0, "label_1": 0.0, "caption": f"a red and blue picture {(start + i) % 500}",
                 "pair_id": f"{start + i:016x}", "value": "No blood or gore in images.", "value_id": "no-red",
                 "category": "toxicity", "aligned_prompt": "a blue picture", "violating_prompt": "a red and blue picture",
                 "base_model": base_model, "seed_0": start + i, "seed_1": start + i} for i, (a, b) in enumerate(pairs)]
        write_shard(run, f"no-red-{k:05d}", rows, [], {"value_id": "no-red"})


def subset(run: Path, out: Path, n_shards: int) -> None:
    """A run holding the first n_shards shards of `run` (hard links: no copy)."""
    for folder in ("shards", "markers"):
        (out / folder).mkdir(parents=True)
    shutil.copy(run / "config.json", out / "config.json")
    for marker in sorted((run / "markers").glob("*.complete.json"))[:n_shards]:
        sid = marker.name.removesuffix(".complete.json")
        os.link(marker, out / "markers" / marker.name)
        os.link(run / "shards" / f"{sid}.parquet", out / "shards" / f"{sid}.parquet")


class Sampler:
    """Peak RssAnon / RssFile of this process, sampled every 20 ms."""

    def __init__(self):
        self.peak = {"anon": 0, "file": 0, "total": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        vals = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile", "VmRSS"):
                    vals[k] = int(v.split()[0]) * 1024
        return {"anon": vals["RssAnon"], "file": vals["RssFile"], "total": vals["VmRSS"]}

    def _run(self):
        while not self._stop.wait(0.02):
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def train_one(run: str, out: str, cache: str, threads: int, queue) -> None:
    import torch

    from flows import env  # noqa: F401  (offline, quiet)
    from livo_core.train import TrainConfig, train

    torch.set_num_threads(threads)
    before = Sampler.read()
    t0 = time.perf_counter()
    with Sampler() as s:
        res = train(TrainConfig(max_steps=2, batch_size=8, device="cpu", checkpoint_every=2, cache_dir=cache,
                                verify_cache=True), [run], out, progress=False)
    queue.put({"seconds": time.perf_counter() - t0, "peak": s.peak, "before": before, "steps": res.steps})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-doc", action="store_true")
    ap.add_argument("--keep", help="keep the data here (reused when it exists)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from livo_core.families import build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        model = work / "micro-sd"
        if not (model / "model_index.json").is_file():
            build_random_model(model, config="micro-sd")
        full = work / f"run-{max(sizes)}"
        t0 = time.perf_counter()
        if not full.is_dir():
            write_run(full, max(sizes), args.size, str(model))
        write_s = time.perf_counter() - t0
        results = []
        for n in sizes:
            run = full if n == max(sizes) else work / f"run-{n}"
            if not run.is_dir():
                subset(full, run, n // 250)
            cache, out = work / f"cache-{n}", work / f"out-{n}"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            proc = ctx.Process(target=train_one, args=(str(run), str(out), str(cache), args.threads, queue))
            proc.start()
            r = queue.get()
            proc.join()
            cache_bytes = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
            r.update(n=n, cache_bytes=cache_bytes, shard_bytes=sum(p.stat().st_size for p in (run / "shards").iterdir()))
            results.append(r)
            print(f"N={n:6d}: peak anon {r['peak']['anon'] / 2**20:7.0f} MiB, file-backed {r['peak']['file'] / 2**20:6.0f} MiB, "
                  f"total {r['peak']['total'] / 2**20:7.0f} MiB; {r['seconds']:.0f} s; cache {cache_bytes / 2**20:.0f} MiB", flush=True)

    anon = [r["peak"]["anon"] for r in results]
    spread = (max(anon) - min(anon)) / min(anon)
    slope = (anon[-1] - anon[0]) / (sizes[-1] - sizes[0])          # bytes of anon RSS per extra pair
    per_pair_cache = results[-1]["cache_bytes"] / sizes[-1]
    # SD 1.5 at 512 px under fp16 training: 2 latents of 4 x 64 x 64 fp16 per pair, + 77 x 768 fp16 per distinct caption
    sd15_pair = 2 * 4 * 64 * 64 * 2
    sd15_caption = 77 * 768 * 2
    from doc_section import machine

    summary = {"sizes": sizes, "image_size": args.size, "threads": args.threads, "write_data_s": write_s,
               "cpu": machine(), "results": results, "anon_spread": spread,
               "anon_bytes_per_pair": slope, "cache_bytes_per_pair": per_pair_cache,
               "extrapolated_86k_anon_gib": (anon[0] + max(slope, 0.0) * (86_000 - sizes[0])) / 2**30,
               "sd15_512_cache_gib_86k": (86_000 * sd15_pair + 86_000 / 4 * sd15_caption) / 2**30}
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
    if args.write_doc:
        import torch

        from doc_section import write_section

        rows = "\n".join(f"| {r['n']:,} | {r['peak']['anon'] / 2**20:.0f} | {r['peak']['file'] / 2**20:.0f} | "
                         f"{r['peak']['total'] / 2**20:.0f} | {r['seconds']:.0f} | {r['cache_bytes'] / 2**20:.0f} |" for r in results)
        write_section("train-memory", "Training memory at scale (peak RSS vs N pairs)", "\n".join([
            f"- command: `.venv/bin/python bench/train_memory.py {' '.join(sys.argv[1:])}`",
            f"- machine: {summary['cpu']}, {args.threads} torch threads, torch {torch.__version__}",
            f"- workload: synthetic {args.size}x{args.size} PNG pairs in shards of 250 written with livo's shard writer; "
            "micro SD (livo_core/data/model_configs/micro-sd.json); `train(max_steps=2, batch_size=8)` in a fresh process from an empty "
            "cache (the time is mostly the one-off VAE encoding of every image)",
            "",
            "| N pairs | peak anon RSS (MiB) | peak file-backed RSS (MiB) | peak total RSS (MiB) | seconds | cache on disk (MiB) |",
            "|---|---|---|---|---|---|",
            rows,
            "",
            f"- peak anon RSS spread across N: **{100 * spread:.1f}%** (goal <= 15%); slope {slope:.0f} bytes per pair",
            f"- extrapolated to 86k pairs: anon RSS {summary['extrapolated_86k_anon_gib']:.2f} GiB for this model "
            f"(+ the model's own weights: SD 1.5 fp16 ~2 GiB on the GPU, not per pair)",
            f"- cache on disk: {per_pair_cache / 1024:.1f} KiB per pair here; SD 1.5 at 512 px, fp16, 86k pairs (4 images "
            f"per caption): {summary['sd15_512_cache_gib_86k']:.1f} GiB on disk, memory-mapped: only the pages of a batch are read",
        ]))


if __name__ == "__main__":
    main()
