"""The LiVO trainer: teach a value encoder, with Stable Diffusion frozen, from aligned/violating image pairs.

One training step, for a batch of B pairs (aligned image w, violating image l, prompt, value principle):

    z_w, z_l        cached VAE latents of both images                       (B, 4, h, w) each
    noise, t        the SAME noise and timestep for w and l                 (B, 4, h, w), (B,)
    value token     value_encoder("<principle>, <prompt>")                  (B, 1, D)   <- the only trainable part
    theta pass      ONE UNet call on cat(w, l), 78 tokens (value token + prompt), with autograd
    ref pass        ONE UNet call on cat(w, l), 77 tokens (prompt only), under no_grad: frozen SD
    loss            livo_loss(theta_w, ref_w, theta_l, ref_l) on per-sample denoising MSEs

Everything that does not depend on the value encoder is computed once before training and cached on disk,
keyed by image hash + model: VAE latents of every image and SD's prompt embeddings of every caption.

    out/train_log.csv, out/train_log.jsonl   one row per step: loss, hinges, gaps, share past margin, lr
    out/loss.png                             loss and gaps over steps
    out/checkpoints/step-000500/             value encoder, optimizer, lr scheduler, RNG states, data position
    out/value_encoder/                       the final value encoder (a transformers CLIPTextModel folder)
    out/train_config.json                    the resolved config (base model filled in)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from livo_core.encoder import ValueEncoder, encode_prompts, prepend_value_token, text_length, tokenize, value_text
from livo_core.errors import LivoError
from livo_core.loss import dpo_loss_terms, livo_loss_terms, min_snr_weights

log = logging.getLogger("livo.train")

METRICS = ["loss", "hinge_w", "hinge_l", "gap_w", "gap_l", "share_past_margin"]
LOG_COLUMNS = ["step", *METRICS, "lr"]


# --------------------------------------------------------------------------- config
class TrainConfig(BaseModel):
    """Training settings. Defaults are the paper's published run (SD 1.5, one GPU)."""

    # Unknown keys are typos; fail on them instead of silently ignoring a setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_model: str | None = Field(None, description="Stable Diffusion 1.x folder or hub id. None = the base_model in the dataset run's config.json.")
    loss: Literal["livo", "dpo"] = Field("livo", description="livo = the paper's two hinge terms; dpo = Diffusion-DPO's sigmoid loss (baseline).")
    beta: float = Field(1000.0, gt=0, description="LiVO: scale of the aligned-image gap theta_w - ref_w.")
    alpha: float = Field(500.0, gt=0, description="LiVO: scale of the violating-image gap ref_l - theta_l.")
    gamma1: float = Field(1.0, ge=0, description="LiVO: margin of the aligned-image hinge.")
    gamma2: float = Field(0.5, ge=0, description="LiVO: margin of the violating-image hinge.")
    beta_dpo: float = Field(5000.0, gt=0, description="DPO: KL strength (Diffusion-DPO uses 5000 for SD 1.5).")
    min_snr_gamma: float | None = Field(None, gt=0, description="Weight each pair by min-SNR-gamma of its timestep (e.g. 5); None = no weighting.")
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
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto = fp16 on CUDA, no on CPU. Frozen models run in this dtype; the value encoder's weights stay fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA if visible, else CPU (under `accelerate launch`, accelerate decides).")
    resolution: int | None = Field(None, ge=8, description="Resize (shorter side) and centre-crop images to this size; None = use the images' own size (all must match).")
    cache_dir: Path | None = Field(None, description="Where cached latents/embeddings live (shareable between runs); None = <out>/cache.")
    init_value_encoder: Path | None = Field(None, description="Start from this value encoder folder (warm start, e.g. an earlier run's value_encoder/); None = a copy of SD's text encoder, as in the paper.")
    prepend_value_token: bool = Field(True, description="False = control run: the theta pass gets no value token, so theta == ref and nothing is learned.")


