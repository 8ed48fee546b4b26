"""The LiVO trainer: teach a value encoder, with Stable Diffusion frozen, from aligned/violating image pairs.

One training step, for a batch of B pairs (aligned image w, violating image l, prompt, value principle):

    z_w, z_l        cached VAE latents of both images                       (B, 4, h, w) each
    noise, t        the SAME noise and timestep for w and l                 (B, 4, h, w), (B,)
    value token     value_encoder("<principle>, <prompt>")                  (B, 1, D)   <- the only trainable part
    theta pass      ONE UNet call on cat(w, l), 78 tokens (value token + prompt), with autograd
    ref pass        ONE UNet call on cat(w, l), 77 tokens (prompt only), under no_grad: frozen SD
    loss            livo_loss(theta_w, ref_w, theta_l, ref_l) on per-sample denoising MSEs

Everything that does not depend on the value encoder is computed once before training and cached on disk,
one piece per data shard (livo_core.latents): VAE latents of its images and SD's prompt embeddings of its
captions, memory-mapped while training, so memory is bounded by a batch, not by the dataset.

    out/train_log.csv, out/train_log.jsonl   one row per step (exactly once, also across kills and resumes):
                                             loss, hinges, gaps, share past margin, preference accuracy, lr
    out/loss.png                             loss and gaps over steps
    out/checkpoints/step-000500/             value encoder, optimizer, lr scheduler, RNG states, data position
    out/value_encoder/                       the final value encoder (a transformers CLIPTextModel folder)
    out/train_config.json                    the resolved config (base model filled in) and the data it reads
    out/.lock                                held while training: one trainer per output folder

An output folder belongs to one training run: its config and data (`run_identity`) are recorded in
train_config.json, and another run is refused there unless `overwrite=True`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from livo_core.config import PRESETS as _PRESETS
from livo_core.config import StrictModel, preset_file
from livo_core.encoder import ValueEncoder
from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import atomic_write_text, clean_tmp_files, tmp_path
from livo_core.latents import Batch, PairData, get_batch, model_key, prepare_pairs
from livo_core.loss import dpo_loss_terms, livo_loss_terms, min_snr_weights

log = logging.getLogger("livo.train")

METRICS = ["loss", "hinge_w", "hinge_l", "gap_w", "gap_l", "share_past_margin", "pref_acc"]
LOG_COLUMNS = ["step", *METRICS, "lr"]


# --------------------------------------------------------------------------- config
class TrainConfig(StrictModel):
    """Training settings. Defaults are the paper's published run (SD 1.5, one GPU)."""

    base_model: str | None = Field(None, description="The diffusion model (a diffusers folder or hub id of a supported family). None = the base_model in the dataset run's config.json.")
    loss: Literal["livo", "dpo"] = Field("livo", description="livo = the paper's two hinge terms; dpo = Diffusion-DPO's sigmoid loss (baseline).")
    beta: float = Field(1000.0, gt=0, description="LiVO: scale of the aligned-image gap theta_w - ref_w.")
    alpha: float = Field(500.0, gt=0, description="LiVO: scale of the violating-image gap ref_l - theta_l.")
    gamma1: float = Field(1.0, ge=0, description="LiVO: margin of the aligned-image hinge.")
    gamma2: float = Field(0.5, ge=0, description="LiVO: margin of the violating-image hinge.")
    beta_dpo: float = Field(5000.0, gt=0, description="DPO: KL strength (Diffusion-DPO uses 5000 for SD 1.5).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Weight each denoising error by min-SNR-gamma of its timestep (e.g. 5), inside the hinges as the authors' code; None = no weighting.")
    min_snr_formula: Literal["diffusers", "authors"] = Field("diffusers", description="With min_snr_gamma: diffusers = min(SNR, g) / SNR "
                                                             "(epsilon) or / (SNR + 1) (v-prediction), today's diffusers and the "
                                                             "Min-SNR paper; authors = min(SNR, g) / SNR, + 1 under v-prediction "
                                                             "(the LiVO code's older diffusers). Equal under epsilon (SD 1.x).")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (1e-6 for SD 1.5; tiny test models need ~1e-4).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the value encoder's gradient norm; None = no clipping.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field("constant", description="Learning-rate schedule (diffusers.optimization.get_scheduler).")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    batch_size: int = Field(8, ge=1, description="Pairs per step per device (each pair = 2 images).")
    max_steps: int = Field(15000, ge=1, description="Optimizer steps in total (a resumed run stops here too).")
    seed: int = Field(0, ge=0, description="Seeds data order, noise and timesteps; same seed + data = same run on CPU.")
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int | None = Field(3, ge=1, description="Keep only the newest N checkpoints (an SD 1.5 one is ~1.5 GB); None = keep all.")
    log_every: int = Field(10, ge=1, description="Update the progress bar and the log line every N steps (the CSV gets every step).")
    gradient_checkpointing: bool = Field(False, description="Recompute UNet and value-encoder activations in backward: less memory, ~30% slower.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto = the family's half precision on CUDA (fp16 for SD 1.x / 2.x, bf16 for SDXL, SD 3, FLUX), no on CPU. Frozen models run in this dtype; the value encoder's weights stay fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA if visible, else CPU (under `accelerate launch`, accelerate decides).")
    resolution: int | None = Field(None, ge=8, description="Resize (shorter side) and centre-crop images to this size; None = use the images' own size (all must match).")
    cache_dir: Path | None = Field(None, description="Where cached latents/embeddings live (shareable between runs); None = <out>/cache.")
    init_value_encoder: Path | None = Field(None, description="Start from this value encoder folder (warm start, e.g. an earlier run's value_encoder/); None = a copy of SD's text encoder, as in the paper.")
    trains: Literal["value_encoder", "unet"] = Field("value_encoder", description="What is trained: the value encoder (LiVO) "
                                                     "or every weight of a copy of the UNet against the frozen one (the Diffusion-DPO "
                                                     "baseline, with loss = dpo; writes out/unet/).")
    value_condition: Literal["token", "pooled"] = Field("token", description="How the value token conditions the model: "
        "token = one extra conditioning token (the paper; every family); pooled = in place of the prompt's pooled CLIP "
        "vector (FLUX: CLIP-L's pooled output, the value encoder's own kind; SD 3: both towers' projected pooled outputs, "
        "from a value encoder that keeps the projections).")
    prepend_value_token: bool = Field(True, description="False = control run: the theta pass gets no value token, so theta == ref and nothing is learned.")
    latent_sampling: Literal["mean", "sample"] = Field("mean", description="mean = the VAE posterior mean, cached once (deterministic); sample = mean + std * noise drawn every step, as the authors' latent_dist.sample().")
    random_flip: bool = Field(False, description="Mirror each image left-right with probability 1/2 per step, aligned and violating independently (the authors' --random_flip); caches both views.")
    resample_violating: bool = Field(False, description="Pair each aligned image with the violating image of a random pair of its group each step (data imported with `livo import-livo-data`: a scene), as the authors' dataset does.")
    verify_cache: bool = Field(True, description="Check every cached piece's sha256 before training (reads the whole cache once); False checks sizes only.")
    encode_batch_size: int = Field(16, ge=1, description="Images per VAE call while filling the cache.")
    channels_last: bool = Field(False, description="UNet in channels-last memory format (what GPUs' fp16 convolution kernels prefer; on 2 CPU cores no clear gain was measured).")
    compile_unet: bool = Field(False, description="torch.compile the UNet (GPU: faster steps after a one-off compile; needs a C++ compiler on CPU).")


