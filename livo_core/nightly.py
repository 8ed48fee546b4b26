"""The nightly loop's state and decisions, apart from Prefect: its config, the night's state files, the configs
of tonight's dataset and the held-out set, held-out scoring of encoders, the comparison rows of a decision.
flows/nightly.py runs a night as a Prefect flow (`livo nightly`); docs/operations.md describes the loop."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from livo_core.config import RunConfig, StrictModel
from livo_core.errors import LivoError
from livo_core.registry import MetricRule, PromotionRule
from livo_core.train import TrainConfig


# --------------------------------------------------------------------------- config
_Strict = StrictModel


class HeldoutSettings(_Strict):
    seed: int = Field(999_999, ge=0, description="Seed of the held-out dataset (its prompts and image seeds); never a night's seed.")
    run_dir: Path | None = Field(None, description="Evaluate on this existing dataset run instead of building ROOT/heldout.")
    prompts_per_value: int | None = Field(None, ge=1, description="Prompt pairs per value of the held-out set; None = as the nightly data.")
    repeats: int = Field(4, ge=1, description="Noise draws (noise + timestep) per held-out pair; more = less noisy metrics.")
    eval_seed: int = Field(0, ge=0, description="Seeds the noise and timesteps: every encoder is scored on the same draws.")
    batch_size: int = Field(16, ge=1, description="Pairs per UNet call during evaluation.")


def _default_rule() -> PromotionRule:
    return PromotionRule(metrics=[MetricRule(metric="heldout_loss", direction="min", tolerance=0.0),
                                  MetricRule(metric="heldout_pref_acc", direction="max", tolerance=0.05)])


class NightlyConfig(_Strict):
    """Everything one night does. Defaults: the toy world, template prompts, warm start, the default rule."""

    dataset: RunConfig = Field(default_factory=RunConfig, description="Tonight's dataset config; its seed is the base seed (night N uses seed + N).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training config of every night's candidate, over the "
                               "training preset its base model declares (the toy world's: train-toyworld.toml).")
    warm_start: bool = Field(True, description="Start tonight's encoder from production (if any) instead of a copy of SD's text encoder.")
    policy_file: Path | None = Field(None, description="A short policy text; when its hash changes, an LLM proposes new value principles from it (needs dataset.prompt_source=llm).")
    new_principles: int = Field(3, ge=1, le=10, description="At most this many principles proposed per policy change.")
    heldout: HeldoutSettings = Field(default_factory=HeldoutSettings, description="The fixed held-out dataset every candidate is scored on.")
    promotion: PromotionRule = Field(default_factory=_default_rule, description="Metrics, direction and tolerance a candidate must not be worse on.")
    keep_versions: int = Field(5, ge=1, description="Registry versions kept (the production one always stays).")
    lock_timeout_s: float = Field(0.0, ge=0, description="How long a second nightly run on the same root waits for the first (0 = refuse at once).")
    evaluation: dict | None = Field(None, description="Also run the evaluation stage (livo evaluate's config: prompt_sets, images_per_prompt, "
                                    "inference, judges, clip_score_model, fid ...) on candidate and production; its metrics join the "
                                    "promotion rule as eval_<metric> (e.g. eval_violation_rate, eval_fid, eval_clip_score).")

    @model_validator(mode="after")
    def _policy_needs_llm(self):
        if self.policy_file is not None and self.dataset.prompt_source != "llm":
            raise ValueError("policy_file needs dataset.prompt_source = llm: template seeds have no prompts for new principles")
        return self


def load_nightly_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None,
                        preset: str | None = None) -> NightlyConfig:
    """Config file (optional .toml/.yaml/.json) + dotted overrides -> NightlyConfig, or a LivoError naming the field.

    The train section starts from the training preset the base model's folder declares (`livo_core.train.preset_for`:
    the toy world's recipe for the toy world), as `livo train` and the training deployment resolve it."""
    from livo_core.config import load_job_config
    from livo_core.train import load_train_config, preset_for

    plain = load_job_config(NightlyConfig, "nightly", path, preset, overrides)
    recipe = load_train_config(preset=preset_for(plain.train.base_model or plain.dataset.base_model))
    base = {"train": recipe.model_dump(mode="json", exclude_unset=True)}
    return load_job_config(NightlyConfig, "nightly", path, preset, overrides, base=base)


