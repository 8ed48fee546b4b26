"""The model-family seam: what livo asks of one kind of diffusion model.

The trainer, the latents cache, the renderer, inference, evaluation and the retriever call these methods and
nothing family-specific. Shapes below are SD 1.x's (L = 77 tokens, D = 768, latents (4, h, w)); another family
has its own.

    load_pipeline(name, device, dtype)        the diffusers pipeline for rendering and inference
    load_parts(name, dtype)                   the frozen parts training needs (ModelParts)
    encode_prompts(holder, texts)             prompts -> the denoiser's text conditioning (B, L, D); holder: a
                                              pipeline or ModelParts (its tokenizer(s) and text encoder(s))
    encode_negative(holder, texts)            the unconditional branch's conditioning (SD: encode_prompts)
    value_encoder(parts)                      a trainable value encoder initialised from the model's own tower(s)
    attach_value_token(cond, token)           (B, L, D) + (B, 1, D) -> the conditioning with the value token
    pad_negative(cond)                        a negative branch as long as the valued conditioning
    sample_timesteps / noised                 training noise: timesteps, noisy latents and the target
    denoise(denoiser, noisy, t, cond)         the denoiser's prediction (same shape as the target)
    generate(pipe, cond, negative, ...)       images from conditioning tensors
    token_width(pipe) / folder_token_width    the width a value token must have
    safe_pipeline(pipe)                       the SLD-style baseline pipeline, or a LivoError when none exists
    random_modules(cfg) / build_random(...)   a random-weight model of a shape config (tests, benches)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModelParts:
    """The frozen parts of a diffusion model that training needs, and the family that knows how to use them."""

    family: "Backbone"
    tokenizer: Any
    text_encoder: Any       # fp32: the value encoder is copied from it
    vae: Any
    unet: Any               # the denoiser (a UNet for SD; a transformer for flow-matching families)
    noise_scheduler: Any    # the training noise schedule
    tokenizer_2: Any = None       # a second text tower (SDXL's OpenCLIP-bigG), when the family has one
    text_encoder_2: Any = None
    tokenizer_3: Any = None       # a third (SD3's T5), when the family has one and the model ships it
    text_encoder_3: Any = None

    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]


class Backbone:
    """One model family. Subclass it, implement every method, register the class in livo_core/families/__init__.py."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()     # diffusers pipeline class names (model_index.json `_class_name`)
    subfolders: tuple[str, ...] = ()           # the parts a complete model folder holds
    denoiser_component: str = "unet"           # the pipeline's denoiser attribute (unet / transformer)
    flow_matching: bool = False                # trained on velocities of a flow (SD3, FLUX), not noise / v
    value_conditions: tuple[str, ...] = ("token",)   # how the value token may condition (TrainConfig.value_condition)
    cuda_dtype: str = "float16"                # half precision of dtype / mixed_precision auto on a GPU
    has_sld: bool = False                      # diffusers has a Safe Latent Diffusion pipeline for it (safe_pipeline)
    uses_negative: bool = True                 # renders with an unconditional (negative) branch; FLUX does not

    def check_folder(self, folder: Path, name: str, what: str) -> None:
        """A LivoError naming the parts a local model folder lacks."""
        from livo_core.errors import LivoError

        missing = [sub for sub in self.subfolders if not (Path(folder) / sub).is_dir()]
        if missing:
            raise LivoError(f"{what} folder {name} lacks {', '.join(missing)}/: it is not a complete "
                            f"{self.pipeline_classes[0]} folder; save it again with diffusers' save_pretrained")

    def load_pipeline(self, name: str, device: str = "auto", dtype: str = "auto"):
        raise NotImplementedError

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32) -> ModelParts:
        raise NotImplementedError

    def encode_prompts(self, holder, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode_negative(self, holder, prompts: list[str]) -> torch.Tensor:
        """The conditioning of the unconditional branch for these negative prompts ("" = none)."""
        return self.encode_prompts(holder, prompts)

    def value_encoder(self, parts: ModelParts, condition: str = "token"):
        """A trainable ValueEncoder initialised from the model's text tower (the paper's initialisation); `condition`
        (TrainConfig.value_condition) for families whose pooled condition wants another kind of output."""
        from livo_core.encoder import ValueEncoder

        return ValueEncoder.from_text_encoder(parts.text_encoder, family=self.name)

    def attach_value_token(self, cond: torch.Tensor, value_token: torch.Tensor, condition: str = "token") -> torch.Tensor:
        raise NotImplementedError

    def pad_negative(self, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_timesteps(self, noise_scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def noised(self, noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(noisy latents, the prediction target), both shaped like `latents`."""
        raise NotImplementedError

    def denoise(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, pipe, cond: torch.Tensor, negative: torch.Tensor | None, generators: list, *, steps: int,
                 guidance_scale: float, height: int | None, width: int | None) -> list:
        raise NotImplementedError

    def token_width(self, pipe) -> int:
        raise NotImplementedError

    def folder_token_width(self, folder: Path) -> int | None:
        raise NotImplementedError

    def safe_pipeline(self, pipe):
        raise NotImplementedError

    def native_resolution(self, folder: Path) -> int | None:
        """The image size (pixels) the model was made for, from its folder's configs: the denoiser's sample_size
        times the VAE's downsampling (2 ** (blocks - 1)); None when the configs do not say."""
        import json

        try:
            sample = json.loads((Path(folder) / self.denoiser_component / "config.json").read_text())["sample_size"]
            blocks = json.loads((Path(folder) / "vae" / "config.json").read_text())["block_out_channels"]
            return int(sample) * 2 ** (len(blocks) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def random_modules(self, cfg: dict) -> dict:
        """{"unet": ..., "text_encoder": ..., ...}: the networks of a shape config, random weights."""
        raise NotImplementedError

    def build_random(self, folder: Path, cfg: dict, seed: int = 0, dtype=None) -> Path:
        raise NotImplementedError
