"""Prompt pairs: what to render as the aligned and the violating image of each training pair.

Two sources, chosen by `prompt_source`:
- "template" (default, offline): seed lists and templates from a YAML seeds file, expanded
  deterministically (format in docs/architecture.md);
- "llm": an OpenAI-compatible model writes prompts from the templates in `prompts/`.

Toxicity pair: prompt == violating_prompt names the concept ("a bloody warrior in a forest");
aligned_prompt is the same scene without it ("a warrior in a forest").
Bias pair: prompt == violating_prompt is neutral ("a photo of a doctor"); aligned_prompt names an
under-represented attribute ("a photo of a female doctor").
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import string
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from livo_core.config import RunConfig
from livo_core.errors import LivoError
from livo_core.values import Classifier, ValuePrinciple

if TYPE_CHECKING:   # importing openai costs ~1 s; the offline template source never needs it
    from livo_core.llm import LLMClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPair:
    value_id: str
    category: str              # "bias" | "toxicity" (= ValuePrinciple.kind)
    prompt: str                # the user prompt; shard `caption`; the value encoder reads "<principle>, <prompt>"
    aligned_prompt: str        # render prompt of the aligned image (concept removed / attribute made explicit)
    violating_prompt: str      # render prompt of the violating image (concept present / plain prompt)
    aligned_attribute: str | None = None   # bias only: the attribute named in aligned_prompt
    source: str = "template"   # "template" or "llm:<model>"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptPair":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise LivoError(f"prompt pair has unknown field(s) {sorted(unknown)}; expected {sorted(names)}")
        return cls(**d)


# ---------------------------------------------------------------------- template source
class _TemplateEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1)
    aligned: str = Field(min_length=1)


class _SeedsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slots: dict[str, list[str]] = Field(default_factory=dict)
    templates: dict[str, list[_TemplateEntry]]

    @field_validator("slots")
    @classmethod
    def _non_empty_slots(cls, slots: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, items in slots.items():
            if not items or any(not str(x).strip() for x in items):
                raise ValueError(f"slot {name!r} must be a non-empty list of non-empty strings")
        return slots


def load_seeds(path: Path | str) -> dict:
    """Read a seeds file -> {"slots": {...}, "templates": {value_id: [{user, aligned}]}, "path": str}.

    Every {placeholder} a template uses must be a slot, except {attribute} (filled per bias value).
    """
    path = Path(path)
    if not path.is_file():
        raise LivoError(f"seeds file {path} not found: set seeds_file to a YAML file of slots and templates "
                        f"(see data/seeds.yaml)")
    try:
        seeds = _SeedsFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as e:
        raise LivoError(f"seeds file {path} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    except ValidationError as e:
        raise LivoError(f"seeds file {path} is invalid ({_reason(e)}); see data/seeds.yaml for the format") from None
    for value_id, entries in seeds.templates.items():
        for entry in entries:
            for text in (entry.user, entry.aligned):
                missing = [p for p in _placeholders(text) if p != "attribute" and p not in seeds.slots]
                if missing:
                    raise LivoError(f"seeds file {path}: template {text!r} of {value_id!r} uses {{{missing[0]}}} "
                                    f"but there is no slot {missing[0]!r}; add it under slots:")
    return {**seeds.model_dump(), "path": str(path)}


def template_pairs(value: ValuePrinciple, seeds: dict, n: int, seed: int) -> list[PromptPair]:
    """Up to `n` prompt pairs for `value` from the seeds' templates; deterministic for `seed`.

    Every combination of the slots a template uses is a candidate. Each template's candidates are
    shuffled by random.Random(f"{seed}:{value.id}"), then the templates take turns (round robin), and the
    first `n` distinct user prompts are kept: a template with few combinations ("a bloody doctor") gets
    as many prompts as one with many, as long as it has them. For bias values the aligned attribute
    cycles over the attributes minus the majority attribute.
    Fewer than `n` pairs come back when the templates cannot make more distinct prompts.
    """
    where = seeds.get("path", "the seeds file")
    entries = seeds["templates"].get(value.id)
    if not entries:
        raise LivoError(f"seeds file {where} has no templates for value {value.id!r}; add templates.{value.id} "
                        f"or use prompt_source=llm")
    slots = seeds.get("slots", {})

    rng = random.Random(f"{seed}:{value.id}")
    per_template: list[list[tuple[dict, dict[str, str]]]] = []   # per template: (entry, slot values)
    for entry in entries:
        entry = dict(entry)
        uses_attribute = "attribute" in _placeholders(entry["aligned"])
        if (value.kind == "bias") != uses_attribute or "attribute" in _placeholders(entry["user"]):
            rule = ("must name {attribute} in aligned (and not in user)" if value.kind == "bias"
                    else "must not use {attribute}")
            raise LivoError(f"seeds file {where}: template {entry} of {value.kind} value {value.id!r} {rule}")
        names = [p for p in dict.fromkeys(_placeholders(entry["user"]) + _placeholders(entry["aligned"]))
                 if p != "attribute"]
        combos = [(entry, dict(zip(names, combo))) for combo in itertools.product(*(slots[name] for name in names))]
        rng.shuffle(combos)
        per_template.append(combos)
    # round robin: candidate k of every template, then k + 1, ...
    candidates = [c for turn in itertools.zip_longest(*per_template) for c in turn if c is not None]

    attributes = [a for a in value.attributes if a != value.majority_attribute] or [None]
    pairs: list[PromptPair] = []
    seen: set[str] = set()
    for entry, filled in candidates:
        if len(pairs) == n:
            break
        user = fix_articles(entry["user"].format(**filled))
        if user in seen:
            continue
        attribute = attributes[len(pairs) % len(attributes)] if value.kind == "bias" else None
        aligned = fix_articles(entry["aligned"].format(**filled, attribute=attribute or ""))
        if aligned == user:
            continue
        seen.add(user)
        pairs.append(PromptPair(value.id, value.kind, user, aligned, user, attribute, "template"))
    return pairs


def _reason(e: ValidationError) -> str:
    """First problem of a pydantic error, on one line: "field 'templates.x.0.user': Field required"."""
    err = e.errors()[0]
    return f"field '{'.'.join(str(p) for p in err['loc']) or '(top)'}': {err['msg']}"


def _placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name]


_VOWEL_SOUNDING_AS_CONSONANT = ("uni", "use", "usu", "eu", "one", "once")   # "a uniform", "a European"
_SILENT_H = ("hour", "honest", "honor", "honour", "heir")                   # "an hour"


def fix_articles(text: str) -> str:
    """Make "a"/"an" agree with the next word after filling slots: "a engineer" -> "an engineer",
    "an black doctor" -> "a black doctor". Acronyms ("an MRI") and a few known words are left alone."""
    def repl(m: re.Match) -> str:
        article, word = m.group(1), m.group(2)
        lower = word.lower()
        if (word.isupper() and len(word) > 1) or (article[0] == "A" and m.start() > 0):
            return m.group(0)   # an acronym, or a capital "A" mid-sentence ("vitamin A and ...")
        vowel_sound = (lower[0] in "aeiou" and not lower.startswith(_VOWEL_SOUNDING_AS_CONSONANT)) \
            or lower.startswith(_SILENT_H)
        right = ("an" if vowel_sound else "a")
        return f"{article[0]}{right[1:]} {word}"
    return re.sub(r"(?<![\w-])(an|An|a|A) ([A-Za-z][\w-]*)", repl, text)


# ---------------------------------------------------------------------- LLM source
def _one_line(v: str) -> str:
    v = " ".join(v.split())   # LLMs pad and wrap lines; prompts are compared word for word
    if not v:
        raise ValueError("must not be empty")
    return v


Text = Annotated[str, AfterValidator(_one_line)]


class _ToxicityItem(BaseModel):
    prompt: Text            # names the concept ("a bloody warrior in a forest")
    aligned_prompt: Text    # the same scene without it ("a warrior in a forest")


class _BiasItem(BaseModel):
    prompt: Text            # neutral: names a person without the attribute ("a photo of a doctor")
    subject: Text           # the words of `prompt` naming the person ("doctor")


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word.lower())}\b", text.lower()) is not None


def llm_pairs(value: ValuePrinciple, n: int, client: LLMClient) -> tuple[list[PromptPair], list[dict]]:
    """Up to `n` prompt pairs for `value` written by the LLM behind `client`.

    Asks `llm.pairs_per_request` at a time, telling the model which prompts it already wrote, until
    `n` distinct pairs exist or a request brings nothing new. Returns (pairs, rejections); each
    rejection is {"value_id", "reason", "item"}.
    """
    per_request = client.cfg.pairs_per_request
    source = f"llm:{client.model}"
    pairs: list[PromptPair] = []
    rejections: list[dict] = []
    seen: set[str] = set()
    attributes = [a for a in value.attributes if a != value.majority_attribute]

    def reject(reason: str, item: Any) -> None:
        rejections.append({"value_id": value.id, "reason": reason, "item": item})

    max_requests = -(-n // per_request) + 2   # a couple of extra asks make up for rejected items
    for _ in range(max_requests):
        if len(pairs) >= n:
            break
        # The latest prompts steer the model away from repeats (capped to keep the request short).
        already = "\n".join(f"- {p.prompt}" for p in pairs[-100:]) or "(none yet)"
        common = {"principle": value.principle, "concept": value.concept, "n": min(per_request, n - len(pairs)),
                  "already": already}
        if value.kind == "toxicity":
            items, bad = client.chat_json("toxicity_pairs.txt", {**common, "keywords": ", ".join(value.keywords)},
                                          _ToxicityItem, "pairs")
        else:
            items, bad = client.chat_json("bias_prompts.txt", {**common, "attributes": ", ".join(value.attributes)},
                                          _BiasItem, "prompts")
        for r in bad:
            reject(r["reason"], r["item"])
        before = len(pairs)
        for item in items:
            if len(pairs) >= n:
                break
            raw = item.model_dump()
            if item.prompt in seen:
                reject("duplicate prompt", raw)
                continue
            if value.kind == "toxicity":
                aligned, attribute = item.aligned_prompt, None
                if aligned.lower() == item.prompt.lower():
                    reject("aligned prompt equals the prompt", raw)
                    continue
                named = next((k for k in value.keywords if _mentions(aligned, k)), None)
                if named:
                    # Naming the concept, even negated ("no blood"), makes the model draw it.
                    reject(f"aligned prompt still names the concept ({named!r})", raw)
                    continue
            else:
                named = next((a for a in value.attributes if _mentions(item.prompt, a)), None)
                if named:
                    reject(f"prompt is not neutral: it names the attribute {named!r}", raw)
                    continue
                if not _mentions(item.prompt, item.subject):
                    reject(f"subject {item.subject!r} does not occur in the prompt", raw)
                    continue
                attribute = attributes[len(pairs) % len(attributes)]
                aligned = fix_articles(re.sub(rf"\b{re.escape(item.subject)}\b", lambda m: f"{attribute} {m.group(0)}",
                                              item.prompt, count=1, flags=re.IGNORECASE))
            seen.add(item.prompt)
            pairs.append(PromptPair(value.id, value.kind, item.prompt, aligned, item.prompt, attribute, source))
        if len(pairs) == before:
            break   # the model has nothing new to offer
    return pairs, rejections


# ---------------------------------------------------------------------- both sources
def generate_pairs(cfg: RunConfig, values: list[ValuePrinciple], cache_dir: Path | None
                   ) -> tuple[list[PromptPair], list[dict]]:
    """Prompt pairs for every value of a run, from cfg.prompt_source (LLM answers cached in cache_dir).

    Returns (pairs, rejections); rejections are the LLM items that were dropped (none for templates).
    A value that gets no pair at all is a LivoError: a run without data for a value is a wrong run.
    """
    pairs: list[PromptPair] = []
    rejections: list[dict] = []
    if cfg.prompt_source == "template":
        seeds = load_seeds(cfg.seeds_file)
        for value in values:
            got = template_pairs(value, seeds, cfg.prompts_per_value, cfg.seed)
            if not got:
                raise LivoError(f"no prompt pairs were produced for value {value.id!r}: its templates in "
                                f"{cfg.seeds_file} give no distinct prompts; add slot items or templates")
            pairs += got
    else:
        from livo_core.llm import LLMClient

        client = LLMClient(cfg.llm, cache_dir)
        for value in values:
            got, bad = llm_pairs(value, cfg.prompts_per_value, client)
            rejections += bad
            if not got:
                why = f"all {len(bad)} items were rejected (first: {bad[0]['reason']})" if bad else "the model returned no items"
                raise LivoError(f"no prompt pairs were produced for value {value.id!r}: {why}; "
                                f"try another llm.model or prompt_source=template")
            pairs += got
    return pairs, rejections


# ---------------------------------------------------------------------- new principles from a policy
class _PrincipleItem(BaseModel):
    id: str
    principle: str
    kind: str
    concept: str
    attributes: list[str] = Field(default_factory=list)
    keywords: list[str] = Field(default_factory=list)


def propose_principles(client: LLMClient, policy_text: str, existing: list[ValuePrinciple] = (), n: int = 3) -> list[ValuePrinciple]:
    """Value principles an LLM reads out of a short policy text (skipping ids in `existing`).

    Proposals get the default classifier of their kind (CLIP concept / CLIP attribute scoring) and
    source "llm:<model>". Invalid proposals are dropped and logged.
    """
    listed = "\n".join(f"- {v.id}: {v.principle}" for v in existing) or "(none)"
    items, bad = client.chat_json("principles.txt", {"policy_text": policy_text.strip(), "existing": listed, "n": n},
                                  _PrincipleItem, "principles")
    taken = {v.id for v in existing}
    principles: list[ValuePrinciple] = []
    for item in items:
        data = item.model_dump()
        classifier = Classifier(name="clip_attribute" if data["kind"] == "bias" else "clip_concept")
        try:
            principle = ValuePrinciple(**data, classifier=classifier, source=f"llm:{client.model}")
        except ValidationError as e:
            bad.append({"reason": _reason(e), "item": data})
            continue
        if principle.id in taken:
            bad.append({"reason": f"value id {principle.id!r} exists already", "item": data})
            continue
        taken.add(principle.id)
        principles.append(principle)
    for r in bad:
        log.warning("proposed value principle dropped: %s (%s)", r["reason"], r["item"])
    return principles
