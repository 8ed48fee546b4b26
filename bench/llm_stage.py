"""LLM prompt stage throughput: pairs/s vs llm.max_concurrency against a loopback OpenAI-compatible server with
latency L per request and capacity C requests at once (what a vLLM server batching C requests looks like).

    .venv/bin/python bench/llm_stage.py [--latency 0.5] [--capacity 16] [--concurrency 1,2,4,8,16] [--write-doc]

The ideal at concurrency k is min(k, C) / L requests per second, times pairs per request. Every setting runs
the same planned requests (fresh cache) in the same process, so the ratios are against a baseline measured
in this run: concurrency 1 is today's serial stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # the loopback server the tests use (stdlib only)


def answer(body: dict) -> dict:
    """A model whose valid, distinct answer depends only on the request (its facet): each item differs from the
    others of its batch in its subject and in what it holds (two words), as real batches do."""
    text = body["messages"][-1]["content"]
    facet = text.split("are set in ")[1].split(", each")[0]
    n = int(text.split("Write ")[1].split(" ")[0])
    things = ["lantern", "sword", "umbrella", "basket", "violin", "shovel", "banner", "kettle"]
    if '"prompts"' in text:
        jobs = ["doctor", "nurse", "chef", "pilot", "judge", "farmer", "teacher", "welder"]
        return {"prompts": [{"prompt": f"a {j} with a {t} in {facet}", "subject": j} for j, t in zip(jobs[:n], things)]}
    word = text.split("(words such as: ")[1].split(",")[0].split(")")[0]
    who = ["knight", "sailor", "farmer", "dancer", "boxer", "clown", "monk", "gardener"]
    return {"pairs": [{"prompt": f"a {word} {w} with a {t} in {facet}", "aligned_prompt": f"a {w} with a {t} in {facet}"}
                      for w, t in zip(who[:n], things)]}


def run_once(latency: float, capacity: int, concurrency: int, pairs_per_value: int, per_request: int) -> dict:
    from openai_server import OpenAIServer

    from livo_core.config import RunConfig
    from livo_core.paths import DATA_DIR
    from livo_core.prompts import generate_pairs
    from livo_core.values import load_values

    values = load_values(DATA_DIR / "values.yaml")
    with OpenAIServer(latency_s=latency, capacity=capacity) as server, tempfile.TemporaryDirectory() as cache:
        server.default = answer
        cfg = RunConfig(prompt_source="llm", prompts_per_value=pairs_per_value,
                        llm={"base_url": server.base_url, "model": "bench", "pairs_per_request": per_request,
                             "max_concurrency": concurrency, "max_retries": 0})
        t0 = time.perf_counter()
        pairs, rejections = generate_pairs(cfg, values, Path(cache))
        seconds = time.perf_counter() - t0
        requests, in_flight = server.count, server.max_in_flight
    ideal = min(concurrency, capacity) / latency * per_request
    return {"concurrency": concurrency, "pairs": len(pairs), "rejected": len(rejections), "requests": requests,
            "max_in_flight": in_flight, "seconds": round(seconds, 3), "pairs_per_s": round(len(pairs) / seconds, 1),
            "ideal_pairs_per_s": round(ideal, 1), "of_ideal": round(len(pairs) / seconds / ideal, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.5, help="seconds per request (L)")
    ap.add_argument("--capacity", type=int, default=16, help="requests the server serves at once (C)")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="llm.max_concurrency values")
    ap.add_argument("--pairs-per-value", type=int, default=128)
    ap.add_argument("--pairs-per-request", type=int, default=8)
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()

    rows = [run_once(args.latency, args.capacity, int(k), args.pairs_per_value, args.pairs_per_request)
            for k in args.concurrency.split(",")]
    base = rows[0]["pairs_per_s"]
    for r in rows:
        r["vs_serial"] = round(r["pairs_per_s"] / base, 2)
        print(json.dumps(r))
    if args.write_doc:
        from doc_section import machine, write_section

        table = "\n".join(f"| {r['concurrency']} | {r['requests']} | {r['max_in_flight']} | {r['seconds']} | {r['pairs_per_s']} | "
                          f"{r['ideal_pairs_per_s']} | {r['of_ideal']:.0%} | {r['vs_serial']}x |" for r in rows)
        body = (f"`bench/llm_stage.py --latency {args.latency} --capacity {args.capacity}`: the prompt stage of 5 values x "
                f"{args.pairs_per_value} pairs ({args.pairs_per_request} pairs per request) against a loopback server that "
                f"answers every request after {args.latency} s and serves {args.capacity} at once; {machine()}. Ideal = "
                "min(concurrency, C) / L requests/s x pairs per request. Concurrency 1 is the serial stage livo had before.\n\n"
                "| llm.max_concurrency | requests | most in flight | seconds | pairs/s | ideal pairs/s | of ideal | vs serial |\n"
                "|---|---|---|---|---|---|---|---|\n" + table + "\n")
        write_section("llm-stage", "LLM prompt stage: pairs/s vs requests in flight", body)


if __name__ == "__main__":
    main()
