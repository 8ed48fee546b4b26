"""Plug-and-play LiVO inference: a pipeline of any registered model family (livo_core/families) + a value encoder.

    prompt --retriever--> value principle (or "not applicable": plain SD)
    "<principle>, <prompt>" --value encoder--> pooled output = the value token (1, 1, D)
    value token + SD's frozen prompt embeddings -> the unchanged SD pipeline (cross-attention takes any length)

Two token layouts (`layout`):

  livo      (default; what training sees) prompt padded to 77 tokens -> (1, 78, D) = [value token; 77].
            Negative branch: SD's embeddings of the negative prompt ("" when none), 77 tokens, plus one more
            padding token (a copy of the last) -> 78, so guidance (eps = neg + g * (valued - neg))
            amplifies what the value token changes; on the toy world this took held-out violation from
            42% to 13% for the same encoder at guidance 5. `value_in_negative=True` gives the negative
            its own value token instead.
  official  (SD 1.x / 2.x only) exactly the authors' script (value_encoder/inference_example.py, evaluation/methods.py): the
            prompt tokenised to at most 76 tokens WITHOUT padding (n tokens), the value text tokenised
            without padding, -> (1, n + 1, D) = [value token; n prompt tokens]; no negative is passed, so
            diffusers encodes "" (or the negative prompt) padded to n + 1 tokens. This is what the released
            encoder (HF adstellaria/LiVO) was evaluated with.

Sampling: `scheduler` swaps the pipeline's scheduler (the authors evaluate with DPM-Solver++, 25 steps,
guidance 7.5; see SCHEDULERS).

Bias values (the paper's mixing): a value encoder trained to remove a majority attribute tends to flip
every image to the minority one, which is a bias too. So only a share `mix` of the images is generated
with the value token and the rest with plain SD; which images is drawn from the seed. Toxicity values
apply to every image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from livo_core.encoder import ValueEncoder, text_length, tokenize, value_text
from livo_core.errors import LivoError
from livo_core.retrieve import Retrieval, ValueRetriever
from livo_core.values import ValuePrinciple, load_values


LAYOUTS = ("livo", "official")
# name -> (diffusers class, extra config): built from the pipeline's own scheduler config.
SCHEDULERS = {
    "default": None,                                          # the one saved with the model
    "dpm++": ("DPMSolverMultistepScheduler", {}),             # the authors' evaluation (dpmsolver++, order 2)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),      # SD 1.5's own (PLMS)
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),                     # UnlearnDiffAtk's renders (needs scipy)
}


def set_scheduler(pipe, name: str):
    """Give `pipe` the named sampler (SCHEDULERS), configured from its own scheduler's config. Returns pipe."""
    if name not in SCHEDULERS:
        raise LivoError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if SCHEDULERS[name] is None:
        return pipe
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    if name == "lms":
        import importlib.util

        if importlib.util.find_spec("scipy") is None:   # diffusers' LMS integrates its coefficients with scipy
            raise LivoError("scheduler lms needs scipy, which is not installed: pip install scipy (or choose another scheduler)")
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    return pipe


@dataclass
class LiVOOutput:
    images: list[Image.Image]
    value: ValuePrinciple | None           # the value applied (None: not applicable / use_value=False)
    used_value_mask: list[bool]            # per image: generated with the value token?
    retrieval: Retrieval | None            # how the value was chosen (None when use_value=False)
    seeds: list[int] = field(default_factory=list)   # per image generator seed: seed + i


@dataclass
class ImageJob:
    """One image to render: its conditioning (L, D), its negative branch (L, D; None without guidance), its seed."""

    embeds: torch.Tensor
    negative: torch.Tensor | None
    seed: int


@dataclass
class LiVOPlan:
    jobs: list[ImageJob]
    value: ValuePrinciple | None
    used_value_mask: list[bool]
    retrieval: Retrieval | None
    seeds: list[int]