def _format_validation_error(e: ValidationError, what: str) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(config)"
    got = err.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
    return f"invalid {what} field '{field}': {err['msg']}{got_s}{more}"


def load_train_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Training config file (optional .toml/.yaml/.json) + overrides -> TrainConfig, or a LivoError naming the field."""
    from livo_core.config import _read_file, _set_dotted  # the run config's reader: same formats, same errors

    data = _read_file(Path(path)) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise LivoError(_format_validation_error(e, "training config")) from None


# --------------------------------------------------------------------------- models
@dataclass
class SDParts:
    """The frozen parts of Stable Diffusion that training needs."""

    tokenizer: Any
    text_encoder: Any       # transformers.CLIPTextModel, fp32: the value encoder is copied from it
    vae: Any                # diffusers.AutoencoderKL
    unet: Any               # diffusers.UNet2DConditionModel
    noise_scheduler: Any    # diffusers.DDPMScheduler (training noise schedule)


def load_sd_parts(base_model: str, dtype: torch.dtype = torch.float32) -> SDParts:
    """Load tokenizer, text encoder (fp32), VAE and UNet (in `dtype`) and noise schedule of an SD 1.x model, on CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from livo_core.models import check_model_source

    check_model_source(base_model)
    try:
        parts = SDParts(
            tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
            # fp32 explicitly: transformers 5 keeps a checkpoint's dtype, and an fp16 value encoder copy NaNs under AdamW.
            text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", dtype=torch.float32),
            vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", dtype=dtype),
            noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
        )
    except (OSError, ValueError) as e:
        raise LivoError(f"cannot load Stable Diffusion model {base_model!r} ({str(e).splitlines()[0]}); "
                        "give a diffusers folder (model_index.json inside) or a reachable hub id") from e
    for m in (parts.text_encoder, parts.vae, parts.unet):
        m.requires_grad_(False)
        m.eval()
    return parts


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


def read_training_pairs(data_dirs: list[Path]):
    """All pairs of the complete shards in `data_dirs`; every skipped shard is logged by name."""
    from livo_core.shards import read_shards

    df, problems = read_shards(data_dirs)
    for p in problems:
        log.warning("skipping %s", p)
    if len(df) == 0:
        raise LivoError(f"no complete shards with pairs in {', '.join(map(str, data_dirs))}: build data with `livo dataset` first")
    return df


# --------------------------------------------------------------------------- the cache
@dataclass
class PairData:
    """Every pair, precomputed once. N pairs, U distinct captions, L text tokens, D text width."""

    latents_w: torch.Tensor        # (N, 4, h, w) aligned-image latents, scaled like SD's
    latents_l: torch.Tensor        # (N, 4, h, w) violating-image latents
    caption_index: torch.Tensor    # (N,) row of prompt_embeds for each pair
    prompt_embeds: torch.Tensor    # (U, L, D) SD's frozen prompt embeddings
    value_ids: torch.Tensor        # (N, L) token ids of "<principle>, <prompt>"
    pair_ids: list[str]

    def __len__(self) -> int:
        return len(self.pair_ids)


@dataclass
class Batch:
    latents_w: torch.Tensor        # (B, 4, h, w)
    latents_l: torch.Tensor        # (B, 4, h, w)
    prompt_embeds: torch.Tensor    # (B, L, D)
    value_ids: torch.Tensor        # (B, L)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.latents_w, self.latents_l, self.prompt_embeds, self.value_ids)))


def get_batch(data: PairData, indices) -> Batch:
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    return Batch(data.latents_w[idx], data.latents_l[idx], data.prompt_embeds[data.caption_index[idx]], data.value_ids[idx])


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def model_key(base_model: str, dtype: torch.dtype, resolution: int | None) -> str:
    """Names the cache: same model weights + dtype + resolution -> same latents and embeddings."""
    fingerprint = []
    folder = Path(base_model).expanduser()
    if folder.is_dir():  # a local folder can be rebuilt under the same name: include its weight files' stats
        for sub in ("vae", "text_encoder"):
            for f in sorted((folder / sub).glob("*")):
                st = f.stat()
                fingerprint.append([f"{sub}/{f.name}", st.st_size, st.st_mtime_ns])
        base_model = str(folder.resolve())
    payload = json.dumps([base_model, str(dtype), resolution, fingerprint])
    return _sha(payload)[:16]


