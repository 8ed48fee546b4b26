"""A dataset run's folder, apart from Prefect: the checks before any work, its config, the values it builds
data for, its prompt pairs, and its stats. flows/dataset.py wires these into tasks and a flow.

    RUN/config.json               the RunConfig (no secret); a rerun with another config is refused
    RUN/pairs/<value>.jsonl       prompt pairs (+ .rejected.jsonl, .stats.json: diversity, rejections, LLM)
    RUN/plan/, shards/, markers/, rejected/   see livo_core.shards
    RUN/stats.json, stats.md      per-shard and per-value figures
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

from pydantic import ValidationError

from livo_core.config import RunConfig
from livo_core.errors import LivoError
from livo_core.families import family_for
from livo_core.files import atomic_write_text, check_writable
from livo_core.models import resolve_device
from livo_core.shards import DamagedFile, load_pairs, pairs_from_plan, save_pairs
from livo_core.values import ValuePrinciple, load_values

_log = logging.getLogger("livo.dataset")


def check_inputs(cfg: RunConfig) -> list[ValuePrinciple]:
    """Everything that can be checked without loading a model; raises LivoError. Writes nothing."""
    if cfg.policy_text and cfg.prompt_source != "llm":
        raise LivoError("policy_text needs prompt_source=llm: an LLM proposes the new principles and writes their prompts")
    values = load_values(cfg.values_file, cfg.values or None)   # unknown value id -> LivoError
    family_for(cfg.base_model)                                   # missing / not-a-model folder / unsupported family -> LivoError
    resolve_device(cfg.device)                                   # device=cuda without a GPU -> LivoError
    if cfg.judge.clip_model.startswith("local-dir:"):
        from livo_core.judge import check_local_clip_dir
        check_local_clip_dir(cfg.judge.clip_model)               # missing / empty CLIP folder -> LivoError
    if cfg.prompt_source == "template":
        # Offline and cheap: expand the templates now, so an empty prompt list fails before any rendering.
        from livo_core.prompts import generate_pairs
        generate_pairs(cfg, values, cache_dir=None)
    else:
        from livo_core.llm import LLMClient
        LLMClient(cfg.llm)   # a missing API key for a remote endpoint fails here, not mid-run
    return values


def read_run_config(run_dir: Path) -> RunConfig:
    """The RunConfig stored in RUN/config.json, or a LivoError saying why it cannot be used."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise LivoError(f"{run_dir} is not a livo dataset run (no config.json): pass the --out dir of `livo dataset`")
    try:
        return RunConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as e:
        first = str(e).splitlines()[0][:160]
        raise LivoError(f"{path} is unreadable ({first}); restore it or start a new run with `livo dataset --out NEW_DIR`") from None


