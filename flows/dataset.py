"""The dataset flow: value principles -> prompt pairs -> rendered, judged Parquet shards, on Prefect.

    livo dataset --out RUN [--config FILE] [--set key=value ...]
    livo resume RUN

One Prefect task makes (or reads back) every value's prompt pairs (an LLM's requests for all values in
flight together); then ONE TASK PER SHARD renders, judges and writes that shard (see livo_core.shards),
value by value. The run folder's logic (checks, config, pairs, stats) is livo_core.dataset; this module
wires it into Prefect. A shard task is skipped when its completion
marker exists, and is also cached by Prefect (key: config hash + run dir + shard id, cache records kept
in RUN/.prefect/), so a new flow run over the same run dir touches nothing that is complete.

Models are loaded once per process (`load_models`), never per shard, and never passed to tasks:
tasks get the config as a dict and the run dir as a string, which Prefect can hash and persist.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import gpu_annotation, task_runner
from livo_core.config import RunConfig
from livo_core.errors import LivoError
from livo_core.lock import RunLock
from livo_core.progress import Progress
from livo_core.dataset import (  # noqa: F401  (check_inputs, read_run_config, load_models: re-exported)
    BUILD_LOCK, DISK_ERRNOS, check_inputs, check_run_dir, failed_markdown, load_models, make_prompt_pairs, prepare_run_dir,
    propose_run_principles, read_run_config, remove_if_nothing_made, run_outcome, run_values, shard_row, write_stats,
)
from livo_core.shards import (
    build_shard, clean_partial, damaged_shards, discard_shard, is_complete, load_pairs, migrate_legacy_plan,
    pairs_path, plan_value, read_marker, save_value_plan,
)


# --------------------------------------------------------------------------- tasks
@task(name="propose-principles", retries=0)
def principles_task(config: dict, run_dir: str) -> list[str]:
    """Value principles an LLM reads out of cfg.policy_text (livo_core.dataset.propose_run_principles)."""
    return propose_run_principles(RunConfig.model_validate(config), Path(run_dir))


@task(name="prompt-pairs", retries=0)
def pairs_task(config: dict, run_dir: str, value_ids: list[str]) -> dict[str, int]:
    """The values' prompt pairs (livo_core.dataset.make_prompt_pairs); returns {value id: pairs}."""
    return make_prompt_pairs(RunConfig.model_validate(config), Path(run_dir), value_ids, get_run_logger())


def _shard_key(context, params: dict) -> str:
    cfg_hash = RunConfig.model_validate(params["config"]).config_hash()
    run_hash = hashlib.sha256(str(Path(params["run_dir"]).resolve()).encode()).hexdigest()[:8]
    return f"livo-shard-{cfg_hash}-{run_hash}-{params['shard_id']}"


# Faults that retrying cannot fix, and that would fail every later shard too: the run stops with one line.
def _retry_unless_user_error(task, task_run, state) -> bool:
    # A LivoError is bad input and a full disk stays full: retrying cannot fix them. Anything else may be transient.
    try:
        state.result()
    except LivoError:
        return False
    except OSError as e:
        return e.errno not in DISK_ERRNOS
    except Exception:
        return True
    return True


def build_one_shard(config: dict, run_dir: str, shard_id: str) -> dict:
    """Render, judge and write one shard; a shard with a completion marker is returned as is."""
    run = Path(run_dir)
    if is_complete(run, shard_id):
        return {**read_marker(run, shard_id), "status": "done before"}
    # TEST HOOK (docs/operations.md): LIVO_FAIL_SHARDS=shard-id,... makes those shards fail, on every try.
    if shard_id in os.environ.get("LIVO_FAIL_SHARDS", "").split(","):
        raise RuntimeError(f"shard {shard_id} made to fail by LIVO_FAIL_SHARDS (test hook)")
    cfg = RunConfig.model_validate(config)
    values = run_values(cfg, run)
    renderer, judge = load_models(cfg, values)
    with BUILD_LOCK:
        return {**build_shard(cfg, run, shard_id, renderer, judge, {v.id: v for v in values}), "status": "built"}


# The task wraps a module-level function (not `@task def`), so Dask workers import it by name instead of
# pickling it with its globals (locks, loaded models). Tag "gpu": `prefect concurrency-limit create gpu N`
# caps how many shards render at once, server-wide.
shard_task = task(name="shard", retries=2, retry_delay_seconds=1, retry_condition_fn=_retry_unless_user_error,
                  persist_result=True, task_run_name="shard-{shard_id}", tags=["gpu"])(build_one_shard)