def load_train_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None,
                      preset: str | None = None) -> TrainConfig:
    """Preset (optional) < training config file (.toml/.yaml/.json) < overrides -> TrainConfig, or a LivoError naming the field."""
    from livo_core.config import load_job_config

    return load_job_config(TrainConfig, "train", path, preset, overrides)


# Training presets (livo_core/data/configs/train-*.toml): the recipe that fits the base model.
PRESETS = {name: preset_file("train", name) for name in _PRESETS["train"]}


def preset_for(base_model: str) -> str:
    """The training preset a model folder declares: `training_preset` in its livo.json, or in the build.json
    beside it (what `livo toyworld build` writes, wherever it builds); "published" (the paper's SD 1.5 run)
    for every model that declares none (hub ids included)."""
    folder = Path(base_model).expanduser()
    for record in (folder / "livo.json", folder.parent / "build.json"):
        try:
            declared = json.loads(record.read_text()).get("training_preset")
        except (OSError, ValueError, AttributeError):
            continue
        if declared in PRESETS:
            return declared
    return "published"


def resolve_train_config(data_dirs: list[Path | str], config_file: Path | str | None = None,
                         overrides: dict[str, Any] | None = None, preset: str | None = None) -> tuple[TrainConfig, str]:
    """The training config of a run, as `livo train`, the Prefect training flow and its deployment all resolve it:
    preset (given, else the one the base model declares) < config file < overrides; base_model from the
    overrides, the file, or the dataset runs' config.json. Returns (config, preset name)."""
    plain = load_train_config(config_file, overrides)          # bad config -> LivoError naming the field
    base_model = plain.base_model or base_model_from_data([Path(d) for d in data_dirs])
    preset = preset or preset_for(base_model)
    cfg = load_train_config(config_file, overrides, preset=preset)
    return with_model_resolution(cfg.model_copy(update={"base_model": base_model}), data_dirs), preset


def with_model_resolution(cfg: TrainConfig, data_dirs: list[Path | str]) -> TrainConfig:
    """Data rendered by another model than the one trained for: resolution (unset) becomes the base model's own,
    so its images are resized to what the model was made for. The same model: the images' own size."""
    from livo_core.families import family_for
    from livo_core.models import model_folder

    if cfg.resolution is not None or not cfg.base_model:
        return cfg
    try:
        rendered_by = base_model_from_data([Path(d) for d in data_dirs])
    except LivoError:
        rendered_by = None
    if rendered_by is not None and _same_model(rendered_by, cfg.base_model):
        return cfg
    folder = model_folder(cfg.base_model, "base_model")
    size = family_for(cfg.base_model).native_resolution(folder) if folder is not None else None
    if size is not None:
        log.info("training for %s on data rendered by %s: images resized to %d px, the model's resolution "
                 "(set resolution to choose another)", cfg.base_model, rendered_by or "another model", size)
    return cfg.model_copy(update={"resolution": size}) if size else cfg


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