def _load_cache(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else {}


def _save_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)  # atomic: a killed run leaves the old cache, never half of one


def _image_tensor(png: bytes, resolution: int | None):
    """PNG/JPEG bytes -> (3, H, W) in [-1, 1], as SD's VAE expects."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    if resolution is not None:  # shorter side to `resolution`, then centre crop (diffusers' training scripts)
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return x.permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae, images: list[torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """(3, H, W) images -> latents (N, 4, H/8, W/8): the VAE posterior mean, scaled like SD's pipeline.

    The mean, not a sample: deterministic, so a cached latent is the same latent every time.
    """
    out = []
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for i in range(0, len(images), batch_size):
        x = torch.stack(images[i:i + batch_size]).to(vae.device, vae.dtype)
        mean = vae.encode(x).latent_dist.mean
        out.append(((mean - shift) * vae.config.scaling_factor).cpu())
    return torch.cat(out)


def precompute(df, sd: SDParts, cache_dir: Path, key: str, resolution: int | None, device, dtype) -> PairData:
    """Latents of every image and prompt embeddings of every caption, from the disk cache or computed now.

    Only what the cache lacks is computed (by image hash / caption hash); the cache file is then rewritten.
    """
    cache_dir = Path(cache_dir) / key
    lat_file, txt_file = cache_dir / "latents.safetensors", cache_dir / "prompt_embeds.safetensors"
    latents, embeds = _load_cache(lat_file), _load_cache(txt_file)

    hashes_w = [_sha(b) for b in df["jpg_0"]]
    hashes_l = [_sha(b) for b in df["jpg_1"]]
    missing: dict[str, bytes] = {}
    for h, b in zip(hashes_w + hashes_l, list(df["jpg_0"]) + list(df["jpg_1"])):
        if h not in latents:
            missing[h] = b
    if missing:
        t0 = time.perf_counter()
        images = [_image_tensor(b, resolution) for b in missing.values()]
        sizes = sorted({tuple(x.shape[1:]) for x in images})
        if len(sizes) > 1:
            raise LivoError(f"the images have different sizes {sizes}: set resolution (e.g. resolution=512) in the training config")
        sd.vae.to(device)
        new = encode_images(sd.vae, images)
        latents.update(zip(missing.keys(), new))
        _save_cache(lat_file, latents)
        log.info("encoded %d images with the VAE in %.1f s (cache %s)", len(missing), time.perf_counter() - t0, lat_file)

    captions = list(dict.fromkeys(df["caption"]))  # distinct, in order
    todo = [c for c in captions if _sha(c) not in embeds]
    if todo:
        sd.text_encoder.to(device, dtype)
        for i in range(0, len(todo), 64):
            chunk = todo[i:i + 64]
            embeds.update(zip(map(_sha, chunk), encode_prompts(sd.text_encoder, sd.tokenizer, chunk).cpu()))
        _save_cache(txt_file, embeds)
        log.info("encoded %d captions with the text encoder (cache %s)", len(todo), txt_file)

    shapes = {tuple(latents[h].shape) for h in hashes_w + hashes_l}
    if len(shapes) > 1:  # images cached earlier at another size
        raise LivoError(f"the images' latents have different sizes {sorted(shapes)}: set resolution (e.g. resolution=512) in the training config")
    row_of = {c: i for i, c in enumerate(captions)}
    length = text_length(sd.tokenizer, sd.text_encoder)
    texts = [value_text(v, c) for v, c in zip(df["value"], df["caption"])]
    value_ids, _ = tokenize(sd.tokenizer, texts, length)
    return PairData(
        latents_w=torch.stack([latents[h] for h in hashes_w]),
        latents_l=torch.stack([latents[h] for h in hashes_l]),
        caption_index=torch.tensor([row_of[c] for c in df["caption"]]),
        prompt_embeds=torch.stack([embeds[_sha(c)] for c in captions]),
        value_ids=value_ids,
        pair_ids=list(df["pair_id"]),
    )


# --------------------------------------------------------------------------- one step
def batch_indices(n: int, batch_size: int, seed: int, position: int) -> np.ndarray:
    """Pair indices of the next batch. The sample stream is epoch after epoch of shuffles of range(n);
    `position` counts samples taken so far, so the whole sampler state is one integer."""
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset:offset + batch_size - len(out)]
        out.extend(take.tolist())
        position += len(take)
    return np.asarray(out)


def noised_pair(noise_scheduler, batch: Batch, generator: torch.Generator):
    """Noise both images of every pair with the SAME noise and timestep, so w and l are compared on equal terms.

    Returns noisy latents (2B, 4, h, w) = cat(w, l), their timesteps (2B,), the prediction target (2B, 4, h, w)
    and the pairs' timesteps (B,). Draws noise first, then timesteps, from `generator` (resume depends on it).
    """
    B = batch.latents_w.shape[0]
    device = batch.latents_w.device
    noise = torch.randn(batch.latents_w.shape, generator=generator).to(device, batch.latents_w.dtype)  # (B, 4, h, w)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (B,), generator=generator).to(device)  # (B,)
    latents = torch.cat([batch.latents_w, batch.latents_l])  # (2B, 4, h, w)
    noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    noisy = noise_scheduler.add_noise(latents, noise2, t2)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise2
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise2, t2)
    else:
        raise LivoError(f"prediction_type {noise_scheduler.config.prediction_type!r} is not supported: use an epsilon or v-prediction model")
    return noisy, t2, target, t


def pair_errors(theta_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor):
    """Predictions on cat(w, l) (2B, 4, h, w) -> per-sample MSEs theta_w, ref_w, theta_l, ref_l, each (B,)."""
    theta_mse = F.mse_loss(theta_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (2B,)
    ref_mse = F.mse_loss(ref_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    theta_w, theta_l = theta_mse.chunk(2)
    ref_w, ref_l = ref_mse.chunk(2)
    return theta_w, ref_w, theta_l, ref_l


def denoising_errors(value_encoder, unet, noise_scheduler, batch: Batch, generator: torch.Generator,
                     prepend: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample MSEs theta_w, ref_w, theta_l, ref_l (each (B,)) and the timesteps (B,)."""
    noisy, t2, target, t = noised_pair(noise_scheduler, batch, generator)
    prompt = torch.cat([batch.prompt_embeds, batch.prompt_embeds])  # (2B, 77, D)
    if prepend:
        value_token = value_encoder(batch.value_ids)  # (B, 1, D): one text pass serves w and l
        theta_embeds = prepend_value_token(prompt, torch.cat([value_token, value_token]))  # (2B, 78, D)
    else:
        theta_embeds = prompt  # control: theta pass == ref pass
    theta_pred = unet(noisy, t2, theta_embeds).sample  # (2B, 4, h, w), with autograd
    with torch.no_grad():
        ref_pred = unet(noisy, t2, prompt).sample  # (2B, 4, h, w), frozen SD
    return (*pair_errors(theta_pred, ref_pred, target), t)