def check_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """A run dir must be new, empty, or a livo run made with the same config (same config hash)."""
    run_dir = Path(run_dir)
    check_writable(run_dir, "--out")   # a file in the way, a read-only disk: refused before anything is made
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    old = read_run_config(run_dir)
    if old.config_hash() != cfg.config_hash():
        raise LivoError(f"{run_dir} holds a dataset made with another config (hash {old.config_hash()}, yours "
                        f"{cfg.config_hash()}): finish it with `livo resume {run_dir}` or pass a new --out")


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create the run dir and its config.json (RunConfig.save holds no secret), after check_run_dir."""
    check_run_dir(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.json").is_file():
        tmp = run_dir / f"config.json.tmp-{os.getpid()}"
        cfg.model_copy(update={"out_dir": run_dir}).save(tmp)
        os.replace(tmp, run_dir / "config.json")


def run_values(cfg: RunConfig, run_dir: Path) -> list[ValuePrinciple]:
    """The value principles a run builds data for: the values file's (restricted to cfg.values), then those
    an LLM proposed from cfg.policy_text (RUN/proposed_values.json, written once by principles_task)."""
    values = load_values(cfg.values_file, cfg.values or None)
    proposed = Path(run_dir) / "proposed_values.json"
    if proposed.is_file():
        values += [ValuePrinciple.model_validate(v) for v in json.loads(proposed.read_text(encoding="utf-8"))]
    return values


def make_prompt_pairs(cfg: RunConfig, run: Path, value_ids: list[str], log=None) -> dict[str, int]:
    """Make the values' prompt pairs (LLM requests of every value in flight together, answers cached in
    RUN/cache/llm), or read them back if stored. Saves RUN/pairs/<value>.jsonl, the dropped items in
    <value>.rejected.jsonl and <value>.stats.json (diversity, rejections, LLM dialect and requests) for every
    value that got pairs, then raises for the first that got none. Returns {value id: pairs}."""
    from livo_core.llm import LLMClient
    from livo_core.prompts import no_pairs_error, pair_stats, pairs_by_value

    counts, todo = {}, []
    for value_id in value_ids:
        try:
            pairs = load_pairs(run, value_id)
        except DamagedFile as e:
            # The plan holds every pair it was made from; else the pairs are made again (templates are
            # deterministic, LLM answers come from RUN/cache/llm), and save_value_plan checks they agree.
            pairs = pairs_from_plan(run, value_id)
            (log or _log).warning("%s; %s", e, "rebuilt it from the plan" if pairs else "making the pairs again")
            if pairs is not None:
                save_pairs(run, value_id, pairs)
        if pairs is None:
            todo.append(value_id)
        else:
            counts[value_id] = len(pairs)
    if not todo:
        return counts
    values = [v for v in run_values(cfg, run) if v.id in todo]
    client = LLMClient(cfg.llm, run / "cache" / "llm") if cfg.prompt_source == "llm" else None
    failed: dict[str, LivoError] = {}
    results = pairs_by_value(cfg, values, run / "cache" / "llm", client, errors=failed)
    empty = None
    for value in values:
        if value.id in failed:   # its requests failed: the other values' pairs are still saved below
            empty = empty or failed[value.id]
            continue
        pairs, rejections = results[value.id]
        if rejections:   # dropped LLM items, kept for inspection
            atomic_write_text(run / "pairs" / f"{value.id}.rejected.jsonl",
                              "".join(json.dumps(r, default=str) + "\n" for r in rejections))
        if not pairs:
            empty = empty or no_pairs_error(cfg, value.id, rejections)
            continue
        atomic_write_text(run / "pairs" / f"{value.id}.stats.json", json.dumps(pair_stats(pairs, rejections, client), indent=1))
        save_pairs(run, value.id, pairs)
        counts[value.id] = len(pairs)
    if empty is not None:
        raise empty
    return counts


# What a run dir holds before any prompt pair, LLM answer or shard is made: safe to remove on failure.
_BOOKKEEPING = {"config.json", ".lock", "stats.json", "stats.md"}


def remove_if_nothing_made(run: Path) -> None:
    """Remove a run folder a failed run created, when it holds nothing but bookkeeping."""
    import shutil

    if not run.is_dir():
        return
    made = [p for p in run.rglob("*") if p.is_file() and p.relative_to(run).parts[0] != ".prefect"
            and p.name not in _BOOKKEEPING and ".tmp-" not in p.name]
    if not made:
        shutil.rmtree(run, ignore_errors=True)


def prompt_stats_md(prompts: dict[str, dict]) -> str:
    """The prompt section of stats.md: per value, diversity (word sets: livo_core.diversity) and rejections."""
    if not prompts:
        return ""
    lines = ["", "## Prompts", "",
             "Distinct = prompts with distinct word sets; similarity = mean pairwise Jaccard of word sets (a fixed sample of "
             "at most 400 prompts); distinct-2 = distinct word bigrams / all bigrams.", "",
             "| value | source | pairs | distinct | mean similarity | distinct-2 | rejected |", "|---|---|---|---|---|---|---|"]
    for vid, p in prompts.items():
        d = p["diversity"]
        rejected = ", ".join(f"{k}: {n}" for k, n in p["rejected"].items()) or "-"
        lines.append(f"| {vid} | {p['source']} | {p['pairs']} | {d['distinct']} | {d['mean_similarity']} | {d['distinct_2']} | {rejected} |")
    llm = [(vid, p["llm"]) for vid, p in prompts.items() if p.get("llm")]
    if llm:
        vid, c = llm[-1]
        refused = f" (refused: {', '.join(c['refused_dialects'])})" if c.get("refused_dialects") else ""
        lines += ["", f"LLM {c['endpoint']} (model {c['model']}): structured output `{c['structured']}` -> dialect "
                      f"`{c['dialect']}`{refused}; {c.get('requests', 0)} requests sent, {c.get('cached', 0)} answers from the "
                      f"cache, {c.get('reasked_malformed', 0)} re-asks for malformed JSON, {c.get('cut', 0)} replies cut at "
                      f"llm.max_tokens, {c.get('items_rejected', 0)} items failing the schema."]
    return "\n".join(lines) + "\n"


def write_stats(run: Path, rows: list[dict]) -> tuple[dict, list[dict]]:
    """RUN/stats.json and RUN/stats.md; returns (totals, the per-shard table the flow publishes as an artifact)."""
    done = [r for r in rows if r["status"] != "failed"]
    reasons: dict[str, int] = {}
    for r in done:
        for reason, n in r["rejected"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    summary = {"run_dir": str(run), "shards": len(rows), "shards_complete": len(done),
               "shards_failed": len(rows) - len(done), "kept": sum(r["kept"] for r in done),
               "rejected": dict(sorted(reasons.items())), "planned": sum(r["planned"] or 0 for r in done)}
    rows = [{k: v for k, v in r.items() if k != "user_error"} for r in rows]
    prompts = {p.name.removesuffix(".stats.json"): json.loads(p.read_text()) for p in sorted((run / "pairs").glob("*.stats.json"))}
    llm = next((p["llm"] for p in prompts.values() if p.get("llm")), None)
    if llm:   # the dialect the endpoint answered in, and how often it was asked
        summary["llm"] = {k: llm.get(k) for k in ("endpoint", "model", "structured", "dialect", "refused_dialects")}
    atomic_write_text(run / "stats.json", json.dumps({"summary": summary, "shards": rows, "prompts": prompts}, indent=1))

    table = [{"shard": r["shard"], "status": r["status"], "kept": r["kept"],
              "rejected": ", ".join(f"{k}: {v}" for k, v in r["rejected"].items()) or "-",
              "seconds": r["seconds"], "images/s": r["images_per_s"], "error": r["error"]} for r in rows]
    header = "| " + " | ".join(table[0]) + " |\n|" + "---|" * len(table[0]) + "\n" if table else ""
    lines = "".join("| " + " | ".join("" if v is None else str(v) for v in t.values()) + " |\n" for t in table)
    atomic_write_text(run / "stats.md", f"# Dataset {run}\n\n{summary['kept']} pairs kept of {summary['planned']} "
                                        f"planned; rejected: {summary['rejected'] or 'none'}; "
                                        f"{summary['shards_failed']} shard(s) failed.\n\n{header}{lines}"
                                        + prompt_stats_md(prompts))
    return summary, table




# --------------------------------------------------------------------------- models, once per process
_MODELS: dict[str, tuple] = {}
_MODELS_LOCK = threading.Lock()
# A diffusers pipeline is not thread-safe (its scheduler keeps state): one shard at a time per process.
BUILD_LOCK = threading.Lock()


def load_models(cfg: RunConfig, values: list[ValuePrinciple]):
    """(Renderer, Judge) for this config and values, loaded on first use in this process and then reused."""
    from livo_core.judge import Judge
    from livo_core.render import Renderer

    key = json.dumps([cfg.base_model, cfg.device, cfg.dtype, [v.model_dump(mode="json") for v in values],
                      cfg.judge.model_dump(mode="json")], sort_keys=True)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()   # one set of models per process: free the old ones first
            _use_dask_workers_gpu()
            _MODELS[key] = (Renderer(cfg.base_model, device=cfg.device, dtype=cfg.dtype), Judge(cfg, values))
        return _MODELS[key]


def _use_dask_workers_gpu() -> None:
    """In a Dask worker of a local cluster with one worker per GPU (named 0..n-1), make "cuda" mean GPU n."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):   # not in a Dask worker
        return
    import torch

    if torch.cuda.is_available() and str(name).isdigit():
        torch.cuda.set_device(int(name) % torch.cuda.device_count())



