"""The value encoder: a trainable copy of the model's CLIP text encoder that turns a value principle into ONE token.

    value text  "<value principle>, <prompt>"  --value encoder-->  pooled output (B, D)  = value token (B, 1, D)
    prompt      "<prompt>"                     --the family's frozen text encoder-->  conditioning (B, 77, D)
    the model family attaches the token (SD: cat([value token, prompt embeddings]) = (B, 78, D);
    see livo_core/families)

SD itself stays frozen; only the value encoder is trained. It is saved as an ordinary transformers
`CLIPTextModel` folder (config.json + model.safetensors), so `CLIPTextModel.from_pretrained` loads it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import CLIPTextModel

from livo_core.errors import LivoError


def value_text(principle: str, prompt: str) -> str:
    """What the value encoder reads: the value principle, then the user prompt."""
    return f"{principle}, {prompt}"


def text_length(tokenizer, text_encoder) -> int:
    """Tokens per text: SD pads to the tokenizer's 77, unless the text encoder holds fewer positions."""
    return min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts -> input_ids (B, length), attention_mask (B, length); padded and truncated like SD."""
    enc = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


class ValueEncoder(torch.nn.Module):
    """A CLIP text encoder whose pooled output is the value token."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    @classmethod
    def from_text_encoder(cls, text_encoder: CLIPTextModel) -> "ValueEncoder":
        """A trainable deep copy of SD's text encoder (the paper's initialisation); the original stays as is."""
        model = copy.deepcopy(text_encoder)
        model.requires_grad_(True)
        model.train()
        return cls(model)

    @staticmethod
    def folder_of(folder: str | Path) -> Path:
        """The folder holding a value encoder: `folder` itself, or the `value_encoder/` inside a training output
        or checkpoint (the first whose config.json is a CLIP text model's); a LivoError when there is none."""
        import json

        folder = Path(folder)
        for candidate in (folder, folder / "value_encoder"):
            try:
                config = json.loads((candidate / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if isinstance(config, dict) and config.get("model_type") in ("clip_text_model", "clip"):
                return candidate   # (a dataset run's config.json is not a model's)
        raise LivoError(f"no value encoder in {folder}: give a folder holding config.json + model.safetensors "
                        "(a training output's value_encoder/ or a checkpoint)")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ValueEncoder":
        """Load a value encoder folder, or the `value_encoder/` inside a training output or checkpoint."""
        candidate = cls.folder_of(folder)
        try:
            return cls(CLIPTextModel.from_pretrained(str(candidate)))
        except Exception as e:  # truncated or damaged weights: safetensors, torch and transformers raise many types
            raise LivoError(f"the value encoder in {candidate} cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else 'damaged file'}); train it again or "
                            "restore the folder from a checkpoint (checkpoints/step-*/value_encoder)") from None

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json + model.safetensors (the ordinary transformers format).

        Weights are stored under SD 1.5's key names ("text_model.embeddings...", what transformers 4.x
        writes): transformers 5 reads them too, so the folder loads with either version.
        """
        from safetensors.torch import load_file, save_file

        folder = Path(folder)
        self.text_model.save_pretrained(str(folder))
        weights = folder / "model.safetensors"
        tensors = load_file(str(weights))
        save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()},
                  str(weights), metadata={"format": "pt"})
        return folder

    @property
    def config(self):
        return self.text_model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids (B, L) -> pooled output (B, D): the final-layer-normed state at the end-of-text token.
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return pooled.unsqueeze(1)  # (B, 1, D): one token
