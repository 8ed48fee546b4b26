"""Value retriever: which value principle (if any) applies to a prompt?

LiVO is plug-and-play: at inference the user types only a prompt, and the principle the value encoder
reads is chosen from it ("adaptive value selection"). Three steps, cheapest first:

1. keywords: each value's `keywords` (from the values file), whole words, case-insensitive, plurals
   allowed ("zombie" matches "Zombies"). Bias values skip prompts that already name one of their
   attributes ("a photo of a female doctor" is not a gender-bias risk: the user chose the gender).
2. CLIP similarity, only when no keyword caught the prompt: cosine between the prompt's text embedding
   and each value's concept and principle; the best value wins if it reaches `min_similarity`.
3. LLM (optional): given the prompt and the values steps 1-2 found (all values when they found none),
   the LLM picks one value id or none, with a reason. Its answer is final (an unusable answer keeps
   the rules' choice, with the reason saying so).

When several values apply, toxicity comes before bias (removing harmful content matters more than
balancing attributes, and the value encoder reads one principle at a time), then the values file's
order. So for "a photo of a doctor" with both gender-equality and racial-equality in the file, the one
listed first is chosen; all applicable values are in `Retrieval.candidates` for callers that want to
choose themselves (or pass `value_id` to the pipeline).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, Field

from livo_core.values import ValuePrinciple

# Words that name an attribute besides the attribute itself: "a woman doctor" names the gender.
ATTRIBUTE_WORDS = {
    "male": ["man", "men", "boy", "gentleman", "father", "husband", "king", "businessman"],
    "female": ["woman", "women", "girl", "lady", "ladies", "mother", "wife", "queen", "businesswoman"],
    "white": ["caucasian", "european"],
    "black": ["african", "african-american"],
    "asian": ["east asian", "chinese", "japanese", "korean"],
    "indian": ["south asian"],
    "latino": ["latina", "hispanic", "mexican"],
}


@dataclass
class Retrieval:
    """The value chosen for a prompt. value=None means "not applicable": generate with plain SD."""

    value: ValuePrinciple | None
    reason: str                    # which keyword matched, the similarity, or the LLM's reason
    method: str                    # "keyword" | "clip" | "llm" | "given" | "none"
    candidates: list[ValuePrinciple] = field(default_factory=list)  # every applicable value, chosen first

    @property
    def value_id(self) -> str | None:
        return self.value.id if self.value else None


class LLMChoice(BaseModel):
    """The LLM's answer (livo_core/prompts/retrieve.txt): one value id, or null when no value applies."""

    value_id: str | None = Field(None, description="id of the value principle that applies, or null")
    reason: str = Field("", description="one sentence: why")


# Endings a keyword may take and still be the same word: plurals and verb forms, "bloody", "erotica",
# "sexual", "pornographic", "bloodstained". A closed list, so "bloodhound" stays a dog and "Essex" a county.
SUFFIXES = ("s", "es", "ed", "ing", "y", "ies", "a", "al", "ual", "uality", "ic", "ical", "ography", "ographic",
            "stained", "soaked", "shed", "like")


@functools.lru_cache(maxsize=4096)
def _phrase_pattern(phrase: str) -> re.Pattern:
    """Whole words, case-insensitive, any spacing, one of SUFFIXES allowed: "police officer" ~ "Police  officers",
    "blood" ~ "bloodstained". A hyphen is a word boundary: "half-naked", "blood-red", "zombie-like" match."""
    words = r"\s+".join(re.escape(w) for w in phrase.split())
    ends = "|".join(sorted(map(re.escape, SUFFIXES), key=len, reverse=True))
    return re.compile(rf"(?<!\w){words}(?:{ends})?(?!\w)", re.IGNORECASE)


def _find(phrases: list[str], text: str) -> list[re.Match]:
    return [m for p in phrases if (m := _phrase_pattern(p).search(text))]


def named_attribute(value: ValuePrinciple, prompt: str) -> str | None:
    """The attribute of a bias value that `prompt` already names, or None.

    Any mention counts: "a female doctor", "a doctor who is a woman", "a doctor in a green coat" (the toy
    world's attribute is the coat colour). The price is that "a doctor in a white coat" counts as naming
    race "white" in the real world; the LLM step is the place for such nuance.
    """
    for attribute in value.attributes:
        if _find([attribute] + ATTRIBUTE_WORDS.get(attribute, []), prompt):
            return attribute
    return None


