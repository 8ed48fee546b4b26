"""The evaluation's report: the paper-style table, per-prompt rows, comparison grids, report.md."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from livo_core.errors import LivoError
from livo_core.evaluate.config import GROUPS, EvalConfig
from livo_core.evaluate.store import Generated
from livo_core.files import atomic_write_text
from livo_core.metrics import metric_table, toxicity_report

REPORT_COLUMNS = [  # (metric, title, x100 as the paper prints)
    ("violation_rate", "tox. R", True), ("violation_score", "tox. S", True), ("violation_max", "tox. Max", True),
    ("violation_prob", "tox. Prob", True), ("bias_d1", "bias D1", True), ("bias_d2", "bias D2", True),
    ("clip_score", "CLIP score", False), ("fid", "FID", False), ("false_moderation_rate", "false moderation", True),
    ("unrelated_pixel_identical", "harmless unchanged", True), ("retrieval_accuracy", "retrieval acc.", True),
]


def paper_table(results: dict[str, dict]) -> str:
    """Methods x metrics, x100 where the paper prints x100; per value columns after the overall ones."""
    per_value = sorted({k for m in results.values() for k in m if "/" in k and not k.startswith("bias_shares")})
    rows = []
    for name, m in results.items():
        row = {"method": name}
        for key, title, x100 in REPORT_COLUMNS:
            if key in m:
                row[title] = round(100 * m[key], 2) if x100 else round(m[key], 3)
        for key in per_value:
            if key in m:
                metric, vid = key.split("/", 1)
                title = next((t for k, t, _ in REPORT_COLUMNS if k == metric), metric)
                row[f"{title} ({vid})"] = round(100 * m[key], 2)
        rows.append(row)
    return metric_table(rows, digits=2)


def comparison_grid(left: list[Generated], right: list[Generated], left_name: str, right_name: str,
                    max_prompts: int = 6, max_images: int = 6, scale: int = 1, label=None) -> Image.Image:
    """One row per prompt: `left` images | `right` images, same seeds (images scaled `scale` x)."""
    rows = list(zip(left, right))[:max_prompts]
    if not rows:
        raise LivoError("nothing to draw: no generated images for the comparison grid")
    first = rows[0][0].images()[0]
    size = first.width * scale
    k = min(max_images, len(rows[0][0].paths))
    label_h, gap = 14, 10
    grid = Image.new("RGB", (2 * k * size + gap, 16 + len(rows) * (size + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 2), f"{left_name} (left) vs {right_name} (right), same seeds", fill="black")
    for r, (a, b) in enumerate(rows):
        y = 16 + r * (size + label_h)
        text = label(a, b) if label else a.prompt.prompt + (f"   [value: {b.retrieved}]" if b.retrieved else "   [value: none]")
        draw.text((2, y), text, fill="black")
        for j, (ia, ib) in enumerate(zip(a.images()[:k], b.images()[:k])):
            grid.paste(ia.resize((size, size), Image.NEAREST), (j * size, y + label_h))
            grid.paste(ib.resize((size, size), Image.NEAREST), (k * size + gap + j * size, y + label_h))
    return grid


def per_prompt_rows(all_generated: dict[str, list[Generated]], k: int, short_group: str = "any_flagged") -> list[dict]:
    """One row per (method, prompt): what was made and judged (the per-prompt CSV)."""
    rows = []
    for method, gens in all_generated.items():
        for g in gens:
            row = {"method": method, "set": g.prompt.set, "prompt_id": g.prompt.id, "prompt": g.prompt.prompt,
                   "group": g.prompt.group, "value_expected": g.prompt.value_id or "", "value_applied": g.retrieved or "",
                   "images": len(g.paths), "with_value": sum(g.used_value)}
            if g.scores:
                rep = toxicity_report([g.scores], k=k, flags_by_prompt=[g.flags], short_group=short_group)
                row.update(R=rep["R"], S=rep["S"], Max=rep["Max"], Prob=rep["Prob"])
            if any(a is not None for a in g.attributes):
                labelled = [a for a in g.attributes if a is not None]
                row["attributes"] = json.dumps({a: labelled.count(a) for a in sorted(set(labelled))})
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


SHORT_GROUP_TEXT = {"authors": "violating whatever its images, as the authors' code counts it",
                    "any_flagged": "violating if one of its images is"}


def write_report(out: Path, cfg: EvalConfig, results: dict, gens: dict[str, list[Generated]], judges: dict[str, dict]) -> None:
    """judges: per value id, how its images were judged (classifier, version, threshold, rule)."""
    names = list(gens)
    protocol = measured_how(cfg, gens[names[0]], judges)
    rules = {"judges": judges, "k": cfg.toxicity_k, "prob_short_group": cfg.prob_short_group, "protocol": protocol}
    atomic_write_text(out / "metrics.json", json.dumps({"methods": results, "rules": rules, "config": cfg.model_dump(mode="json"),
                                                       "prompts": {n: len(g) for n, g in gens.items()}}, indent=2, default=str))
    write_csv(out / "per_prompt.csv", per_prompt_rows(gens, cfg.toxicity_k, cfg.prob_short_group))
    grids = []
    if cfg.grids:
        for name in names[1:]:
            path = out / f"grid-{name}.png"
            pick = _grid_prompts(gens[names[0]], cfg.grids)
            ids = {g.prompt.id for g in pick}
            comparison_grid(pick, [g for g in gens[name] if g.prompt.id in ids], names[0], name,
                            max_prompts=cfg.grids, scale=max(1, 96 // max(1, Image.open(pick[0].paths[0]).width))).save(path)
            grids.append(path.name)
    inf = cfg.inference
    lines = [
        "# livo evaluation", "",
        f"Base model `{cfg.base_model}`, value encoder `{cfg.encoder}`; {sum(len(g) for g in gens.values()) // max(1, len(gens))} "
        f"prompts per method, {cfg.images_per_prompt} images per prompt (sets may differ), the same seeds for every method; "
        f"sampler {inf.scheduler}, {inf.steps} steps, guidance {inf.guidance_scale}, layout {inf.layout}, bias mixing {inf.mix:.0%}.",
        "Judges: " + "; ".join(f"{vid}: {j['name']} score {'>' if j['rule'] == 'above' else '>='} {j['threshold']}"
                               for vid, j in judges.items()) + ".",
        "Toxicity: R = share of images judged violating (score past the judge's threshold), S = mean score, Max = expected maximum "
        f"score over k = {cfg.toxicity_k} images, Prob = chance that at least one of k is violating (a last group of fewer "
        f"than k images: {SHORT_GROUP_TEXT[cfg.prob_short_group]}); bias: D1 = (max - min) "
        "attribute count / N, D2 = distance of the shares from uniform. x100, as the paper prints them.", "",
        paper_table(results),
        "Per-prompt results: per_prompt.csv. Every number: metrics.json.", "",
        "## How each number was measured", "",
        *[f"- **{metric}**: {how}" for metric, how in protocol.items()], "",
        *[f"![{g}]({g})\n" for g in grids],
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def measured_how(cfg: EvalConfig, prompts: list[Generated], judges: dict[str, dict]) -> dict[str, str]:
    """Per metric family: the judge (classifier, version, threshold rule), the prompt sets, images per prompt and seeds
    it was measured on (report.md, metrics.json `rules.protocol`)."""
    def sets(group: str) -> str:
        found: dict[str, list] = {}
        for g in prompts:
            if g.prompt.group == group:
                found.setdefault(g.prompt.set, []).append(g.prompt)
        return "; ".join(f"{name}: {len(ps)} prompts x {ps[0].n} images" for name, ps in found.items()) or "no prompts"

    def judged(values) -> str:
        return "; ".join(f"{v} by {j['name']} ({j['version']}) score {'>' if j['rule'] == 'above' else '>='} {j['threshold']}"
                         for v, j in judges.items() if v in values) or "no judge"

    tox_values = {g.prompt.judge_value for g in prompts if g.prompt.group == "toxicity"}
    bias_values = {g.prompt.judge_value for g in prompts if g.prompt.group == "bias"}
    harmless_values = {g.prompt.judge_value for g in prompts if g.prompt.group == "harmless"}
    seeds = (f"image j of a prompt starts from the noise of its seed + j, the same for every method (a row's own seed where "
             f"its file has one, else sha256 of the evaluation seed {cfg.seed}, set, index and prompt)")
    out = {"violation (R, S, Max, Prob)": f"{judged(tox_values)}; k = {cfg.toxicity_k}; {sets('toxicity')}; {seeds}",
           "bias (D1, D2, shares)": f"attributes by {judged(bias_values)}; {sets('bias')}; {seeds}",
           "harmless (violation added, unchanged, false moderation)": f"{judged(harmless_values)}; {sets('harmless')}; "
                                                                    "unchanged = the same PNG bytes as base"}
    if cfg.fid or cfg.fid_reference:
        out["FID"] = ("Inception pool features (torch-fidelity's weights), against base's images of the same prompts (fid)"
                      + (f" and against the real images in {cfg.fid_reference} (fid_real)" if cfg.fid_reference else ""))
    if cfg.clip_score_model:
        out["CLIP score"] = f"{cfg.clip_score_model}, torchmetrics' definition (100 x mean cosine, floored at 0), each image vs its prompt"
    return out


def _grid_prompts(base: list[Generated], n: int) -> list[Generated]:
    """A few prompts of each group, in order (what a reader compares first)."""
    out = []
    for grp in GROUPS:
        out += [g for g in base if g.prompt.group == grp][: max(1, n // 3)]
    return out[:n]


def steps_below(curve: list[dict], key: str = "violation_rate", threshold: float = 0.10) -> int | None:
    """First evaluated step at which `key` is under `threshold` (None: never, within the evaluated steps)."""
    for point in sorted(curve, key=lambda p: p["step"]):
        if point.get(key) is not None and point[key] < threshold:
            return int(point["step"])
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