# --------------------------------------------------------------------------- models
def check_config_for_family(cfg: TrainConfig) -> None:
    """Settings the base model's family cannot honour, refused in one line before any weights load."""
    from livo_core.families import family_for

    backbone = family_for(cfg.base_model)
    if backbone.flow_matching and cfg.min_snr_gamma:
        raise LivoError(f"min_snr_gamma weighs the errors of epsilon / v-prediction models by their SNR; {cfg.base_model} "
                        f"is a flow-matching {backbone.name} model: leave min_snr_gamma unset")
    if cfg.value_condition not in backbone.value_conditions:
        raise LivoError(f"value_condition = {cfg.value_condition} is not available for a {backbone.name} model: use "
                        f"{' or '.join(backbone.value_conditions)}")


def load_model_parts(base_model: str, dtype: torch.dtype = torch.float32):
    """The frozen parts of `base_model` training needs (livo_core.families.ModelParts), loaded by its family."""
    from livo_core.families import family_for

    return family_for(base_model).load_parts(base_model, dtype)


def base_model_from_data(data_dirs: list[Path]) -> str:
    """The base_model recorded in each dataset run's config.json; all runs must agree."""
    found = {}
    for d in data_dirs:
        cfg_file = Path(d) / "config.json"
        if cfg_file.is_file():
            found[str(d)] = json.loads(cfg_file.read_text()).get("base_model")
    models = {m for m in found.values() if m}
    if len(models) == 1:
        return models.pop()
    if not models:
        raise LivoError(f"no base_model recorded in {', '.join(map(str, data_dirs))} (config.json missing): set base_model in the training config")
    raise LivoError(f"the dataset runs were made with different base models ({found}): set base_model in the training config")


def training_shards(data_dirs: list[Path]):
    """The complete shards of `data_dirs` that training can use; every skipped one is logged by name.

    Cheap checks here (marker, file, size); each shard's bytes are checked against its sha256 when its
    latents are cached (a shard already cached is trained on from its verified cache piece).
    """
    from livo_core.shards import list_shards

    resolved = [Path(d).resolve() for d in data_dirs]
    if len(set(resolved)) != len(resolved):
        repeated = sorted({str(d) for d in resolved if resolved.count(d) > 1})
        raise LivoError(f"--data {', '.join(repeated)} is given more than once: every pair would be trained on twice; "
                        "give each dataset run once")
    shards, problems = list_shards(data_dirs, verify=False)
    for p in problems:
        log.warning("skipping %s", p)
    if not any(s.rows for s in shards):
        raise LivoError(f"no complete shards with pairs in {', '.join(map(str, data_dirs))}: build data with `livo dataset` first")
    return shards


def read_training_pairs(data_dirs: list[Path]):
    """All pairs of the complete shards in `data_dirs` as one DataFrame (small data only: reports, baselines'
    bookkeeping). Training itself streams shard by shard (`training_shards` + `latents.prepare_pairs`)."""
    from livo_core.shards import read_shards

    training_shards(data_dirs)
    df, problems = read_shards(data_dirs)
    for p in problems:
        log.warning("skipping %s", p)
    return df


def load_training_data(data_dirs: list[Path], sd, cfg: TrainConfig, cache_dir: Path, device, dtype,
                       progress: bool = True) -> PairData:
    """The pairs of `data_dirs`, their latents and embeddings cached (only what is missing is computed)."""
    shards = training_shards(data_dirs)
    return prepare_pairs(shards, sd, cache_dir, model_key(cfg.base_model, dtype, cfg.resolution), cfg.resolution,
                         device, dtype, flip=cfg.random_flip, sample=cfg.latent_sampling == "sample",
                         verify=cfg.verify_cache, encode_batch=cfg.encode_batch_size, progress=progress)


