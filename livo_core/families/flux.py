"""FLUX.1: a guidance-distilled flow-matching transformer (double- and single-stream blocks) over packed 2 x 2 latent
patches, reading T5 tokens and CLIP-L's pooled vector.

    prompt --T5-XXL (512 tokens) -------------------------------> (B, 512, 4096)   encoder_hidden_states
    prompt --CLIP-L pooler_output (final LayerNorm, end of text) -> (B, 768)         pooled_projections
    latents (B, 16, h, w) -> 2 x 2 patches (B, h/2 * w/2, 64), with RoPE ids (every text token has id 0)

livo's conditioning tensor packs the pooled vector as one last row: (B, 512 + 1, 4096). The value encoder is LiVO's
own: a copy of the model's CLIP-L whose pooled output is the value token (B, 1, 768) — exactly the tensor FLUX reads
as its pooled vector. Two ways to give it to the transformer (TrainConfig.value_condition, recorded with the encoder):

    token    zero-padded to 4096 and prepended to the T5 tokens (as on the other families; its RoPE id is 0 as every
             text token's, so the position does not matter)
    pooled   in place of CLIP-L's pooled vector of the prompt (the prompt keeps its T5 tokens)

FLUX.1-dev is guidance-distilled: rendering has no unconditional branch (the guidance scale goes into the
transformer), so a negative prompt is not used; training passes the distilled guidance 3.5 as diffusers' FLUX
training scripts do (FLUX.1-schnell has no guidance input and gets none).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from livo_core.errors import LivoError
from livo_core.families.base import ModelParts
from livo_core.families.sd import _load_error
from livo_core.families.sd3 import StableDiffusion3

T5_TOKENS = 512          # diffusers' FluxPipeline max_sequence_length default
TRAIN_GUIDANCE = 3.5     # the distilled guidance diffusers' train_dreambooth_lora_flux.py passes


class Flux(StableDiffusion3):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    subfolders = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    denoiser_class = "FluxTransformer2DModel"
    value_conditions = ("token", "pooled")
    uses_negative = False    # guidance-distilled (see the module docstring)

    def pipeline_class(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32) -> ModelParts:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        from livo_core.progress import silence_library_progress

        silence_library_progress()
        try:
            parts = ModelParts(
                family=self,
                tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", dtype=torch.float32),
                vae=AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dtype),
                unet=FluxTransformer2DModel.from_pretrained(name, subfolder="transformer", dtype=dtype),
                noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler"),
                tokenizer_2=T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_2"),
                text_encoder_2=T5EncoderModel.from_pretrained(name, subfolder="text_encoder_2", dtype=dtype),
            )
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        for m in (*parts.text_encoders(), parts.vae, parts.unet):
            m.requires_grad_(False)
            m.eval()
        return parts

    def load_denoiser(self, folder: Path, device, dtype):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(str(folder)).to(device, dtype).eval()

    def safe_pipeline(self, pipe):
        raise LivoError("SLD (safe latent diffusion) exists in diffusers for SD 1.x / 2.x only, not for FLUX: "
                        "drop the sld method for this model")

    def value_encoder(self, parts: ModelParts, condition: str = "token"):
        from livo_core.encoder import ValueEncoder

        return ValueEncoder.from_text_encoder(parts.text_encoder, family=self.name)   # LiVO's own: CLIP-L, pooled

    # ---- conditioning
    @torch.no_grad()
    def encode_prompts(self, holder, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 512 + 1, J): FluxPipeline.encode_prompt's T5 tokens, then CLIP-L's pooled vector."""
        ids = holder.tokenizer(prompts, padding="max_length", max_length=holder.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        pooled = holder.text_encoder(ids.to(holder.text_encoder.device), output_hidden_states=False).pooler_output
        t5_ids = holder.tokenizer_2(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                    return_tensors="pt").input_ids
        tokens = holder.text_encoder_2(t5_ids.to(holder.text_encoder_2.device), output_hidden_states=False)[0]
        return self.pack(tokens, pooled.to(tokens.dtype))

    def pooled_width(self, config) -> int:
        return int(config.pooled_projection_dim)

    # ---- training and inference
    def denoise(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> 2 x 2 patches -> the transformer -> (B, C, h, w) velocity."""
        from diffusers import FluxPipeline

        tokens, pooled = self.unpack(cond, self.pooled_width(denoiser.config))
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = (torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=torch.float32)
                    if denoiser.config.guidance_embeds else None)
        out = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def generate(self, pipe, cond: torch.Tensor, negative: torch.Tensor | None, generators: list, *, steps: int,
                 guidance_scale: float, height: int | None, width: int | None) -> list:
        """Guidance-distilled: the guidance scale goes into the transformer; no negative branch (see the docstring)."""
        tokens, pooled = self.unpack(cond, self.pooled_width(pipe.transformer.config))
        return pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, generator=generators, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=height, width=width, output_type="pil").images

    def native_resolution(self, folder: Path) -> int | None:
        """FLUX's transformer config has no sample_size; its VAE's says the size (1024 for FLUX.1)."""
        try:
            return int(json.loads((Path(folder) / "vae" / "config.json").read_text())["sample_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def token_width(self, pipe) -> int:
        return int(pipe.text_encoder.config.hidden_size)

    def folder_token_width(self, folder: Path) -> int | None:
        try:
            return int(json.loads((Path(folder) / "text_encoder" / "config.json").read_text())["hidden_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- random-weight models (tests, benches)
    def random_modules(self, cfg: dict) -> dict:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        return {"transformer": FluxTransformer2DModel(**cfg["transformer"]), "vae": AutoencoderKL(**cfg["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                "text_encoder_2": T5EncoderModel(T5Config(**cfg["text_encoder_2"]))}

    def build_random(self, folder: Path, cfg: dict, seed: int = 0, dtype=None) -> Path:
        """A random-weight FLUX folder; its T5 tokenizer is livo's offline stand-in (livo_core.models.t5_tokenizer)."""
        import diffusers

        from livo_core.models import clip_tokenizer, t5_tokenizer

        torch.manual_seed(seed)
        scheduler = getattr(diffusers, cfg.get("scheduler_class", "FlowMatchEulerDiscreteScheduler"))(**cfg["scheduler"])
        pipe = self.pipeline_class()(**self.random_modules(cfg), tokenizer=clip_tokenizer(),
                                     tokenizer_2=t5_tokenizer(min(32000, cfg["text_encoder_2"]["vocab_size"])),
                                     scheduler=scheduler)
        if dtype is not None and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder))
        return Path(folder)

