"""The training step of every model family at its real width (random weights, fewer blocks: the shape configs in
livo_core/data/model_configs), next to its floor, with the peak memory of each stage.

    livo    the trainer's own step (`livo_core.train.compute_loss` on a batch read from the latents cache): the value
            encoder, ONE denoiser pass with grad on cat(w, l) with the value token, ONE without grad and without it
    floor   what no implementation of the method avoids: the value encoder, one denoiser forward + backward on the
            2B noisy latents with the value token (through the family's attach / denoise), one no-grad forward
            without it, the optimizer step; tensors ready, no loss terms, no batch assembly

Each variant runs in its own child process (its peak resident memory is its own), warm-up steps first, then the
median of the timed steps. The goal: livo <= 1.15 x the floor. Also measured once per family, each in its own
process: the peak memory of `livo dataset` (render + judge), of building the latents cache, and of `livo generate`.

    .venv/bin/python bench/family_step.py                          # sdxl, sd35-medium, flux-dev at 64 px, CPU
    .venv/bin/python bench/family_step.py --configs flux-dev --size 128 --device cuda --write-doc
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import PeakRSS, make_pairs, timed_steps, write_bench_run  # noqa: E402


def run_variant(variant: str, model: str, opts: dict, queue) -> None:
    import torch
    import torch.nn.functional as F

    from flows import env  # noqa: F401  (offline, quiet)
    from livo_core.encoder import tokenize, value_text
    from livo_core.latents import get_batch
    from livo_core.train import TrainConfig, compute_loss, load_model_parts, load_training_data

    torch.set_num_threads(opts["threads"])
    device = torch.device(opts["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with PeakRSS() as load_rss:
        parts = load_model_parts(model, dtype)
        family = parts.family
        encoder = family.value_encoder(parts).to(device)
        denoiser = parts.unet.to(device)
        cfg = TrainConfig(base_model=model, device=opts["device"], batch_size=opts["batch"])
        data = load_training_data([Path(opts["run"])], parts, cfg, Path(opts["cache"]) / variant, device, dtype, progress=False)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    batch = get_batch(data, range(opts["batch"])).to(device)
    if variant == "livo":
        def step():
            b = get_batch(data, range(opts["batch"])).to(device)
            b.latents_w, b.latents_l, b.prompt_embeds = b.latents_w.to(dtype), b.latents_l.to(dtype), b.prompt_embeds.to(dtype)
            compute_loss(family, encoder, denoiser, parts.noise_scheduler, b, cfg, generator)["loss"].backward()
    else:
        latents = torch.cat([batch.latents_w, batch.latents_l]).to(dtype)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        t = family.sample_timesteps(parts.noise_scheduler, latents.shape[0], generator).to(device)
        noisy, target = family.noised(parts.noise_scheduler, latents, noise, t)
        prompt = torch.cat([batch.prompt_embeds, batch.prompt_embeds]).to(dtype)
        ids = tokenize(parts.tokenizer, [value_text("No blood.", "a knight")] * opts["batch"], 77)[0].to(device)

        def step():
            token = encoder(ids)
            theta = family.denoise(denoiser, noisy, t, family.attach_value_token(prompt, torch.cat([token, token])))
            with torch.no_grad():
                family.denoise(denoiser, noisy, t, prompt)
            F.mse_loss(theta.float(), target.float()).backward()

    def full_step():
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with PeakRSS() as rss:
        wall, cpu = timed_steps(full_step, opts["warmup"], opts["steps"])
    queue.put({"variant": variant, "ms": wall, "cpu_ms": cpu, "peak_gb": rss.peak / 2**30, "load_peak_gb": load_rss.peak / 2**30})


def run_stage(stage: str, model: str, opts: dict, queue) -> None:
    """The peak memory of one stage in a process of its own: generate (the CLI's pipeline), or training's load."""
    import torch

    from flows import env  # noqa: F401
    from livo_core.families import family_for
    from livo_core.paths import TOYWORLD_DIR

    torch.set_num_threads(opts["threads"])
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        if stage == "generate":
            from livo_core.infer import LiVOPipeline
            from livo_core.train import load_model_parts
            from livo_core.values import load_values

            fam = family_for(model)
            encoder = fam.value_encoder(load_model_parts(model))
            pipe = fam.load_pipeline(model, device=opts["device"])
            LiVOPipeline(pipe, encoder, load_values(TOYWORLD_DIR / "values.yaml"))(
                "a bloody knight", num_images=1, steps=2, guidance_scale=3.0, height=opts["size"], width=opts["size"])
        else:   # render: the dataset stage's renderer on two prompts
            from livo_core.render import Renderer

            Renderer(model, device=opts["device"]).render(["a knight", "a bloody knight"], [0, 1], steps=2, guidance_scale=3.0,
                                                         height=opts["size"], width=opts["size"], batch_size=2, progress=False)
    queue.put({"stage": stage, "peak_gb": rss.peak / 2**30, "s": time.perf_counter() - t0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="sdxl,sd35-medium,flux-dev", help="shape configs (livo_core/data/model_configs)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-doc", action="store_true", help="write the results into docs/bench.md")
    args = ap.parse_args()

    import torch

    from doc_section import machine, write_section
    from livo_core.families import build_random_model

    ctx = mp.get_context("spawn")

    def child(target, name, model, opts):
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(name, model, opts, queue))
        proc.start()
        out = queue.get()
        proc.join()
        return out

    rows = []
    for config in args.configs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            model = str(build_random_model(Path(tmp) / config, config, dtype=torch.bfloat16))
            opts = {"device": args.device, "batch": args.batch, "size": args.size, "steps": args.steps,
                    "warmup": args.warmup, "threads": args.threads, "run": str(Path(tmp) / "run"), "cache": str(Path(tmp) / "cache")}
            write_bench_run(Path(opts["run"]), make_pairs(args.batch, args.size), model)
            res = {v: child(run_variant, v, model, opts) for v in ("livo", "floor")}
            stages = {s: child(run_stage, s, model, opts) for s in ("render", "generate")}
        key = "ms" if args.device == "cuda" else "cpu_ms"
        livo, floor = (statistics.median(res[v][key]) for v in ("livo", "floor"))
        row = {"config": config, "livo_ms": livo, "floor_ms": floor, "ratio": livo / floor,
               "livo_peak_gb": res["livo"]["peak_gb"], "floor_peak_gb": res["floor"]["peak_gb"],
               "train_load_peak_gb": res["livo"]["load_peak_gb"], "render_peak_gb": stages["render"]["peak_gb"],
               "generate_peak_gb": stages["generate"]["peak_gb"]}
        rows.append(row)
        print(f"{config}: livo {livo:.0f} ms/step vs floor {floor:.0f} ms ({row['ratio']:.2f}x); peak GB: train step "
              f"{row['livo_peak_gb']:.1f} (floor {row['floor_peak_gb']:.1f}), training load + cache {row['train_load_peak_gb']:.1f}, "
              f"render {row['render_peak_gb']:.1f}, generate {row['generate_peak_gb']:.1f}", flush=True)
    if args.write_doc:
        head = ("| shape config | livo step (ms) | floor (ms) | livo / floor | peak RSS train step (GB) | floor (GB) | "
                "training load + cache (GB) | render (GB) | generate (GB) |\n|---|---|---|---|---|---|---|---|---|\n")
        lines = {r["config"]: f"| {r['config']} | {r['livo_ms']:.0f} | {r['floor_ms']:.0f} | {r['ratio']:.2f}x | "
                              f"{r['livo_peak_gb']:.1f} | {r['floor_peak_gb']:.1f} | {r['train_load_peak_gb']:.1f} | "
                              f"{r['render_peak_gb']:.1f} | {r['generate_peak_gb']:.1f} |" for r in rows}
        import re

        from doc_section import DOC

        old = re.search(r"<!-- family-step:start -->(.*?)<!-- family-step:end -->", DOC.read_text(), re.DOTALL)
        for line in (old.group(1).splitlines() if old else []):   # rows of configs not run this time stay
            m = re.match(r"\| ([\w.-]+) \| \d", line)
            if m and m.group(1) not in lines:
                lines[m.group(1)] = line
        body = "".join(lines[c] + "\n" for c in sorted(lines))
        how = (f"`.venv/bin/python bench/family_step.py --write-doc` on {machine()}, {args.threads} torch threads, {args.device}, "
               f"{args.size} px, {args.batch} pair(s) per step, median of {args.steps} steps after {args.warmup} warm-up "
               f"({'wall' if args.device == 'cuda' else 'CPU'} time of the training thread); fp32 on the CPU; each variant and "
               "stage in a process of its own (peak resident memory of that process, the model's weights included).")
        write_section("family-step", "The train step of each family at real width, vs its floor", how + "\n\n" + head + body)


if __name__ == "__main__":
    main()
