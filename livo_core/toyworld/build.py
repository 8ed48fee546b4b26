"""Train the toy world's models from scratch on CPU: a tiny Stable Diffusion and a tiny CLIP.

`build_world(out_dir)` writes two ordinary folders, used by livo exactly like real models:
  out_dir/model/  a StableDiffusionPipeline folder (VAE, UNet, CLIP text encoder, CLIP tokenizer, DDIM), fp16
  out_dir/clip/   an open_clip model (`local-dir:` format) trained contrastively on the same world
plus out_dir/build.json (settings, losses, timings, versions).

Order: render a pool of world images -> train the VAE -> cache the pool's latents -> train UNet and text
encoder together on the cached latents -> train CLIP. Everything is seeded, so a build is repeatable on
the same torch version and thread count (float sums depend on how work is split across threads).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from livo_core.models import clip_tokenizer
from livo_core.paths import TOYWORLD_DIR
from livo_core.toyworld.world import caption_of, render_array, sample_caption

IMAGE_SIZE = 32
LATENT_SIZE = 16          # VAE with two blocks halves the image once: 32x32x3 -> 16x16x4
TEXT_WIDTH = 128          # text encoder width = UNet cross-attention dim = value token width


@dataclass
class BuildSettings:
    pool: int = 24_000            # rendered (caption, image) examples; VAE, UNet and CLIP all draw from it
    vae_steps: int = 600
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6          # tiny KL: latents stay near-deterministic but bounded
    vae_mean_penalty: float = 1e-2  # keeps channel means near 0: the pipeline only scales latents, never shifts
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 8e-4
    caption_dropout: float = 0.1  # empty caption 10% of the time: the unconditional branch of CFG
    min_snr: float = 5.0          # min-SNR-gamma loss weighting (Hang et al. 2023)
    clip_steps: int = 400
    clip_batch: int = 256
    clip_lr: float = 1e-3
    warmup: int = 100

    def scaled(self, unet_steps: int) -> "BuildSettings":
        """A smaller build with `unet_steps` UNet steps; VAE and CLIP steps and the pool shrink with it.

        Under 100 steps the build is only a smoke test of the whole path (loadable, useless weights), so
        it also uses batches of 8.
        """
        k = unet_steps / self.unet_steps
        tiny = unet_steps < 100
        return replace(
            self,
            unet_steps=unet_steps,
            vae_steps=max(1, round(self.vae_steps * k)),
            clip_steps=max(1, round(self.clip_steps * k)),
            pool=min(self.pool, max(256, unet_steps * self.unet_batch)),
            warmup=min(self.warmup, max(1, unet_steps // 10)),
            vae_batch=8 if tiny else self.vae_batch,
            unet_batch=8 if tiny else self.unet_batch,
            clip_batch=8 if tiny else self.clip_batch,
        )


# --------------------------------------------------------------------------- model definitions
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=IMAGE_SIZE,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    # Cross-attention only at 8x8 and 4x4: at 16x16 it costs most and adds little for 32 px scenes.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # `attention_head_dim` is diffusers' legacy name for the number of heads: 2 heads of 32/64 dims
        # (8 narrow heads were 20% slower on CPU for nothing).
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=32,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    # 77 positions like SD 1.x: pipelines pad prompts to 77, and "<value principle>, <prompt>" must fit.
    return CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, vocab_size=49408, projection_dim=TEXT_WIDTH,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))


def make_scheduler():
    from diffusers import DDIMScheduler

    # SD 1.x's noise schedule; DDIM for sampling (the DDPM training maths only needs alphas_cumprod).
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


# --------------------------------------------------------------------------- helpers
def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _update(opt, params, loss: torch.Tensor, ema: float | None) -> float:
    """One optimizer step on `loss` (gradients clipped to norm 1); returns the loss's running mean (0.98)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the range SD's VAE works in."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_pool(n: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """n world examples: images (n, 32, 32, 3) uint8, the sampled captions, and full captions naming all."""
    rng = np.random.default_rng(seed)
    captions = [sample_caption(rng) for _ in range(n)]
    images, full = [], []
    for i, c in enumerate(captions):
        img, scene = render_array(c, seed * 1_000_003 + i)
        images.append(img)
        full.append(caption_of(scene))
    return np.stack(images), captions, full


# --------------------------------------------------------------------------- stage 1: VAE
def train_vae(images: torch.Tensor, s: BuildSettings, gen: torch.Generator, progress: bool):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    n = len(images)
    t0 = time.time()
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = s.vae_lr * _cosine_lr(step, s.vae_steps, min(s.warmup, s.vae_steps))
        x = images[torch.randint(n, (s.vae_batch,), generator=gen)]          # (B, 3, 32, 32)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B, 4, 16, 16)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()
        centre = z.mean(dim=(0, 2, 3)).pow(2).sum()                           # per-channel mean -> 0
        loss = mse + s.vae_kl * kl + s.vae_mean_penalty * centre
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == s.vae_steps - 1:
            psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))               # range [-1, 1] has peak-to-peak 2
            _log(progress, f"[vae] step {step + 1}/{s.vae_steps} mse {mse.item():.5f} ({psnr:.1f} dB) "
                           f"kl {kl.item():.3f} mean² {centre.item():.4f} {time.time() - t0:.0f}s")
    vae.eval().requires_grad_(False)
    return vae, {"mse": mse.item(), "psnr_db": psnr, "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def reconstruction_agreement(vae, images_u8: np.ndarray, mean: torch.Tensor, n: int = 512) -> dict:
    """Share of images whose detections (subject, colour, coat, splatter) survive VAE encode/decode."""
    from livo_core.toyworld.detect import detect

    rec = vae.decode(mean[:n]).sample                                        # (n, 3, 32, 32) in [-1, 1]
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    same = {"subject": 0, "colour": 0, "coat": 0, "splatter": 0}
    for a, b in zip(images_u8[:n], rec_u8):
        da, db = detect(a), detect(b)
        same["subject"] += da.subject == db.subject
        same["colour"] += da.colour == db.colour
        same["coat"] += da.coat == db.coat
        same["splatter"] += (da.splatter_score >= 0.5) == (db.splatter_score >= 0.5)
    return {k: round(v / min(n, len(rec_u8)), 4) for k, v in same.items()}


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool image: (N, 4, 16, 16) each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------- stage 2: UNet + text encoder
def train_unet(mean: torch.Tensor, std: torch.Tensor, scaling: float, token_ids: torch.Tensor,
               empty_ids: torch.Tensor, s: BuildSettings, gen: torch.Generator, progress: bool):
    unet, text_encoder, sched = make_unet(), make_text_encoder(), make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    abar = sched.alphas_cumprod                                              # (1000,)
    snr = abar / (1 - abar)
    weight = snr.clamp(max=s.min_snr) / snr                                  # min-SNR for epsilon prediction
    n = len(mean)
    t0, ema = time.time(), None
    for step in range(s.unet_steps):
        for g in opt.param_groups:
            g["lr"] = s.unet_lr * _cosine_lr(step, s.unet_steps, s.warmup)
        idx = torch.randint(n, (s.unet_batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling  # (B, 4, 16, 16)
        ids = token_ids[idx].clone()                                         # (B, 77)
        drop = torch.rand(s.unet_batch, generator=gen) < s.caption_dropout
        ids[drop] = empty_ids
        t = torch.randint(1000, (s.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = abar[t].sqrt().view(-1, 1, 1, 1) * z0 + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * noise
        # The world has few distinct captions: encode each distinct one once (same result, less work).
        uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
        cond = text_encoder(uniq)[0][inverse]                                # (B, 77, 128)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per_sample).mean()
        ema = _update(opt, params, loss, ema)
        if step % 50 == 0 or step == s.unet_steps - 1:
            _log(progress, f"[unet] step {step + 1}/{s.unet_steps} loss {ema:.4f} {time.time() - t0:.0f}s")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, sched, {"loss_ema": ema, "seconds": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------- stage 3: CLIP
def clip_normalise(images01: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> CLIP input; the same maths as open_clip's preprocess for 32x32 images."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    m = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (images01 - m) / sd


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise half the batch, so CLIP also scores soft generated images sensibly. x in [0, 1]."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(len(x), 1, 1, 1, generator=gen)
    noisy = (x + amount * (blurred - x)) + 0.04 * amount * torch.randn(x.shape, generator=gen)
    pick = (torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5).float()
    return (pick * noisy + (1 - pick) * x).clamp(0, 1)


def train_clip(images: torch.Tensor, captions: list[str], full: list[str], s: BuildSettings,
               gen: torch.Generator, progress: bool):
    import open_clip

    model = open_clip.CLIP(**CLIP_CONFIG)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")                          # the standard CLIP BPE, 77 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=s.clip_lr, weight_decay=0.1)
    n = len(images)
    t0 = time.time()
    for step in range(s.clip_steps):
        for g in opt.param_groups:
            g["lr"] = s.clip_lr * _cosine_lr(step, s.clip_steps, min(s.warmup, s.clip_steps))
        idx = torch.randint(n, (s.clip_batch,), generator=gen).tolist()
        # Half the time the full caption (names everything), else the sampled one (leaves things out).
        use_full = torch.rand(len(idx), generator=gen) < 0.5
        texts = [full[i] if f else captions[i] for i, f in zip(idx, use_full.tolist())]
        x = clip_normalise(_degrade((images[idx] + 1) / 2, gen))
        img_f = F.normalize(model.encode_image(x), dim=-1)                   # (B, 64)
        txt_f = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)     # (B, 64)
        logits = model.logit_scale.exp() * img_f @ txt_f.T                   # (B, B)
        # Repeated captions in a batch are all positives: soft targets instead of the diagonal.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == s.clip_steps - 1:
            _log(progress, f"[clip] step {step + 1}/{s.clip_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s")
    model.eval().requires_grad_(False)
    return model, {"loss": loss.item(), "seconds": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------- saving
def save_pipeline(folder: Path, vae, unet, text_encoder, scheduler) -> None:
    """Save a StableDiffusionPipeline folder in fp16 safetensors (loads in any dtype)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    mark_float32(folder)


