"""Stable Diffusion 3 / 3.5: a flow-matching MMDiT transformer with joint attention over text and image tokens.

    prompt --CLIP-L (penultimate) ‖ OpenCLIP-bigG (penultimate), zero-padded to T5's width --> (B, 77, 4096)
    prompt --T5-XXL (256 tokens; zeros when the model is loaded without it) --------------> (B, 256, 4096)
    prompt --CLIP-L pooled ‖ bigG pooled (projected) -------------------------------------> (B, 2048) pooled
    tokens = cat along the sequence (B, 77 + 256, 4096); the pooled vector -> pooled_projections

As for SDXL, livo's conditioning tensor packs the pooled vector as one last row, zero-padded: (B, 77 + 256 + 1, 4096).
The value token is the two CLIP towers' end-of-text rows of the penultimate layer (768 + 1280 = 2048, SDXL's value
encoder), zero-padded to 4096 as SD3 pads its CLIP tokens, and prepended: no text position exists inside the
transformer (joint attention; the image tokens alone carry positions), so where it goes does not matter.
Training is flow matching (livo_core/families/flow.py): x_sigma = (1 - sigma) x0 + sigma noise, target the velocity
noise - x0, sigma logit-normal on the scheduler's grid; the hinge compares per-sample velocity errors.
SD3 has no force-zeros negative: the empty negative prompt is encoded as diffusers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from livo_core.errors import LivoError
from livo_core.families.base import ModelParts
from livo_core.families.flow import FlowMatchingNoise
from livo_core.families.sd import _load_error
from livo_core.families.sdxl import StableDiffusionXL

T5_TOKENS = 256   # diffusers' max_sequence_length default for SD3


def t5_rows(name: str) -> int:
    """How many zero rows stand for T5 in a folder without it: 256 (diffusers') unless the folder's livo.json says
    `t5_rows` (livo's flow toy world trains with none: 256 identical rows would triple its attention cost)."""
    try:
        return int(json.loads((Path(name) / "livo.json").read_text()).get("t5_rows", T5_TOKENS))
    except (OSError, ValueError, TypeError, AttributeError):
        return T5_TOKENS


class StableDiffusion3(FlowMatchingNoise, StableDiffusionXL):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    subfolders = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    denoiser_class = "SD3Transformer2DModel"
    denoiser_component = "transformer"
    flow_matching = True
    value_conditions = ("token", "pooled")

    # ---- loading
    def pipeline_class(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def load_pipeline(self, name: str, device: str = "auto", dtype: str = "auto"):
        from livo_core.models import resolve_device, resolve_dtype
        from livo_core.progress import silence_library_progress

        silence_library_progress()
        dev = resolve_device(device)
        try:
            # A folder saved without T5 (text_encoder_3 null) loads as such: diffusers then puts zeros in its place.
            pipe = self.pipeline_class().from_pretrained(name, dtype=resolve_dtype(dtype, dev, self.cuda_dtype), **self._absent(name))
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.livo_t5_rows = t5_rows(name)   # read by _t5; travels with the module into copies
        return pipe.to(dev)

    @staticmethod
    def _absent(name: str) -> dict:
        """The optional components a local folder's model_index.json names as null: passed as None explicitly."""
        try:
            index = json.loads((Path(name) / "model_index.json").read_text())
        except (OSError, ValueError):
            return {}
        optional = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
        return {k: None for k in optional if k in index and index[k] in (None, [None, None])}

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32) -> ModelParts:
        """Both CLIP towers (fp32), T5 when the folder has one, the VAE and the transformer (in `dtype`), the
        flow-matching schedule; on CPU."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        from livo_core.progress import silence_library_progress

        silence_library_progress()
        try:
            parts = ModelParts(
                family=self,
                tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer"),
                text_encoder=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder", dtype=torch.float32),
                vae=AutoencoderKL.from_pretrained(name, subfolder="vae", dtype=dtype),
                unet=SD3Transformer2DModel.from_pretrained(name, subfolder="transformer", dtype=dtype),
                noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler"),
                tokenizer_2=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2"),
                text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", dtype=torch.float32),
            )
            if (Path(name) / "text_encoder_3").is_dir() or not Path(name).exists():
                from transformers import T5EncoderModel, T5TokenizerFast

                parts.tokenizer_3 = T5TokenizerFast.from_pretrained(name, subfolder="tokenizer_3")
                parts.text_encoder_3 = T5EncoderModel.from_pretrained(name, subfolder="text_encoder_3", dtype=dtype)
        except (OSError, ValueError) as e:
            raise _load_error(name, e) from e
        for m in (*parts.text_encoders(), parts.vae, parts.unet):
            m.requires_grad_(False)
            m.eval()
        parts.unet.livo_t5_rows = t5_rows(name)
        return parts

    def load_denoiser(self, folder: Path, device, dtype):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(str(folder)).to(device, dtype).eval()

    def copy_pipeline(self, pipe, **replace):
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        new = type(pipe)(**{**pipe.components, "scheduler": scheduler, **replace})
        new.set_progress_bar_config(disable=True)
        if not hasattr(new.transformer, "livo_t5_rows"):   # a fine-tuned transformer of this base reads as many rows
            new.transformer.livo_t5_rows = getattr(pipe.transformer, "livo_t5_rows", T5_TOKENS)
        return new

    def safe_pipeline(self, pipe):
        raise LivoError("SLD (safe latent diffusion) exists in diffusers for SD 1.x / 2.x only, not for SD 3: "
                        "drop the sld method for this model")

    # ---- conditioning
    @torch.no_grad()
    def encode_prompts(self, holder, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, 77 + 256 + 1, J): StableDiffusion3Pipeline.encode_prompt's tokens, then the pooled row."""
        clip, pooled = [], []
        for tokenizer, encoder in ((holder.tokenizer, holder.text_encoder), (holder.tokenizer_2, holder.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])                       # the projected pooled output (B, P_i)
            clip.append(out.hidden_states[-2])
        t5 = self._t5(holder, prompts, clip[0])         # (B, 256, J)
        clip_tokens = F.pad(torch.cat(clip, dim=-1), (0, t5.shape[-1] - sum(c.shape[-1] for c in clip)))
        tokens = torch.cat([clip_tokens, t5.to(clip_tokens.dtype)], dim=1)
        return self.pack(tokens, torch.cat(pooled, dim=-1).to(tokens.dtype))

    def _t5(self, holder, prompts: list[str], like: torch.Tensor) -> torch.Tensor:
        encoder = getattr(holder, "text_encoder_3", None)
        if encoder is None:   # loaded without T5: diffusers puts zeros in its place
            denoiser = self._denoiser(holder)
            rows = getattr(denoiser, "livo_t5_rows", T5_TOKENS)
            return torch.zeros(len(prompts), rows, self.joint_width(denoiser.config), dtype=like.dtype, device=like.device)
        ids = holder.tokenizer_3(prompts, padding="max_length", max_length=T5_TOKENS, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0]

    @staticmethod
    def _denoiser(holder):
        return getattr(holder, "transformer", None) or holder.unet

    @staticmethod
    def joint_width(config) -> int:
        return int(config.joint_attention_dim)

    def encode_negative(self, holder, prompts: list[str]) -> torch.Tensor:
        return self.encode_prompts(holder, prompts)

    def value_encoder(self, parts: ModelParts, condition: str = "token"):
        """token: both towers' penultimate end-of-text rows (SDXL's); pooled: both towers' projected pooled outputs,
        the kind of vector SD3 reads as `pooled_projections` (so it starts as the prompt's own pooled vector's kind)."""
        from livo_core.encoder import ValueEncoder

        token = "projected-pooled" if condition == "pooled" else self.value_token
        return ValueEncoder.from_text_encoder(parts.text_encoder, parts.text_encoder_2, token=token, family=self.name)

    def attach_value_token(self, cond: torch.Tensor, value_token: torch.Tensor, condition: str = "token") -> torch.Tensor:
        """token: (B, L + 1, J) + (B, 1, 2048) -> (B, 1 + L + 1, J), the token zero-padded to J as SD3 pads CLIP
        tokens; pooled: (B, L + 1, J), the value vector in place of the prompt's pooled vector (the last row)."""
        if value_token.dim() != 3 or value_token.shape[1] != 1:
            raise ValueError(f"value_token must be (B, 1, D), got {tuple(value_token.shape)}")
        if condition == "pooled":
            pooled = torch.zeros_like(cond[:, -1:])
            pooled[..., :value_token.shape[-1]] = value_token.to(cond.dtype)
            return torch.cat([cond[:, :-1], pooled], dim=1)
        token = F.pad(value_token.to(cond.dtype), (0, cond.shape[-1] - value_token.shape[-1]))
        return torch.cat([token, cond], dim=1)

    def pooled_width(self, config) -> int:
        return int(config.pooled_projection_dim)

    # ---- training and inference
    def denoise(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.unpack(cond, self.pooled_width(denoiser.config))
        return denoiser(hidden_states=noisy, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled).sample

    def generate(self, pipe, cond: torch.Tensor, negative: torch.Tensor | None, generators: list, *, steps: int,
                 guidance_scale: float, height: int | None, width: int | None) -> list:
        p = self.pooled_width(pipe.transformer.config)
        tokens, pooled = self.unpack(cond, p)
        neg_tokens, neg_pooled = self.unpack(negative, p) if negative is not None else (None, None)
        return pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_tokens,
                    negative_pooled_prompt_embeds=neg_pooled, generator=generators, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=height, width=width, output_type="pil").images

    def token_width(self, pipe) -> int:
        """The value token's width: the two CLIP towers' (zero-padded to the joint width when attached)."""
        return int(pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)

    def folder_token_width(self, folder: Path) -> int | None:
        try:
            return sum(int(json.loads((Path(folder) / sub / "config.json").read_text())["hidden_size"])
                       for sub in ("text_encoder", "text_encoder_2"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def denoiser_token_width(self, config: dict) -> int | None:
        return config.get("joint_attention_dim")

    # ---- random-weight models (tests, benches)
    def random_modules(self, cfg: dict) -> dict:
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        return {"transformer": SD3Transformer2DModel(**cfg["transformer"]), "vae": AutoencoderKL(**cfg["vae"]),
                "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder"])),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))}

    def build_random(self, folder: Path, cfg: dict, seed: int = 0, dtype=None) -> Path:
        """A random-weight SD3 folder without T5 (text_encoder_3 = None: diffusers' zeros in its place; no T5
        tokenizer can be built offline)."""
        import diffusers

        from livo_core.models import clip_tokenizer

        torch.manual_seed(seed)
        tokenizer_2 = clip_tokenizer()
        tokenizer_2.pad_token = "!"
        scheduler = getattr(diffusers, cfg.get("scheduler_class", "FlowMatchEulerDiscreteScheduler"))(**cfg["scheduler"])
        pipe = self.pipeline_class()(**self.random_modules(cfg), tokenizer=clip_tokenizer(), tokenizer_2=tokenizer_2,
                                     text_encoder_3=None, tokenizer_3=None, scheduler=scheduler)
        if dtype is not None and dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
        pipe.save_pretrained(str(folder))
        return Path(folder)
