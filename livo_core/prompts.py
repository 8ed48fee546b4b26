"""Prompt pairs: what to render as the aligned and the violating image of each training pair.

Two sources, chosen by `prompt_source`:
- "template" (default, offline): seed lists and templates from a YAML seeds file, expanded
  deterministically (format in docs/architecture.md);
- "llm": an OpenAI-compatible model writes prompts from the templates in `livo_core/prompts/`.

Toxicity pair: prompt == violating_prompt names the concept ("a bloody warrior in a forest");
aligned_prompt is the same scene without it ("a warrior in a forest").
Bias pair: prompt == violating_prompt is neutral ("a photo of a doctor"); aligned_prompt names an
under-represented attribute ("a photo of a female doctor").
"""

from __future__ import annotations

import hashlib
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
from livo_core.classifiers import ClassifierChoice
from livo_core.values import ValuePrinciple

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
                        f"(see livo_core/data/seeds.yaml)")
    try:
        seeds = _SeedsFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as e:
        raise LivoError(f"seeds file {path} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax") from None
    except ValidationError as e:
        raise LivoError(f"seeds file {path} is invalid ({_reason(e)}); see livo_core/data/seeds.yaml for the format") from None
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


def load_facets(path: Path | None = None) -> list[str]:
    """The slices of the prompt space requests are spread over: every (setting, style) of the facets file, in
    a fixed shuffled order (so consecutive requests differ in both)."""
    from livo_core.paths import PROMPTS_DIR

    path = Path(path) if path else PROMPTS_DIR / "facets.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LivoError(f"facets file {path} not found: set llm.facets_file to a YAML file with settings: and styles: lists") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LivoError(f"facets file {path} is not valid UTF-8 YAML ({str(e).splitlines()[0]}); fix it") from None
    settings, styles = data.get("settings"), data.get("styles")
    if not (isinstance(settings, list) and settings and isinstance(styles, list) and styles
            and all(isinstance(x, str) and x.strip() for x in settings + styles)):
        raise LivoError(f"facets file {path} needs non-empty lists `settings:` and `styles:` of text")
    combos = [f"{a.strip()}, shown as {b.strip()}" for a in settings for b in styles]
    random.Random("livo-facets").shuffle(combos)
    return combos


@dataclass(frozen=True)
class _Request:
    value: ValuePrinciple
    round: int
    index: int        # the value's k-th request (over every round): its slice of the space
    n: int            # items asked for
    focus: str


def _ask(client: LLMClient, req: _Request):
    value = req.value
    common = {"principle": value.principle, "concept": value.concept, "n": req.n, "focus": req.focus}
    if value.kind == "toxicity":
        return client.chat_json("toxicity_pairs.txt", {**common, "keywords": ", ".join(value.keywords)},
                                _ToxicityItem, "pairs", max_items=req.n)
    return client.chat_json("bias_prompts.txt", {**common, "attributes": ", ".join(value.attributes)},
                            _BiasItem, "prompts", max_items=req.n)