# --------------------------------------------------------------------------- the flow
@flow(name="livo-dataset", task_runner=ThreadPoolTaskRunner(max_workers=1))
def dataset_flow(config: dict, run_dir: str) -> dict:
    """Build (or finish) the preference dataset of `config` in `run_dir`. Returns the run's totals.

    Ends with a LivoError naming the failed shards if any shard failed; finished shards stay on disk. A run
    dir this call created is removed again when the run fails before making anything.
    """
    cfg = RunConfig.model_validate(config)
    run = Path(run_dir)
    check_inputs(cfg)
    created = not run.exists()
    prepare_run_dir(cfg, run)
    try:
        return _build_dataset(config, cfg, run)
    except BaseException:
        if created:
            remove_if_nothing_made(run)
        raise


def _build_dataset(config: dict, cfg: RunConfig, run: Path) -> dict:
    log = get_run_logger()
    run_dir = str(run)
    with RunLock(run, purpose="livo dataset", timeout_s=0):   # one writer per run dir
        removed = clean_partial(run)
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted run", len(removed))
        if migrate_legacy_plan(run):
            log.warning("split the run's plan.json into per-shard plan files (plan/)")
        for shard_id, reason in damaged_shards(run):   # resume repairs what is damaged: rebuilt below
            log.warning("shard %s is damaged (%s): rebuilding it", shard_id, reason)
            discard_shard(run, shard_id)
        # Shard results are cached next to the data: deleting the run dir deletes its cache too.
        shard = shard_task.with_options(cache_policy=CacheKeyFnPolicy(cache_key_fn=_shard_key).configure(
            key_storage=str(run.resolve() / ".prefect" / "cache")))

        rows: list[dict] = []
        stop: LivoError | None = None
        try:
            if cfg.policy_text:
                principles_task(config, run_dir)
        except LivoError as e:
            stop = e
        values = [] if stop else run_values(cfg, run)
        try:
            pairs_task(config, run_dir, [v.id for v in values])
        except LivoError as e:   # e.g. the LLM endpoint failed: render the values that got pairs, then stop
            stop = e
        for value in values:
            if not pairs_path(run, value.id).is_file():
                continue
            shards = plan_value(cfg, value.id, load_pairs(run, value.id))
            save_value_plan(run, cfg, value.id, shards)
            # The cache is only trusted for shards whose marker is on disk: a shard deleted by hand is rebuilt.
            with gpu_annotation(cfg.device):
                futures = [(shard if is_complete(run, sid) else shard.with_options(refresh_cache=True))
                           .submit(config, run_dir, sid) for sid in shards]
            with Progress(total=len(futures), desc=f"dataset {value.id}", unit="shard") as bar:
                for sid, future in zip(shards, futures):
                    future.wait()
                    rows.append(_stats_row(sid, value.id, future.state))
                    bar.update(1)
            user_errors = [r for r in rows if r.get("user_error")]
            if user_errors:   # bad input seen by a shard (e.g. a model that does not load): the rest would fail too
                stop = LivoError(user_errors[0]["error"])
                break
        summary, table = write_stats(run, rows)
        if table:
            create_table_artifact(table=table, key="livo-dataset-shards", description=f"Per-shard stats of the livo dataset in {run}")

    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="livo-dataset-failed", description=f"Failed shards of {run}", markdown=failed_markdown(run, failed))
    ending = run_outcome(run, summary, failed, stop)
    if ending is not None:
        raise ending
    return summary


def _stats_row(shard_id: str, value_id: str, state) -> dict:
    if state.is_completed():
        return shard_row(shard_id, value_id, state.result(), cached=state.name == "Cached")
    try:
        state.result()
        return shard_row(shard_id, value_id, None, error=state.message or "failed")
    except Exception as e:  # the task's exception, as the reason for the report
        return shard_row(shard_id, value_id, None, error=e)


# --------------------------------------------------------------------------- CLI
def _run(cfg: RunConfig, run_dir: Path, args) -> int:
    from flows.server import ensure_api

    ensure_api()   # the inputs are checked: now a Prefect API is worth starting
    summary = dataset_flow.with_options(task_runner=task_runner(args))(
        config=cfg.model_dump(mode="json"), run_dir=str(run_dir))
    print(f"livo: {summary['shards_complete']} shard(s) complete in {run_dir}: {summary['kept']} pairs kept, "
          f"rejected {summary['rejected'] or 'none'}; stats in {run_dir / 'stats.md'}")
    return 0


def cli_dataset(args) -> int:
    from flows.args import config_from_args

    run_dir = Path(args.out)
    cfg = config_from_args(args, out_dir=run_dir)
    check_inputs(cfg)           # fail on bad input before Prefect starts or anything is written
    check_run_dir(cfg, run_dir)
    return _run(cfg, run_dir, args)


def cli_resume(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise LivoError(f"{run_dir} does not exist: pass the --out dir of an earlier `livo dataset`")
    cfg = read_run_config(run_dir)
    check_inputs(cfg)
    return _run(cfg, run_dir, args)
