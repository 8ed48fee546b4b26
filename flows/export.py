"""`livo export RUN [RUN ...] --out DIR`: dataset runs as one folder Hugging Face `datasets` and Diffusion-DPO
read (no Prefect needed: it only links files and writes a card; the logic is livo_core.export)."""

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
