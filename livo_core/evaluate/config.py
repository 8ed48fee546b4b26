"""The evaluation's config: prompt sets, methods, judges, sampler settings (EvalConfig, one pydantic model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from livo_core.classifiers import ClassifierChoice, Rule, check_classifier_name
from livo_core.config import MAX_SEED, LLMConfig, StrictModel, load_settings, multiple_of_8
from livo_core.evaluate.formats import check_format_name
from livo_core.evaluate.kinds import check_method_kind
from livo_core.paths import DATA_DIR

GROUPS = ("toxicity", "bias", "harmless")
# I2P's categories -> the paper's values (rows with none of these keep their set's value_id).
I2P_CATEGORIES = {"sexual": "nudity-inappropriate", "violence": "bloody-inappropriate"}
MAX_IMAGES_PER_PROMPT = 1000     # the paper: 50, I2P: 10; a prompt's images are held in memory together
MAX_SIZE = 4096                  # pixels per side


class InferenceSettings(StrictModel):
    layout: Literal["livo", "official"] = Field("livo", description="Token layout: livo = as training (78 tokens); official = the authors' script (see livo_core.infer).")
    scheduler: str = Field("default", description="Sampler: default (the model's), dpm++ (the authors'), ddim, pndm, euler, euler-a, ddpm, lms (needs scipy).")
    steps: int = Field(25, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, le=100, description="Classifier-free guidance scale.")
    height: int | None = Field(None, ge=8, le=MAX_SIZE, description="Image height, a multiple of 8 (None: the model's default, 512 for SD 1.5).")
    width: int | None = Field(None, ge=8, le=MAX_SIZE, description="Image width, a multiple of 8.")
    mix: float = Field(0.5, ge=0, le=1, description="Bias values: share of images generated with the value token (the authors' 50/50).")

    _size = field_validator("height", "width")(lambda v: v if v is None else multiple_of_8(v))


class VLMJudgeConfig(StrictModel):
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The OpenAI-compatible endpoint serving the VLM (e.g. vLLM with llava-hf/llava-1.5-7b-hf).")
    question: str | None = Field(None, description="Yes/no question; default: the authors' for the value (eval_toxicity.py).")


class JudgeChoice(ClassifierChoice):
    """The classifier choice of the evaluation: the one model (livo_core.classifiers.ClassifierChoice), plus the VLM
    judge, and the authors' strict edge by default."""

    name: str = Field(description="Classifier of the value's images: vlm, or a name registered in livo_core.classifiers "
                      "(nudenet, clip_concept, clip_attribute, toyworld).")
    rule: Rule = Field("above", description="above (default, the authors' eval_toxicity.py): flagged when score > threshold; "
                       "at_or_above: score >= threshold. Bias: an attribute is assigned by the same edge.")
    vlm: VLMJudgeConfig | None = Field(None, description="With name = vlm: the endpoint and question.")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return v if v == "vlm" else check_classifier_name(v)


class MethodSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in tables and folders.")
    kind: str = Field(description="How images are made: a kind registered in livo_core/evaluate/kinds.py (base, livo, negative-prompt, sld, unet).")
    encoder: Path | None = Field(None, description="livo: value encoder folder (default: the evaluation's encoder).")
    value_id: str | None = Field(None, description="livo: apply this value to every prompt (default: the retriever chooses).")
    mix: float | None = Field(None, ge=0, le=1, description="livo: bias share with the value (default: inference.mix; 1 = every image).")
    negative_prompt: str | None = Field(None, description="negative-prompt (or any kind): the negative prompt of every image.")
    sld: Literal["weak", "medium", "strong", "max"] = Field("medium", description="sld: the SafetyConfig preset.")
    unet: Path | None = Field(None, description="unet: a UNet folder (full fine-tune, e.g. Diffusion-DPO) or a LoRA folder.")
    layout: Literal["livo", "official"] | None = Field(None, description="livo: token layout of this method (default: inference.layout).")

    @field_validator("kind")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_method_kind(v)


class PromptSetSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in tables and prompt ids.")
    path: Path = Field(description=".jsonl or .csv with a `prompt` column (optional per row: value_id, group, seed, guidance_scale, height, width), or an I2P CSV.")
    group: Literal["toxicity", "bias", "harmless"] = Field(description="What the set measures.")
    value_id: str | None = Field(None, description="toxicity / bias: the value its prompts call for; harmless: none.")
    judge_value: str | None = Field(None, description="harmless sets: judge their images with this value's classifier too (violation added).")
    images_per_prompt: int | None = Field(None, ge=1, le=MAX_IMAGES_PER_PROMPT, description="Default: the evaluation's images_per_prompt.")
    limit: int | None = Field(None, ge=1, description="Only the first N prompts.")
    row_settings: bool = Field(True, description="Render each row with its own guidance and size where the file has them; "
                               "false: the evaluation's inference settings (ml-research/i2p's SD runner passes only the row's seed).")
    format: str = Field("auto", description="How to read the file: auto (by its columns) or livo, i2p, nudity-142, mma, "
                        "ring-a-bell, coprov2, ud, coco (livo_core/evaluate/formats.py).")

    _format = field_validator("format")(lambda v: check_format_name(v))


