"""`livo demo`: the whole LiVO loop on the toy world, measured against baselines, on Prefect.

    livo demo [--out runs/demo] [--quick]

Stages (each a Prefect task or subflow; a progress bar counts them):
  1. data       the real dataset flow, once per value: template prompt pairs -> world-model renders ->
                CLIP + toy-world detector judge -> Parquet shards (OUT/data/<value id>/)
  2. train      the real trainer: LiVO value encoder (OUT/train/livo/); baselines on the same data, batch
                and step budget: DPO loss on the same value encoder (OUT/train/dpo-encoder/) and
                Diffusion-DPO on the UNet (OUT/train/dpo-unet/)
  3. evaluate   held-out prompts (subject/colour/background combinations no training prompt used), same
                seeds for every method: base, LiVO (value retrieved from the prompt), negative prompt,
                DPO value encoder, DPO UNet; and violation/fidelity at every checkpoint of each trained method
  4. report     OUT/report.md, OUT/metrics.json, OUT/grid.png (base vs LiVO), OUT/training_curves.png,
                a printed summary table, and the same as Prefect artifacts
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import sys
import time
from pathlib import Path

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from livo_core.errors import LivoError
from livo_core.paths import TOYWORLD_DIR


def cli_toyworld(args) -> int:
    """`livo toyworld build [--out DIR] [--steps N]`: retrain the world model and world CLIP from scratch."""
    from livo_core.toyworld.build import build_world

    if args.toyworld_command == "build":
        if args.steps is not None and args.steps < 1:
            raise LivoError(f"--steps must be at least 1, got {args.steps}")
        out = Path(args.out) if args.out else TOYWORLD_DIR
        import torch

        if torch.get_num_threads() > 1:   # a 2-thread rebuild of the flow world gave other weights (docs/toyworld.md)
            print(f"livo: note: building on {torch.get_num_threads()} threads; the weights are reproducible on one "
                  "(OMP_NUM_THREADS=1), as the shipped worlds were built", file=sys.stderr)
        if getattr(args, "family", "sd") == "sd3":
            from livo_core.toyworld.flow_build import build_flow_world

            report = build_flow_world(out, steps=args.steps)
            print(f"flow-matching toy world built in {report['seconds']:.0f}s: {out / 'model-sd3'} "
                  f"(weights sha256 {report['weights_sha256'][:16]})")
            return 0
        report = build_world(out, steps=args.steps)
        print(f"toy world built in {report['seconds']:.0f}s: {out / 'model'} and {out / 'clip'}")
    return 0


from livo_core.toyworld.demo import (  # noqa: E402  (the demo's measurement lives in the library)
    DemoSettings, build_metrics, dataset_config, demo_settings, demo_values, plot_curves, report_markdown,
    run_evaluation, summary_rows, summary_table, train_configs, world_model,
)


# --------------------------------------------------------------------------- Prefect tasks and flow
from prefect import flow, get_run_logger, task  # noqa: E402  (after flows.env has set the environment)
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402


@task(name="demo-train", task_run_name="train-{method}")
def train_task(method: str, config: dict, data_dirs: list[str], out_dir: str) -> dict:
    """Train one method (see TRAINED) on the demo's data; keep checkpoints' models, drop their optimizer states."""
    from livo_core.train import TrainConfig, train

    cfg = TrainConfig.model_validate(config)
    t0 = time.perf_counter()
    res = train(cfg, data_dirs, out_dir)   # the DPO UNet baseline too (its config says trains = unet)
    seconds = time.perf_counter() - t0
    # Optimizer states only serve resuming; the demo evaluates the checkpoints' models, so drop the ~2x larger rest.
    for f in Path(out_dir).glob("checkpoints/*/optimizer.pt"):
        f.unlink()
    # A NaN loss leaves NaN weights, whose black images would pass as "no violation": say so in the report.
    diverged = not math.isfinite(res.last_metrics.get("loss", float("nan")))
    return {"steps": res.steps, "last": res.last_metrics, "seconds": round(seconds, 1), "log_csv": str(res.log_csv),
            "lr": cfg.learning_rate, "loss": cfg.loss, "diverged": diverged}


@task(name="demo-evaluate")
def evaluate_task(settings: dict, out_dir: str, base_model: str) -> dict:
    return run_evaluation(DemoSettings.model_validate(settings), Path(out_dir), base_model)


@task(name="demo-report")
def report_task(metrics: dict, out_dir: str, logs: dict[str, str]) -> str:
    """Write metrics.json, report.md, training_curves.png; publish the table, report and images as artifacts."""
    out = Path(out_dir)
    plot_curves(metrics["curves"], logs, out / "training_curves.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report = report_markdown(metrics, out)
    (out / "report.md").write_text(report)

    create_table_artifact(table=summary_rows(metrics["results"], metrics["methods"], metrics["steps_to_violation_below_10pct"]),
                          key="livo-demo-metrics", description=f"livo demo: held-out metrics per method ({out})")
    create_table_artifact(table=metrics["targets"], key="livo-demo-targets", description="livo demo: targets reached or not")
    # The images inline (small PNGs as data URIs) so the report reads the same in the Prefect UI.
    inline = report
    for name in ("grid.png", "training_curves.png"):
        data = base64.b64encode((out / name).read_bytes()).decode()
        inline = inline.replace(f"]({name})", f"](data:image/png;base64,{data})")
    create_markdown_artifact(markdown=inline, key="livo-demo-report", description=f"livo demo report ({out / 'report.md'})")
    return str(out / "report.md")


@flow(name="livo-demo")
def demo_flow(out_dir: str, quick: bool = False, world_dir: str | None = None, baselines: bool = False,
              family: str = "sd") -> dict:
    """The whole LiVO loop on the toy world: data -> training (LiVO + baselines) -> evaluation -> report.

    world_dir: folder holding the world models (model/, model-sd3/) and world CLIP (clip/); default
    livo_core/data/toyworld. family: which world model renders and is aligned (sd: the UNet world; sd3: the
    flow-matching one, trained with its own preset).
    Returns the metrics (also in OUT/metrics.json). A non-empty OUT from an earlier demo is reused where it
    is complete: the dataset flow skips finished shards; training and evaluation run again.
    """
    from livo_core.progress import Progress

    from flows.dataset import dataset_flow

    log = get_run_logger()
    s = demo_settings(family, quick, baselines)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    toxic, bias = demo_values()
    stages = ["data", *(f"train {m}" for m in s.trained), "evaluate", "report"]
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    with Progress(total=len(stages), desc="demo", unit="stage") as bar:
        def stage(name):
            bar.set_description(f"demo: {name}")
            seconds[name] = time.perf_counter()

        def done(name):
            seconds[name] = round(time.perf_counter() - seconds[name], 1)
            bar.update(1)

        stage("data")
        datasets, data_dirs = {}, []
        for value in (toxic, bias):
            run_dir = out / "data" / value.id
            datasets[value.id] = dataset_flow(dataset_config(s, value, run_dir, Path(world_dir or TOYWORLD_DIR), family),
                                              str(run_dir))
            data_dirs.append(str(run_dir))
        done("data")
        base_model = json.loads((Path(data_dirs[0]) / "config.json").read_text())["base_model"]

        training = {}
        for method, cfg in train_configs(s, out / "train" / "cache").items():
            if method not in s.trained:
                continue
            stage(f"train {method}")
            train_dir = out / "train" / method
            shutil.rmtree(train_dir, ignore_errors=True)  # a fresh run: checkpoints of an earlier demo would mix in
            training[method] = train_task(method, cfg.model_dump(mode="json"), data_dirs, str(train_dir))
            done(f"train {method}")

        stage("evaluate")
        evaluation = evaluate_task(s.model_dump(), str(out), base_model)
        done("evaluate")

        stage("report")
        seconds["total"] = round(time.perf_counter() - t_start, 1)
        metrics = build_metrics(s, quick, datasets, training, evaluation, {k: v for k, v in seconds.items() if k != "report"},
                                family)
        report_task(metrics, str(out), {m: t["log_csv"] for m, t in training.items()})
        done("report")
    log.info("livo demo report: %s", out / "report.md")
    return metrics


def print_summary(metrics: dict, out: Path) -> None:
    from livo_core.metrics import metric_table

    print(summary_table(metrics["results"], metrics["methods"], metrics["steps_to_violation_below_10pct"]))
    print(metric_table(metrics["targets"]))
    print(f"livo demo: {metrics['seconds']['total']:.0f} s; report {out / 'report.md'}, metrics {out / 'metrics.json'}, "
          f"images {out / 'grid.png'}, {out / 'training_curves.png'}")


def cli_demo(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LivoError(f"--out {out} is a file: pass a directory for the demo's outputs")
    from livo_core.families import family_for

    family = getattr(args, "family", "sd")
    model = world_model(TOYWORLD_DIR, family)
    if not model.is_dir():
        raise LivoError(f"the {family} toy world model {model} is missing: build it with `livo toyworld build --family {family}`")
    family_for(str(model), "toy world model")
    from flows.server import ensure_api

    ensure_api()
    metrics = demo_flow(out_dir=str(out), quick=args.quick, baselines=args.baselines, family=family)
    print_summary(metrics, out)
    return 0