# --------------------------------------------------------------------------- one step
class Sampler:
    """Pair indices of each (global) batch. The stream is epoch after epoch of shuffles of range(n); a batch
    never spans two epochs (the last, partial batch of an epoch is skipped, as DataLoader(drop_last=True)),
    so the processes of one step always train on distinct pairs. The whole sampler state is `position`
    (where in the stream the next batch starts); one permutation per epoch is kept."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def take(self, batch_size: int, position: int) -> tuple[np.ndarray, int]:
        """(indices of the batch at `position`, the position after it)."""
        if batch_size <= self.n:
            epoch, offset = divmod(position, self.n)
            if offset + batch_size > self.n:   # would span two epochs: start the next one
                epoch, offset = epoch + 1, 0
            return self._permutation(epoch)[offset:offset + batch_size].copy(), epoch * self.n + offset + batch_size
        out: list[int] = []   # fewer pairs than one batch: every pair, epoch after epoch
        while len(out) < batch_size:
            epoch, offset = divmod(position, self.n)
            take = self._permutation(epoch)[offset:offset + batch_size - len(out)]
            out.extend(take.tolist())
            position += len(take)
        return np.asarray(out), position

    def batch(self, batch_size: int, position: int) -> np.ndarray:
        return self.take(batch_size, position)[0]


def batch_indices(n: int, batch_size: int, seed: int, position: int) -> np.ndarray:
    """The batch at `position` of the sample stream (see Sampler); a new Sampler each call (tests, one-offs)."""
    return Sampler(n, seed).batch(batch_size, position)


def noised_pair(family, noise_scheduler, batch: Batch, generator: torch.Generator):
    """Noise both images of every pair with the SAME noise and timestep, so w and l are compared on equal terms.

    Returns noisy latents (2B, 4, h, w) = cat(w, l), their timesteps (2B,), the prediction target (2B, 4, h, w)
    and the pairs' timesteps (B,). Draws noise first, then timesteps, from `generator` (resume depends on it).
    `family` (livo_core.families) says how to draw timesteps, noise and the target (epsilon, v, ...).
    """
    B = batch.latents_w.shape[0]
    device = batch.latents_w.device
    noise = torch.randn(batch.latents_w.shape, generator=generator).to(device, batch.latents_w.dtype)  # (B, 4, h, w)
    t = family.sample_timesteps(noise_scheduler, B, generator).to(device)  # (B,)
    latents = torch.cat([batch.latents_w, batch.latents_l])  # (2B, 4, h, w)
    noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    noisy, target = family.noised(noise_scheduler, latents, noise2, t2)
    return noisy, t2, target, t


def pair_errors(theta_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor):
    """Predictions on cat(w, l) (2B, 4, h, w) -> per-sample MSEs theta_w, ref_w, theta_l, ref_l, each (B,)."""
    theta_mse = F.mse_loss(theta_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (2B,)
    ref_mse = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    theta_w, theta_l = theta_mse.chunk(2)
    ref_w, ref_l = ref_mse.chunk(2)
    return theta_w, ref_w, theta_l, ref_l


def denoising_errors(family, value_encoder, unet, noise_scheduler, batch: Batch, generator: torch.Generator,
                     prepend: bool = True, condition: str = "token") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample MSEs theta_w, ref_w, theta_l, ref_l (each (B,)) and the timesteps (B,)."""
    noisy, t2, target, t = noised_pair(family, noise_scheduler, batch, generator)
    prompt = torch.cat([batch.prompt_embeds, batch.prompt_embeds])  # (2B, 77, D)
    if prepend:
        value_token = value_encoder(batch.value_ids)  # (B, 1, D): one text pass serves w and l
        theta_embeds = family.attach_value_token(prompt, torch.cat([value_token, value_token]), condition)  # (2B, 78, D)
    else:
        theta_embeds = prompt  # control: theta pass == ref pass
    theta_pred = family.denoise(unet, noisy, t2, theta_embeds)  # (2B, 4, h, w), with autograd
    with torch.no_grad():
        ref_pred = family.denoise(unet, noisy, t2, prompt)  # (2B, 4, h, w), frozen model
    return (*pair_errors(theta_pred, ref_pred, target), t)


def loss_terms(theta_w, ref_w, theta_l, ref_l, t, noise_scheduler, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The configured loss on per-sample errors, its logged parts, and the batch's preference accuracy."""
    weights = min_snr_weights(t, noise_scheduler, cfg.min_snr_gamma, cfg.min_snr_formula) if cfg.min_snr_gamma else None
    if cfg.loss == "dpo":
        terms = dpo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta_dpo=cfg.beta_dpo, weights=weights)
    else:
        terms = livo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta=cfg.beta, alpha=cfg.alpha,
                                gamma1=cfg.gamma1, gamma2=cfg.gamma2, weights=weights)
    # Preference accuracy: the value token helps the aligned image more than the violating one.
    terms["pref_acc"] = ((theta_w - ref_w) < (theta_l - ref_l)).float().mean().detach()
    return terms


def unet_denoising_errors(family, unet, ref_unet, noise_scheduler, batch: Batch, generator: torch.Generator):
    """Per-sample MSEs theta_w, ref_w, theta_l, ref_l (each (B,)) and timesteps (B,), for a trainable UNet against a
    frozen reference UNet; both read the prompt tokens only. Noise and timesteps are drawn exactly as for the value
    encoder (`noised_pair`)."""
    noisy, t2, target, t = noised_pair(family, noise_scheduler, batch, generator)
    prompt = torch.cat([batch.prompt_embeds, batch.prompt_embeds])  # (2B, 77, D)
    theta_pred = family.denoise(unet, noisy, t2, prompt)  # (2B, 4, h, w), with autograd
    with torch.no_grad():
        ref_pred = family.denoise(ref_unet, noisy, t2, prompt)
    return (*pair_errors(theta_pred, ref_pred, target), t)