def mark_float32(folder: Path) -> None:
    """Make a plain `from_pretrained(folder)` run in float32 although the weights are stored in fp16.

    diffusers loads its models in float32 by default, but transformers loads the text encoder in the dtype
    its config.json names ("float16" after saving fp16 weights), and fp16 text features then meet fp32
    UNet weights. A `dtype=` argument still overrides this.
    """
    path = Path(folder) / "text_encoder" / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_clip(folder: Path, model) -> str:
    """Save in open_clip's `local-dir:` format, fp16; returns the model name to load it by."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"size": IMAGE_SIZE, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CONFIG, "preprocess_cfg": preprocess}, indent=2))
    return f"local-dir:{folder}"


# --------------------------------------------------------------------------- the build
def build_world(out_dir: Path | str | None = None, steps: int | None = None, seed: int = 0,
                progress: bool = True) -> dict:
    """Train the world model and world CLIP from scratch; write out_dir/{model,clip,build.json}.

    steps: UNet steps (None = the full build; a few steps make a quick, useless but loadable build).
    Returns the build report (also written to build.json).
    """
    import diffusers
    import open_clip

    out = Path(out_dir) if out_dir else TOYWORLD_DIR
    s = BuildSettings() if steps is None else BuildSettings().scaled(steps)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()

    images_u8, captions, full = render_pool(s.pool, seed)
    images = _to_unit(images_u8)                                             # (N, 3, 32, 32) in [-1, 1]
    _log(progress, f"[pool] {s.pool} images, {len(set(captions))} distinct captions, {time.time() - t0:.0f}s")

    vae, vae_report = train_vae(images, s, gen, progress)
    mean, std = encode_pool(vae, images)
    # SD scales latents to unit variance with one number; the mean penalty keeps them centred on 0.
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    vae_report.update(scaling_factor=scaling, latent_channel_means=[round(v, 3) for v in mean.mean(dim=(0, 2, 3)).tolist()],
                      reconstruction_agreement=reconstruction_agreement(vae, images_u8, mean))
    _log(progress, f"[vae] {vae_report}")

    tok = clip_tokenizer()
    tokenize = lambda texts: tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids  # noqa: E731
    token_ids = tokenize(captions)                                           # (N, 77)
    empty_ids = tokenize([""])[0]
    unet, text_encoder, scheduler, unet_report = train_unet(mean, std, scaling, token_ids, empty_ids, s, gen, progress)

    clip, clip_report = train_clip(images, captions, full, s, gen, progress)

    out.mkdir(parents=True, exist_ok=True)
    save_pipeline(out / "model", vae, unet, text_encoder, scheduler)
    save_clip(out / "clip", clip)
    report = {
        # the training recipe this world's data needs (livo_core.train.preset_for reads it, wherever the world is)
        "training_preset": "toyworld",
        "settings": asdict(s), "seed": seed, "seconds": round(time.time() - t0, 1),
        "vae": vae_report, "unet": unet_report, "clip": clip_report,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "open_clip": open_clip.__version__, "threads": torch.get_num_threads()},
    }
    (out / "build.json").write_text(json.dumps(report, indent=2))
    _log(progress, f"[done] {out} in {report['seconds']:.0f}s")
    return report
