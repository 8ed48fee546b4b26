"""Plain commands (no Prefect): `livo export RUN [RUN ...] --out DIR` (dataset runs as one folder Hugging Face
`datasets` and Diffusion-DPO read; the logic is livo_core.export) and `livo model random CONFIG --out DIR` (a
random-weight model of a family's shape config; livo_core.families)."""

from __future__ import annotations

from pathlib import Path

from livo_core.errors import LivoError


def cli_export(args) -> int:
    from livo_core.export import export_runs

    for d in args.run_dir:
        if not (Path(d) / "shards").is_dir():
            raise LivoError(f"{d} is not a livo dataset run (no shards/ folder): pass the --out dir of `livo dataset`")
    record = export_runs([Path(d) for d in args.run_dir], Path(args.out), name=args.name)
    per_value = ", ".join(f"{k} {n}" for k, n in record["pairs_per_value"].items())
    print(f"livo: exported {record['pairs']} pairs ({per_value}) in {len(record['files'])} file(s) to {args.out} "
          f"({', '.join(record['file_method'])}); load with datasets.load_dataset({str(args.out)!r}, split='train')")
    for p in record["skipped"]:
        print(f"livo: skipped {p}")
    return 0


def cli_model(args) -> int:
    import torch

    from livo_core.families import build_random_model, family_for
    from livo_core.models import model_config
    from livo_core.paths import data_path

    names = sorted(p.stem for p in data_path("model_configs").glob("*.json")
                   if {"unet", "family"} & set(model_config(p.stem)))   # diffusion models, not the judge CLIP
    if args.config not in names:
        raise LivoError(f"unknown shape config {args.config!r}: choose one of {', '.join(names)}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LivoError(f"--out {out} exists and is not empty: give a new folder")
    build_random_model(out, args.config, seed=args.seed, dtype=getattr(torch, args.dtype))
    family = family_for(str(out))
    print(f"livo: a random-weight {args.config} model ({family.name} family, {args.dtype}) in {out}; a value encoder "
          f"for it makes {family.folder_token_width(out)}-wide tokens")
    return 0
