"""Stable Diffusion XL: a UNet reading two CLIP towers' tokens through cross-attention, plus a pooled text vector and
the image's size ("time ids") through its added conditioning.

    prompt --CLIP-L (penultimate layer)----------> (B, 77, 768)  \\  concatenated along the width
    prompt --OpenCLIP-bigG (penultimate layer)---> (B, 77, 1280) /   -> tokens (B, 77, 2048)
    prompt --bigG pooled + projection-----------> (B, 1280)         -> added_cond_kwargs["text_embeds"]
    image size (h, w, 0, 0, h, w)               -> (B, 6)            -> added_cond_kwargs["time_ids"]

livo's conditioning tensor for this family packs the pooled vector as one last row, zero-padded to the token width:
(B, 77 + 1, 2048). So the latents cache, the trainer and the renderer pass one tensor around as for SD; only this
module reads the last row as `text_embeds`. The value token is prepended (B, 1 + 77 + 1, 2048); the UNet reads
every row before the last as a token.

The value encoder is both towers, each initialised from the model's own, and the value token is the end-of-text row
of each tower's penultimate layer, concatenated: exactly the statistics of the prompt token SDXL puts at that
position (a projection from CLIP-L alone would start from a random map). Both towers share CLIP's BPE vocabulary
and are causal, so the end-of-text row does not depend on the padding: one tokenisation serves both.
The negative branch is SDXL's: zeros (tokens and pooled) for an empty negative prompt when the model says
force_zeros_for_empty_prompt (SDXL base does), else the encoded negative prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from livo_core.families.base import ModelParts
from livo_core.families.sd import StableDiffusion, _load_error

VAE_SCALE = 8   # every SDXL VAE downsamples by 8; time ids are in pixels


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    subfolders = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    value_token = "penultimate-eos"   # see the module docstring
    has_sld = False
    cuda_dtype = "bfloat16"   # SDXL's VAE overflows in fp16 (diffusers upcasts it); bf16 needs no upcast

    # ---- loading
    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def load_pipeline(self, name: str, device: str = "auto", dtype: str = "auto"):
        from livo_core.models import resolve_device, resolve_dtype
        from livo_core.progress import silence_library_progress

        silence_library_progress()
        dev = resolve_device(device)
        try:
            pipe = self.pipeline_class().from_pretrained(name, dtype=resolve_dtype(dtype, dev, self.cuda_dtype), add_watermarker=False)
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(dev)

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32) -> ModelParts:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        parts = super().load_parts(name, dtype)
        try:
            parts.tokenizer_2 = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2")
            parts.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        parts.text_encoder_2.requires_grad_(False).eval()
        return parts

    def copy_pipeline(self, pipe, **replace):
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        new = type(pipe)(**{**pipe.components, "scheduler": scheduler, **replace},
                         force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt, add_watermarker=False)
        new.set_progress_bar_config(disable=True)
        return new

    def safe_pipeline(self, pipe):
        from livo_core.errors import LivoError

        raise LivoError("SLD (safe latent diffusion) exists in diffusers for SD 1.x / 2.x only, not for SDXL: "
                        "drop the sld method for this model")

    def value_encoder(self, parts: ModelParts, condition: str = "token"):
        from livo_core.encoder import ValueEncoder

        return ValueEncoder.from_text_encoder(parts.text_encoder, parts.text_encoder_2, token=self.value_token, family=self.name)

    # ---- conditioning
    @torch.no_grad()
    def encode_prompts(self, holder, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77 + 1, D): the tokens of StableDiffusionXLPipeline.encode_prompt (both towers'
        penultimate layers, each with its own tokenizer), then the pooled vector as the last row."""
        rows, pooled = [], None
        for tokenizer, encoder in ((holder.tokenizer, holder.text_encoder), (holder.tokenizer_2, holder.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]                      # the last tower's projected pooled output (B, P)
            rows.append(out.hidden_states[-2])
        tokens = torch.cat(rows, dim=-1)         # (B, 77, D)
        return self.pack(tokens, pooled.to(tokens.dtype))

    @staticmethod
    def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens + (B, P) pooled -> (B, L + 1, D), the pooled vector zero-padded as the last row."""
        last = torch.zeros(tokens.shape[0], 1, tokens.shape[2], dtype=tokens.dtype, device=tokens.device)
        last[:, 0, :pooled.shape[1]] = pooled
        return torch.cat([tokens, last], dim=1)

    @staticmethod
    def unpack(cond: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L + 1, D) -> tokens (B, L, D), pooled (B, P)."""
        return cond[:, :-1], cond[:, -1, :pooled_width]

    def encode_negative(self, pipe, prompts: list[str]) -> torch.Tensor:
        if all(p == "" for p in prompts) and pipe.config.force_zeros_for_empty_prompt:   # SDXL's own unconditional
            like = self.encode_prompts(pipe, prompts[:1])
            return torch.zeros(len(prompts), *like.shape[1:], dtype=like.dtype, device=like.device)
        return self.encode_prompts(pipe, prompts)

    def pad_negative(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 77 + 1, D) -> (B, 78 + 1, D): one more padding token before the pooled row."""
        return torch.cat([cond[:, :-1], cond[:, -2:-1], cond[:, -1:]], dim=1)

    def pooled_width(self, unet_config) -> int:
        """P: the UNet's added-conditioning input is 6 time ids x addition_time_embed_dim + P."""
        return int(unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim)

    # ---- training and inference
    def denoise(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.unpack(cond, self.pooled_width(denoiser.config))
        h, w = noisy.shape[-2] * VAE_SCALE, noisy.shape[-1] * VAE_SCALE
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=tokens.dtype, device=noisy.device).expand(noisy.shape[0], 6)
        return denoiser(noisy, t, tokens, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    def generate(self, pipe, cond: torch.Tensor, negative: torch.Tensor | None, generators: list, *, steps: int,
                 guidance_scale: float, height: int | None, width: int | None) -> list:
        p = self.pooled_width(pipe.unet.config)
        tokens, pooled = self.unpack(cond, p)
        neg_tokens, neg_pooled = self.unpack(negative, p) if negative is not None else (None, None)
        return pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_tokens,
                    negative_pooled_prompt_embeds=neg_pooled, generator=generators, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=height, width=width, output_type="pil").images

    def folder_token_width(self, folder: Path) -> int | None:
        try:
            return int(json.loads((Path(folder) / "unet" / "config.json").read_text())["cross_attention_dim"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # ---- random-weight models (tests, benches)
    def random_modules(self, cfg: dict) -> dict:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        return {"unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"]),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))}

    def build_random(self, folder: Path, cfg: dict, seed: int = 0, dtype=None) -> Path:
        import diffusers

        from livo_core.models import clip_tokenizer

        torch.manual_seed(seed)
        tokenizer_2 = clip_tokenizer()
        tokenizer_2.pad_token = "!"   # SDXL's second tokenizer pads with "!" (id 0), its first with end-of-text
        scheduler_class = getattr(diffusers, cfg.get("scheduler_class", "EulerDiscreteScheduler"))
        pipe = self.pipeline_class()(**self.random_modules(cfg), tokenizer=clip_tokenizer(), tokenizer_2=tokenizer_2,
                                     scheduler=scheduler_class(**cfg["scheduler"]), add_watermarker=False)
        if dtype is not None and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder))
        return Path(folder)
