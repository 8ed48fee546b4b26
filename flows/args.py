"""The flags commands share and the run config they describe (--preset < --config < flags < --set); shared by the
commands, so they need not import the CLI module that dispatches to them."""

from __future__ import annotations

import argparse


def config_from_args(args: argparse.Namespace, out_dir=None):
    """Build the validated RunConfig from --config, direct flags and --set overrides."""
    from livo_core.config import parse_override

    overrides = dict(parse_override(o) for o in args.overrides)
    direct = {
        "base_model": getattr(args, "base_model", None),
        "values": args.values.split(",") if getattr(args, "values", None) else None,
        "prompt_source": getattr(args, "prompt_source", None),
        "device": getattr(args, "device", None),
        "out_dir": str(out_dir) if out_dir else None,
    }
    overrides.update({k: v for k, v in direct.items() if v is not None})
    from livo_core.config import RunConfig, load_job_config

    return load_job_config(RunConfig, "dataset", args.config, getattr(args, "preset", None), overrides)


def config_args(p: argparse.ArgumentParser) -> None:
    """The flags of the commands that read a dataset config."""
    from livo_core.config import PRESETS

    p.add_argument("--config", help="run config file (.toml/.yaml/.json); defaults are the embedded toy world")
    p.add_argument("--preset", choices=sorted(PRESETS["dataset"]), help="a shipped dataset preset under --config and --set "
                   "(sd15: Stable Diffusion 1.5, the paper's values, an LLM; `livo config show dataset --preset sd15`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set render.steps=10 (repeatable)")
    p.add_argument("--base-model", help="diffusion model folder or hub id (config: base_model)")
    p.add_argument("--values", help="comma-separated value ids (config: values)")
    p.add_argument("--prompt-source", choices=["template", "llm"], help="config: prompt_source")
    p.add_argument("--device", help="auto, cpu or cuda (config: device)")


def runner_args(p: argparse.ArgumentParser) -> None:
    """--task-runner / --dask-address / --dask-workers of the commands that render (flows/runners.py)."""
    p.add_argument("--task-runner", choices=["thread", "dask"], default="thread", help="Prefect task runner")
    p.add_argument("--dask-address", help="address of an existing Dask scheduler (with --task-runner dask)")
    p.add_argument("--dask-workers", type=int, help="worker processes of the local Dask cluster (default: one per GPU, else 2)")
