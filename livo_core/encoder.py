"""The value encoder: a trainable copy of the model's CLIP text encoder that turns a value principle into ONE token.

    value text  "<value principle>, <prompt>"  --value encoder-->  pooled output (B, D)  = value token (B, 1, D)
    prompt      "<prompt>"                     --the family's frozen text encoder-->  conditioning (B, 77, D)
    the model family attaches the token (SD: cat([value token, prompt embeddings]) = (B, 78, D);
    see livo_core/families)

SD itself stays frozen; only the value encoder is trained. It is saved as an ordinary transformers
`CLIPTextModel` folder (config.json + model.safetensors), so `CLIPTextModel.from_pretrained` loads it.

A family with two text towers (SDXL) gets a two-tower value encoder (`token = "penultimate-eos"`): the token is the
end-of-text row of each tower's penultimate layer, concatenated (1 x (768 + 1280) for SDXL), as that family builds
its prompt tokens. The second tower is saved in `tower_2/` and the token kind in `value_encoder.json`.
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
    """A CLIP text encoder whose pooled output is the value token (or two towers' end-of-text rows, see above)."""

    TOKENS = ("pooled", "penultimate-eos", "projected-pooled")

    def __init__(self, text_model: CLIPTextModel, text_model_2=None, token: str = "pooled", family: str = "sd"):
        super().__init__()
        if token not in self.TOKENS:
            raise LivoError(f"unknown value-token kind {token!r}: use {', '.join(self.TOKENS)}")
        self.text_model = text_model
        self.text_model_2 = text_model_2
        self.token = token
        self.family = family   # the model family it was made for (livo_core/families), recorded in value_encoder.json
        self.condition = "token"   # how the family reads it (token / pooled: TrainConfig.value_condition), recorded too

    @classmethod
    def from_text_encoder(cls, text_encoder: CLIPTextModel, text_encoder_2=None, token: str = "pooled",
                          family: str = "sd") -> "ValueEncoder":
        """A trainable deep copy of the model's text encoder(s) (the paper's initialisation); the originals stay as is."""
        if not isinstance(text_encoder, CLIPTextModel) and token != "projected-pooled":
            # SD3's CLIP-L carries a projection the token does not use (projected-pooled: SD3's pooled vector does)
            plain = CLIPTextModel(text_encoder.config)
            inner = text_encoder.text_model.state_dict()   # transformers 5: CLIPTextModel holds these modules itself
            plain.load_state_dict(inner if not hasattr(plain, "text_model") else {f"text_model.{k}": v for k, v in inner.items()})
            text_encoder = plain.to(text_encoder.dtype)
        models = [copy.deepcopy(m) for m in (text_encoder, text_encoder_2) if m is not None]
        for model in models:
            model.requires_grad_(True)
            model.train()
        return cls(*models, token=token, family=family)

    @classmethod
    def folder_info(cls, folder: str | Path) -> dict:
        """{"family", "width", "token", "towers"} of a saved value encoder, from its config files only (no weights).
        Encoders saved before value_encoder.json existed are SD's, one tower, pooled."""
        import json

        candidate = cls.folder_of(folder)
        meta = {"family": "sd", "token": "pooled", "towers": 1, "condition": "token"}
        try:
            meta.update(json.loads((candidate / "value_encoder.json").read_text()))
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            raise LivoError(f"{candidate / 'value_encoder.json'} cannot be read: restore the encoder folder") from None
        key = cls._width_key(meta["token"])
        widths = [json.loads((candidate / "config.json").read_text())[key]]
        if meta["towers"] == 2:
            widths.append(json.loads((candidate / "tower_2" / "config.json").read_text())[key])
        return {**meta, "width": sum(widths)}

    @property
    def width(self) -> int:
        """The value token's width: the width of the conditioning tokens it joins (of the pooled vector it replaces)."""
        key = self._width_key(self.token)
        return sum(getattr(m.config, key) for m in (self.text_model, self.text_model_2) if m is not None)

    @staticmethod
    def _width_key(token: str) -> str:
        """The tower config field that gives the token's width: a projected pooled output is projection_dim wide."""
        return "projection_dim" if token == "projected-pooled" else "hidden_size"

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
        import json

        from transformers import CLIPTextModelWithProjection

        candidate = cls.folder_of(folder)
        try:
            meta = json.loads((candidate / "value_encoder.json").read_text()) if (candidate / "value_encoder.json").is_file() else {}
            second = CLIPTextModelWithProjection.from_pretrained(str(candidate / "tower_2")) if meta.get("towers", 1) == 2 else None
            token = meta.get("token", "pooled")
            first = (CLIPTextModelWithProjection if token == "projected-pooled" else CLIPTextModel).from_pretrained(str(candidate))
            encoder = cls(first, second, token=token, family=meta.get("family", "sd"))
            encoder.condition = meta.get("condition", "token")
            return encoder
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
        save_file({k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in tensors.items()},
                  str(weights), metadata={"format": "pt"})
        import json

        if self.text_model_2 is not None:
            self.text_model_2.save_pretrained(str(folder / "tower_2"))
        (folder / "value_encoder.json").write_text(json.dumps(
            {"family": self.family, "token": self.token, "towers": 2 if self.text_model_2 is not None else 1,
             "width": self.width, "condition": self.condition}, indent=2) + "\n")
        return folder

    @property
    def config(self):
        return self.text_model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.token == "projected-pooled":
            # SD3's pooled vector: each tower's projected pooled output, concatenated (B, 1, P1 + P2)
            parts = [m(input_ids=input_ids, attention_mask=attention_mask).text_embeds
                     for m in (self.text_model, self.text_model_2) if m is not None]
            return torch.cat(parts, dim=-1).unsqueeze(1)
        if self.token == "pooled":
            # input_ids (B, L) -> pooled output (B, D): the final-layer-normed state at the end-of-text token.
            pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            return pooled.unsqueeze(1)  # (B, 1, D): one token
        # Each tower's penultimate layer at the first end-of-text token (causal: padding after it does not count).
        eos_id = self.text_model.config.eos_token_id
        # (B,) as transformers' pooler finds it: configs of the original checkpoints say eos 2 and mean the highest id
        eos = input_ids.argmax(dim=-1) if eos_id == 2 else (input_ids == eos_id).int().argmax(dim=-1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        parts = [m(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-2][rows, eos]
                 for m in (self.text_model, self.text_model_2) if m is not None]              # (B, D_i) each
        return torch.cat(parts, dim=-1).unsqueeze(1)                                          # (B, 1, sum D_i)