# --------------------------------------------------------------------------- plain steps (no Prefect)
def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def short_sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    from livo_core.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def nights(root: Path) -> list[dict]:
    """Every night's state, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((Path(root) / "nights").glob("night-*.json"))]


def begin_night(root: Path, cfg: NightlyConfig) -> dict:
    """Tonight's state: the unfinished last night (resumed, same seed), or the next night with a new seed."""
    done = nights(root)
    if done and done[-1]["status"] != "done":
        return done[-1]
    index = done[-1]["index"] + 1 if done else 1
    state = {"night": f"night-{index:04d}", "index": index, "seed": cfg.dataset.seed + index,
             "status": "running", "started": utc_now()}
    write_json(root / "nights" / f"{state['night']}.json", state)
    return state


def update_principles(root: Path, cfg: NightlyConfig, previous_hash: str | None) -> tuple[Path, str | None, list[str]]:
    """(values file for tonight, policy hash, ids of principles added tonight).

    Without a policy file the dataset's values file is used as is. With one, ROOT/values.yaml (the dataset's
    values plus every principle proposed so far) is tonight's values file, extended when the policy changed.
    """
    if cfg.policy_file is None:
        return cfg.dataset.values_file, None, []
    import yaml

    from livo_core.llm import LLMClient
    from livo_core.prompts import propose_principles
    from livo_core.values import load_values

    if not cfg.policy_file.is_file():
        raise LivoError(f"policy_file {cfg.policy_file} not found: point it at a text file or remove it from the nightly config")
    text = cfg.policy_file.read_text(encoding="utf-8")
    policy_hash = short_sha(text)
    living = root / "values.yaml"
    if not living.is_file():
        shutil.copyfile(cfg.dataset.values_file, living)
    if policy_hash == previous_hash:
        return living, policy_hash, []
    existing = load_values(living)
    proposed = propose_principles(LLMClient(cfg.dataset.llm, root / "cache" / "llm"), text, existing, n=cfg.new_principles)
    if proposed:
        raw = yaml.safe_load(living.read_text(encoding="utf-8"))
        raw["values"] += [p.model_dump(mode="json") for p in proposed]
        from livo_core.files import atomic_write_text

        atomic_write_text(living, yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return living, policy_hash, [p.id for p in proposed]


def night_dataset_config(cfg: NightlyConfig, state: dict, values_file: Path, run_dir: Path) -> RunConfig:
    """Tonight's RunConfig: the nightly dataset config with tonight's seed and values file.

    When the config lists value ids, principles proposed from the policy (on any night) are added to them.
    """
    from livo_core.values import load_values

    values = list(cfg.dataset.values)
    if values and Path(values_file) != Path(cfg.dataset.values_file):
        values += [v.id for v in load_values(values_file) if v.source.startswith("llm:") and v.id not in values]
    return cfg.dataset.model_copy(update={"seed": state["seed"], "values_file": Path(values_file), "values": values,
                                          "out_dir": run_dir})


def heldout_dataset_config(cfg: NightlyConfig, run_dir: Path) -> RunConfig:
    """The held-out RunConfig. Once ROOT/heldout exists its stored config wins: the held-out set never changes."""
    from livo_core.dataset import read_run_config

    if (run_dir / "config.json").is_file():
        return read_run_config(run_dir)
    update = {"seed": cfg.heldout.seed, "out_dir": run_dir}
    if cfg.heldout.prompts_per_value:
        update["prompts_per_value"] = cfg.heldout.prompts_per_value
    return cfg.dataset.model_copy(update=update)


def dataset_lineage(run_dir: Path) -> dict:
    """A dataset run as lineage: where, which config (hash), which complete shards."""
    from livo_core.dataset import read_run_config
    from livo_core.shards import complete_shard_ids

    return {"run_dir": str(run_dir), "config_hash": read_run_config(run_dir).config_hash(),
            "shards": complete_shard_ids(run_dir)}


def night_eval_config(cfg: NightlyConfig, base_model: str, encoders: dict[str, str]):
    """The evaluation of tonight's candidate and production: cfg.evaluation with the night's models as methods."""
    from livo_core.evaluate import load_eval_config

    methods = [{"name": "base", "kind": "base"}] + [{"name": label, "kind": "livo", "encoder": folder} for label, folder in encoders.items()]
    overrides = {"device": cfg.train.device if cfg.train.device != "auto" else "auto", "values_file": str(cfg.dataset.values_file),
                 **cfg.evaluation, "base_model": base_model, "methods": methods}
    return load_eval_config(None, overrides)


def heldout_metrics(encoders: dict[str, Path], heldout_dirs: list[Path], base_model: str, train_cfg: TrainConfig,
                    settings: HeldoutSettings, cache_dir: Path) -> dict[str, dict[str, float]]:
    """Score each value encoder on the held-out pairs: {label: metrics}. Lower loss / higher accuracy is better.

    Every encoder sees the same pairs, noise and timesteps (`livo_core.train.preference_metrics` with one
    seed), so the numbers differ only because the encoders do. Metrics, averaged over pairs x `repeats`
    noise draws:
      heldout_loss               the training loss (LiVO hinges, or DPO) on held-out pairs
      heldout_pref_acc           share where the value token helps the aligned image more than the violating
                                 one: (theta_w - ref_w) < (theta_l - ref_l)
      heldout_gap_w / _gap_l     mean theta - ref of aligned / violating images (want < 0 / > 0)
      heldout_share_past_margin  share of pairs past both margins (LiVO) / with positive reward margin (DPO)
    """
    import torch

    from livo_core.encoder import ValueEncoder
    from livo_core.models import resolve_device
    from livo_core.train import load_model_parts, load_training_data, preference_metrics

    device = resolve_device(train_cfg.device)
    cfg = train_cfg.model_copy(update={"base_model": base_model, "random_flip": False, "latent_sampling": "mean"})
    sd = load_model_parts(base_model)
    try:
        data = load_training_data(heldout_dirs, sd, cfg, cache_dir, device, torch.float32, progress=False)
    except LivoError as e:
        raise LivoError(f"the held-out set {', '.join(map(str, heldout_dirs))} is not usable ({e}); give "
                        "heldout.prompts_per_value more prompts or another heldout.seed") from None
    unet = sd.unet.to(device)
    out = {}
    for label, folder in encoders.items():
        encoder = ValueEncoder.from_pretrained(folder).to(device).eval()
        m = preference_metrics(sd.family, encoder, unet, sd.noise_scheduler, data, cfg, repeats=settings.repeats,
                               seed=settings.eval_seed, batch_size=settings.batch_size, device=device)
        out[label] = {**{f"heldout_{k}": v for k, v in m.items()}, "heldout_pairs": len(data)}
    return out


def comparison_rows(candidate: str, production: str | None, metrics: dict[str, dict], rule: PromotionRule) -> list[dict]:
    """One row per metric: production vs tonight, which direction is better, the tolerance, the verdict."""
    rows = []
    cand = metrics["candidate"]
    prod = metrics.get("production") or {}
    ruled = {r.metric: r for r in rule.metrics}
    for key in cand:
        r = ruled.get(key)
        verdict = "-"
        if r and key in prod:
            worse_by = cand[key] - prod[key] if r.direction == "min" else prod[key] - cand[key]
            verdict = "worse" if worse_by > r.tolerance else ("better" if worse_by < 0 else "not worse")
        rows.append({"metric": key, f"production ({production or 'none'})": prod.get(key),
                     f"tonight ({candidate})": cand[key], "better": {"min": "lower", "max": "higher"}[r.direction] if r else "-",
                     "tolerance": r.tolerance if r else None, "in rule": "yes" if r else "no", "verdict": verdict})
    return rows


def candidate_lineage(state: dict, production: str | None, init: str | None, data_dirs: list[Path], heldout_dir: Path,
                      base_model: str, train_cfg: TrainConfig, policy_hash: str | None, new_ids: list[str]) -> dict:
    """What a night's candidate came from (stored with it in the registry)."""
    return {"night": state["night"], "night_seed": state["seed"], "parent": production,
            "warm_start_from": production if init else None, "datasets": [dataset_lineage(d) for d in data_dirs],
            "heldout": dataset_lineage(heldout_dir), "base_model": base_model, "train_config": train_cfg.model_dump(mode="json"),
            "train_config_hash": short_sha(train_cfg.model_dump_json()), "policy_hash": policy_hash,
            "values_hash": state["values_hash"], "new_principles": new_ids}


def comparison_markdown(night, candidate, production, promoted, reason, metrics, rule, built, data_dirs, removed, init) -> str:
    """The night's report: tonight's candidate against production, the decision and why."""
    from livo_core.metrics import metric_table

    verdict = f"**{candidate} promoted** to production" if promoted else f"**{production} kept** in production; {candidate} not promoted"
    return "\n".join([
        f"# livo nightly {night}: tonight vs production", "",
        f"{verdict}. Reason: {reason}.", "",
        metric_table(comparison_rows(candidate, production, metrics, rule), digits=4),
        f"Data: {len(built)} new shard(s) tonight; trained on {len(data_dirs)} night(s) of data "
        f"({'warm start from ' + production if init else 'fresh start'}). Versions removed: {', '.join(removed) or 'none'}.",
    ])