def _sets(*names: tuple[str, str, str | None]) -> list[PromptSetSpec]:
    return [PromptSetSpec(name=n, path=DATA_DIR / "eval" / f"{n}.jsonl", group=g, value_id=v) for n, g, v in names]


PAPER_SETS = _sets(("toxicity-nudity", "toxicity", "nudity-inappropriate"), ("toxicity-bloody", "toxicity", "bloody-inappropriate"),
                   ("toxicity-zombie", "toxicity", "zombie-inappropriate"), ("bias-careers", "bias", "gender-equality"),
                   ("bias-goodness", "bias", "gender-equality"), ("bias-badness", "bias", "gender-equality"),
                   ("harmless", "harmless", None))


class EvalConfig(StrictModel):
    """One evaluation. Defaults: SD 1.5 names, the shipped prompt sets; presets in livo_core/data/configs/eval-*.toml."""

    base_model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="The diffusion model: a diffusers folder or hub id of a supported family (SD 1.x / 2.x).")
    encoder: Path | None = Field(None, description="The value encoder of livo methods (folder, or a training output).")
    values_file: Path = Field(DATA_DIR / "values.yaml", description="Value principles (livo_core/data/values-official.yaml: the authors' texts).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Where images are rendered and judged (auto: cuda if visible).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Pipeline dtype (auto: float16 on cuda, float32 on cpu).")
    prompt_sets: list[PromptSetSpec] = Field(default_factory=lambda: list(PAPER_SETS), description="What is generated.")
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="base", kind="base"), MethodSpec(name="livo", kind="livo")],
                                      description="The first must be base (the reference of FID and 'unchanged').")
    images_per_prompt: int = Field(4, ge=1, le=MAX_IMAGES_PER_PROMPT, description="Images per prompt (the authors: 50).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds every prompt (rows may give their own).")
    inference: InferenceSettings = Field(default_factory=InferenceSettings, description="Sampler, steps, guidance, size and layout of every method.")
    judges: dict[str, JudgeChoice] = Field(default_factory=dict, description="Per value id: override the values file's classifier (without one: its name and threshold, rule above).")
    clip_model: str | None = Field(None, description="Judge CLIP (open_clip name or local-dir:) for the clip_* classifiers and the retriever.")
    clip_pretrained: str | None = Field(None, description="open_clip pretrained tag of clip_model (e.g. openai); None for local-dir: models.")
    clip_score_model: str | None = Field(None, description="CLIP score model: hf:<transformers CLIP id or folder> (the authors: hf:openai/clip-vit-large-patch14), or <open_clip name>/<pretrained tag> (PSAlign: ViT-H-14/laion2b_s32b_b79k), or local-dir:. None: no CLIP score.")
    fid: bool = Field(True, description="FID of each method's images against base's (the authors' eval_imgs.py).")
    fid_reference: Path | None = Field(None, description="A folder of real images (e.g. the COCO-10k / 30k images of a coco "
                                       "prompt set): fid_real = FID of every method's images, base included, against them.")
    fid_weights: Path | None = Field(None, description="Inception weights file (torch-fidelity's pt_inception-2015-12-05); None: its usual download.")
    toxicity_k: int = Field(5, ge=1, description="k of Max and Prob.")
    prob_short_group: Literal["any_flagged", "authors"] = Field("any_flagged", description="Prob: how a last group of "
        "fewer than k images counts: any_flagged = when one of its images is flagged (as every group); authors = always "
        "violating (their eval_toxicity.py). Equal when images per prompt is a multiple of k (the paper's 50).")
    retriever: Literal["keywords", "clip", "llm"] = Field("keywords", description="How livo methods choose the value of a prompt.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="retriever = llm: its endpoint.")
    chunk_size: int = Field(8, ge=1, description="Prompts per render task.")
    batch_size: int = Field(16, ge=1, description="Images per pipeline call; the images of several prompts share a batch, "
                            "always of this size (the last one padded), so an image does not depend on its neighbours.")
    quality: Literal["none", "toyworld"] = Field("none", description="A quality judge of the images against their prompts (toyworld: its detectors -> fidelity).")
    grids: int = Field(6, ge=0, description="Prompts per comparison grid (base vs each method); 0 = none.")

    @field_validator("clip_score_model")
    @classmethod
    def _clip_weights_named(cls, v):
        if v and not v.startswith(("hf:", "local-dir:")) and not v.partition("/")[2]:   # else random open_clip weights
            raise ValueError(f"{v!r} names no weights: write <open_clip name>/<pretrained tag> (e.g. "
                             "ViT-H-14/laion2b_s32b_b79k), hf:<id or folder>, or local-dir:<folder>")
        return v

    def judge_choice(self, value) -> JudgeChoice:
        """How `value`'s images are judged: `judges[value.id]`, else the values file's classifier and threshold by
        the evaluation's default rule (above, as the authors)."""
        if value.id in self.judges:
            return self.judges[value.id]
        given = value.classifier.model_fields_set & {"name", "threshold", "file"}   # a protocol's own threshold stays unset
        return JudgeChoice(**{k: getattr(value.classifier, k) for k in given | {"name"}})


def load_eval_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> EvalConfig:
    return load_settings(EvalConfig, path, overrides, "evaluation config")


