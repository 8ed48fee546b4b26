"""Render images with a model family's pipeline (livo_core/families): batched, one seed per image.

Every image gets its own `torch.Generator` seeded with its own seed, so its starting noise does not depend
on which other images share its batch. The last, shorter batch is padded to `batch_size` (the padding
images are thrown away): on CPU, oneDNN picks convolution kernels by batch size, and a batch of 3 gives
results that differ from a batch of 4 in the 6th decimal, enough to flip a pixel. With every batch the
same size, an image depends only on its prompt, its seed and the render settings.

Speed: prompts are encoded once per distinct prompt in a batch (a dataset renders each prompt with
several seeds), and the negative prompt once per `render` call, instead of once per image as
a diffusers pipeline does when given a list of prompts.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from tqdm.auto import tqdm

from livo_core.families import family_for


class Renderer:
    """A loaded pipeline that renders (prompt, seed) lists in batches."""

    def __init__(self, base_model: str, device: str = "auto", dtype: str = "auto"):
        self.base_model = base_model
        # fp16 on CUDA, fp32 on CPU (see models.resolve_dtype); raises LivoError for a missing model.
        self.family = family_for(base_model)
        self.pipe = self.family.load_pipeline(base_model, device=device, dtype=dtype)
        self.device = self.pipe.device
        self.dtype = self.pipe.dtype

    def _generator(self, seed: int) -> torch.Generator:
        # MPS has no device generators; diffusers' randn_tensor moves CPU noise to the device.
        device = "cpu" if self.device.type == "mps" else self.device
        return torch.Generator(device).manual_seed(int(seed))

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """The denoiser's conditioning, (len(prompts), 77, hidden) for SD, as the pipeline encodes it."""
        return self.family.encode_prompts(self.pipe, prompts)

    @torch.inference_mode()
    def render(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        batch_size: int,
        negative_prompt: str | None = None,
        progress: bool = True,
    ) -> list[Image.Image]:
        """One RGB image per (prompt, seed), in input order."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not prompts:
            return []

        use_cfg = guidance_scale > 1.0 and self.family.uses_negative  # the pipeline's own rule for classifier-free guidance
        negative = self.family.encode_negative(self.pipe, [negative_prompt or ""]) if use_cfg else None  # (1, 77, hidden)

        images: list[Image.Image] = []
        with tqdm(total=len(prompts), desc="render", unit="img", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch_prompts = list(prompts[start : start + batch_size])
                batch_seeds = list(seeds[start : start + batch_size])
                n_real = len(batch_prompts)
                # Pad the last batch with copies of its last image (see the module docstring).
                batch_prompts += [batch_prompts[-1]] * (batch_size - n_real)
                batch_seeds += [batch_seeds[-1]] * (batch_size - n_real)

                # Encode each distinct prompt once, then gather: (batch_size, 77, hidden).
                unique = list(dict.fromkeys(batch_prompts))
                index = torch.tensor([unique.index(p) for p in batch_prompts], device=self.device)
                prompt_embeds = self._encode(unique).index_select(0, index)

                out = self.family.generate(
                    self.pipe, prompt_embeds, negative.expand(batch_size, -1, -1) if use_cfg else None,
                    [self._generator(s) for s in batch_seeds], steps=steps, guidance_scale=guidance_scale,
                    height=height, width=width)
                images.extend(out[:n_real])
                bar.update(n_real)
        return images


def image_to_bytes(img: Image.Image, format: str = "PNG") -> bytes:
    """Encode an image for a Parquet cell. PNG (default) is lossless; JPEG is saved at quality 95."""
    buf = io.BytesIO()
    if format.upper() in ("JPEG", "JPG"):
        img.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format=format)
    return buf.getvalue()


def bytes_to_image(b: bytes) -> Image.Image:
    """Decode image bytes (PNG, JPEG, ...) into a fully loaded PIL image."""
    img = Image.open(io.BytesIO(b))
    img.load()  # read now, so the image does not depend on the buffer later
    return img