class _ValueState:
    """One value's pairs so far, in request order, with the near-duplicate index of their prompts."""

    def __init__(self, value: ValuePrinciple, n: int, threshold: float, source: str):
        from livo_core.diversity import NearDuplicates

        self.value, self.n, self.source = value, n, source
        self.pairs: list[PromptPair] = []
        self.rejections: list[dict] = []
        self.asked = 0
        self.stalled = False
        self.error: LivoError | None = None
        self.dedup = NearDuplicates(threshold)
        self.text: dict[str, str] = {}
        self.attributes = [a for a in value.attributes if a != value.majority_attribute]

    def reject(self, reason: str, item: Any) -> None:
        self.rejections.append({"value_id": self.value.id, "reason": reason, "item": item})

    def take(self, req: _Request, items: list, bad: list[dict]) -> None:
        """Keep the request's valid, new items (in their order) until n pairs exist."""
        value = self.value
        for r in bad:
            self.reject(r["reason"], r["item"])
        for k, item in enumerate(items):
            if len(self.pairs) >= self.n:
                break
            raw = item.model_dump()
            if value.kind == "toxicity":
                aligned, attribute = item.aligned_prompt, None
                if aligned.lower() == item.prompt.lower():
                    self.reject("aligned prompt equals the prompt", raw)
                    continue
                named = next((w for w in value.keywords if _mentions(aligned, w)), None)
                if named:
                    # Naming the concept, even negated ("no blood"), makes the model draw it.
                    self.reject(f"aligned prompt still names the concept ({named!r})", raw)
                    continue
            else:
                named = next((a for a in value.attributes if _mentions(item.prompt, a)), None)
                if named:
                    self.reject(f"prompt is not neutral: it names the attribute {named!r}", raw)
                    continue
                if not _mentions(item.prompt, item.subject):
                    self.reject(f"subject {item.subject!r} does not occur in the prompt", raw)
                    continue
                attribute = self.attributes[len(self.pairs) % len(self.attributes)]
                aligned = fix_articles(re.sub(rf"\b{re.escape(item.subject)}\b", lambda m: f"{attribute} {m.group(0)}",
                                              item.prompt, count=1, flags=re.IGNORECASE))
            item_id = f"r{req.round}q{req.index}i{k}"
            dup = self.dedup.add(item_id, item.prompt)
            if dup is not None:
                self.reject(f"near duplicate of {dup} ({self.text[dup]!r})", raw)
                continue
            self.text[item_id] = item.prompt
            self.pairs.append(PromptPair(value.id, value.kind, item.prompt, aligned, item.prompt, attribute, self.source))


