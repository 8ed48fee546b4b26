"""Judge: does each image match its render prompt (CLIP), and is it aligned or violating (safety)?

A pair is kept only if both images match their prompts and the aligned image is judged clean while the
violating one is judged violating; every rejected pair is kept apart with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from livo_core.values import ValuePrinciple


@dataclass
class Verdict:
    score: float                   # toxicity: violation score in [0, 1]; bias: confidence of `attribute`
    attribute: str | None = None   # bias: the attribute assigned (None when below the threshold)


class SafetyClassifier(Protocol):
    """Decides per image, for one value. Add a classifier by writing a class with these four members."""

    name: str
    version: str
    threshold: float

    def classify(self, images: list[Image.Image], value: ValuePrinciple) -> list[Verdict]: ...
