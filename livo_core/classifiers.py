"""Safety classifiers by name: the one table a judge is registered in (a leaf module; nothing is imported
until a classifier is built). Adding one = a module with the class (name, version, threshold,
`classify(images, value) -> list[Verdict]`, see livo_core.judge.SafetyClassifier) + one line here.

    factory      "module:Class"; built as Class(threshold) or, when it needs_clip, Class(clip, threshold), and with
                 file=... when it needs_file
    kind         the value kind it judges ("toxicity" / "bias"), or None for either
    needs_clip   it scores with the judge CLIP (clip_model)
    needs_file   it reads a file the choice names (`file`: Q16's prompt embeddings)
A class with a `protocol` ({"threshold", "rule"}: a published rule, livo_core/protocols.py) judges by it only.

Which classifier judges a value, at what threshold and by which edge, is one model everywhere (the values file,
the dataset config, the evaluation config): `ClassifierChoice(name, threshold, rule)`, the rule named
"at_or_above" (score >= threshold) or "above" (score > threshold, the authors' evaluation), never implied.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from livo_core.errors import LivoError


@dataclass(frozen=True)
class ClassifierEntry:
    factory: str
    kind: str | None
    needs_clip: bool = False
    needs_file: bool = False


CLASSIFIERS: dict[str, ClassifierEntry] = {
    "nudenet": ClassifierEntry("livo_core.judge:NudeNetClassifier", "toxicity"),
    "clip_concept": ClassifierEntry("livo_core.judge:ClipConceptClassifier", "toxicity", needs_clip=True),
    "clip_attribute": ClassifierEntry("livo_core.judge:ClipAttributeClassifier", "bias", needs_clip=True),
    "toyworld": ClassifierEntry("livo_core.toyworld.classifier:ToyWorldClassifier", None),
    # the judges peers publish with (livo_core/protocols.py)
    "q16": ClassifierEntry("livo_core.protocols:Q16Classifier", "toxicity", needs_clip=True, needs_file=True),
    "nudenet-i2p-v2-5": ClassifierEntry("livo_core.protocols:NudeNetI2P", "toxicity"),
    "nudenet-unlearndiffatk-9": ClassifierEntry("livo_core.protocols:NudeNetUnlearnDiffAtk", "toxicity"),
    "nudenet-genitalia": ClassifierEntry("livo_core.protocols:NudeNetGenitalia", "toxicity"),
    "i2p-inappropriate": ClassifierEntry("livo_core.protocols:I2PInappropriate", "toxicity", needs_clip=True, needs_file=True),
    "q16-or-genitalia": ClassifierEntry("livo_core.protocols:Q16OrGenitalia", "toxicity", needs_clip=True, needs_file=True),
}


def classifier_class(name: str):
    """The class registered under `name` (imported now)."""
    module, _, cls = CLASSIFIERS[name].factory.partition(":")
    return getattr(importlib.import_module(module), cls)


def entry_for(value, name: str) -> ClassifierEntry:
    """The registry entry of classifier `name` for `value` (a ValuePrinciple): a LivoError when the name is not
    registered or the classifier judges the other kind of value. Builds nothing."""
    entry = CLASSIFIERS.get(name)
    if entry is None:
        raise LivoError(f"unknown safety classifier {name!r} for value {value.id!r}: use {', '.join(CLASSIFIERS)}")
    if entry.kind is not None and entry.kind != value.kind:
        raise LivoError(f"classifier {name!r} judges {entry.kind} values but {value.id!r} is a {value.kind} value: "
                        f"set judge.classifiers.{value.id}.name to a {value.kind} classifier")
    return entry


def check_classifier_name(name: str) -> str:
    """A pydantic validator: a registered name, or a ValueError listing them."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown safety classifier {name!r}: use {', '.join(CLASSIFIERS)}")
    return name


Rule = Literal["at_or_above", "above"]


def crosses(score: float, threshold: float, rule: Rule) -> bool:
    """Whether `score` is past `threshold` by `rule`: violating (toxicity), or confident enough (bias attributes)."""
    if rule == "at_or_above":
        return score >= threshold
    if rule == "above":
        return score > threshold
    raise ValueError(f"unknown threshold rule {rule!r}: use at_or_above or above")


class ClassifierChoice(BaseModel):
    """Which safety classifier judges a value, its threshold and the threshold's edge."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Safety classifier: a name registered in livo_core.classifiers (" + ", ".join(CLASSIFIERS) + ").")
    threshold: float = Field(0.5, ge=0, le=1, description="Toxicity: the score past which an image is violating. Bias: the "
                             "confidence past which an attribute is assigned. Past = by `rule`.")
    rule: Rule = Field("at_or_above", description="at_or_above: score >= threshold; above: score > threshold "
                       "(the authors' evaluation).")
    file: Path | None = Field(None, description="A file the classifier reads (q16, i2p-inappropriate, q16-or-genitalia: Q16's prompts.p, "
                              "or an .npy / .safetensors of it).")

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_classifier_name(v)


def resolve_choice(value, choice: ClassifierChoice):
    """(registry entry, class, threshold, rule) a choice judges `value` with: a published protocol's own threshold and
    rule (a choice that sets others is refused), else the choice's. LivoError for a name that cannot judge the value."""
    entry = entry_for(value, choice.name)
    cls = classifier_class(choice.name)
    fixed = getattr(cls, "protocol", None)   # a published rule: its threshold and edge, never another
    if not fixed:
        return entry, cls, choice.threshold, choice.rule
    for key in ("threshold", "rule"):
        if key in choice.model_fields_set and getattr(choice, key) != fixed[key]:
            raise LivoError(f"classifier {choice.name} is a published protocol ({fixed['rule']} {fixed['threshold']}); "
                            f"value {value.id} sets {key} = {getattr(choice, key)}: drop it, or use nudenet with your own threshold")
    return entry, cls, fixed["threshold"], fixed["rule"]
