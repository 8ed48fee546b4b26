"""Evaluation methods: ways of making a prompt's images, each registered by kind in livo_core/evaluate/kinds.py.

A method class says, for one `MethodSpec` of an evaluation config:
    check(spec, cfg, values, width)   its own inputs, before any work (a LivoError naming the problem)
    describe(spec, cfg)               what beyond the spec shapes its images (content digests: the fingerprint)
    build(spec, shared)               the method over the evaluation's loaded pipeline
    render_many(prompts)              each prompt's n images; image j of prompt p starts from the noise of
                                      p.seed + j, for every method, so "unchanged" can be checked pixel by pixel
All go through the model family of the pipeline (livo_core/families), never a family's classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from livo_core.errors import LivoError
from livo_core.evaluate.config import EvalConfig, MethodSpec
from livo_core.evaluate.kinds import method_class
from livo_core.evaluate.prompts import EvalPrompt, prompt_settings


@dataclass
class Rendered:
    images: list[Image.Image]
    used_value: list[bool]
    retrieved: str | None         # the value the method applied (None: none / not a LiVO method)


@dataclass
class Shared:
    """What every method of one evaluation builds on: the loaded pipeline, its family, values, retriever."""

    cfg: EvalConfig
    pipe: Any
    family: Any
    values: list
    retriever: Any
    encoders: dict[str, Any] = field(default_factory=dict)   # value encoders by folder, loaded once


class Method:
    """Plain generation through the family (no value token); subclasses change the pipeline or the conditioning."""

    uses_value = False     # applies value tokens (its retriever is checked)

    def __init__(self, spec: MethodSpec, cfg: EvalConfig, pipe, livo=None):
        self.spec, self.cfg, self.pipe, self.livo = spec, cfg, pipe, livo
        self.name = spec.name

    @classmethod
    def check(cls, spec: MethodSpec, cfg: EvalConfig, values: dict, width: int | None) -> None:
        if spec.negative_prompt:
            from livo_core.families import family_for

            backbone = family_for(cfg.base_model)
            if not backbone.uses_negative:
                raise LivoError(f"method {spec.name!r}: a {backbone.name} model is guidance-distilled and renders without an "
                                "unconditional branch, so a negative prompt changes nothing: drop the negative-prompt method")
        if spec.value_id is not None and spec.value_id not in values:
            raise LivoError(f"method {spec.name!r} applies value {spec.value_id!r}, not in {cfg.values_file}: "
                            f"choose one of {', '.join(sorted(values))}")

    @classmethod
    def describe(cls, spec: MethodSpec, cfg: EvalConfig) -> dict:
        return {}

    @classmethod
    def build(cls, spec: MethodSpec, shared: Shared, pipe=None, encoder=None) -> "Method":
        from livo_core.infer import LiVOPipeline

        own = pipe if pipe is not None else shared.family.copy_pipeline(shared.pipe)   # a scheduler of its own
        livo = LiVOPipeline(own, encoder, shared.values, retriever=shared.retriever, mix=shared.cfg.inference.mix,
                            layout=spec.layout or shared.cfg.inference.layout, family=shared.family)
        return cls(spec, shared.cfg, own, livo)

    def render(self, p: EvalPrompt) -> Rendered:
        return self.render_many([p])[0]

    def render_many(self, prompts: list[EvalPrompt]) -> list[Rendered]:
        """The images of several prompts, in shared fixed-size batches (prompts with the same settings)."""
        use_value = self.uses_value
        plans = [self.livo.plan(p.prompt, value_id=self.spec.value_id if use_value else None, num_images=p.n, seed=p.seed,
                                negative_prompt=self.spec.negative_prompt, use_value=use_value, mix=self.spec.mix,
                                guidance_scale=prompt_settings(self.cfg, p)["guidance_scale"]) for p in prompts]
        groups: dict[tuple, list[int]] = {}
        for k, p in enumerate(prompts):
            groups.setdefault(tuple(sorted(prompt_settings(self.cfg, p).items())), []).append(k)
        images: dict[int, list[Image.Image]] = {}
        for settings, members in groups.items():
            jobs = [job for k in members for job in plans[k].jobs]
            flat = self.livo.render_jobs(jobs, batch_size=self.cfg.batch_size, **dict(settings))
            for k in members:
                images[k], flat = flat[:prompts[k].n], flat[prompts[k].n:]
        return [Rendered(images[k], plans[k].used_value_mask, plans[k].value.id if plans[k].value else None)
                for k in range(len(prompts))]


class PlainMethod(Method):
    """kind base (the model as is) and negative-prompt (the spec's negative_prompt on every image)."""


class LiVOMethod(Method):
    """A value encoder's token on the prompts its value applies to (bias values: the paper's mixing)."""

    uses_value = True

    @classmethod
    def check(cls, spec, cfg, values, width):
        from livo_core.encoder import ValueEncoder

        super().check(spec, cfg, values, width)
        folder = spec.encoder or cfg.encoder
        if folder is None:
            raise LivoError(f"method {spec.name!r} (livo) needs a value encoder: pass --encoder DIR or set its encoder")
        from livo_core.families import check_encoder_fits

        check_encoder_fits(folder, cfg.base_model, f"method {spec.name!r}: the value encoder")   # family and width
        ValueEncoder.from_pretrained(folder)   # missing / damaged -> one line

    @classmethod
    def describe(cls, spec, cfg):
        from livo_core.encoder import ValueEncoder
        from livo_core.files import content_digest

        return {"encoder": content_digest(ValueEncoder.folder_of(spec.encoder or cfg.encoder))[:16],
                "values": content_digest(Path(cfg.values_file))[:16],
                "layout": spec.layout or cfg.inference.layout,
                "mix": cfg.inference.mix if spec.mix is None else spec.mix,
                "retriever": {"keywords": "keywords", "clip": f"clip:{cfg.clip_model}",
                              "llm": f"llm:{cfg.llm.base_url}|{cfg.llm.model}"}[cfg.retriever]}

    @classmethod
    def build(cls, spec, shared, pipe=None, encoder=None):
        from livo_core.encoder import ValueEncoder

        folder = spec.encoder or shared.cfg.encoder
        if folder is None:
            raise LivoError(f"method {spec.name!r} (livo) needs a value encoder: pass --encoder DIR or set its encoder")
        if str(folder) not in shared.encoders:
            shared.encoders[str(folder)] = ValueEncoder.from_pretrained(folder)
        return super().build(spec, shared, pipe, shared.encoders[str(folder)])


class SLDMethod(Method):
    """Safe Latent Diffusion (diffusers' SafetyConfig presets) over the same components, where the family has it."""

    @classmethod
    def check(cls, spec, cfg, values, width):
        from livo_core.families import family_for

        super().check(spec, cfg, values, width)
        backbone = family_for(cfg.base_model)
        if not backbone.has_sld:   # before anything is written, not when the method is built
            backbone.safe_pipeline(None)

    @classmethod
    def build(cls, spec, shared, pipe=None, encoder=None):
        return super().build(spec, shared, shared.family.safe_pipeline(shared.pipe))

    def render_many(self, prompts):
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

        preset = getattr(SafetyConfig, self.spec.sld.upper())
        out = []
        for p in prompts:
            s = prompt_settings(self.cfg, p)
            negative = [self.spec.negative_prompt] * p.n if self.spec.negative_prompt else None
            images = self.pipe(prompt=[p.prompt] * p.n, negative_prompt=negative, generator=[_generator(p.seed + j) for j in range(p.n)],
                               num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                               height=s["height"], width=s["width"], **preset).images
            out.append(Rendered(images, [False] * p.n, None))
        return out


LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


class UNetMethod(Method):
    """A fine-tuned denoiser folder (full fine-tune, e.g. Diffusion-DPO) or a LoRA loaded on the denoiser."""

    @classmethod
    def check(cls, spec, cfg, values, width):
        from livo_core.families import family_for

        super().check(spec, cfg, values, width)
        folder = Path(spec.unet) if spec.unet is not None else None
        if folder is None or not folder.is_dir():
            raise LivoError(f"method {spec.name!r} (unet) needs unet = an existing UNet or LoRA folder (got {spec.unet})")
        lora = any((folder / f).is_file() for f in LORA_FILES)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            config = None
        family = family_for(cfg.base_model)
        if not lora and not (isinstance(config, dict) and config.get("_class_name") == family.denoiser_class):
            raise LivoError(f"method {spec.name!r}: {folder} is neither a UNet folder (config.json of a {family.denoiser_class} "
                            "+ weights) nor a LoRA folder (pytorch_lora_weights.safetensors): give a Diffusion-DPO UNet or LoRA output")
        base_reads = _base_denoiser_width(family, cfg.base_model)
        if lora:
            _check_lora(spec.name, folder / next(f for f in LORA_FILES if (folder / f).is_file()), family, cfg.base_model, base_reads)
            return
        reads = family.denoiser_token_width(config)
        if base_reads is not None and reads != base_reads:
            raise LivoError(f"method {spec.name!r}: the denoiser in {folder} reads {reads}-wide tokens, "
                            f"{cfg.base_model}'s {base_reads}: give a denoiser fine-tuned from this base model")

    @classmethod
    def describe(cls, spec, cfg):
        from livo_core.files import content_digest

        return {"unet": content_digest(spec.unet)[:16]} if spec.unet is not None else {}

    @classmethod
    def build(cls, spec, shared, pipe=None, encoder=None):
        if spec.unet is None:
            raise LivoError(f"method {spec.name!r} (unet) needs unet = <UNet or LoRA folder>")
        return super().build(spec, shared, _pipe_with_denoiser(shared.family, shared.pipe, Path(spec.unet)))


def _base_denoiser_width(family, base_model: str) -> int | None:
    """The token width the base model's own denoiser reads (its config.json), None for an uncached hub id."""
    from livo_core.models import model_folder

    folder = model_folder(base_model, "base_model")
    try:
        return family.denoiser_token_width(json.loads((folder / family.denoiser_component / "config.json").read_text()))
    except (TypeError, OSError, ValueError):
        return None


# The token width a LoRA's cross-attention keys read -> the family that reads it (for the message).
_WIDTH_FAMILIES = {768: "sd (1.x)", 1024: "sd (2.x)", 2048: "sdxl"}


def _check_lora(method: str, path: Path, family, base_model: str, base_reads: int | None) -> None:
    """A LoRA made for another family (its denoiser's name in the keys, or the width its key projections read) is
    refused in one line naming both; only the file's header is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            widths = {f.get_slice(k).get_shape()[1] for k in keys
                      if "attn2.to_k" in k and ("lora_A" in k or "lora.down" in k or "lora_down" in k)}
    except Exception as e:   # not a safetensors file: safetensors raises several types
        raise LivoError(f"method {method!r}: {path} is not a readable LoRA file ({type(e).__name__}); give a "
                        "diffusers LoRA (pytorch_lora_weights.safetensors)") from None
    made_for = {k.split(".")[0] for k in keys} & {"unet", "transformer"}
    if made_for and family.denoiser_component not in made_for:
        theirs = "a transformer model (sd3 / flux)" if "transformer" in made_for else "a UNet model (sd / sdxl)"
        raise LivoError(f"method {method!r}: the LoRA in {path.parent} is for {theirs} but {base_model} is a {family.name} "
                        "model: give a LoRA trained on this base model")
    if base_reads is not None and widths and widths != {base_reads}:
        (w,) = sorted(widths)[:1]
        raise LivoError(f"method {method!r}: the LoRA in {path.parent} reads {w}-wide tokens (a "
                        f"{_WIDTH_FAMILIES.get(w, 'different')} model) but {base_model} is a {family.name} model reading "
                        f"{base_reads}-wide tokens: give a LoRA trained on this base model")


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(int(seed))


def _pipe_with_denoiser(family, pipe, folder: Path):
    """A copy of `pipe` with a fine-tuned denoiser folder, or with a LoRA (diffusers / peft) loaded on its denoiser."""
    if (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        return family.copy_pipeline(pipe, **{family.denoiser_component: family.load_denoiser(folder, pipe.device, pipe.dtype)})
    lora = [f for f in LORA_FILES if (folder / f).is_file()]
    if not lora:
        raise LivoError(f"{folder} is neither a UNet folder (config.json + weights) nor a LoRA folder "
                        "(pytorch_lora_weights.safetensors): give a Diffusion-DPO UNet or LoRA output")
    import copy

    # Own copies of the UNet and text encoder: a LoRA is merged into the modules it is loaded on.
    denoiser = family.denoiser_component
    new = family.copy_pipeline(pipe, **{denoiser: copy.deepcopy(getattr(pipe, denoiser))}, text_encoder=copy.deepcopy(pipe.text_encoder))
    try:
        new.load_lora_weights(str(folder), weight_name=lora[0])
    except (ImportError, ValueError, OSError) as e:
        raise LivoError(f"cannot load the LoRA in {folder} ({str(e).splitlines()[0][:160]}); install peft "
                        "(pip install peft) or give a full UNet folder") from None
    return new


def check_method_list(cfg: EvalConfig) -> None:
    """Base first (the reference of FID and 'unchanged'), every name once."""
    if not cfg.methods or cfg.methods[0].kind != "base":
        raise LivoError("the first evaluation method must be kind = base (the reference of FID and 'unchanged images')")
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LivoError(f"evaluation method names must be unique: {', '.join(dup)} given twice; rename one")


def check_methods(cfg: EvalConfig, values: dict, width: int | None) -> None:
    """The method list and every method's own inputs (see Evaluation.check)."""
    check_method_list(cfg)
    for spec in cfg.methods:
        method_class(spec.kind).check(spec, cfg, values, width)


def describe_method(spec: MethodSpec, cfg: EvalConfig) -> dict:
    """What shapes a method's images beyond the evaluation's common settings: its spec and its own inputs."""
    return {"method": spec.model_dump(mode="json", exclude={"name", "encoder", "unet"}),
            **method_class(spec.kind).describe(spec, cfg)}


def build_methods(cfg: EvalConfig, pipe, values, retriever) -> list[Method]:
    """The configured methods over one loaded pipeline (components shared, a scheduler each)."""
    from livo_core.families import family_of_pipeline

    check_method_list(cfg)
    shared = Shared(cfg, pipe, family_of_pipeline(pipe), values, retriever)
    return [method_class(spec.kind).build(spec, shared) for spec in cfg.methods]
