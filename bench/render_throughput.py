"""Render throughput: livo's shard rendering (Renderer.render) vs a plain StableDiffusionPipeline loop.

Both render the same prompts and seeds with the same pipeline object, batch size, steps and image size,
in ONE process, interleaved over several rounds (a shared CPU is noisy); the median of each is reported.
The goal is that livo costs nothing: ratio livo / raw >= 0.9.

    .venv/bin/python bench/render_throughput.py                        # tiny random SD (built in a temp dir)
    .venv/bin/python bench/render_throughput.py --model livo_core/data/toyworld/model --size 32
    .venv/bin/python bench/render_throughput.py --write-doc            # update the render section of docs/bench.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows import env  # noqa: E402,F401  (offline, quiet)
import torch  # noqa: E402

from livo_core.families import build_random_model  # noqa: E402
from livo_core.render import Renderer  # noqa: E402
from livo_core.shards import pair_seed  # noqa: E402

from doc_section import DOC, write_section  # noqa: E402  (bench/ is on the path: the script's own folder)


def shard_workload(n_pairs: int, seeds_per_prompt: int) -> tuple[list[str], list[int]]:
    """The prompts and seeds of one shard as livo renders it: n aligned images then n violating ones."""
    prompts_a, prompts_v, seeds = [], [], []
    for i in range(n_pairs):
        prompt = f"a bloody red square on a blue background {i // seeds_per_prompt}"
        prompts_a.append(prompt.replace("bloody ", ""))
        prompts_v.append(prompt)
        seeds.append(pair_seed(0, "bloody-inappropriate", prompt, i % seeds_per_prompt))
    return prompts_a + prompts_v, seeds + seeds


def raw_loop(pipe, prompts, seeds, *, steps, guidance_scale, height, width, batch_size):
    """What a user would write with diffusers alone: call the pipeline on each batch of prompts."""
    images = []
    for start in range(0, len(prompts), batch_size):
        gens = [torch.Generator(pipe.device).manual_seed(s) for s in seeds[start:start + batch_size]]
        out = pipe(prompt=prompts[start:start + batch_size], generator=gens, num_inference_steps=steps,
                   guidance_scale=guidance_scale, height=height, width=width, output_type="pil")
        images += out.images
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="SD folder (default: a tiny random SD from livo_core/data/model_configs/tiny-sd.json)")
    ap.add_argument("--pairs", type=int, default=16, help="pairs per shard (2 images each)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--write-doc", action="store_true", help=f"write the result into {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_random_model(Path(tmp) / "tiny-sd", "tiny-sd"))
        renderer = Renderer(model, device=args.device)
        prompts, seeds = shard_workload(args.pairs, seeds_per_prompt=2)
        settings = dict(steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
                        batch_size=args.batch)
        # Warm-up (kernel selection, allocator) for both paths.
        renderer.render(prompts[:args.batch], seeds[:args.batch], progress=False, **settings)
        raw_loop(renderer.pipe, prompts[:args.batch], seeds[:args.batch], **settings)

        livo_s, raw_s = [], []
        for _ in range(args.rounds):   # interleaved, so load changes hit both alike
            t = time.perf_counter()
            renderer.render(prompts, seeds, progress=False, **settings)
            livo_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            raw_loop(renderer.pipe, prompts, seeds, **settings)
            raw_s.append(time.perf_counter() - t)

    n = len(prompts)
    livo_ips, raw_ips = n / statistics.median(livo_s), n / statistics.median(raw_s)
    device = renderer.device
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    model_name = args.model or "tiny random SD (livo_core/data/model_configs/tiny-sd.json)"
    lines = [
        f"- command: `.venv/bin/python bench/render_throughput.py {' '.join(sys.argv[1:])}`",
        f"- machine: {device.type} ({machine}), torch {torch.__version__}, dtype {renderer.dtype}",
        f"- workload: {model_name}; one shard = {args.pairs} pairs = {n} images, batch {args.batch}, "
        f"{args.steps} steps, {args.size}x{args.size}, guidance {args.guidance}; median of {args.rounds} interleaved rounds",
        f"- livo `Renderer.render`: {livo_ips:.1f} images/s (median {statistics.median(livo_s):.2f} s per shard)",
        f"- raw `StableDiffusionPipeline.__call__` loop: {raw_ips:.1f} images/s (median {statistics.median(raw_s):.2f} s)",
        f"- ratio livo / raw: **{livo_ips / raw_ips:.2f}x** (goal >= 0.9x)",
    ]
    print("\n".join(lines))
    if args.write_doc:
        write_section("render-bench", "Render throughput", "\n".join(lines))


if __name__ == "__main__":
    main()
