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

import json
from pathlib import Path
from typing import Any

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import clean_tmp_files
from livo_core.registry import ModelRegistry, promote_if_not_worse
from livo_core.nightly import (  # noqa: F401  (the night's state and decisions live in the library; some re-exported)
    HeldoutSettings, NightlyConfig, begin_night, candidate_lineage, comparison_markdown, heldout_dataset_config, heldout_metrics,
    load_nightly_config, night_dataset_config, night_eval_config, nights, short_sha, update_principles, utc_now, write_json,
)
from livo_core.train import TrainConfig, base_model_from_data


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
    write_json(done, result)
    return result


@task(name="nightly-evaluate")
def evaluate_task(encoders: dict[str, str], heldout_dirs: list[str], base_model: str, train_config: dict,
                  heldout: dict, cache_dir: str) -> dict[str, dict[str, float]]:
    return heldout_metrics({k: Path(v) for k, v in encoders.items()}, [Path(d) for d in heldout_dirs], base_model,
                           TrainConfig.model_validate(train_config), HeldoutSettings.model_validate(heldout), Path(cache_dir))


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
        write_json(root_dir / "nightly_config.json", cfg.model_dump(mode="json"))   # holds no secret: keys are only named
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
                     values_hash=short_sha(Path(values_file).read_bytes()), dataset_config_hash=night_cfg.config_hash())
        write_json(state_path, state)
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
        write_json(state_path, state)
        init = str(registry.encoder_dir(production)) if cfg.warm_start and production else None
        train_cfg = cfg.train.model_copy(update={"cache_dir": cfg.train.cache_dir or root_dir / "cache"})
        trained = train_candidate(train_cfg.model_dump(mode="json"), [str(d) for d in data_dirs],
                                  str(root_dir / "train" / night), init)
        kill_point("nightly.train")

        # 6. candidate and production on the same held-out pairs and noise
        base_model = cfg.train.base_model or base_model_from_data(data_dirs)
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
            lineage = candidate_lineage(state, production, init, data_dirs, Path(heldout_dir), base_model, train_cfg,
                                        policy_hash, new_ids)
            state["candidate"] = registry.add_version(trained["value_encoder"], metrics["candidate"], lineage, key=night)
            write_json(state_path, state)
            kill_point("nightly.register")
        candidate = state["candidate"]
        promoted, reason = promote_if_not_worse(metrics["candidate"], metrics.get("production"), cfg.promotion)
        if promoted:
            registry.set_current(candidate)
        decision = {"night": night, "candidate": candidate, "production": production, "promoted": promoted,
                    "reason": reason, "metrics": metrics, "rule": cfg.promotion.model_dump()}
        registry.record_decision(decision, key=night)   # once per night, even when a kill made us run again
        state["decision"] = decision
        write_json(state_path, state)
        kill_point("nightly.decide")
        # Never prune what an unfinished night (this one included) still refers to.
        protect = {v for n in nights(root_dir) if n.get("status") != "done" for v in (n.get("production"), n.get("candidate")) if v}
        removed = registry.prune(cfg.keep_versions, protect=protect)
        kill_point("nightly.prune")
        state.update(status="done", finished=utc_now(), new_shards=tonight, rendered_by_last_attempt=built,
                     train=trained, pairs_kept_tonight=data_summary["kept"])
        write_json(state_path, state)

    verb = f"promoted {candidate} to production" if promoted else f"kept {production} in production ({candidate} not promoted)"
    log.info("%s: %s: %s", night, verb, reason)
    create_markdown_artifact(markdown=comparison_markdown(night, candidate, production, promoted, reason, metrics, cfg.promotion,
                                                          tonight, data_dirs, removed, init),
                             key="livo-nightly-comparison", description=f"livo nightly {night}: {candidate} vs {production or 'none'}")
    return {"night": night, "seed": state["seed"], "candidate": candidate, "production_before": production,
            "production": candidate if promoted else production, "promoted": promoted, "reason": reason,
            "metrics": metrics, "new_shards": tonight, "rendered": built, "removed_versions": removed}


@flow(name="livo-heldout")
def heldout_flow(root: str = "runs/nightly", version: str | None = None) -> dict:
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
