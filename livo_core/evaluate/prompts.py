"""Evaluation prompt sets: the shipped JSONL sets, a user's CSV / JSONL, the I2P CSV (per-row seed, guidance, size)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from livo_core.config import MAX_SEED
from livo_core.errors import LivoError
from livo_core.evaluate.config import GROUPS, I2P_CATEGORIES, MAX_SIZE, EvalConfig, PromptSetSpec
from livo_core.evaluate.formats import format_for

@dataclass(frozen=True)
class EvalPrompt:
    id: str                       # stable: "<set>-<index>-<hash>", the folder of its images
    prompt: str
    group: str                    # toxicity | bias | harmless
    value_id: str | None          # the value a correct retriever picks (None: none applies)
    judge_value: str | None       # whose classifier judges the images (None: no safety judgement)
    seed: int                     # image j starts from the noise of seed + j
    set: str
    n: int                        # images
    steps: int | None = None      # per-row overrides (I2P rows carry guidance and size)
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    expect: tuple = ()            # extra row fields as (key, value) pairs (toy world: subject, colour)
    clean_prompt: str | None = None   # an adversarial row's clean prompt (MMA, Ring-A-Bell): scored as an attack
    categories: tuple = ()        # the row's own categories (I2P, CoProV2): retrieval is measured per category

    @property
    def extra(self) -> dict:
        return dict(self.expect)


def _rows(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise LivoError(f"prompt file {path} not found: give a .jsonl or .csv file with a `prompt` column")
    try:
        text = path.read_text(encoding="utf-8-sig")   # a spreadsheet's byte-order mark is not part of the first column name
    except UnicodeDecodeError:
        raise LivoError(f"prompt file {path} is not UTF-8 text: save it as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise LivoError(f"{path} line {n} is not valid JSON ({e.msg}): fix or remove that line") from None
        return rows
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    raise LivoError(f"prompt file {path}: unknown extension {path.suffix!r}; use .jsonl or .csv")


def _num(row: dict, key: str, cast, low: float, high: float, multiple: int = 1):
    """A row's optional number, checked: finite, integral for ints, in [low, high], a multiple of `multiple`."""
    v = row.get(key)
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none")):
        return None
    where = f"prompt row {str(row.get('prompt', ''))[:40]!r}: {key} = {v!r}"
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise LivoError(f"{where} is not a number; fix the row") from None
    if not math.isfinite(x) or (cast is int and not x.is_integer()):
        raise LivoError(f"{where} is not a finite {'whole ' if cast is int else ''}number; fix the row")
    x = int(x) if cast is int else x
    if not low <= x <= high or (multiple > 1 and x % multiple):
        extra = f", a multiple of {multiple}" if multiple > 1 else ""
        raise LivoError(f"{where} is out of range: give {low:g} to {high:g}{extra}; fix the row")
    return x


def load_prompt_set(spec: PromptSetSpec, images_per_prompt: int, seed: int) -> list[EvalPrompt]:
    """A prompt set's prompts (see the module docstring for the formats)."""
    rows = _rows(Path(spec.path))
    if not rows:
        raise LivoError(f"prompt file {spec.path} holds no prompts")
    if not all(isinstance(r, dict) for r in rows):
        raise LivoError(f"prompt file {spec.path} needs one object (a row with a `prompt`) per line")
    fmt = format_for(spec.format, set(rows[0]), spec.path)   # see livo_core/evaluate/formats.py
    if not all(isinstance(r.get(fmt.prompt), str) and r[fmt.prompt].strip() for r in rows):
        raise LivoError(f"prompt file {spec.path} ({fmt.name} format) needs a `{fmt.prompt}` column (text) in every row")
    used = {c for c in (fmt.prompt, fmt.seed, fmt.guidance, fmt.width, fmt.height, fmt.category, fmt.clean) if c}
    known = used | {"value_id", "group", "steps", "", "Unnamed: 0"}
    out = []
    for i, r in enumerate(rows[: spec.limit]):
        prompt = fmt.template.format(r[fmt.prompt].strip())
        value_id = r.get("value_id") or spec.value_id
        cats = [c.strip() for c in str(r.get(fmt.category) or "").split(",") if c.strip()] if fmt.category else []
        if cats and spec.group == "toxicity":   # its categories say which value a row calls for
            value_id = next((I2P_CATEGORIES[c] for c in cats if c in I2P_CATEGORIES), value_id)
        group = r.get("group") or spec.group
        if group not in GROUPS:
            raise LivoError(f"{spec.path} row {i + 1}: group {group!r} is not one of {', '.join(GROUPS)}; fix the row")
        n = spec.images_per_prompt or images_per_prompt
        row = {**r, "prompt": prompt}   # so a bad number names its prompt
        row_seed = _num(row, fmt.seed, int, 0, MAX_SEED - n) if fmt.seed else None
        digest = hashlib.sha256(f"{seed}|{spec.name}|{i}|{r[fmt.prompt]}".encode()).hexdigest()   # the row as written
        clean = (str(r.get(fmt.clean) or "").strip() or None) if fmt.clean else None
        out.append(EvalPrompt(
            id=f"{spec.name}-{i:05d}-{digest[:8]}", prompt=prompt, group=group,
            value_id=None if group == "harmless" else value_id,
            judge_value=(spec.judge_value if group == "harmless" else value_id),
            seed=row_seed if row_seed is not None else int(digest[:8], 16) & 0x7FFFFFFF, set=spec.name,
            n=n, steps=_num(row, "steps", int, 1, 1000),
            guidance_scale=_num(row, fmt.guidance, float, 0, 100) if fmt.guidance and spec.row_settings else None,
            height=_num(row, fmt.height, int, 8, MAX_SIZE, 8) if fmt.height and spec.row_settings else None,
            width=_num(row, fmt.width, int, 8, MAX_SIZE, 8) if fmt.width and spec.row_settings else None,
            expect=tuple(sorted((k, v) for k, v in r.items() if k not in known)), clean_prompt=clean,
            categories=tuple(cats)))
    return out


def load_prompts(cfg: EvalConfig) -> list[EvalPrompt]:
    prompts = [p for spec in cfg.prompt_sets for p in load_prompt_set(spec, cfg.images_per_prompt, cfg.seed)]
    if not prompts:
        raise LivoError("the evaluation has no prompts: list at least one prompt set")
    return prompts


def prompt_settings(cfg: EvalConfig, p: EvalPrompt) -> dict:
    """A prompt's sampler settings: its row's own, else the evaluation's inference settings."""
    inf = cfg.inference
    return dict(steps=p.steps or inf.steps, guidance_scale=inf.guidance_scale if p.guidance_scale is None else p.guidance_scale,
                height=p.height or inf.height, width=p.width or inf.width)


def prompt_key(p: EvalPrompt, settings: dict) -> dict:
    """What shapes one prompt's images beyond its method: text, first seed, resolved per-row settings."""
    return {"prompt": p.prompt, "seed": p.seed, **settings}
