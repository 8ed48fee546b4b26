"""Training-step cost: livo's step vs a reference step built like the official LiVO training script, and vs the
floor no implementation of the method can go under.

    reference  per step: VAE-encode both images (latent_dist.sample()), the text encoder on the captions, the
               value encoder, FOUR UNet calls (theta_w, theta_l with grad; ref_w, ref_l under no_grad)
    livo       latents and prompt embeddings cached once (the trainer's cache pieces, timed apart); per step:
               value encoder, ONE UNet call on cat(w, l) with grad (78 tokens), ONE under no_grad (77):
               `livo_core.train.compute_loss`, the trainer's own step, reading the batch from the cache
    floor      only what cannot be avoided: the value encoder, one UNet forward + backward (gradients to the
               conditioning only) on 2B latents with 78 tokens, one no-grad forward on 2B with 77, the
               optimizer step -- tensors ready on the device, no loss terms, no batch assembly

FLOPs are counted on one step of each (torch.utils.flop_counter: matmuls and convolutions, backward
included): reference FLOPs / livo FLOPs is the best speedup caching can give (the FLOP bound); the goal is
a measured speedup >= 90% of it, and livo's step time <= 1.15x the floor's.

Each variant runs in its own child process (its peak memory is its own); they alternate for several rounds
and the median step time is reported. On CPU with one torch thread the ratio is taken on the training
thread's CPU time (wall time on a shared machine mostly measures the neighbours).

    .venv/bin/python bench/train_step.py                                 # tiny random SD, CPU
    .venv/bin/python bench/train_step.py --shape sd15 --size 256 --batch 1 --threads 2 --write-doc
    .venv/bin/python bench/train_step.py --model /path/to/sd15 --size 512 --batch 4 --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_pairs(n: int, size: int, seed: int = 0):
    """n (aligned, violating) PNG pairs: blue images, and the same with red blobs."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        blue = Image.new("RGB", (size, size), (0, 60, 200))
        red = blue.copy()
        draw = ImageDraw.Draw(red)
        for _ in range(3):
            (x, y), r = rng.integers(0, size, 2), int(rng.integers(size // 8, size // 4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(230, 0, 0))
        png = []
        for img in (blue, red):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            png.append(buf.getvalue())
        pairs.append(tuple(png))
    return pairs


def write_bench_run(run: Path, pairs, base_model: str) -> None:
    from livo_core.shards import write_shard

    rows = [{"jpg_0": a, "jpg_1": b, "label_0": 1.0, "label_1": 0.0, "caption": f"a red and blue picture {i}",
             "pair_id": f"{i:016x}", "value": "No blood or gore in images.", "value_id": "no-red", "category": "toxicity",
             "base_model": base_model} for i, (a, b) in enumerate(pairs)]
    write_shard(run, "no-red-00000", rows, [], {})
    (run / "config.json").write_text(json.dumps({"base_model": base_model}))


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 2 ms (Linux)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def timed_steps(step, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run `step` warmup + steps times; wall and thread-CPU milliseconds of the timed (post-warm-up) calls."""
    wall, cpu = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        step()
        if i >= warmup:
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.thread_time() - c0) * 1000)
    return wall, cpu


def run_variant(variant: str, model: str, opts: dict, queue) -> None:
    """In a child process: build the step, warm up, time `opts['steps']` steps, count one step's FLOPs."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from flows import env  # noqa: F401  (offline, quiet)
    from livo_core.encoder import ValueEncoder, text_length, tokenize, value_text
    from livo_core.latents import get_batch, image_tensor
    from livo_core.loss import livo_loss_terms
    from livo_core.train import TrainConfig, compute_loss, load_model_parts, load_training_data

    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda and opts["fp16"] else torch.float32
    torch.manual_seed(0)
    sd = load_model_parts(model, dtype)
    prepend_value_token = sd.family.attach_value_token
    value_encoder = ValueEncoder.from_text_encoder(sd.text_encoder).to(device)
    sd.text_encoder.to(device, dtype)
    sd.vae.to(device)
    unet = sd.unet.to(device)
    optimizer = torch.optim.AdamW(value_encoder.parameters(), lr=1e-6, fused=True)  # as the trainer; same for all
    cfg = TrainConfig(base_model=model, device=opts["device"])
    generator = torch.Generator().manual_seed(0)
    setup_s = 0.0
    run = Path(opts["run"])

    if variant in ("precompute", "livo"):
        t0 = time.perf_counter()
        data = load_training_data([run], sd, cfg, Path(opts["cache"]), device, dtype, progress=False)
        setup_s = time.perf_counter() - t0
        if variant == "precompute":
            queue.put({"variant": variant, "setup_s": setup_s})
            return

        def step():
            batch = get_batch(data, range(opts["batch"])).to(device)   # read from the memory-mapped cache each step
            terms = compute_loss(sd.family, value_encoder, unet, sd.noise_scheduler, batch, cfg, generator)
            terms["loss"].backward()
    else:
        from livo_core.shards import read_shards

        df, _ = read_shards([run])
        captions, principle = list(df["caption"]), df["value"][0]
        pixels_w = torch.stack([image_tensor(b, None) for b in df["jpg_0"]]).to(device, dtype)  # (B, 3, H, W)
        pixels_l = torch.stack([image_tensor(b, None) for b in df["jpg_1"]]).to(device, dtype)
        length = text_length(sd.tokenizer, sd.text_encoder)
        caption_ids = tokenize(sd.tokenizer, captions, length)[0].to(device)
        value_ids = tokenize(sd.tokenizer, [value_text(principle, c) for c in captions], length)[0].to(device)
        sched = sd.noise_scheduler
        B = pixels_w.shape[0]
        if variant == "floor":
            with torch.no_grad():
                latents = sd.vae.encode(torch.cat([pixels_w, pixels_l])).latent_dist.mean * sd.vae.config.scaling_factor
                prompt = sd.text_encoder(caption_ids)[0]
            noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
            t2 = torch.randint(0, sched.config.num_train_timesteps, (2 * B,), generator=generator).to(device)
            noisy = sched.add_noise(latents, noise, t2)
            prompt2 = torch.cat([prompt, prompt])

            def step():
                token = value_encoder(value_ids)                                    # (B, 1, D)
                theta = unet(noisy, t2, prepend_value_token(prompt2, torch.cat([token, token]))).sample
                with torch.no_grad():
                    unet(noisy, t2, prompt2)
                # one plain MSE: the backward gets a dense gradient, as from livo's (or any) denoising loss
                F.mse_loss(theta.float(), noise.float()).backward()
        else:
            def step():
                with torch.no_grad():
                    latents = sd.vae.encode(torch.cat([pixels_w, pixels_l])).latent_dist.sample() * sd.vae.config.scaling_factor
                    prompt = sd.text_encoder(caption_ids)[0]  # (B, 77, D)
                lat_w, lat_l = latents.chunk(2)
                noise = torch.randn(lat_w.shape, generator=generator).to(device, dtype)
                t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=generator).to(device)
                noisy_w, noisy_l = sched.add_noise(lat_w, noise, t), sched.add_noise(lat_l, noise, t)
                value_embeds = prepend_value_token(prompt, value_encoder(value_ids))  # (B, 78, D)

                def mse(pred):
                    return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

                theta_w = mse(unet(noisy_w, t, value_embeds).sample)
                theta_l = mse(unet(noisy_l, t, value_embeds).sample)
                with torch.no_grad():
                    ref_w = mse(unet(noisy_w, t, prompt).sample)
                    ref_l = mse(unet(noisy_l, t, prompt).sample)
                livo_loss_terms(theta_w, ref_w, theta_l, ref_l)["loss"].backward()

    def full_step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda and opts["fp16"]):
            step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:   # from before the first step: warm-up steps allocate what every step needs
        wall, cpu = timed_steps(full_step, opts["warmup"], opts["steps"])
    peak = (torch.cuda.max_memory_allocated() - held) if cuda else (rss.peak - rss.start)
    counter = FlopCounterMode(display=False)
    with counter:
        full_step()
    queue.put({"variant": variant, "ms": wall, "cpu_ms": cpu, "peak_mb": peak / 2**20, "setup_s": setup_s,
               "tflop": counter.get_total_flops() / 1e12})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="SD 1.x diffusers folder (default: built from --shape with random weights)")
    ap.add_argument("--shape", default="tiny-sd", choices=["tiny-sd", "micro-sd", "sd15"],
                    help="livo_core/data/model_configs/<shape>.json when no --model is given (sd15: SD 1.5's architecture)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fp32", action="store_true", help="on CUDA: fp32 instead of fp16 frozen models + autocast")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (reference, livo, floor), each in fresh processes")
    ap.add_argument("--threads", type=int, default=torch_threads_default())
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--write-doc", action="store_true", help="write the result into docs/bench.md")
    args = ap.parse_args()

    opts = {"device": args.device, "fp16": args.device == "cuda" and not args.fp32, "batch": args.batch,
            "size": args.size, "steps": args.steps, "warmup": args.warmup, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import torch

            from livo_core.families import build_random_model
            model = str(build_random_model(Path(tmp) / args.shape, config=args.shape,
                                      dtype=torch.float16 if args.shape == "sd15" else torch.float32))
        opts["cache"], opts["run"] = str(Path(tmp) / "cache"), str(Path(tmp) / "run")
        write_bench_run(Path(opts["run"]), make_pairs(args.batch, args.size), model)
        ctx = mp.get_context("spawn")
        results: dict[str, list[dict]] = {"precompute": [], "reference": [], "livo": [], "floor": []}

        def launch(variant):
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(variant, model, opts, queue))
            proc.start()
            results[variant].append(queue.get())
            proc.join()

        launch("precompute")
        for _ in range(args.rounds):
            for variant in ("reference", "livo", "floor"):
                launch(variant)

    import torch

    from doc_section import machine

    summary = {"device": args.device, "dtype": "fp16" if opts["fp16"] else "fp32", "model": args.model or f"{args.shape} (random weights)",
               "batch_pairs": args.batch, "image_size": args.size, "threads": args.threads,
               "steps_timed": args.steps * args.rounds, "cpu": machine()}
    for variant in ("reference", "livo", "floor"):
        runs = results[variant]
        summary[f"{variant}_ms_per_step"] = statistics.median(t for r in runs for t in r["ms"])
        summary[f"{variant}_cpu_ms_per_step"] = statistics.median(t for r in runs for t in r["cpu_ms"])
        summary[f"{variant}_peak_step_mb"] = max(r["peak_mb"] for r in runs)
        summary[f"{variant}_tflop_per_step"] = runs[0]["tflop"]
    summary["livo_precompute_s"] = results["precompute"][0]["setup_s"]
    # On a CPU with one thread, compare CPU time of the training thread (waiting for a core is the neighbours');
    # with several threads or on CUDA: wall time.
    key = "ms_per_step" if args.device == "cuda" or args.threads > 1 else "cpu_ms_per_step"
    summary["speedup"] = summary[f"reference_{key}"] / summary[f"livo_{key}"]
    summary["flop_bound"] = summary["reference_tflop_per_step"] / summary["livo_tflop_per_step"]
    summary["share_of_bound"] = summary["speedup"] / summary["flop_bound"]
    summary["over_floor"] = summary[f"livo_{key}"] / summary[f"floor_{key}"]
    summary["speedup_of"] = key
    print(f"{'':10} {'wall ms/step':>13} {'CPU ms/step':>12} {'TFLOP/step':>11} {'peak step memory (MiB)':>24}")
    for variant in ("reference", "livo", "floor"):
        print(f"{variant:10} {summary[f'{variant}_ms_per_step']:13.1f} {summary[f'{variant}_cpu_ms_per_step']:12.1f} "
              f"{summary[f'{variant}_tflop_per_step']:11.3f} {summary[f'{variant}_peak_step_mb']:24.1f}")
    print(f"speedup reference / livo ({key}): {summary['speedup']:.2f}x; FLOP bound {summary['flop_bound']:.2f}x "
          f"({100 * summary['share_of_bound']:.0f}% of it); livo / floor {summary['over_floor']:.3f}x "
          f"(livo's one-off precompute for {args.batch} pairs: {summary['livo_precompute_s']:.2f} s)")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    if args.write_doc:
        from doc_section import write_section

        s = summary
        name = f"train-bench-{args.device}" + ("" if args.shape == "tiny-sd" and not args.model else f"-{args.shape}-{args.size}")
        write_section(name, f"Training step ({args.device}, {s['dtype']}, {s['model']}, {args.size} px)", "\n".join([
            f"- command: `.venv/bin/python bench/train_step.py {' '.join(sys.argv[1:])}`",
            f"- machine: {s['cpu']}, {args.threads} torch threads, torch {torch.__version__}",
            f"- workload: {args.batch} pair(s) of {args.size}x{args.size} images per step, the same loss and fused AdamW; "
            f"{s['steps_timed']} timed steps per variant over {args.rounds} alternating round(s), each in a fresh process",
            "",
            "| variant | wall ms/step | CPU ms/step | TFLOP/step (counted) | peak step memory (MiB) |",
            "|---|---|---|---|---|",
            *[f"| {v} | {s[f'{v}_ms_per_step']:.1f} | {s[f'{v}_cpu_ms_per_step']:.1f} | {s[f'{v}_tflop_per_step']:.3f} | "
              f"{s[f'{v}_peak_step_mb']:.1f} |" for v in ("reference", "livo", "floor")],
            "",
            f"- speedup reference / livo ({s['speedup_of']}): **{s['speedup']:.2f}x**; FLOP bound {s['flop_bound']:.2f}x: "
            f"**{100 * s['share_of_bound']:.0f}%** of it (goal >= 90%)",
            f"- livo / floor: **{s['over_floor']:.3f}x** (goal <= 1.15x)",
            f"- livo's one-off precompute (VAE latents + prompt embeddings, {args.batch} pairs): {s['livo_precompute_s']:.2f} s",
        ]))


def torch_threads_default() -> int:
    # One thread: tiny tensors gain nothing from a second, and the project's CPU machines are shared.
    return 1 if os.cpu_count() and os.cpu_count() <= 4 else min(8, os.cpu_count() or 1)


if __name__ == "__main__":
    main()