def propose_run_principles(cfg: RunConfig, run: Path) -> list[str]:
    """Value principles an LLM reads out of cfg.policy_text, stored once in RUN/proposed_values.json; their ids."""
    from livo_core.llm import LLMClient
    from livo_core.prompts import propose_principles

    path = run / "proposed_values.json"
    if not path.is_file():
        client = LLMClient(cfg.llm, run / "cache" / "llm")
        proposed = propose_principles(client, cfg.policy_text, load_values(cfg.values_file))
        atomic_write_text(path, json.dumps([v.model_dump(mode="json") for v in proposed], indent=1))
    return [v["id"] for v in json.loads(path.read_text(encoding="utf-8"))]


# --------------------------------------------------------------------------- a run's outcome
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)   # a full or read-only disk: the run stops with one line


def shard_row(shard_id: str, value_id: str, result: dict | None, cached: bool = False, error: BaseException | str | None = None) -> dict:
    """One shard's row of the run's stats: its result, or why it failed (`user_error`: bad input or a full disk,
    which every other shard would hit too, so the run stops)."""
    if result is not None:
        return {"shard": shard_id, "value_id": value_id, "status": "cached" if cached else result["status"],
                "planned": result["planned"], "kept": result["kept"], "rejected": result["rejected"],
                "seconds": result["seconds"], "images_per_s": result.get("images_per_s"), "error": ""}
    user_error = isinstance(error, LivoError) or isinstance(error, OSError) and error.errno in DISK_ERRNOS
    if isinstance(error, LivoError):
        text = str(error)
    elif isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        from livo_core.files import os_error_line

        text = os_error_line(error)
    elif isinstance(error, BaseException):
        text = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
    else:
        text = error or "failed"
    return {"shard": shard_id, "value_id": value_id, "status": "failed", "planned": None, "kept": 0,
            "rejected": {}, "seconds": None, "images_per_s": None, "error": text, "user_error": user_error}


def failed_markdown(run: Path, failed: list[dict]) -> str:
    """The report of a run's failed shards (a Prefect artifact)."""
    listed = "".join(f"| {r['shard']} | {r['error']} |\n" for r in failed)
    return (f"# {len(failed)} failed shard(s) in {run}\n\n| shard | error |\n|---|---|\n{listed}\n"
            f"Retry only these: `livo resume {run}` (or retry this flow run); finished shards are kept.\n")


def run_outcome(run: Path, summary: dict, failed: list[dict], stop: LivoError | None) -> LivoError | None:
    """The one line a run ends with when it did not finish every shard (None: it did)."""
    if stop is not None:
        kept = f"{summary['shards_complete']} finished shard(s) kept in {run}; " if summary["shards_complete"] else ""
        return LivoError(f"{stop} ({kept}fix it and run `livo resume {run}`)")
    if failed:
        listed = "; ".join(f"{r['shard']}: {r['error']}" for r in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        return LivoError(f"{len(failed)} shard(s) failed ({listed}{more}); {summary['shards_complete']} finished "
                         f"shard(s) kept, see {run / 'stats.md'}; run `livo resume {run}` to retry")
    return None