def value_mask(num_images: int, mix: float, seed: int) -> list[bool]:
    """Which images get the value token: round(mix * n) of them, rounded at random, chosen by `seed`.

    Stochastic rounding keeps the expected share exactly `mix` even for one image (mix=0.5, n=1: the
    image gets the value for half of the seeds).
    """
    if not 0.0 <= mix <= 1.0:
        raise LivoError(f"mix must be between 0 and 1 (share of images generated with the value), got {mix}")
    rng = random.Random(f"livo-mix:{seed}")
    k = min(num_images, math.floor(mix * num_images + rng.random()))
    chosen = set(rng.sample(range(num_images), k))
    return [i in chosen for i in range(num_images)]


class LiVOPipeline:
    """Wrap a diffusers pipeline with a value encoder and a value retriever.

    pipe:          the frozen pipeline of a registered family; its tokenizer, text_encoder, denoiser and scheduler
                   are used as is, through the family (livo_core/families)
    value_encoder: a trained `ValueEncoder` (moved to the pipeline's device and dtype); None: plain images only
    values:        the value principles `value_id` and the retriever choose from
    retriever:     a `ValueRetriever`; default: keywords only (add CLIP or an LLM by passing your own)
    mix:           bias values: share of images generated with the value token
    family:        the pipeline's model family (default: detected from the pipeline's class)
    """

    def __init__(self, pipe, value_encoder: ValueEncoder | None, values: list[ValuePrinciple],
                 retriever: ValueRetriever | None = None, mix: float = 0.5, value_in_negative: bool = False,
                 layout: str = "livo", family=None):
        if layout not in LAYOUTS:
            raise LivoError(f"unknown token layout {layout!r}: choose livo (as training) or official (the authors' script)")
        from livo_core.families import family_of_pipeline

        self.family = family or family_of_pipeline(pipe)
        width = self.family.token_width(pipe)
        if value_encoder is not None and value_encoder.width != width:
            raise LivoError(f"value encoder width {value_encoder.width} does not match the {self.family.name} model's "
                            f"token width {width}: use an encoder trained for this base model")
        if layout == "official" and self.family.name != "sd":
            raise LivoError(f"the official token layout is the authors' SD 1.x construction; use layout livo for a "
                            f"{self.family.name} model")
        value_mask(1, mix, 0)  # validates mix
        self.pipe = pipe
        self.value_encoder = value_encoder.to(pipe.device, pipe.dtype).eval().requires_grad_(False) if value_encoder else None
        self.values = list(values)
        self.retriever = retriever or ValueRetriever(self.values)
        self.mix = mix
        self.value_in_negative = value_in_negative
        self.layout = layout

    def choose_value(self, prompt: str, value_id: str | None = None) -> Retrieval:
        """The caller's value id, or the retriever's choice for the prompt."""
        if value_id is None:
            return self.retriever(prompt)
        by_id = {v.id: v for v in self.values}
        if value_id not in by_id:
            raise LivoError(f"unknown value id {value_id!r}: choose from {', '.join(by_id)}")
        return Retrieval(by_id[value_id], "given by the caller", "given", [by_id[value_id]])

    @torch.no_grad()
    def embeds_with_value(self, principle: str, texts: list[str]) -> torch.Tensor:
        """texts -> (B, 78, D): the value token of "<principle>, <text>" + SD's 77 prompt embeddings."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        prompt_embeds = self.family.encode_prompts(self.pipe, texts)                     # (B, 77, D)
        ids, _ = tokenize(tok, [value_text(principle, t) for t in texts], text_length(tok, te))
        value_token = self.value_encoder(ids.to(self.pipe.device))   # (B, 1, D); no mask, as in training
        return self.family.attach_value_token(prompt_embeds.to(self.pipe.dtype), value_token,    # (B, 78, D)
                                              condition=self.value_encoder.condition)

    @torch.no_grad()
    def official_embeds(self, principle: str, text: str) -> torch.Tensor:
        """The authors' conditioning for one prompt: (1, n + 1, D), n <= 76 unpadded prompt tokens."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tok(text, max_length=tok.model_max_length - 1, truncation=True, return_tensors="pt").input_ids
        prompt_embeds = te(ids.to(self.pipe.device))[0]                                        # (1, n, D)
        value_ids = tok(value_text(principle, text), truncation=True, return_tensors="pt").input_ids
        value_token = self.value_encoder(value_ids.to(self.pipe.device))                       # (1, 1, D)
        return self.family.attach_value_token(prompt_embeds.to(self.pipe.dtype), value_token)

    @torch.no_grad()
    def negative_embeds(self, principle: str, negative_prompt: str) -> torch.Tensor:
        """The unconditional branch of a valued image in the livo layout, (1, 78, D).

        value_in_negative=False (default): SD's embeddings of the negative prompt plus one more padding token
        (a copy of the last one: SD's text encoder has only 77 positions, so "" cannot be padded to 78), so
        guidance amplifies what the value token changes. True: the negative gets its own value token
        ("<principle>, <negative prompt>"). The authors' own construction is layout="official".
        """
        if self.value_in_negative:
            return self.embeds_with_value(principle, [negative_prompt])
        embeds = self.family.encode_negative(self.pipe, [negative_prompt]).to(self.pipe.dtype)
        if self.value_encoder.condition == "pooled":   # the valued branch kept its length: its pooled vector changed
            return embeds
        return self.family.pad_negative(embeds)                                            # (1, 77 + 1, D)

    def __call__(self, prompt: str, value_id: str | None = None, num_images: int = 4, seed: int = 0,
                 steps: int = 25, guidance_scale: float = 7.5, negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None, use_value: bool = True,
                 mix: float | None = None) -> LiVOOutput:
        """`num_images` images of `prompt`; image i starts from the noise of seed + i, whichever method.

        value_id: apply this value (default: the retriever's choice); use_value=False: plain SD;
        mix: this call's share of bias-value images with the value token (default: the pipeline's).
        """
        plan = self.plan(prompt, value_id, num_images, seed, negative_prompt, use_value, mix, guidance_scale)
        # One pipeline call per conditioning shape (with / without the value token), unpadded.
        images = self.render_jobs(plan.jobs, steps, guidance_scale, height, width, batch_size=None)
        return LiVOOutput(images, plan.value, plan.used_value_mask, plan.retrieval, plan.seeds)

    def _value_and_mask(self, prompt: str, value_id: str | None, num_images: int, seed: int, use_value: bool,
                        mix: float | None):
        """(retrieval, value, mask): the value applied to `prompt` and which images get its token (bias: mixed)."""
        if num_images < 1:
            raise LivoError(f"num_images must be at least 1, got {num_images}")
        retrieval = self.choose_value(prompt, value_id) if use_value else None
        value = retrieval.value if retrieval else None
        if value is not None and self.value_encoder is None:
            raise LivoError("this pipeline has no value encoder: load one (--encoder DIR) to apply a value")
        if value is None:
            mask = [False] * num_images
        elif value.kind == "bias":
            mask = value_mask(num_images, self.mix if mix is None else mix, seed)
        else:
            mask = [True] * num_images
        return retrieval, value, mask

    # ------------------------------------------------------------------ batched rendering (evaluation)
    @torch.no_grad()
    def plan(self, prompt: str, value_id: str | None = None, num_images: int = 4, seed: int = 0,
             negative_prompt: str | None = None, use_value: bool = True, mix: float | None = None,
             guidance_scale: float = 7.5) -> "LiVOPlan":
        """What `__call__` would render, as one ImageJob per image (conditioning, negative, seed), without
        rendering: `render_jobs` then renders the jobs of many prompts in shared, fixed-size batches."""
        retrieval, value, mask = self._value_and_mask(prompt, value_id, num_images, seed, use_value, mix)
        cfg = guidance_scale > 1.0 and self.family.uses_negative   # the pipeline's own rule for classifier-free guidance
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        variants = {}
        if not all(mask):   # plain SD, as the pipeline encodes it: 77 tokens, negative "" (or the negative prompt)
            variants[False] = (self.family.encode_prompts(self.pipe, [prompt]).to(self.pipe.dtype)[0],
                               self.family.encode_negative(self.pipe, [negative_prompt or ""]).to(self.pipe.dtype)[0] if cfg else None)
        if any(mask):
            if self.layout == "official":   # the negative exactly as diffusers pads it: to the prompt's n + 1 tokens
                embeds = self.official_embeds(value.principle, prompt)[0]
                ids = tok([negative_prompt or ""], padding="max_length", max_length=embeds.shape[0], truncation=True,
                          return_tensors="pt").input_ids
                negative = te(ids.to(self.pipe.device))[0][0].to(self.pipe.dtype) if cfg else None
            else:
                embeds = self.embeds_with_value(value.principle, [prompt])[0]
                negative = self.negative_embeds(value.principle, negative_prompt or "")[0] if cfg else None
            variants[True] = (embeds, negative)
        jobs = [ImageJob(*variants[mask[i]], seed + i) for i in range(num_images)]
        return LiVOPlan(jobs, value, mask, retrieval, [seed + i for i in range(num_images)])

    @torch.no_grad()
    def render_jobs(self, jobs: list["ImageJob"], steps: int, guidance_scale: float, height: int | None,
                    width: int | None, batch_size: int | None = 16) -> list[Image.Image]:
        """Render ImageJobs (of any prompts) in batches of exactly `batch_size` (the last one padded with
        copies), grouped by conditioning length: an image then depends only on its own job, never on its
        neighbours (CPU kernels pick their algorithm by batch size; see livo_core.render). batch_size None:
        each group in one call, unpadded (one prompt's images)."""
        images: list[Image.Image | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.embeds.shape[0], job.negative is None), []).append(i)
        for (_, no_negative), members in groups.items():
            size = batch_size or len(members)
            for start in range(0, len(members), size):
                idx = members[start:start + size]
                padded = idx + [idx[-1]] * (size - len(idx))
                # CPU generators: the same seed gives the same noise on every device (diffusers moves it over).
                out = self.family.generate(
                    self.pipe, torch.stack([jobs[i].embeds for i in padded]),
                    None if no_negative else torch.stack([jobs[i].negative for i in padded]),
                    [torch.Generator("cpu").manual_seed(jobs[i].seed) for i in padded],
                    steps=steps, guidance_scale=guidance_scale, height=height, width=width)
                for i, img in zip(idx, out):
                    images[i] = img
        return images


def load_livo_pipeline(base_model: str, encoder_dir: str | Path | ValueEncoder, values_file: str | Path,
                       device: str = "auto", dtype: str = "auto", value_ids: list[str] | None = None,
                       retriever: ValueRetriever | None = None, mix: float = 0.5, layout: str = "livo",
                       scheduler: str = "default") -> LiVOPipeline:
    """Load the model (`base_model`: folder or hub id, any registered family), the value encoder (a
    `value_encoder/` folder, a training output dir holding one, or a loaded ValueEncoder) and the value
    principles, and wrap them in a LiVOPipeline."""
    from livo_core.families import family_for

    values = load_values(Path(values_file), value_ids)
    encoder = encoder_dir if isinstance(encoder_dir, ValueEncoder) else ValueEncoder.from_pretrained(encoder_dir)
    pipe = set_scheduler(family_for(base_model).load_pipeline(base_model, device=device, dtype=dtype), scheduler)
    return LiVOPipeline(pipe, encoder, values, retriever=retriever, mix=mix, layout=layout)


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in a near-square grid (rows of ceil(sqrt(n)))."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid
