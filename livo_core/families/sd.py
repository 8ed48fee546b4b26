"""Stable Diffusion 1.x / 2.x: a UNet reading CLIP text tokens through cross-attention (epsilon or v-prediction).

    prompt  --CLIP text encoder (final LayerNorm)-->  (B, 77, D)         D = 768 (SD 1.x), 1024 (SD 2.x)
    value token (B, 1, D) prepended                -> (B, 78, D)         cross-attention reads any length
    training target: the noise (epsilon) or the velocity (v-prediction), by the scheduler's prediction_type
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from livo_core.errors import LivoError
from livo_core.families.base import Backbone, ModelParts


def _load_error(name: str, e: Exception) -> LivoError:
    return LivoError(f"cannot load Stable Diffusion model {name!r} ({str(e).splitlines()[0]}); "
                     "give a diffusers folder (model_index.json inside) or a reachable hub id")


class StableDiffusion(Backbone):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    subfolders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_class = "UNet2DConditionModel"
    has_sld = True

    # ---- loading
    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def load_pipeline(self, name: str, device: str = "auto", dtype: str = "auto"):
        from livo_core.models import resolve_device, resolve_dtype
        from livo_core.progress import silence_library_progress

        silence_library_progress()
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        try:
            pipe = self.pipeline_class().from_pretrained(name, dtype=dt, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dev)

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32) -> ModelParts:
        """Tokenizer, text encoder (fp32), VAE and UNet (in `dtype`) and the training noise schedule, on CPU."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from livo_core.progress import silence_library_progress

        silence_library_progress()
        try:
            parts = ModelParts(
                family=self,
                tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                # fp32 explicitly: transformers 5 keeps a checkpoint's dtype, and an fp16 value encoder copy NaNs under AdamW.
                text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=torch.float32),
                vae=AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dtype),
                unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", dtype=dtype),
                noise_scheduler=DDPMScheduler.from_pretrained(name, subfolder="scheduler"),
            )
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        for m in (parts.text_encoder, parts.vae, parts.unet):
            m.requires_grad_(False)
            m.eval()
        return parts

    def load_denoiser(self, folder: Path, device, dtype):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(str(folder)).to(device, dtype).eval()

    def copy_pipeline(self, pipe, **replace):
        """A copy of `pipe` sharing its components (but those in `replace`), with its own scheduler: a diffusers
        scheduler keeps per-call state (timesteps), so two pipelines must not share one."""
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        new = type(pipe)(**{**pipe.components, "scheduler": scheduler, **replace}, requires_safety_checker=False)
        new.set_progress_bar_config(disable=True)
        return new

    def safe_pipeline(self, pipe):
        """Safe Latent Diffusion (diffusers' StableDiffusionPipelineSafe) over `pipe`'s components."""
        from diffusers import StableDiffusionPipelineSafe

        components = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
        own = StableDiffusionPipelineSafe(**components, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        own.set_progress_bar_config(disable=True)
        return own

    # ---- conditioning
    @torch.no_grad()
    def encode_prompts(self, holder, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77, D), exactly as StableDiffusionPipeline.encode_prompt makes them: padded to 77 tokens
        (fewer when the text encoder has fewer positions); no attention mask unless the encoder's config asks.
        holder: the pipeline or the ModelParts (its tokenizer and text_encoder)."""
        from livo_core.encoder import text_length, tokenize

        text_encoder, tokenizer = holder.text_encoder, holder.tokenizer
        ids, mask = tokenize(tokenizer, prompts, text_length(tokenizer, text_encoder))
        device = text_encoder.device
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        return text_encoder(ids.to(device), attention_mask=mask.to(device) if use_mask else None).last_hidden_state

    def attach_value_token(self, cond: torch.Tensor, value_token: torch.Tensor, condition: str = "token") -> torch.Tensor:
        """(B, 77, D) prompt embeddings + (B, 1, D) value token -> (B, 78, D), value token first."""
        if value_token.dim() != 3 or value_token.shape[1] != 1:
            raise ValueError(f"value_token must be (B, 1, D), got {tuple(value_token.shape)}")
        return torch.cat([value_token.to(cond.dtype), cond], dim=1)

    def pad_negative(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 77, D) -> (B, 78, D): one more padding token (a copy of the last; the text encoder has only 77
        positions, so "" cannot be encoded at 78), so the negative branch matches the valued one's length."""
        return torch.cat([cond, cond[:, -1:]], dim=1)

    def token_width(self, pipe) -> int:
        return int(pipe.unet.config.cross_attention_dim)

    def folder_token_width(self, folder: Path) -> int | None:
        try:
            return int(json.loads((Path(folder) / "unet" / "config.json").read_text())["cross_attention_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def denoiser_token_width(self, config: dict) -> int | None:
        """The token width a saved denoiser's config.json reads."""
        return config.get("cross_attention_dim")

    # ---- training
    def sample_timesteps(self, noise_scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator)

    def noised(self, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        noisy = noise_scheduler.add_noise(latents, noise, t)
        kind = noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noisy, noise
        if kind == "v_prediction":
            return noisy, noise_scheduler.get_velocity(latents, noise, t)
        raise LivoError(f"prediction_type {kind!r} is not supported: use an epsilon or v-prediction model")

    def denoise(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return denoiser(noisy, t, cond).sample

    # ---- inference
    def generate(self, pipe, cond: torch.Tensor, negative: torch.Tensor | None, generators: list, *, steps: int,
                 guidance_scale: float, height: int | None, width: int | None) -> list:
        return pipe(prompt_embeds=cond, negative_prompt_embeds=negative, generator=generators,
                    num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                    output_type="pil").images

    # ---- random-weight models (tests, benches)
    def random_modules(self, cfg: dict) -> dict:
        """The networks of a shape config with random weights (in the current torch default device)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        return {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))}

    def build_random(self, folder: Path, cfg: dict, seed: int = 0, dtype=None) -> Path:
        """A random-weight pipeline of a shape config ("tiny-sd": a few MB; "sd15": SD 1.5's architecture,
        3.4 GB in fp32), saved with save_pretrained."""
        import diffusers

        from livo_core.models import clip_tokenizer

        torch.manual_seed(seed)
        scheduler_class = getattr(diffusers, cfg.get("scheduler_class", "DDIMScheduler"))
        pipe = self.pipeline_class()(
            **self.random_modules(cfg), tokenizer=clip_tokenizer(), scheduler=scheduler_class(**cfg["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if dtype is not None and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder))
        return Path(folder)
