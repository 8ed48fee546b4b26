"""Baselines LiVO is measured against, on the same data and the same step budget.

    base model        plain SD, nothing trained
    negative prompt   plain SD with NEGATIVE_PROMPT ("bloody") as the negative prompt of every image
    DPO value encoder the LiVO set-up (frozen SD + value token) trained with Diffusion-DPO's sigmoid loss
                      instead of LiVO's hinges: `train(TrainConfig(loss="dpo", ...))`, nothing new here
    Diffusion-DPO UNet Wallace et al. 2023: the UNet itself fine-tuned with the sigmoid loss on the same
                      aligned/violating pairs, no value token (`train_unet_dpo` below)

The UNet baseline fine-tunes every UNet weight (peft is not installed; the toy world's UNet is small, and
Diffusion-DPO's own SD 1.5 run fine-tunes the full UNet too). The reference model is a frozen copy of the
UNet. It reuses the LiVO trainer's data path (cached latents and prompt embeddings, the same sampler and
the same noise/timestep stream for a seed), so the only differences from LiVO are what is trained and the loss.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

import torch

from livo_core.latents import Batch, get_batch
from livo_core.train import (
    LOG_COLUMNS, METRICS, Sampler, TrainConfig, TrainResult, base_model_from_data, load_model_parts, load_training_data,
    loss_terms, noised_pair, pair_errors, plot_losses, training_shards,
)

log = logging.getLogger("livo.baselines")

NEGATIVE_PROMPT = "bloody"


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters a method trains (all of `module`'s)."""
    return sum(p.numel() for p in module.parameters())


def unet_denoising_errors(family, unet, ref_unet, noise_scheduler, batch: Batch, generator: torch.Generator):
    """Per-sample MSEs theta_w, ref_w, theta_l, ref_l (each (B,)) and timesteps (B,), for a trainable UNet
    against a frozen reference UNet; both read SD's 77 prompt tokens. Noise and timesteps are drawn exactly
    as the value encoder's trainer draws them (`livo_core.train.noised_pair`)."""
    noisy, t2, target, t = noised_pair(family, noise_scheduler, batch, generator)
    prompt = torch.cat([batch.prompt_embeds, batch.prompt_embeds])  # (2B, 77, D)
    theta_pred = family.denoise(unet, noisy, t2, prompt)  # (2B, 4, h, w), with autograd
    with torch.no_grad():
        ref_pred = family.denoise(ref_unet, noisy, t2, prompt)
    return (*pair_errors(theta_pred, ref_pred, target), t)


def train_unet_dpo(cfg: TrainConfig, data_dirs: list[str | Path], out_dir: str | Path,
                   progress: bool = True) -> TrainResult:
    """Diffusion-DPO on the UNet: fine-tune a copy of SD's UNet on the dataset runs' pairs.

    Uses from `cfg`: base_model, beta_dpo, min_snr_gamma, learning_rate, adam_*, weight_decay, max_grad_norm,
    batch_size, max_steps, seed, checkpoint_every, log_every, resolution, cache_dir, device (LiVO-only fields
    are ignored). Writes the same logs as `train` (train_log.csv, loss.png), checkpoints/step-NNNNNN/unet/
    every `checkpoint_every` steps (all kept: they are evaluated along training), and out/unet/.
    TrainResult.value_encoder points at out/unet (the trained part).
    """
    from livo_core.models import resolve_device
    from livo_core.progress import Progress

    out_dir, data_dirs = Path(out_dir), [Path(d) for d in data_dirs]
    training_shards(data_dirs)   # no usable data -> LivoError before anything is written
    base_model = cfg.base_model or base_model_from_data(data_dirs)
    cfg = cfg.model_copy(update={"base_model": base_model, "loss": "dpo"})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    sd = load_model_parts(base_model)
    data = load_training_data(data_dirs, sd, cfg, cfg.cache_dir or out_dir / "cache", device, torch.float32, progress)
    sd.vae, sd.text_encoder = None, None
    ref_unet = sd.unet.to(device)                       # frozen reference (requires_grad False, eval)
    unet = copy.deepcopy(ref_unet).requires_grad_(True)  # the policy: every weight trained
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon, fused=device.type in ("cpu", "cuda"))
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    generator = torch.Generator().manual_seed(cfg.seed)

    csv_path, png_path = out_dir / "train_log.csv", out_dir / "loss.png"
    csv_path.write_text(",".join(LOG_COLUMNS) + "\n")
    last: dict[str, float] = {}
    bar = Progress(total=cfg.max_steps, disable=not progress, desc="train unet-dpo", unit="step")
    sampler, position = Sampler(len(data), cfg.seed), 0
    for step in range(1, cfg.max_steps + 1):
        idx, position = sampler.take(cfg.batch_size, position)   # the same pairs, step for step, as `train`
        batch = get_batch(data, idx).to(device)
        theta_w, ref_w, theta_l, ref_l, t = unet_denoising_errors(sd.family, unet, ref_unet, sd.noise_scheduler, batch, generator)
        terms = loss_terms(theta_w, ref_w, theta_l, ref_l, t, sd.noise_scheduler, cfg)   # cfg.loss is "dpo"
        terms["loss"].backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        last = {"step": step, **{k: float(terms[k].detach()) for k in METRICS}, "lr": lr_scheduler.get_last_lr()[0]}
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([repr(last[c]) if isinstance(last[c], float) else last[c] for c in LOG_COLUMNS])
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{last['loss']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            unet.save_pretrained(out_dir / "checkpoints" / f"step-{step:06d}" / "unet")
    bar.close()
    unet.save_pretrained(out_dir / "unet")
    plot_losses(csv_path, png_path)
    (out_dir / "result.json").write_text(json.dumps({"steps": cfg.max_steps, "last": last}, indent=2))
    return TrainResult(out_dir, cfg.max_steps, last, out_dir / "unet", png_path, csv_path)
