"""The nightly flow: new data, a new value encoder, promoted only if it is not worse than production.

    livo nightly --root runs/nightly [--config nightly.toml] [--set train.max_steps=200 ...]
    (or the `nightly` deployment, cron "0 3 * * *" UTC: see docs/operations.md)

One night, in order (each step a Prefect task or subflow):
  1. night       the next night number N, and its seed = dataset.seed + N (recorded). A night that did not
                 finish (crash, failed shard) is resumed by the next run instead: same N, same seed.
  2. principles  if `policy_file` changed since the last night (sha256), an LLM proposes new value
                 principles from it; they are added to ROOT/values.yaml and get data from tonight on.
  3. data        the dataset flow on ROOT/data/night-N: new prompt pairs and new image seeds, so only new
                 shards are rendered and judged. Earlier nights' shards are reused as they are.
  4. held-out    ROOT/heldout: a dataset built once, on the first night, with its own seed, never trained on.
  5. train       the training flow (subflow) on every night's data so far, fresh or warm-started from production.
  6. evaluate    candidate and production on the held-out pairs, with the same noise and timesteps.
  7. decide      the candidate becomes a registry version (ROOT/models); it is promoted only if it is not
                 worse than production by the promotion rule. The decision and why are logged, stored in
                 ROOT/models/decisions.jsonl and ROOT/nights/night-N.json, and shown in a Prefect artifact
                 comparing tonight with production.

The whole night holds a lock on ROOT: a second nightly run on the same ROOT waits `lock_timeout_s` or is refused.

    ROOT/nights/night-0001.json   a night's state: seed, data, candidate, metrics, decision
    ROOT/data/night-0001/         that night's dataset run
    ROOT/heldout/                 the fixed held-out dataset run
    ROOT/train/night-0001/        that night's training output
    ROOT/models/                  versions, `current`, decisions.jsonl (livo_core.registry)
    ROOT/cache/                   latents and prompt embeddings shared by every night; LLM answers
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from livo_core.config import RunConfig, StrictModel, load_settings
from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import clean_tmp_files
from livo_core.registry import MetricRule, ModelRegistry, PromotionRule, promote_if_not_worse
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
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(learning_rate=1e-4, max_steps=200, batch_size=16, checkpoint_every=100),
                               description="Training config of every night's candidate.")
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


def load_nightly_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> NightlyConfig:
    """Config file (optional .toml/.yaml/.json) + dotted overrides -> NightlyConfig, or a LivoError naming the field."""
    return load_settings(NightlyConfig, path, overrides, "nightly config")


# --------------------------------------------------------------------------- plain steps (no Prefect)
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _write_json(path: Path, data: dict) -> None:
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
             "status": "running", "started": _now()}
    _write_json(root / "nights" / f"{state['night']}.json", state)
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
    policy_hash = _sha(text)
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
    from livo_core.train import load_sd_parts, load_training_data, preference_metrics

    device = resolve_device(train_cfg.device)
    cfg = train_cfg.model_copy(update={"base_model": base_model, "random_flip": False, "latent_sampling": "mean"})
    sd = load_sd_parts(base_model)
    try:
        data = load_training_data(heldout_dirs, sd, cfg, cache_dir, device, torch.float32, progress=False)
    except LivoError as e:
        raise LivoError(f"the held-out set {', '.join(map(str, heldout_dirs))} is not usable ({e}); give "
                        "heldout.prompts_per_value more prompts or another heldout.seed") from None
    unet = sd.unet.to(device)
    out = {}
    for label, folder in encoders.items():
        encoder = ValueEncoder.from_pretrained(folder).to(device).eval()
        m = preference_metrics(encoder, unet, sd.noise_scheduler, data, cfg, repeats=settings.repeats,
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


# --------------------------------------------------------------------------- Prefect tasks and flows
from prefect import flow, get_run_logger, task  # noqa: E402  (after flows.env has set the environment)
from prefect.artifacts import create_markdown_artifact  # noqa: E402


@task(name="nightly-principles")
def principles_task(root: str, config: dict, previous_hash: str | None) -> tuple[str, str | None, list[str]]:
    values_file, policy_hash, new_ids = update_principles(Path(root), NightlyConfig.model_validate(config), previous_hash)
    return str(values_file), policy_hash, new_ids


def train_candidate(train_config: dict, data_dirs: list[str], out_dir: str, init_encoder: str | None) -> dict:
    """Train tonight's candidate (fresh, or from `init_encoder`) with the training flow, as a subflow.

    A finished training of this night (a resumed night) is reused as it is.
    """
    from flows.training import train_value_encoder

    from livo_core.train import base_model_from_data, run_identity

    out = Path(out_dir)
    done = out / "nightly_train.json"
    if done.is_file() and (out / "value_encoder" / "config.json").is_file():
        return json.loads(done.read_text())
    if init_encoder:
        train_config = {**train_config, "init_value_encoder": init_encoder}
    # A killed attempt of this same training is continued from its last checkpoint; anything else there is replaced.
    cfg = TrainConfig.model_validate(train_config)
    cfg = cfg.model_copy(update={"base_model": cfg.base_model or base_model_from_data([Path(d) for d in data_dirs])})
    try:
        same = json.loads((out / "train_config.json").read_text()).get("run_identity") == run_identity(cfg, data_dirs)
    except (OSError, ValueError):
        same = False
    res = train_value_encoder(data_dirs=data_dirs, out_dir=str(out), train_config=train_config,
                              resume="latest" if same else None, overwrite=not same)
    for f in out.glob("checkpoints/*/optimizer.pt"):   # only resuming needs them; the registry keeps the model
        f.unlink()
    result = {"steps": res["steps"], "last": res["last"], "value_encoder": res["value_encoder"], "warm_start": init_encoder}
    _write_json(done, result)
    return result


@task(name="nightly-evaluate")
def evaluate_task(encoders: dict[str, str], heldout_dirs: list[str], base_model: str, train_config: dict,
                  heldout: dict, cache_dir: str) -> dict[str, dict[str, float]]:
    return heldout_metrics({k: Path(v) for k, v in encoders.items()}, [Path(d) for d in heldout_dirs], base_model,
                           TrainConfig.model_validate(train_config), HeldoutSettings.model_validate(heldout), Path(cache_dir))


def _base_model(dataset_dirs: list[Path], train_cfg: TrainConfig) -> str:
    from livo_core.train import base_model_from_data

    return train_cfg.base_model or base_model_from_data(dataset_dirs)


@flow(name="livo-nightly")
def nightly_flow(root: str = "runs/nightly", config_file: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """One night: new data -> train -> evaluate against production -> promote if not worse. Returns the decision.

    root: the nightly folder (see the module docstring); config_file / overrides: the NightlyConfig
    (overrides are dotted keys, e.g. {"train.max_steps": 50}).
    """
    from flows.dataset import dataset_flow
    from livo_core.dataset import check_inputs
    from livo_core.lock import RunLock

    log = get_run_logger()
    cfg = load_nightly_config(config_file, overrides)
    root_dir = Path(root)
    check_inputs(cfg.dataset)   # bad input fails here, before the lock and before any work
    with RunLock(root_dir, purpose="livo nightly", timeout_s=cfg.lock_timeout_s):
        for folder in ("nights", "models"):   # temporaries of a killed run (a SIGKILL skips every `finally`)
            clean_tmp_files(root_dir / folder)
        _write_json(root_dir / "nightly_config.json", cfg.model_dump(mode="json"))   # holds no secret: keys are only named
        previous = [n for n in nights(root_dir) if n["status"] == "done"]
        state = begin_night(root_dir, cfg)
        night = state["night"]
        state_path = root_dir / "nights" / f"{night}.json"
        registry = ModelRegistry(root_dir / "models")
        log.info("%s (seed %d)%s", night, state["seed"], " resumed" if state.get("data") else "")

        # 2. principles: new ones only when the policy text changed since the last finished night
        values_file, policy_hash, new_ids = principles_task(str(root_dir), cfg.model_dump(mode="json"),
                                                            previous[-1].get("policy_hash") if previous else None)
        if new_ids:
            log.info("policy changed: new value principles %s", ", ".join(new_ids))

        # 3. tonight's data (only new shards: new seeds), 4. the held-out set (built once)
        data_dir = root_dir / "data" / night
        night_cfg = night_dataset_config(cfg, state, Path(values_file), data_dir)
        state.update(data=str(data_dir.relative_to(root_dir)), policy_hash=policy_hash, new_principles=new_ids,
                     values_hash=_sha(Path(values_file).read_bytes()), dataset_config_hash=night_cfg.config_hash())
        _write_json(state_path, state)
        data_summary = dataset_flow(config=night_cfg.model_dump(mode="json"), run_dir=str(data_dir))
        kill_point("nightly.data")
        # Every shard of tonight's run dir is new (tonight's seed); `built` = rendered by this attempt.
        stats = json.loads((data_dir / "stats.json").read_text())["shards"]
        tonight = [r["shard"] for r in stats]
        built = [r["shard"] for r in stats if r["status"] == "built"]
        heldout_dir = cfg.heldout.run_dir or root_dir / "heldout"
        if cfg.heldout.run_dir is None:
            dataset_flow(config=heldout_dataset_config(cfg, heldout_dir).model_dump(mode="json"), run_dir=str(heldout_dir))
        kill_point("nightly.heldout")

        # 5. train on every finished night's data and tonight's
        data_dirs = [root_dir / n["data"] for n in previous] + [data_dir]   # stored relative: a root can be moved
        # Production as the night first saw it: a resumed night that promoted before it crashed compares the same.
        production = state.setdefault("production", registry.current())
        _write_json(state_path, state)
        init = str(registry.encoder_dir(production)) if cfg.warm_start and production else None
        train_cfg = cfg.train.model_copy(update={"cache_dir": cfg.train.cache_dir or root_dir / "cache"})
        trained = train_candidate(train_cfg.model_dump(mode="json"), [str(d) for d in data_dirs],
                                  str(root_dir / "train" / night), init)
        kill_point("nightly.train")

        # 6. candidate and production on the same held-out pairs and noise
        base_model = _base_model(data_dirs, cfg.train)
        encoders = {"candidate": trained["value_encoder"]}
        if production:
            encoders["production"] = str(registry.encoder_dir(production))
        metrics = evaluate_task(encoders, [str(heldout_dir)], base_model, train_cfg.model_dump(mode="json"),
                                cfg.heldout.model_dump(mode="json"), str(root_dir / "cache"))
        if cfg.evaluation is not None:   # the paper's metrics on renders, same prompts and seeds for both
            from flows.evaluation import evaluation_flow

            eval_cfg = night_eval_config(cfg, base_model, encoders)
            results = evaluation_flow(config=eval_cfg.model_dump(mode="json"), out_dir=str(root_dir / "eval" / night))
            for label in encoders:
                metrics[label].update({f"eval_{k}": v for k, v in results[label].items() if isinstance(v, (int, float))})
        kill_point("nightly.evaluate")

        # 7. decide: register the candidate (once per night: keyed by the night), promote it only if not worse
        if not state.get("candidate"):   # a resumed night that registered its candidate already reuses it
            lineage = {"night": night, "night_seed": state["seed"], "parent": production, "warm_start_from": production if init else None,
                       "datasets": [dataset_lineage(d) for d in data_dirs], "heldout": dataset_lineage(Path(heldout_dir)),
                       "base_model": base_model, "train_config": train_cfg.model_dump(mode="json"),
                       "train_config_hash": _sha(train_cfg.model_dump_json()), "policy_hash": policy_hash,
                       "values_hash": state["values_hash"], "new_principles": new_ids}
            state["candidate"] = registry.add_version(trained["value_encoder"], metrics["candidate"], lineage, key=night)
            _write_json(state_path, state)
            kill_point("nightly.register")
        candidate = state["candidate"]
        promoted, reason = promote_if_not_worse(metrics["candidate"], metrics.get("production"), cfg.promotion)
        if promoted:
            registry.set_current(candidate)
        decision = {"night": night, "candidate": candidate, "production": production, "promoted": promoted,
                    "reason": reason, "metrics": metrics, "rule": cfg.promotion.model_dump()}
        registry.record_decision(decision, key=night)   # once per night, even when a kill made us run again
        state["decision"] = decision
        _write_json(state_path, state)
        kill_point("nightly.decide")
        # Never prune what an unfinished night (this one included) still refers to.
        protect = {v for n in nights(root_dir) if n.get("status") != "done" for v in (n.get("production"), n.get("candidate")) if v}
        removed = registry.prune(cfg.keep_versions, protect=protect)
        kill_point("nightly.prune")
        state.update(status="done", finished=_now(), new_shards=tonight, rendered_by_last_attempt=built,
                     train=trained, pairs_kept_tonight=data_summary["kept"])
        _write_json(state_path, state)

    verb = f"promoted {candidate} to production" if promoted else f"kept {production} in production ({candidate} not promoted)"
    log.info("%s: %s: %s", night, verb, reason)
    _comparison_artifact(night, candidate, production, promoted, reason, metrics, cfg.promotion, tonight, data_dirs, removed, init)
    return {"night": night, "seed": state["seed"], "candidate": candidate, "production_before": production,
            "production": candidate if promoted else production, "promoted": promoted, "reason": reason,
            "metrics": metrics, "new_shards": tonight, "rendered": built, "removed_versions": removed}


def _comparison_artifact(night, candidate, production, promoted, reason, metrics, rule, built, data_dirs, removed, init) -> None:
    from livo_core.metrics import metric_table

    verdict = f"**{candidate} promoted** to production" if promoted else f"**{production} kept** in production; {candidate} not promoted"
    md = "\n".join([
        f"# livo nightly {night}: tonight vs production",
        "",
        f"{verdict}. Reason: {reason}.",
        "",
        metric_table(comparison_rows(candidate, production, metrics, rule), digits=4),
        f"Data: {len(built)} new shard(s) tonight; trained on {len(data_dirs)} night(s) of data "
        f"({'warm start from ' + production if init else 'fresh start'}). Versions removed: {', '.join(removed) or 'none'}.",
    ])
    create_markdown_artifact(markdown=md, key="livo-nightly-comparison", description=f"livo nightly {night}: {candidate} vs {production or 'none'}")


@flow(name="livo-evaluate")
def evaluate_flow(root: str = "runs/nightly", version: str | None = None) -> dict:
    """Score a registry version (default: production) on the nightly's held-out set (denoising metrics; the
    renders' eval_* metrics are `livo evaluate`'s); returns its metrics."""
    log = get_run_logger()
    root_dir = Path(root)
    if not (root_dir / "nightly_config.json").is_file():
        raise LivoError(f"{root_dir} is not a nightly root (no nightly_config.json): run the nightly flow first or pass its --root")
    cfg = NightlyConfig.model_validate_json((root_dir / "nightly_config.json").read_text())
    registry = ModelRegistry(root_dir / "models")
    version = version or registry.current()
    if version is None:
        raise LivoError(f"{registry.root} has no production version yet: run a nightly first or pass a version")
    heldout_dir = cfg.heldout.run_dir or root_dir / "heldout"
    lineage = registry.lineage(version)
    train_cfg = TrainConfig.model_validate(lineage["train_config"])
    metrics = evaluate_task({version: str(registry.encoder_dir(version))}, [str(heldout_dir)], lineage["base_model"],
                            train_cfg.model_dump(mode="json"), cfg.heldout.model_dump(mode="json"), str(root_dir / "cache"))
    from livo_core.metrics import metric_table

    create_markdown_artifact(markdown=f"# livo evaluation of {version}\n\n" + metric_table([{"metric": k, version: v} for k, v in metrics[version].items()], digits=4),
                             key="livo-evaluation", description=f"held-out metrics of {version} ({root_dir})")
    log.info("%s: %s", version, metrics[version])
    return metrics[version]


# --------------------------------------------------------------------------- CLI
def cli_nightly(args) -> int:
    from livo_core.config import parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_nightly_config(args.config, overrides)   # bad config fails before Prefect starts
    from livo_core.dataset import check_inputs
    from flows.server import ensure_api

    check_inputs(cfg.dataset)
    ensure_api()
    result = nightly_flow(root=args.root, config_file=args.config, overrides=overrides)
    verb = "promoted" if result["promoted"] else "kept production, not promoted"
    print(f"livo nightly {result['night']}: {result['candidate']} {verb} ({result['reason']}); "
          f"production is {result['production']}; {len(result['new_shards'])} new shard(s)")
    return 0
