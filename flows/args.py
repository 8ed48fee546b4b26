"""The run config a command's flags describe (--preset < --config < flags < --set); shared by the commands
that read a dataset config, so they need not import the CLI module that dispatches to them."""

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
