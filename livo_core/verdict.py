"""What a safety classifier says about one image (a leaf module: any classifier, the toy world's included,
imports it without importing livo_core.judge, which picks classifiers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Verdict:
    score: float                   # toxicity: violation score in [0, 1]; bias: confidence of `attribute`
    attribute: str | None = None   # bias: the attribute assigned (None when below the threshold)
    source: str | None = None      # how the score was read, when a classifier has several ways (VLM: logprobs / text)
