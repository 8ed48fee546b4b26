"""Safety classifiers by name: the one table a judge is registered in (a leaf module; nothing is imported
until a classifier is built). Adding one = a module with the class (name, version, threshold,
`classify(images, value) -> list[Verdict]`, see livo_core.judge.SafetyClassifier) + one line here.

    factory      "module:Class"; built as Class(threshold) or, when it needs_clip, Class(clip, threshold)
    kind         the value kind it judges ("toxicity" / "bias"), or None for either
    needs_clip   it scores with the judge CLIP (clip_model)

Which classifier judges a value, at what threshold and by which edge, is one model everywhere (the values file,
the dataset config, the evaluation config): `ClassifierChoice(name, threshold, rule)`, the rule named
"at_or_above" (score >= threshold) or "above" (score > threshold, the authors' evaluation), never implied.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from livo_core.errors import LivoError


@dataclass(frozen=True)
class ClassifierEntry:
    factory: str
    kind: str | None
    needs_clip: bool = False


CLASSIFIERS: dict[str, ClassifierEntry] = {
    "nudenet": ClassifierEntry("livo_core.judge:NudeNetClassifier", "toxicity"),
    "clip_concept": ClassifierEntry("livo_core.judge:ClipConceptClassifier", "toxicity", needs_clip=True),
    "clip_attribute": ClassifierEntry("livo_core.judge:ClipAttributeClassifier", "bias", needs_clip=True),
    "toyworld": ClassifierEntry("livo_core.toyworld.classifier:ToyWorldClassifier", None),
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

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_classifier_name(v)