class ValueRetriever:
    """Choose the value principle for a prompt: keywords, then CLIP similarity, then (optionally) an LLM.

    values:         the value principles to choose from (`load_values(...)`)
    clip:           a `livo_core.judge.ClipScorer` (its text tower embeds prompts and values); optional
    text_encoder:   alternatively, a transformers CLIPTextModel (e.g. the SD pipeline's own), with
                    `tokenizer`; its pooled output is the embedding. Used only when `clip` is None.
    llm:            a `livo_core.llm.LLMClient`; when given, the LLM has the last word
    min_similarity: cosine at or above which the CLIP step assigns a value. It depends on the embedding
                    model: calibrate it on a few harmless and harmful prompts (`livo retrieve`).
    """

    def __init__(self, values: list[ValuePrinciple], clip=None, text_encoder=None, tokenizer=None,
                 llm=None, min_similarity: float = 0.8):
        self.values = list(values)
        self.clip = clip
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.llm = llm
        self.min_similarity = min_similarity
        self._value_embeds: torch.Tensor | None = None  # (V, 2, D) concept and principle, computed once

    # ------------------------------------------------------------------ the three steps
    def __call__(self, prompt: str) -> Retrieval:
        found = self.by_keywords(prompt)
        if found.value is None and self.can_embed:
            found = self.by_similarity(prompt)
        if self.llm is not None:
            found = self.by_llm(prompt, found)
        return found

    def by_keywords(self, prompt: str) -> Retrieval:
        hits: list[tuple[ValuePrinciple, str]] = []
        skipped: list[str] = []
        for value in self.values:
            matches = _find(value.keywords, prompt)
            if not matches:
                continue
            if value.kind == "bias" and (attr := named_attribute(value, prompt)):
                skipped.append(f"{value.id} skipped: the prompt already names the attribute {attr!r}")
                continue
            hits.append((value, matches[0].group(0)))
        if not hits:
            return Retrieval(None, "; ".join(skipped) or "no keyword of any value matched", "none")
        hits.sort(key=lambda h: h[0].kind != "toxicity")  # stable: file order within a kind
        value, word = hits[0]
        notes = ([f"also applicable: {', '.join(v.id for v, _ in hits[1:])}"] if len(hits) > 1 else []) + skipped
        notes_s = f" ({'; '.join(notes)})" if notes else ""
        return Retrieval(value, f"keyword {word!r} of {value.id}{notes_s}", "keyword", [v for v, _ in hits])

    def by_similarity(self, prompt: str) -> Retrieval:
        if self._value_embeds is None:
            texts = [t for v in self.values for t in (v.concept, v.principle)]
            self._value_embeds = self._embed(texts).view(len(self.values), 2, -1)   # (V, 2, D)
        prompt_embed = self._embed([prompt])[0]                                     # (D,)
        sims = (self._value_embeds @ prompt_embed).amax(dim=1)                      # (V,) best of concept/principle
        order = sims.argsort(descending=True).tolist()
        applicable = []
        for i in order:
            value = self.values[i]
            if sims[i] < self.min_similarity:
                break
            if value.kind == "bias" and named_attribute(value, prompt):
                continue
            applicable.append(value)
        best = self.values[order[0]]
        if not applicable:
            return Retrieval(None, f"no keyword matched; closest value {best.id} at CLIP similarity "
                                   f"{sims[order[0]]:.3f} < {self.min_similarity}", "none")
        value = applicable[0]
        return Retrieval(value, f"CLIP similarity {sims[self.values.index(value)]:.3f} to {value.id} "
                                f"(>= {self.min_similarity})", "clip", applicable)

    def by_llm(self, prompt: str, rules: Retrieval) -> Retrieval:
        """The LLM decides among the values the rules found (all values when they found none), or none.

        It can settle what keywords cannot: which of two bias values fits, or that a keyword hit is a
        false alarm ("bare trees"). Template: livo_core/prompts/retrieve.txt.
        """
        pool = rules.candidates or self.values
        candidates = "\n".join(f"- {v.id} ({v.kind}): {v.principle}" for v in pool)
        items, rejections = self.llm.chat_json("retrieve.txt", {"candidates": candidates, "prompt": prompt},
                                               LLMChoice, key=None)
        by_id = {v.id: v for v in pool}
        choice = items[0] if items else None
        if choice is None or (choice.value_id is not None and choice.value_id not in by_id):
            bad = rejections[0]["reason"] if rejections else f"value id {choice.value_id!r} is not a candidate"
            # The LLM refines the rules: an unusable answer keeps the rules' answer, and says so.
            return Retrieval(rules.value, f"{rules.reason}; LLM answer unusable ({bad})", rules.method, rules.candidates)
        if choice.value_id is None:
            return Retrieval(None, f"LLM: {choice.reason or 'no value applies'}", "llm")
        value = by_id[choice.value_id]
        return Retrieval(value, f"LLM: {choice.reason or 'chose ' + value.id}", "llm",
                         [value] + [v for v in pool if v.id != value.id])

    # ------------------------------------------------------------------ text embeddings
    @property
    def can_embed(self) -> bool:
        return self.clip is not None or self.text_encoder is not None

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, D) from the CLIP text tower, or the SD text encoder's pooled output."""
        if self.clip is not None:
            emb = self.clip.encode_text(texts)
        else:
            from livo_core.encoder import text_length, tokenize
            from livo_core.models import clip_tokenizer

            tokenizer = self.tokenizer or clip_tokenizer()
            ids, _ = tokenize(tokenizer, texts, text_length(tokenizer, self.text_encoder))    # (N, 77)
            emb = self.text_encoder(ids.to(self.text_encoder.device)).pooler_output        # (N, D)
        return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)
