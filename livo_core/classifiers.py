"""Safety classifiers by name: the one table a judge is registered in (a leaf module; nothing is imported
until a classifier is built). Adding one = a module with the class (name, version, threshold,
`classify(images, value) -> list[Verdict]`, see livo_core.judge.SafetyClassifier) + one line here.

    factory      "module:Class"; built as Class(threshold) or, when it needs_clip, Class(clip, threshold)
    kind         the value kind it judges ("toxicity" / "bias"), or None for either
    needs_clip   it scores with the judge CLIP (clip_model)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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
