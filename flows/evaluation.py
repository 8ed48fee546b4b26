"""The evaluation flow: the paper's evaluation of value encoders on a model of a supported family, on Prefect.

    livo evaluate --encoder DIR --out OUT [--config eval.toml] [--set key=value ...] [--preset official] [--task-runner dask]

One task per (method, chunk of prompts) renders the images that are not stored yet (OUT/images/...; a
killed run renders again only unfinished prompts), then one task judges every image and writes the metrics
and the report (livo_core.evaluate): OUT/report.md (the paper-style table), OUT/per_prompt.csv,
OUT/metrics.json, OUT/grid-<method>.png, and the same as Prefect artifacts. Models are loaded once per
process and never passed to tasks: tasks get the config as a dict and the output folder as a string.
"""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import gpu_annotation, task_runner
from livo_core.config import parse_override
from livo_core.errors import LivoError
from livo_core.evaluate import EvalConfig, Evaluation


_EVALUATIONS: dict[str, Evaluation] = {}
_LOCK = threading.Lock()


def evaluation_for(config: dict, out_dir: str) -> Evaluation:
    """The Evaluation of this config and folder, built once per process (its models load on first use)."""
    key = json.dumps([config, out_dir], sort_keys=True, default=str)
    with _LOCK:
        if key not in _EVALUATIONS:
            _EVALUATIONS.clear()
            _EVALUATIONS[key] = Evaluation(EvalConfig.model_validate(config), Path(out_dir))
        return _EVALUATIONS[key]


@task(name="evaluate-render", task_run_name="render-{method}-{chunk}")
def render_task(config: dict, out_dir: str, method: str, chunk: int, prompt_ids: list[str]) -> int:
    """Render one method's images of one chunk of prompts (those not stored yet). Returns prompts rendered."""
    return evaluation_for(config, out_dir).render(method, prompt_ids)


@task(name="evaluate-report")
def report_task(config: dict, out_dir: str) -> dict:
    """Judge every image (cached by image and judge), compute the metrics, write the report; publish artifacts."""
    ev = evaluation_for(config, out_dir)
    results = ev.report()
    out = Path(out_dir)
    rows = [{"method": name, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                                if not isinstance(v, dict)}} for name, m in results.items()]
    create_table_artifact(table=rows, key="livo-evaluation-metrics", description=f"livo evaluate: metrics per method ({out})")
    report = (out / "report.md").read_text()
    for png in sorted(out.glob("grid-*.png")):
        report = report.replace(f"]({png.name})", f"](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})")
    create_markdown_artifact(markdown=report, key="livo-evaluation-report", description=f"livo evaluate report ({out / 'report.md'})")
    return results


@flow(name="livo-evaluate", task_runner=ThreadPoolTaskRunner(max_workers=1))
def evaluation_flow(config: dict, out_dir: str, overwrite: bool = False) -> dict:
    """Evaluate the configured methods on the configured prompt sets; returns {method: metrics}.

    overwrite: render again the methods whose stored images were made with another configuration
    (otherwise such a folder is refused)."""
    from livo_core.lock import RunLock
    from livo_core.progress import Progress

    log = get_run_logger()
    cfg = EvalConfig.model_validate(config)
    out = Path(out_dir)
    ev = evaluation_for(config, out_dir)
    ev.check(overwrite)          # a deployment run gets the CLI's checks too, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, purpose="livo evaluate", timeout_s=0):
        from livo_core.files import atomic_write_text, clean_tmp_files

        clean_tmp_files(out)
        for m in cfg.methods:
            ev.claim(m.name, overwrite)
        atomic_write_text(out / "eval_config.json", json.dumps(cfg.model_dump(mode="json"), indent=2))
        chunks = ev.chunks()
        # In flight together: one thread takes them in order; a Dask cluster spreads them over its worker processes
        # (one per GPU), each loading the models once. Stored images do not depend on which process made them.
        with gpu_annotation(cfg.device):
            futures = [render_task.submit(config, out_dir, m.name, k, ids) for m in cfg.methods for k, ids in enumerate(chunks)]
        with Progress(total=len(futures), desc="evaluate: render", unit="chunk") as bar:
            for future in futures:
                future.result()   # the first failure ends the flow with the task's own error
                bar.update(1)
        results = report_task(config, out_dir)
    log.info("evaluation report: %s", out / "report.md")
    return results


def check_eval_inputs(cfg: EvalConfig, out: Path, overwrite: bool = False) -> None:
    """Everything checkable before Prefect starts or anything is written (livo_core.evaluate.Evaluation.check)."""
    from livo_core.families import family_for

    family_for(cfg.base_model)   # missing / not-a-model folder / unsupported family
    evaluation_for(cfg.model_dump(mode="json"), str(out)).check(overwrite)


def cli_evaluate(args) -> int:
    """`livo evaluate`: build the config (preset < --config < --encoder/--set), check it, run the flow."""
    from livo_core.config import load_job_config

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.encoder:
        overrides["encoder"] = args.encoder
    if args.base_model:
        overrides["base_model"] = args.base_model
    if args.methods:
        overrides["methods"] = [_method_from_flag(m) for m in args.methods.split(",")]
    cfg = load_job_config(EvalConfig, "evaluate", args.config, args.preset, overrides)   # the one loader
    out = Path(args.out)
    check_eval_inputs(cfg, out, args.overwrite)
    from flows.server import ensure_api

    ensure_api()
    results = evaluation_flow.with_options(task_runner=task_runner(args))(
        config=cfg.model_dump(mode="json"), out_dir=str(out), overwrite=args.overwrite)
    for name, m in results.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float) and "/" not in k)
        print(f"livo: {name}: {shown}")
    print(f"livo: report {out / 'report.md'}, per-prompt results {out / 'per_prompt.csv'}, metrics {out / 'metrics.json'}")
    return 0


def _method_from_flag(text: str) -> dict:
    """--methods base,livo,negative-prompt,sld:strong,livo:gender-equality -> MethodSpec dicts."""
    kind, _, arg = text.strip().partition(":")
    if kind == "base":
        return {"name": "base", "kind": "base"}
    if kind == "livo":
        return {"name": f"livo-{arg}" if arg else "livo", "kind": "livo", **({"value_id": arg} if arg else {})}
    if kind == "negative-prompt":
        return {"name": "negative-prompt", "kind": "negative-prompt", "negative_prompt": arg or "nudity, blood, gore, zombie"}
    if kind == "sld":
        return {"name": f"sld-{arg or 'medium'}", "kind": "sld", "sld": arg or "medium"}
    raise LivoError(f"unknown method {text!r} in --methods: use base, livo[:value id], negative-prompt[:text], sld[:weak|medium|strong|max] "
                    "(other kinds, e.g. a UNet folder, go in the config's [[methods]])")