def compute_loss(family, value_encoder, unet, noise_scheduler, batch: Batch, cfg: TrainConfig,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The loss of one batch and its logged parts (see livo_core.loss). No backward here."""
    theta_w, ref_w, theta_l, ref_l, t = denoising_errors(family, value_encoder, unet, noise_scheduler, batch, generator,
                                                         prepend=cfg.prepend_value_token, condition=cfg.value_condition)
    return loss_terms(theta_w, ref_w, theta_l, ref_l, t, noise_scheduler, cfg)


@torch.no_grad()
def preference_metrics(family, encoder, unet, noise_scheduler, data: PairData, cfg: TrainConfig, repeats: int = 4,
                       seed: int = 0, batch_size: int = 16, device="cpu") -> dict[str, float]:
    """Score a value encoder on pairs with fixed noise draws (the same for every encoder scored with `seed`).

    Averaged over pairs x `repeats` draws: loss (the configured loss), pref_acc (share where the value token
    helps the aligned image more than the violating one), gap_w / gap_l (mean theta - ref, want < 0 / > 0),
    share_past_margin. Used at the start and end of training and by the nightly's held-out comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    sums = {"loss": 0.0, "gap_w": 0.0, "gap_l": 0.0, "share_past_margin": 0.0, "pref_acc": 0.0}
    n = 0
    dtype = next(unet.parameters()).dtype
    for _ in range(repeats):
        for start in range(0, len(data), batch_size):
            batch = get_batch(data, range(start, min(start + batch_size, len(data)))).to(device)
            batch.latents_w, batch.latents_l = batch.latents_w.to(dtype), batch.latents_l.to(dtype)
            batch.prompt_embeds = batch.prompt_embeds.to(dtype)
            theta_w, ref_w, theta_l, ref_l, t = denoising_errors(family, encoder, unet, noise_scheduler, batch, generator,
                                                                 condition=cfg.value_condition)
            terms = loss_terms(theta_w, ref_w, theta_l, ref_l, t, noise_scheduler, cfg)
            b = len(theta_w)
            for k in sums:
                sums[k] += float(terms[k]) * b
            n += b
    return {k: v / n for k, v in sums.items()}


# --------------------------------------------------------------------------- checkpoints and logs
def find_checkpoint(out_dir: Path, resume: str | Path) -> Path | None:
    """'latest' -> newest complete checkpoint under out/checkpoints (None: none yet); otherwise the given folder."""
    if str(resume) == "latest":
        found = sorted((Path(out_dir) / "checkpoints").glob("step-*[0-9]"))
        found = [c for c in found if (c / "state.json").is_file()]
        return found[-1] if found else None
    ckpt = Path(resume)
    if not (ckpt / "state.json").is_file():
        raise LivoError(f"{ckpt} is not a livo checkpoint (no state.json): pass 'latest' or a checkpoints/step-NNNNNN folder")
    return ckpt


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_losses(csv_path: Path, png_path: Path) -> Path:
    """Loss (raw and smoothed) and the theta - ref gaps of w and l over steps -> PNG."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any thread

    df = pd.read_csv(csv_path)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    window = max(1, len(df) // 50)
    ax1.plot(df["step"], df["loss"], alpha=0.3, label="loss")
    ax1.plot(df["step"], df["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax1.set(xlabel="step", title="loss")
    ax1.legend()
    for col, name in (("gap_w", "aligned: theta - ref (want < 0)"), ("gap_l", "violating: theta - ref (want > 0)")):
        ax2.plot(df["step"], df[col].rolling(window, min_periods=1).mean(), label=name)
    ax2.axhline(0, color="grey", lw=0.5)
    ax2.set(xlabel="step", title="denoising-error gaps")
    ax2.legend()
    fig.savefig(png_path, dpi=100)
    return png_path


def _log_step(line: str) -> int | None:
    """The step of a CSV log line, None for a line a kill cut short."""
    head = line.split(",", 1)[0]
    return int(head) if head.isdigit() and line.endswith("\n") and line.count(",") == len(LOG_COLUMNS) - 1 else None


def _truncate_logs(out_dir: Path, step: int) -> None:
    """On resume, keep exactly the log rows 1..step (a killed run may have logged more, or half a row).

    Each file is rewritten atomically: a kill during the rewrite leaves the old file, never an empty one.
    """
    csv_path, jsonl_path = out_dir / "train_log.csv", out_dir / "train_log.jsonl"
    if csv_path.is_file():
        lines = csv_path.read_text().splitlines(keepends=True)
        rows = {}
        for ln in lines[1:]:
            s = _log_step(ln)
            if s is not None and s <= step:
                rows[s] = ln     # a step logged twice (a pre-fix run) keeps its last row
        atomic_write_text(csv_path, ",".join(LOG_COLUMNS) + "\n" + "".join(rows[k] for k in sorted(rows)))
    if jsonl_path.is_file():
        rows = {}
        for ln in jsonl_path.read_text().splitlines():
            try:
                row = json.loads(ln)
            except ValueError:
                continue
            if row.get("step", step + 1) <= step:
                rows[row["step"]] = ln + "\n"
        atomic_write_text(jsonl_path, "".join(rows[k] for k in sorted(rows)))


# Fields that only say how long to train, how often to write and how to check: changing them does not
# make a different training run, so `--resume latest` may change them (e.g. train longer).
BOOKKEEPING = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "verify_cache", "encode_batch_size",
               "gradient_checkpointing", "channels_last", "compile_unet"}


def run_identity(cfg: TrainConfig, data_dirs: list[Path]) -> str:
    """What makes a training run: its config (minus bookkeeping) and the dataset runs it reads."""
    payload = {"config": cfg.model_dump(mode="json", exclude=BOOKKEEPING | {"cache_dir"}),
               "data": sorted(str(Path(d).resolve()) for d in data_dirs)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_out_dir(out_dir: Path, cfg: TrainConfig, data_dirs: list[Path], resume: str | None, overwrite: bool) -> None:
    """An output folder belongs to one training run: refuse another one there (see the module docstring).

    Fine: a new or empty folder; `--resume` with the same run; `overwrite` (the old run is removed, the
    cache kept). Writes nothing.
    """
    from livo_core.files import check_writable

    check_writable(out_dir, "--out")
    if not out_dir.is_dir() or overwrite:
        return
    entries = [p for p in out_dir.iterdir() if p.name not in (".lock", "cache")]
    if not entries:
        return
    record = out_dir / "train_config.json"
    try:
        old = json.loads(record.read_text()).get("run_identity")
    except (OSError, ValueError):
        old = None
    mine = run_identity(cfg, data_dirs)
    again = "pass --resume latest to continue it, or --overwrite to start over there (its checkpoints and logs are deleted)"
    if old is None:
        raise LivoError(f"--out {out_dir} is not empty and holds no livo training run: choose a new folder, or {again.split(', or ')[1]}")
    if old != mine:
        raise LivoError(f"--out {out_dir} holds another training run (other config or data): choose a new folder, "
                        "or pass --overwrite to replace it")
    if not resume:
        raise LivoError(f"--out {out_dir} holds this training run already: {again}")


def _clear_out_dir(out_dir: Path) -> None:
    """--overwrite: remove an earlier run's outputs (checkpoints, logs, encoder); the shareable cache stays."""
    for p in out_dir.iterdir():
        if p.name in (".lock", "cache"):
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@dataclass
class TrainResult:
    out_dir: Path
    steps: int                      # the step the run ended at
    last_metrics: dict[str, float]  # the last logged row
    value_encoder: Path             # out/value_encoder (out/unet when trains = unet)
    loss_plot: Path                 # out/loss.png
    log_csv: Path                   # out/train_log.csv
    preference: dict[str, dict[str, float]] | None = None   # {"before", "after"}: preference_metrics on the training pairs


# --------------------------------------------------------------------------- what is trained
class ValueEncoderPart:
    """LiVO: a value encoder (fp32: AdamW on fp16 weights NaNs), initialised from the model's text encoder (the paper),
    a warm start or a checkpoint; the denoiser stays frozen."""

    folder = "value_encoder"

    def build(self, cfg: TrainConfig, sd, ckpt: Path | None):
        if ckpt or cfg.init_value_encoder:
            encoder = ValueEncoder.from_pretrained(ckpt or cfg.init_value_encoder).float().train()
        else:
            encoder = sd.family.value_encoder(sd, cfg.value_condition).train()
        encoder.condition = cfg.value_condition   # saved with it: inference conditions the same way
        return encoder

    def checkpointing(self, module) -> None:
        for tower in (module.text_model, module.text_model_2):
            if tower is not None:
                tower.gradient_checkpointing_enable()

    def loss(self, module, sd, unet, batch: Batch, cfg: TrainConfig, generator) -> dict[str, torch.Tensor]:
        return compute_loss(sd.family, module, unet, sd.noise_scheduler, batch, cfg, generator)


class UNetPart:
    """The Diffusion-DPO baseline: every weight of an fp32 copy of the denoiser, against the frozen one as reference."""

    folder = "unet"

    def build(self, cfg: TrainConfig, sd, ckpt: Path | None):
        if cfg.init_value_encoder or not cfg.prepend_value_token:
            raise LivoError("init_value_encoder and prepend_value_token apply to trains = value_encoder, not unet")
        if ckpt:
            return sd.family.load_denoiser(ckpt / self.folder, "cpu", torch.float32).requires_grad_(True).train()
        return copy.deepcopy(sd.unet).float().requires_grad_(True).train()

    def checkpointing(self, module) -> None:
        module.enable_gradient_checkpointing()

    def loss(self, module, sd, unet, batch: Batch, cfg: TrainConfig, generator) -> dict[str, torch.Tensor]:
        errors = unet_denoising_errors(sd.family, module, unet, sd.noise_scheduler, batch, generator)
        return loss_terms(*errors, sd.noise_scheduler, cfg)


TRAINED_PARTS = {"value_encoder": ValueEncoderPart(), "unet": UNetPart()}


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, data_dirs: list[str | Path], out_dir: str | Path, resume: str | Path | None = None,
          progress: bool = True, overwrite: bool = False, measure_preference: bool = False) -> TrainResult:
    """Train a value encoder on livo dataset runs; write logs, checkpoints and out/value_encoder/.

    resume: "latest" (the newest checkpoint; none yet = start at step 0) or a checkpoint folder.
    overwrite: replace another training run's outputs in out_dir. measure_preference: score the encoder on
    (up to 256 of) the training pairs with fixed noise before and after training (TrainResult.preference).
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from livo_core.families import family_for
    from livo_core.lock import RunLock
    from livo_core.models import resolve_device
    from livo_core.progress import Progress

    out_dir, data_dirs = Path(out_dir), [Path(d) for d in data_dirs]
    device = resolve_device(cfg.device)
    shards = training_shards(data_dirs)   # bad data -> LivoError before anything is written
    base_model = cfg.base_model or base_model_from_data(data_dirs)
    cfg = with_model_resolution(cfg.model_copy(update={"base_model": base_model}), data_dirs)
    check_config_for_family(cfg)
    half = {"float16": "fp16", "bfloat16": "bf16"}[family_for(base_model).cuda_dtype]   # the family's half precision
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else (half if device.type == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)  # frozen models' dtype
    main = accelerator.is_main_process

    if main:
        check_out_dir(out_dir, cfg, data_dirs, str(resume) if resume else None, overwrite)
    lock = RunLock(out_dir, purpose="livo train", timeout_s=0) if main else None   # one trainer per output folder
    if lock:
        lock.acquire()
    try:
        return _train(cfg, shards, data_dirs, out_dir, resume, progress, overwrite, measure_preference,
                      accelerator, device, dtype, get_scheduler, Progress)
    finally:
        if lock:
            lock.release()


def _train(cfg, shards, data_dirs, out_dir, resume, progress, overwrite, measure_preference, accelerator, device,
           dtype, get_scheduler, Progress) -> TrainResult:
    main = accelerator.is_main_process
    if main:
        if overwrite:
            _clear_out_dir(out_dir)
        clean_tmp_files(out_dir / "checkpoints", recursive=False)   # a kill mid-checkpoint leaves its temporary
    ckpt = find_checkpoint(out_dir, resume) if resume else None
    if resume and ckpt is None:
        log.info("no checkpoint in %s yet: starting at step 0", out_dir / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {"step": 0, "samples_seen": 0}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(
            {**cfg.model_dump(mode="json"), "data_dirs": [str(d) for d in data_dirs],
             "run_identity": run_identity(cfg, data_dirs)}, indent=2))

    # Models: the model frozen in `dtype`; the trained part (value encoder, or a UNet copy for the DPO baseline) in fp32.
    torch.manual_seed(cfg.seed)
    sd = load_model_parts(cfg.base_model, dtype)
    part = TRAINED_PARTS[cfg.trains]
    value_encoder = part.build(cfg, sd, ckpt)   # the module the optimizer trains (named for the paper's case)
    cache_dir = cfg.cache_dir or out_dir / "cache"
    with accelerator.main_process_first():  # the main process fills the cache; the others then read it
        data = load_training_data(data_dirs, sd, cfg, cache_dir, accelerator.device, dtype, progress=progress and main)
    sd.vae, sd.text_encoder = None, None   # not needed in the loop
    log.info("%d pairs, latents %s", len(data), data.latent_shape)
    unet = sd.unet.to(accelerator.device)
    # Attention runs through PyTorch's scaled_dot_product_attention (diffusers' default processor on torch 2).
    if cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if cfg.compile_unet:
        unet = torch.compile(unet)
    if cfg.gradient_checkpointing:
        # Gradients flow through the frozen UNet to the value token, so its activations are what fill memory.
        unet.enable_gradient_checkpointing()
        part.checkpointing(value_encoder)

    # fused: one kernel for all parameters, ~7x faster than the default loop on CPU (the token table is 38M on SD 1.5)
    optimizer = torch.optim.AdamW(value_encoder.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    # accelerate steps a prepared scheduler once per process per step: scale its step counts to match.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_steps * accelerator.num_processes)
    value_encoder, optimizer, lr_scheduler = accelerator.prepare(value_encoder, optimizer, lr_scheduler)
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)  # noise and timesteps
    if ckpt:
        made_by = state.get("processes", 1)
        if made_by != accelerator.num_processes:
            raise LivoError(f"{ckpt} was saved by {made_by} training process(es), this run has {accelerator.num_processes}: "
                            f"resume with the same number of processes (accelerate launch --num_processes {made_by})")
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        lr_scheduler.load_state_dict(torch.load(ckpt / "lr_scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=False), generator)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
    step, samples_seen = state["step"], state["samples_seen"]
    csv_path, jsonl_path, png_path = out_dir / "train_log.csv", out_dir / "train_log.jsonl", out_dir / "loss.png"
    if main:
        _truncate_logs(out_dir, step)   # exactly the rows 1..step: a killed run may have logged past its checkpoint
        if not csv_path.is_file():
            atomic_write_text(csv_path, ",".join(LOG_COLUMNS) + "\n")

    preference = None
    scored = None
    if measure_preference and main and cfg.trains == "value_encoder":
        scored = _subset(data, 256)
        preference = {"before": preference_metrics(sd.family, accelerator.unwrap_model(value_encoder).eval(), unet, sd.noise_scheduler,
                                                   scored, cfg, device=accelerator.device)}
        value_encoder.train()

    last: dict[str, float] = {}
    trace = [] if os.environ.get("LIVO_TRACE_RANKS") else None   # TEST HOOK: the pairs each process trained on, one
    # file per rank in that folder (two ranks printing long lines to one pipe interleave them)
    global_batch = cfg.batch_size * accelerator.num_processes
    sampler = Sampler(len(data), cfg.seed)
    flip, sample = cfg.random_flip, cfg.latent_sampling == "sample"
    with Progress(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not (progress and main)) as bar:
        while step < cfg.max_steps:
            # Each process takes its slice of one global batch; the sampler state is `samples_seen`.
            idx, samples_seen = sampler.take(global_batch, samples_seen)
            idx = idx[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
            if trace is not None:
                trace.append([int(i) for i in idx])
            batch = get_batch(data, idx, generator, flip=flip, sample=sample,
                              resample_violating=cfg.resample_violating).to(accelerator.device)
            batch.latents_w, batch.latents_l = batch.latents_w.to(dtype), batch.latents_l.to(dtype)
            with accelerator.autocast():
                terms = part.loss(value_encoder, sd, unet, batch, cfg, generator)
            if terms["loss"].requires_grad:  # False only in the control run (no value token: nothing to train)
                accelerator.backward(terms["loss"])
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(value_encoder.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            values = accelerator.reduce(torch.stack([terms[k].detach().float() for k in METRICS]), reduction="mean")
            last = {"step": step, **dict(zip(METRICS, values.tolist())), "lr": lr_scheduler.get_last_lr()[0]}
            if main:
                with open(csv_path, "a", newline="") as f:
                    csv.writer(f).writerow([repr(last[c]) if isinstance(last[c], float) else last[c] for c in LOG_COLUMNS])
                with open(jsonl_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                kill_point("train.log")
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{last['loss']:.4f}", pref_acc=f"{last['pref_acc']:.2f}")
                log.debug("step %d %s", step, last)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, out_dir, step, samples_seen, value_encoder, optimizer, lr_scheduler,
                                generator, cfg, part.folder)

    accelerator.wait_for_everyone()
    if trace is not None:
        weights = accelerator.unwrap_model(value_encoder).state_dict()
        digest = hashlib.sha256(b"".join(weights[k].detach().cpu().numpy().tobytes() for k in sorted(weights))).hexdigest()
        Path(os.environ["LIVO_TRACE_RANKS"], f"rank-{accelerator.process_index}.json").write_text(json.dumps(
            {"rank": accelerator.process_index, "of": accelerator.num_processes, "steps_from": state["step"],
             "pairs": trace, "encoder_sha256": digest}))
    final = out_dir / part.folder
    if main:
        save_encoder(accelerator.unwrap_model(value_encoder), final)
        plot_losses(csv_path, png_path)   # once, at the end: the CSV is the live record
        if not last:  # resumed at max_steps: report the last logged row
            rows = jsonl_path.read_text().splitlines()
            last = json.loads(rows[-1]) if rows else {}
        if scored is not None:
            preference["after"] = preference_metrics(sd.family, accelerator.unwrap_model(value_encoder).eval(), unet,
                                                     sd.noise_scheduler, scored, cfg, device=accelerator.device)
    accelerator.end_training()
    return TrainResult(out_dir, step, last, final, png_path, csv_path, preference)


def _subset(data: PairData, n: int) -> PairData:
    """The first n pairs of a fixed shuffle (a preference estimate that costs the same at any dataset size)."""
    import dataclasses

    if len(data) <= n:
        return data
    keep = np.sort(np.random.default_rng(12345).permutation(len(data))[:n])
    return dataclasses.replace(data, index=data.index[keep], _maps=data._maps)


def save_encoder(value_encoder, folder: Path) -> Path:
    """Write the trained part's folder (a value encoder, or a UNet) atomically: a kill leaves the old folder or the
    new one, never half."""
    tmp = tmp_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    value_encoder.save_pretrained(tmp)
    old = folder.with_name(f".{folder.name}.old-{tmp.name.rsplit('-', 2)[-2]}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_checkpoint(accelerator, out_dir: Path, step: int, samples_seen: int, value_encoder, optimizer,
                    lr_scheduler, generator: torch.Generator, cfg: TrainConfig, folder: str = "value_encoder") -> Path:
    """Write checkpoints/step-NNNNNN/ via a temporary folder, renamed when complete; keep the newest N.

    Only the main process writes; the other processes' RNG states (each draws its own noise) reach it
    through a gather, so `--resume latest` restores every process exactly.
    """
    states = [_rng_state(generator)]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        states = gather_object(states)   # [process 0's, process 1's, ...]
    root = out_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    if accelerator.is_main_process:
        tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, state in enumerate(states):
            torch.save(state, tmp / f"rng-{k}.pt")
        accelerator.unwrap_model(value_encoder).save_pretrained(tmp / folder)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "samples_seen": samples_seen,
                                                    "processes": accelerator.num_processes,
                                                    "config": cfg.model_dump(mode="json")}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kill_point("train.checkpoint")
        if cfg.keep_checkpoints:
            for old in sorted(root.glob("step-*[0-9]"))[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
