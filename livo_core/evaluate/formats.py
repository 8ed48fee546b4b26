"""Prompt-set file formats: the columns each benchmark's file has, mapped onto livo's prompt rows.

livo ships no third-party prompt files (licences, harmful text): point a prompt set at your copy, and `format`
(default auto: recognised by its columns) says how to read it. A row's own seed, guidance, size and category are
used where the format has them; an adversarial set's clean prompt is kept beside each row (per_prompt.csv) and
its rows are scored as attacks (attack success rate).

    format       identified by                                     prompt from        also read
    livo         a `prompt` column                                 prompt             seed, guidance_scale, height, width,
                                                                                      steps, value_id, group
    i2p          prompt, categories, sd_seed, sd_guidance_scale,   prompt             sd_seed, sd_guidance_scale,
                 sd_image_width, sd_image_height                                      sd_image_width/height, categories
    nudity-142   prompt, categories and an unnamed index column     prompt             evaluation_seed (else sd_seed),
                 (UnlearnDiffAtk's nudity.csv: I2P's columns with                      evaluation_guidance (else
                 evaluation_seed / evaluation_guidance)                               sd_guidance_scale), sd_image_*,
                                                                                      categories
    mma          target_prompt, adv_prompt, clean_prompt, ...      adv_prompt         clean_prompt (attack)
    ring-a-bell  "sensitive prompt", "normal prompt"               sensitive prompt   normal prompt (attack)
    coprov2      prompt, image, category                           prompt             category
    ud           file_name, caption                                caption
    coco         case_number, source, prompt, evaluation_seed,     prompt             evaluation_seed (a harmless set)
                 coco_id
    heim         person (HEIM's demographic-stereotypes scenario:  "a photo of the    category (descriptors / occupations)
                 its descriptors and occupations, one per row)     face of <person>"
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from livo_core.errors import LivoError


@dataclass(frozen=True)
class Format:
    name: str
    identify: frozenset[str]          # columns that must all be present
    prompt: str                       # the column holding the prompt
    seed: str | tuple[str, ...] | None = None       # a tuple: the first of these columns the file has
    guidance: str | tuple[str, ...] | None = None
    width: str | None = None
    height: str | None = None
    category: str | None = None       # categories, comma-separated (I2P's) or one (CoProV2's)
    clean: str | None = None          # an adversarial row's clean prompt: the set is scored as attacks
    needs_unnamed: bool = False       # a pandas index column ("" or "Unnamed: 0") is part of the format
    template: str = "{}"              # how the prompt column becomes the prompt (HEIM: "a photo of the face of {}")

    def bind(self, columns: set[str]) -> Format:
        """This format with each alternative column (a tuple) settled on the first one the file has."""
        def first(c):
            return next((x for x in c if x in columns), None) if isinstance(c, tuple) else c
        return replace(self, seed=first(self.seed), guidance=first(self.guidance))


_I2P = dict(prompt="prompt", seed="sd_seed", guidance="sd_guidance_scale", width="sd_image_width",
            height="sd_image_height", category="categories")
I2P_COLUMNS = frozenset({"prompt", "categories", "sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height"})

# Most specific first: auto-detection takes the first whose columns a file has.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("nudity-142", frozenset({"prompt", "categories"}), needs_unnamed=True,
           **{**_I2P, "seed": ("evaluation_seed", "sd_seed"), "guidance": ("evaluation_guidance", "sd_guidance_scale")}),
    Format("i2p", I2P_COLUMNS, **_I2P),
    Format("mma", frozenset({"target_prompt", "adv_prompt", "clean_prompt"}), prompt="adv_prompt", clean="clean_prompt"),
    Format("ring-a-bell", frozenset({"sensitive prompt", "normal prompt"}), prompt="sensitive prompt", clean="normal prompt"),
    Format("coco", frozenset({"case_number", "prompt", "evaluation_seed", "coco_id"}), prompt="prompt", seed="evaluation_seed"),
    Format("coprov2", frozenset({"prompt", "image", "category"}), prompt="prompt", category="category"),
    Format("ud", frozenset({"file_name", "caption"}), prompt="caption"),
    Format("heim", frozenset({"person"}), prompt="person", category="category", template="a photo of the face of {}"),
    Format("livo", frozenset({"prompt"}), prompt="prompt", seed="seed", guidance="guidance_scale", width="width",
           height="height"),
)}


def check_format_name(name: str) -> str:
    """A pydantic validator: auto or a known format."""
    if name != "auto" and name not in FORMATS:
        raise ValueError(f"unknown prompt-set format {name!r}: use auto or {', '.join(FORMATS)}")
    return name


def _has_unnamed(columns: set[str]) -> bool:
    return "" in columns or any(c.startswith("Unnamed:") for c in columns)


def detect_format(columns: set[str], path) -> Format:
    """The format of a file with these columns (the first in FORMATS whose columns it has)."""
    for fmt in FORMATS.values():
        if fmt.identify <= columns and (not fmt.needs_unnamed or _has_unnamed(columns)):
            return fmt.bind(columns)
    raise LivoError(f"prompt file {path} needs a `prompt` column (or the columns of a known format: "
                    f"{', '.join(FORMATS)}); it has {', '.join(sorted(columns)) or 'none'}")


def format_for(name: str, columns: set[str], path) -> Format:
    """The named format (its columns checked), or the detected one for auto."""
    if name == "auto":
        return detect_format(columns, path)
    fmt = FORMATS[name]
    missing = sorted(fmt.identify - columns)
    if missing:
        raise LivoError(f"prompt file {path} is not in the {name} format: it lacks {', '.join(missing)}; "
                        "set the prompt set's format to the file's (or auto)")
    return fmt.bind(columns)
