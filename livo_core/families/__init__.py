"""Model families by name: the one table a family is registered in (nothing is imported until one is used).

A model family is a `Backbone` (livo_core/families/base.py): everything livo needs to know about one kind of
diffusers pipeline (how to load it, encode a prompt, attach the value token, noise and denoise, render).
Adding one = a module with a Backbone subclass + one line here. The family of a model folder is detected from
its `model_index.json` (`_class_name`, the pipeline class diffusers saved).

    FAMILIES   name -> "module:Class"
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path

from livo_core.errors import LivoError

FAMILIES: dict[str, str] = {
    "sd": "livo_core.families.sd:StableDiffusion",
    "sdxl": "livo_core.families.sdxl:StableDiffusionXL",
    "sd3": "livo_core.families.sd3:StableDiffusion3",
    "flux": "livo_core.families.flux:Flux",
}


@lru_cache(maxsize=None)
def _family(target: str):
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def family(name: str):
    """The Backbone registered under `name`."""
    if name not in FAMILIES:
        raise LivoError(f"unknown model family {name!r}: use {', '.join(FAMILIES)}")
    return _family(FAMILIES[name])


def family_for_class(pipeline_class: str, where: str = "the model"):
    """The Backbone whose pipelines include `pipeline_class` (a diffusers class name); a LivoError naming the
    supported classes when none does."""
    for name in FAMILIES:
        backbone = family(name)
        if pipeline_class in backbone.pipeline_classes:
            return backbone
    known = sorted({c for name in FAMILIES for c in family(name).pipeline_classes})
    raise LivoError(f"{where} is a {pipeline_class}, a model family livo does not support yet (supported: "
                    f"{', '.join(known)}): use a model of a supported family, or add the family (docs/architecture.md)")


def family_for(name: str, what: str = "base_model"):
    """The Backbone of a model given as a local folder or hub id, from its model_index.json.

    The folder is checked first (missing, not a diffusers folder, parts missing: one line each).
    """
    from livo_core.models import model_folder

    folder = model_folder(name, what)      # missing / not-a-model folder -> LivoError; None: hub id not cached
    index = folder / "model_index.json" if folder is not None else _hub_model_index(name, what)
    try:
        pipeline_class = json.loads(Path(index).read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LivoError(f"{what} {name}: its model_index.json cannot be read or names no pipeline class (_class_name); "
                        "save the model again with diffusers' save_pretrained") from None
    backbone = family_for_class(pipeline_class, f"{what} {name}")
    if folder is not None:
        backbone.check_folder(folder, name, what)
    return backbone


def family_of_pipeline(pipe):
    """The Backbone of a loaded pipeline (its class, or a class it derives from, is registered)."""
    for cls in type(pipe).__mro__:
        try:
            return family_for_class(cls.__name__)
        except LivoError:
            continue
    return family_for_class(type(pipe).__name__, "the pipeline")


def check_encoder_fits(encoder: str | Path, base_model: str, what: str = "the value encoder") -> None:
    """A LivoError naming both families (and widths) when the value encoder in `encoder` was made for another model
    family or token width than `base_model`'s; reads config files only, before any weights load."""
    from livo_core.encoder import ValueEncoder
    from livo_core.models import model_folder

    info = ValueEncoder.folder_info(encoder)
    backbone = family_for(base_model)
    folder = model_folder(base_model, "base_model")
    width = backbone.folder_token_width(folder) if folder is not None else None
    if info["family"] != backbone.name or (width is not None and info["width"] != width):
        theirs = f"{width}-wide tokens" if width is not None else "its own width"
        raise LivoError(f"{what} in {encoder} was trained for a {info['family']} model ({info['width']}-wide value token) "
                        f"but {base_model} is a {backbone.name} model ({theirs}): use an encoder trained for this base model")


def _hub_model_index(name: str, what: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(name, "model_index.json")
    except Exception as e:   # network, auth, missing repo: many types
        raise LivoError(f"{what} {name!r}: cannot read its model_index.json from the hub ({type(e).__name__}); "
                        "check the id and the network, or give a local folder") from None


def build_random_model(folder: Path, config: str, seed: int = 0, dtype=None) -> Path:
    """A random-weight model of a shape config (`livo_core/data/model_configs/<config>.json`, whose "family"
    names its family; SD when absent), saved as an ordinary diffusers folder. Tests and benches use it."""
    from livo_core.models import model_config

    cfg = model_config(config)
    return family(cfg.pop("family", "sd")).build_random(Path(folder), cfg, seed=seed, dtype=dtype)
