"""The training flow: livo dataset runs -> a trained value encoder, on Prefect.

    livo train --data RUN [--data RUN2 ...] --out OUT [--train-config FILE] [--set key=value ...] [--resume latest]

One flow run calls `livo_core.train.train` (the trainer keeps its own checkpoints, so a crashed flow is
continued with --resume latest), then publishes two artifacts: a table of the last step's metrics and
a markdown report with the loss plot inline.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from flows import env  # noqa: F401  (offline/quiet environment before Prefect loads)
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from livo_core.config import parse_override
from livo_core.errors import LivoError
from livo_core.train import load_train_config, resolve_train_config, train


@flow(name="livo-train")
def train_value_encoder(data_dirs: list[str], out_dir: str, train_config: dict | None = None, resume: str | None = None,
                        overwrite: bool = False, measure_preference: bool = False, preset: str | None = None) -> dict:
    """Train a value encoder on dataset runs; returns {"steps", "last", "value_encoder", "loss_plot", "preference"}.

    train_config: TrainConfig fields (any subset) over the preset; preset: a training preset (default: the one
    the base model declares, livo_core.train.preset_for: the toy world's recipe for toy-world data, the
    paper's otherwise); resume: "latest" or a checkpoint folder; overwrite: replace another training run in
    out_dir; measure_preference: preference accuracy on the training pairs before and after (fixed noise).
    """
    logger = get_run_logger()
    cfg, preset = resolve_train_config(data_dirs, None, train_config or {}, preset)
    logger.info("training preset %s: %d steps, lr %g", preset, cfg.max_steps, cfg.learning_rate)
    res = train(cfg, data_dirs, out_dir, resume=resume, overwrite=overwrite, measure_preference=measure_preference)
    logger.info("trained %d steps; value encoder in %s", res.steps, res.value_encoder)

    rows = [{"metric": k, "value": v} for k, v in res.last_metrics.items()]
    create_table_artifact(table=rows, key="livo-train-metrics", description=f"livo train: last step's metrics ({out_dir})")
    png = base64.b64encode(res.loss_plot.read_bytes()).decode() if res.loss_plot.is_file() else None
    md = (f"# livo training: {out_dir}\n\n{res.steps} steps, loss {cfg.loss}; value encoder: `{res.value_encoder}`\n\n"
          + (f"![loss](data:image/png;base64,{png})\n" if png else "(no loss plot)\n")
          + "\nLeft: loss. Right: mean theta - ref denoising-error gap of aligned (want < 0) and violating (want > 0) images.\n")
    create_markdown_artifact(markdown=md, key="livo-train-report", description=f"livo train: loss plot ({out_dir})")
    return {"steps": res.steps, "last": res.last_metrics, "value_encoder": str(res.value_encoder),
            "loss_plot": str(res.loss_plot), "preference": res.preference}


def check_train_inputs(args):
    """Everything `livo train` can check before Prefect starts or anything is written -> (cfg, preset name)."""
    from livo_core.families import family_for
    from livo_core.models import resolve_device
    from livo_core.train import check_config_for_family, check_out_dir, find_checkpoint, training_shards

    overrides = dict(parse_override(o) for o in args.overrides)
    if getattr(args, "base_model", None):   # train for this model's family on any livo dataset
        overrides["base_model"] = args.base_model
    load_train_config(args.train_config, overrides)          # bad config -> LivoError naming the field
    for d in args.data:
        if not (Path(d) / "shards").is_dir():
            raise LivoError(f"--data {d} is not a livo dataset run (no shards/ folder): pass the --out dir of `livo dataset`")
    training_shards([Path(d) for d in args.data])           # repeated --data, no usable shard
    cfg, preset = resolve_train_config(args.data, args.train_config, overrides, args.preset)
    family_for(cfg.base_model)                               # missing / not-a-model folder / unsupported family
    check_config_for_family(cfg)                             # settings the family cannot honour
    resolve_device(cfg.device)                               # device=cuda without a GPU
    if args.resume and args.resume != "latest":
        find_checkpoint(Path(args.out), args.resume)
    if _rank() == 0:   # under `accelerate launch` the main process owns the output folder (the others only read)
        check_out_dir(Path(args.out), cfg, [Path(d) for d in args.data], args.resume, args.overwrite)
    return cfg, preset


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def cli_train(args) -> int:
    """`livo train`: check the inputs, say which recipe runs, then run the flow."""
    cfg, preset = check_train_inputs(args)
    why = "the data was made on the embedded toy world" if preset == "toyworld" else "the paper's SD 1.5 run"
    if not args.preset and _rank() == 0:
        print(f"livo: training preset {preset!r} ({why}): {cfg.max_steps} steps of {cfg.batch_size} pairs, "
              f"lr {cfg.learning_rate:g}, {cfg.loss} loss (beta {cfg.beta:g}, alpha {cfg.alpha:g}); "
              f"--preset or --set changes it", flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under `accelerate launch` with several processes: every process trains (accelerate splits the
        # batches), and one Prefect flow run per process would only confuse; run the trainer directly.
        res = train(cfg, args.data, args.out, resume=args.resume, overwrite=args.overwrite, measure_preference=True)
        result = {"steps": res.steps, "last": res.last_metrics, "value_encoder": str(res.value_encoder),
                  "loss_plot": str(res.loss_plot), "preference": res.preference}
        if not res.preference:   # not the main process: it writes nothing and reports nothing
            return 0
    else:
        from flows.server import ensure_api

        ensure_api()
        result = train_value_encoder(data_dirs=[str(d) for d in args.data], out_dir=str(args.out),
                                     train_config=cfg.model_dump(mode="json"), resume=args.resume,
                                     overwrite=args.overwrite, measure_preference=True)
    last, pref = result["last"], result.get("preference") or {}
    acc = ""
    if "before" in pref and "after" in pref:
        acc = (f"; preference accuracy on the training pairs {pref['before']['pref_acc']:.2f} -> "
               f"{pref['after']['pref_acc']:.2f} (gap_w {pref['after']['gap_w']:.2e}, gap_l {pref['after']['gap_l']:.2e})")
    print(f"livo: trained {result['steps']} steps (loss {last.get('loss', float('nan')):.4f}){acc}; "
          f"value encoder in {result['value_encoder']}, loss plot {result['loss_plot']}")
    return 0


def cli_import_livo_data(args) -> int:
    """`livo import-livo-data SRC --out RUN`: the official LiVO data layout -> a livo dataset run (no Prefect needed)."""
    from livo_core.livo_data import import_livo_data
    from livo_core.paths import data_path

    values_file = Path(args.values_file) if getattr(args, "values_file", None) else data_path("values.yaml")
    stats = import_livo_data(Path(args.src), Path(args.out), values_file=values_file,
                             base_model=getattr(args, "base_model", None),
                             pairs_per_shard=getattr(args, "pairs_per_shard", 512),
                             keep_value_text=getattr(args, "keep_value_text", False))
    per_value = ", ".join(f"{k} {n}" for k, n in sorted(stats["pairs_per_value"].items()))
    print(f"livo: imported {stats['pairs']} pairs from {stats['scenes']} scenes into {args.out} ({per_value}); "
          f"violating images reused {stats['violating_reused']}, unused {stats['violating_unused']}; "
          f"aligned images without a violating one {stats['aligned_unpaired']}")
    for value_id, new in stats["new_values"].items():
        print(f"livo: value {new['text']!r} matches no principle in {values_file}: imported as new id {value_id!r} ({new['category']})")
    hint = "" if stats["base_model"] else " --set base_model=<SD folder or hub id>"
    print(f"livo: next: livo train --data {args.out} --out <train dir>{hint}  (details in {Path(args.out) / 'import.json'})")
    return 0
