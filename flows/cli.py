"""The `livo` command. Each subcommand parses its arguments and calls one flow or library function.

Whatever ends a command reaches the user through `flows.console`: bad input (LivoError, wherever it was
raised) is one line `livo: error: <problem>; <fix>` and exit code 2; a full or read-only disk one line
and 1; Ctrl-C / SIGTERM one line, no process left behind, and 130 / 143. `--verbose` shows library
output, Prefect's log and tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from flows import env  # noqa: F401  (sets offline/quiet environment before Prefect loads)
from flows.args import config_args, runner_args
from livo_core.config import PRESETS


def _retriever_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-clip", action="store_true", help="retrieve by keywords only (skip the CLIP similarity step)")
    p.add_argument("--min-similarity", type=float, help="CLIP similarity at which a value applies (calibrate per CLIP model)")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one `livo: error:` line like every other error."""

    def error(self, message: str):
        print(f"livo: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true",
                        help="show library progress bars and warnings, Prefect's log and full tracebacks")
    parser = _Parser(prog="livo", description="LiVO: align text-to-image diffusion with human values.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **kw: add_parser(*a, parents=[common], **kw)   # --verbose after the subcommand too

    p = sub.add_parser("dataset", help="build a preference dataset (prompt pairs -> renders -> judge -> Parquet shards)")
    p.add_argument("--out", required=True, help="run directory to create (must be new or empty)")
    runner_args(p)
    config_args(p)

    p = sub.add_parser("resume", help="finish whatever is incomplete in a dataset run directory")
    p.add_argument("run_dir")
    runner_args(p)

    p = sub.add_parser("train", help="train a value encoder on a dataset run directory")
    p.add_argument("--data", required=True, action="append", help="dataset run directory (repeatable)")
    p.add_argument("--out", required=True, help="training output directory")
    p.add_argument("--train-config", help="training config file (.toml/.yaml/.json)")
    p.add_argument("--resume", help="'latest' (the newest checkpoint; none yet = from the start) or a checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace another training run in --out (its checkpoints and logs)")
    p.add_argument("--base-model", help="the diffusion model to train for (any supported family; default: the one the "
                   "dataset run was rendered with); images are resized to --set resolution=N when given")
    p.add_argument("--preset", choices=sorted(PRESETS["train"]),
                   help="training recipe (default: the one the base model declares: toyworld for the toy world's data, "
                        "else the paper's published run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training config field, e.g. --set max_steps=200")

    p = sub.add_parser("import-livo-data", help="convert the official LiVO data layout into livo shards")
    p.add_argument("src", help="folder holding <type>/<scene>/metadata.jsonl + images (e.g. the extracted livo_data/)")
    p.add_argument("--out", required=True, help="dataset run directory to create (re-running the same import resumes it)")
    p.add_argument("--base-model", help="Stable Diffusion folder or hub id to train on, recorded in RUN/config.json")
    p.add_argument("--values-file", help="YAML file of value principles to match the data's value texts against (default: livo_core/data/values.yaml)")
    p.add_argument("--keep-value-text", action="store_true", help="keep the data's own value wording instead of the values file's principle sentence")
    p.add_argument("--pairs-per-shard", type=int, default=512, help="pairs per Parquet shard")

    p = sub.add_parser("export", help="write a dataset run as a folder Hugging Face datasets / Diffusion-DPO read (dataset card included)")
    p.add_argument("run_dir", nargs="+", help="dataset run directory (several: one dataset)")
    p.add_argument("--out", required=True, help="new folder for the export")
    p.add_argument("--name", help="dataset name in the card (default: the folder's name)")

    p = sub.add_parser("retrieve", help="which value principle applies to a prompt (or not applicable)")
    p.add_argument("prompt")
    p.add_argument("--values-file", help="YAML file of value principles")
    p.add_argument("--use-llm", action="store_true", help="let the configured LLM decide among candidates")
    _retriever_args(p)
    config_args(p)

    p = sub.add_parser("generate", help="generate images with a value encoder")
    p.add_argument("prompt")
    p.add_argument("--encoder", required=True, help="value encoder folder (or a training output dir)")
    p.add_argument("--out", required=True, help="output PNG file (a grid when --num-images > 1)")
    p.add_argument("--value", help="value id; default: retrieved from the prompt")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", type=float, help="bias values: share of samples generated with the value")
    p.add_argument("--layout", default="livo", choices=["livo", "official"],
                   help="token layout: livo (78 padded tokens, as training) or official (the authors' inference, "
                        "unpadded; docs/inference.md)")
    p.add_argument("--scheduler", default="default", help="sampler: default (the model's), dpm++ (the authors' "
                   "evaluation), ddim, pndm, euler, ... (docs/inference.md)")
    _retriever_args(p)
    config_args(p)

    p = sub.add_parser("evaluate", help="the paper's evaluation of a value encoder (and baselines) on a diffusion model of a supported family")
    p.add_argument("--encoder", help="value encoder folder (or a training output) of the livo methods")
    p.add_argument("--out", required=True, help="evaluation folder (images, report; a rerun resumes it)")
    p.add_argument("--config", help="evaluation config file (.toml/.yaml/.json): prompt sets, methods, judges")
    p.add_argument("--preset", choices=sorted(PRESETS["evaluate"]), help="official = the authors' protocol (DPM-Solver++, "
                   "25 steps, 512 px, 50 images); toyworld = the toy world's held-out sets; i2p-original, safetydpo-ip, "
                   "unlearndiffatk-nudity, heim-bias = the peers' protocols (docs/evaluation.md)")
    p.add_argument("--base-model", help="diffusion model folder or hub id (config: base_model)")
    p.add_argument("--methods", help="comma-separated: base,livo,livo:<value id>,negative-prompt,sld:<preset>")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluation config field, e.g. --set images_per_prompt=8")
    p.add_argument("--overwrite", action="store_true",
                   help="render again the methods whose images in --out were made with another configuration (refused otherwise)")
    runner_args(p)

    p = sub.add_parser("toyworld", help="the toy world: rebuild its models")
    tw = p.add_subparsers(dest="toyworld_command", required=True)
    b = tw.add_parser("build", help="train the world model and world CLIP from scratch (deterministic)")
    b.add_argument("--out", help="output folder (default: livo_core/data/toyworld in the project)")
    b.add_argument("--steps", type=int, help="denoiser steps (default: the full build)")
    b.add_argument("--family", choices=["sd", "sd3"], default="sd", help="sd: the UNet world (model/, clip/); sd3: the "
                   "flow-matching world (model-sd3/), from the UNet world's VAE and text tower")

    p = sub.add_parser("model", help="models of a family's shape config (livo_core/data/model_configs)")
    r = p.add_subparsers(dest="model_command", required=True).add_parser("random", help="a random-weight model of a shape config")
    r.add_argument("config", help="shape config name: tiny-sd, tiny-sd2, tiny-sdxl, tiny-sd3, tiny-flux (tests); sd15, sd21, "
                   "sdxl, sd35-medium, flux-dev (real widths, fewer blocks: shapes, dtypes, memory)")
    r.add_argument("--out", required=True, help="new folder for the diffusers model")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")

    p = sub.add_parser("demo", help="run the whole LiVO loop on the toy world and measure it")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
    p.add_argument("--baselines", action="store_true", help="also train and evaluate the DPO baselines (about 2.5x the time)")
    p.add_argument("--family", choices=["sd", "sd3"], default="sd", help="sd: the UNet world (epsilon); sd3: the "
                   "flow-matching world (model-sd3/, an SD 3 transformer; velocity errors in the hinge)")

    p = sub.add_parser("nightly", help="one night: new data -> train -> evaluate vs production -> promote if not worse")
    p.add_argument("--root", default="runs/nightly", help="the nightly folder (data, held-out set, models)")
    p.add_argument("--config", help="nightly config file (.toml/.yaml/.json); defaults: the toy world")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a nightly config field, e.g. --set train.max_steps=50 (repeatable)")

    p = sub.add_parser("config", help="print a job's resolved config with every field's description")
    cs = p.add_subparsers(dest="config_command", required=True)
    show = cs.add_parser("show", help="the resolved config (preset < --config < --set) of a job")
    show.add_argument("kind", choices=["dataset", "train", "evaluate", "nightly"])
    show.add_argument("--preset", help="a shipped preset of that job (see the error for the names)")
    show.add_argument("--config", help="a config file on top of the preset")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field")

    p = sub.add_parser("deploy", help="create the Prefect deployments against the configured Prefect API")
    p.add_argument("--prefect-yaml", default=None, help="deploy what this prefect.yaml declares (prefect deploy --all)")
    p.add_argument("--work-pool", default="livo", help="work pool of the deployments (created as a process pool if missing)")
    p.add_argument("--serve", action="store_true", help="no work pool: serve the deployments from this process")
    p.add_argument("--root", default="runs/nightly", help="nightly folder the nightly and heldout deployments use")
    p.add_argument("--nightly-config", help="nightly config file the nightly deployment passes")
    p.add_argument("--nightly-cron", default="0 3 * * *", help="cron schedule of the nightly deployment")
    p.add_argument("--timezone", default="UTC", help="time zone of the cron schedule")

    return parser


def cli_config(args: argparse.Namespace) -> int:
    """`livo config show KIND [--preset P] [--config F] [--set k=v]`: what a job would run with, field by field."""
    from livo_core.config import format_config, load_job_config, parse_override

    if args.kind == "dataset":
        from livo_core.config import RunConfig as model
    elif args.kind == "train":
        from livo_core.train import TrainConfig as model
    elif args.kind == "evaluate":
        from livo_core.evaluate import EvalConfig as model
    else:
        from livo_core.nightly import NightlyConfig as model
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.kind == "nightly":   # its train section starts from the base model's training preset
        from livo_core.nightly import load_nightly_config

        cfg = load_nightly_config(args.config, overrides, args.preset)
    else:
        cfg = load_job_config(model, args.kind, args.config, args.preset, overrides)
    print(format_config(cfg, f"livo {args.kind} config (preset: {args.preset or 'none'}; defaults, then --preset, "
                             f"--config, --set)"), end="")
    return 0


def interrupt_hint(args: argparse.Namespace) -> str:
    """How to continue a command after Ctrl-C / SIGTERM (printed on the interrupt line)."""
    if args.command == "dataset":
        return f"finished shards are kept: `livo resume {args.out}` continues"
    if args.command == "resume":
        return f"finished shards are kept: `livo resume {args.run_dir}` continues"
    if args.command == "train":
        data = " ".join(f"--data {d}" for d in args.data)
        return f"checkpoints are kept: `livo train {data} --out {args.out} --resume latest` continues"
    if args.command == "nightly":
        return f"`livo nightly --root {args.root}` resumes the night"
    if args.command == "demo":
        return f"`livo demo --out {args.out}` reuses the finished data"
    if args.command == "evaluate":
        return f"stored images are kept: the same `livo evaluate ... --out {args.out}` renders only what is missing"
    return ""


def main(argv: list[str] | None = None) -> int:
    from flows import console

    args = build_parser().parse_args(argv)
    console.quiet(args.verbose)
    try:
        console.install_signal_handlers(interrupt_hint(args))
    except ValueError:   # not the main thread (signals can only be handled there)
        pass
    try:
        if args.command == "dataset":
            from flows.dataset import cli_dataset
            return cli_dataset(args)
        if args.command == "resume":
            from flows.dataset import cli_resume
            return cli_resume(args)
        handlers = {
            "train": ("flows.training", "cli_train"),
            "import-livo-data": ("flows.training", "cli_import_livo_data"),
            "export": ("flows.export", "cli_export"),
            "evaluate": ("flows.evaluation", "cli_evaluate"),
            "retrieve": ("flows.inference", "cli_retrieve"),
            "generate": ("flows.inference", "cli_generate"),
            "toyworld": ("flows.demo", "cli_toyworld"),
            "demo": ("flows.demo", "cli_demo"),
            "nightly": ("flows.nightly", "cli_nightly"),
            "deploy": ("flows.deployments", "cli_deploy"),
            "model": ("flows.export", "cli_model"),
            "config": ("flows.cli", "cli_config"),
        }
        module, func = handlers[args.command]
        import importlib
        return getattr(importlib.import_module(module), func)(args)
    except SystemExit:
        raise
    except BaseException as e:   # the one place where failures reach the user (flows.console.report)
        return console.report(e)


if __name__ == "__main__":
    sys.exit(main())