def compute_loss(value_encoder, unet, noise_scheduler, batch: Batch, cfg: TrainConfig,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The loss of one batch and its logged parts (see livo_core.loss). No backward here."""
    theta_w, ref_w, theta_l, ref_l, t = denoising_errors(value_encoder, unet, noise_scheduler, batch, generator,
                                                         prepend=cfg.prepend_value_token)
    weights = min_snr_weights(t, noise_scheduler, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
    if cfg.loss == "dpo":
        return dpo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta_dpo=cfg.beta_dpo, weights=weights)
    return livo_loss_terms(theta_w, ref_w, theta_l, ref_l, beta=cfg.beta, alpha=cfg.alpha,
                           gamma1=cfg.gamma1, gamma2=cfg.gamma2, weights=weights)


# --------------------------------------------------------------------------- checkpoints and logs
def find_checkpoint(out_dir: Path, resume: str | Path) -> Path:
    """'latest' -> newest complete checkpoint under out/checkpoints; otherwise the given folder."""
    if str(resume) == "latest":
        found = sorted((Path(out_dir) / "checkpoints").glob("step-*[0-9]"))
        found = [c for c in found if (c / "state.json").is_file()]
        if not found:
            raise LivoError(f"resume=latest but {Path(out_dir) / 'checkpoints'} holds no checkpoint: drop --resume to start fresh")
        return found[-1]
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


def _truncate_logs(out_dir: Path, step: int) -> None:
    """On resume, drop log rows past the checkpoint (the killed run may have logged a few more)."""
    csv_path, jsonl_path = out_dir / "train_log.csv", out_dir / "train_log.jsonl"
    if csv_path.is_file():
        lines = csv_path.read_text().splitlines(keepends=True)
        csv_path.write_text("".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) <= step]))
    if jsonl_path.is_file():
        rows = [ln for ln in jsonl_path.read_text().splitlines(keepends=True) if json.loads(ln)["step"] <= step]
        jsonl_path.write_text("".join(rows))


@dataclass
class TrainResult:
    out_dir: Path
    steps: int                      # the step the run ended at
    last_metrics: dict[str, float]  # the last logged row
    value_encoder: Path             # out/value_encoder
    loss_plot: Path                 # out/loss.png
    log_csv: Path                   # out/train_log.csv


# --------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, data_dirs: list[str | Path], out_dir: str | Path,
          resume: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train a value encoder on livo dataset runs; write logs, checkpoints and out/value_encoder/."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from livo_core.models import resolve_device

    out_dir, data_dirs = Path(out_dir), [Path(d) for d in data_dirs]
    device = resolve_device(cfg.device)
    mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("fp16" if device.type == "cuda" else "no")
    accelerator = Accelerator(mixed_precision=mixed, cpu=device.type == "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)  # frozen models' dtype
    main = accelerator.is_main_process

    df = read_training_pairs(data_dirs)
    base_model = cfg.base_model or base_model_from_data(data_dirs)
    other = sorted(set(df["base_model"].dropna()) - {base_model})
    if other:
        log.warning("the images were rendered by %s but training uses %s", other, base_model)
    cfg = cfg.model_copy(update={"base_model": base_model})

    ckpt = find_checkpoint(out_dir, resume) if resume else None
    state = json.loads((ckpt / "state.json").read_text()) if ckpt else {"step": 0, "samples_seen": 0}
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))

    # Models: SD frozen in `dtype`; the value encoder a trainable fp32 copy of SD's text encoder.
    torch.manual_seed(cfg.seed)
    sd = load_sd_parts(base_model, dtype)
    if ckpt or cfg.init_value_encoder:
        value_encoder = ValueEncoder.from_pretrained(ckpt or cfg.init_value_encoder).float()  # fp32: AdamW on fp16 weights NaNs
    else:
        value_encoder = ValueEncoder.from_text_encoder(sd.text_encoder)
    value_encoder.train()
    cache_dir = cfg.cache_dir or out_dir / "cache"
    with accelerator.main_process_first():  # the main process fills the cache; the others then read it
        data = precompute(df, sd, cache_dir, model_key(base_model, dtype, cfg.resolution), cfg.resolution,
                          accelerator.device, dtype)
    del sd.vae, sd.text_encoder  # not needed in the loop
    log.info("%d pairs, latents %s, %d distinct captions", len(data), tuple(data.latents_w.shape[1:]), data.prompt_embeds.shape[0])
    unet = sd.unet.to(accelerator.device)
    if cfg.gradient_checkpointing:
        # Gradients flow through the frozen UNet to the value token, so its activations are what fill memory.
        unet.enable_gradient_checkpointing()
        value_encoder.text_model.gradient_checkpointing_enable()

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
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        lr_scheduler.load_state_dict(torch.load(ckpt / "lr_scheduler.pt", weights_only=False))
        _set_rng_state(torch.load(ckpt / f"rng-{accelerator.process_index}.pt", weights_only=False), generator)
        if main:
            _truncate_logs(out_dir, state["step"])
        log.info("resumed from %s (step %d)", ckpt, state["step"])

    step, samples_seen = state["step"], state["samples_seen"]
    csv_path, jsonl_path, png_path = out_dir / "train_log.csv", out_dir / "train_log.jsonl", out_dir / "loss.png"
    if main and not csv_path.is_file():
        csv_path.write_text(",".join(LOG_COLUMNS) + "\n")
    last: dict[str, float] = {}
    global_batch = cfg.batch_size * accelerator.num_processes
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (progress and main), desc="train", unit="step")
    while step < cfg.max_steps:
        # Each process takes its slice of one global batch; the sampler state is `samples_seen`.
        idx = batch_indices(len(data), global_batch, cfg.seed, samples_seen)
        idx = idx[accelerator.process_index * cfg.batch_size:(accelerator.process_index + 1) * cfg.batch_size]
        batch = get_batch(data, idx).to(accelerator.device)
        batch.latents_w, batch.latents_l = batch.latents_w.to(dtype), batch.latents_l.to(dtype)
        with accelerator.autocast():
            terms = compute_loss(value_encoder, unet, sd.noise_scheduler, batch, cfg, generator)
        if terms["loss"].requires_grad:  # False only in the control run (no value token: nothing to train)
            accelerator.backward(terms["loss"])
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(value_encoder.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += global_batch

        values = accelerator.reduce(torch.stack([terms[k].detach().float() for k in METRICS]), reduction="mean")
        last = {"step": step, **dict(zip(METRICS, values.tolist())), "lr": lr_scheduler.get_last_lr()[0]}
        if main:
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow([repr(last[c]) if isinstance(last[c], float) else last[c] for c in LOG_COLUMNS])
            with open(jsonl_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{last['loss']:.4f}", gap_w=f"{last['gap_w']:.2e}", gap_l=f"{last['gap_l']:.2e}")
            log.debug("step %d %s", step, last)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(accelerator, out_dir, step, samples_seen, value_encoder, optimizer, lr_scheduler,
                            generator, cfg)
    bar.close()

    accelerator.wait_for_everyone()
    final = out_dir / "value_encoder"
    if main:
        accelerator.unwrap_model(value_encoder).save_pretrained(final)
        plot_losses(csv_path, png_path)   # once, at the end: the CSV is the live record
        if not last:  # resumed at max_steps: report the last logged row
            last = json.loads(jsonl_path.read_text().splitlines()[-1])
    accelerator.end_training()
    return TrainResult(out_dir, step, last, final, png_path, csv_path)


def save_checkpoint(accelerator, out_dir: Path, step: int, samples_seen: int, value_encoder, optimizer,
                    lr_scheduler, generator: torch.Generator, cfg: TrainConfig) -> Path:
    """Write checkpoints/step-NNNNNN/ via a temporary folder, renamed when complete; keep the newest N."""
    root = out_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(generator), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(value_encoder).save_pretrained(tmp / "value_encoder")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step, "samples_seen": samples_seen,
                                                    "config": cfg.model_dump(mode="json")}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if cfg.keep_checkpoints:
            for old in sorted(root.glob("step-*[0-9]"))[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
