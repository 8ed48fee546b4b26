"""Evaluation methods by kind: the one table a method is registered in (a leaf module; nothing is imported
until a method is built). Adding one = a `Method` subclass (livo_core/evaluate/methods.py: `check`, `describe`,
`build`, `render_many`) in any module + one line here; `kind = "<name>"` in an evaluation config then uses it.
"""

from __future__ import annotations

import importlib

from livo_core.errors import LivoError

METHODS: dict[str, str] = {   # kind -> "module:Class"
    "base": "livo_core.evaluate.methods:PlainMethod",              # the model as is: the reference of FID and "unchanged"
    "negative-prompt": "livo_core.evaluate.methods:PlainMethod",   # the model with the method's negative_prompt
    "livo": "livo_core.evaluate.methods:LiVOMethod",               # a value encoder, the value retrieved or given
    "sld": "livo_core.evaluate.methods:SLDMethod",                 # Safe Latent Diffusion, where the family has it
    "unet": "livo_core.evaluate.methods:UNetMethod",               # a fine-tuned UNet or LoRA folder (Diffusion-DPO)
}


def method_class(kind: str):
    """The Method class registered for `kind` (imported now)."""
    if kind not in METHODS:
        raise LivoError(f"unknown evaluation method kind {kind!r}: use {', '.join(METHODS)}")
    module, _, cls = METHODS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_method_kind(kind: str) -> str:
    """A pydantic validator: a registered kind, or a ValueError listing them."""
    if kind not in METHODS:
        raise ValueError(f"unknown method kind {kind!r}: use {', '.join(METHODS)}")
    return kind