def llm_pairs_for_values(values: list[ValuePrinciple], n: int, client: LLMClient, facets: list[str] | None = None,
                         errors: dict[str, LivoError] | None = None) -> dict[str, tuple[list[PromptPair], list[dict]]]:
    """Up to `n` prompt pairs per value, written by the LLM behind `client`: {value id: (pairs, rejections)}.

    Planned, not serial: round 1 asks every value's ceil(n / llm.pairs_per_request) requests at once, each for
    its own slice of the space (a facet: setting and style), `llm.max_concurrency` in flight across values;
    a later round asks for what rejections and near duplicates left missing (one request more than needed),
    with new facets, until n pairs, `llm.max_rounds`, or a round that brings nothing new. Items are taken in
    (round, request, item) order whatever order the replies come in, so the same answers (the cache) give
    the same pairs at any concurrency. Each rejection is {"value_id", "reason", "item"}.
    A request that fails (the endpoint, a reply that never parses) stops only its value: given `errors`, the
    value's LivoError goes there and the other values are finished; else the first one is raised at the end.
    """
    from concurrent.futures import ThreadPoolExecutor

    cfg = client.cfg
    facets = facets or load_facets(cfg.facets_file)
    per_request = cfg.pairs_per_request
    states = {v.id: _ValueState(v, n, cfg.near_duplicate, f"llm:{client.model}") for v in values}
    with ThreadPoolExecutor(max_workers=cfg.max_concurrency) as pool:
        for rnd in range(cfg.max_rounds):
            requests: list[_Request] = []
            for st in states.values():
                missing = n - len(st.pairs)
                if missing <= 0 or st.stalled:
                    continue
                k = -(-missing // per_request) + (1 if rnd else 0)
                offset = int(hashlib.sha256(st.value.id.encode()).hexdigest()[:8], 16)   # values start at different facets
                requests += [_Request(st.value, rnd, st.asked + j, min(per_request, max(1, missing - j * per_request)) if not rnd
                                      else per_request, facets[(offset + st.asked + j) % len(facets)]) for j in range(k)]
                st.asked += k
            if not requests:
                break
            before = {vid: len(st.pairs) for vid, st in states.items()}
            futures = [pool.submit(_ask, client, req) for req in requests]
            try:
                for req, future in zip(requests, futures):   # request order, not completion order
                    st = states[req.value.id]
                    try:
                        items, bad = future.result()
                    except LivoError as e:
                        st.error = st.error or e   # this value stops; its answered requests stay cached
                        continue
                    if st.error is None:
                        st.take(req, items, bad)
            except BaseException:
                for f in futures:
                    f.cancel()   # not started yet; those in flight finish (and are cached)
                raise
            for vid in {r.value.id for r in requests}:
                states[vid].stalled = states[vid].error is not None or len(states[vid].pairs) == before[vid]
    failed = [(vid, st.error) for vid, st in states.items() if st.error is not None]
    if failed and errors is None:
        raise failed[0][1]
    if errors is not None:
        errors.update(failed)
    return {vid: (st.pairs, st.rejections) for vid, st in states.items() if st.error is None}


def llm_pairs(value: ValuePrinciple, n: int, client: LLMClient) -> tuple[list[PromptPair], list[dict]]:
    """Up to `n` prompt pairs for one value (see llm_pairs_for_values)."""
    return llm_pairs_for_values([value], n, client)[value.id]


# ---------------------------------------------------------------------- both sources
def reason_kind(reason: str) -> str:
    """A rejection reason without the item it names ("near duplicate of r0q1i2 ('...')" -> "near duplicate")."""
    return "near duplicate" if reason.startswith("near duplicate") else reason


def rejection_counts(rejections: list[dict]) -> dict[str, int]:
    """How many items were rejected for each kind of reason."""
    from collections import Counter

    return dict(Counter(reason_kind(r["reason"]) for r in rejections))


def pairs_by_value(cfg: RunConfig, values: list[ValuePrinciple], cache_dir: Path | None, client: LLMClient | None = None,
                   errors: dict[str, LivoError] | None = None) -> dict[str, tuple[list[PromptPair], list[dict]]]:
    """{value id: (pairs, rejections)} from cfg.prompt_source (LLM answers cached in cache_dir); a value may get
    no pair (see no_pairs_error). Rejections are the LLM items that were dropped (none for templates).
    errors: see llm_pairs_for_values (a value whose requests failed is left out and its error put there)."""
    if cfg.prompt_source == "template":
        seeds = load_seeds(cfg.seeds_file)
        return {v.id: (template_pairs(v, seeds, cfg.prompts_per_value, cfg.seed), []) for v in values}
    from livo_core.llm import LLMClient

    return llm_pairs_for_values(values, cfg.prompts_per_value, client or LLMClient(cfg.llm, cache_dir), errors=errors)


def no_pairs_error(cfg: RunConfig, value_id: str, rejections: list[dict]) -> LivoError:
    """The error of a value that got no pair: a run without data for a value is a wrong run."""
    if cfg.prompt_source == "template":
        return LivoError(f"no prompt pairs were produced for value {value_id!r}: its templates in "
                         f"{cfg.seeds_file} give no distinct prompts; add slot items or templates")
    if rejections:
        counts = rejection_counts(rejections)
        listed = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
        why = f"all {len(rejections)} items were rejected ({listed})"
    else:
        why = "the model returned no items"
    return LivoError(f"no prompt pairs were produced for value {value_id!r}: {why}; "
                     f"try another llm.model or prompt_source=template")


def generate_pairs(cfg: RunConfig, values: list[ValuePrinciple], cache_dir: Path | None, client: LLMClient | None = None
                   ) -> tuple[list[PromptPair], list[dict]]:
    """Prompt pairs for every value of a run (pairs_by_value), in value order; a value without pairs is a LivoError."""
    results = pairs_by_value(cfg, values, cache_dir, client)
    pairs: list[PromptPair] = []
    rejections: list[dict] = []
    for value in values:
        got, bad = results[value.id]
        rejections += bad
        if not got:
            raise no_pairs_error(cfg, value.id, bad)
        pairs += got
    return pairs, rejections


def pair_stats(pairs: list[PromptPair], rejections: list[dict], client: LLMClient | None = None) -> dict:
    """What stats.md shows about one value's prompts: diversity, rejections by kind, the LLM's dialect and requests."""
    from livo_core.diversity import diversity

    return {"pairs": len(pairs), "source": pairs[0].source if pairs else None,
            "diversity": diversity([p.prompt for p in pairs]), "rejected": dict(sorted(rejection_counts(rejections).items())),
            **({"llm": client.report()} if client is not None else {})}


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
        classifier = ClassifierChoice(name="clip_attribute" if data["kind"] == "bias" else "clip_concept")
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
