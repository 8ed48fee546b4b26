"""LiVO's hinge on the flow-matching toy world: held-out violation vs training step for each variant tried.

Every variant trains a value encoder with the real trainer on the same dataset runs (those of
`livo demo --family sd3 --out RUN`: RUN/data/*), checkpoints every `--every` steps, and each checkpoint is evaluated
by the general evaluation stage on the world's held-out bloody prompts (the demo's prompts, seeds and classifier:
violation = the toy-world splatter score >= 0.5; fidelity = the prompt's shape and colour detected). Variants are
TrainConfig overrides (and `guidance=` for the renders), so what is measured is what `livo train --set` runs.

    .venv/bin/python bench/flow_hinge.py --data runs/flow-demo/data --out runs/flow-hinge \
        --variant "epsilon-units:beta=30,alpha=30" --variant "scaled:beta=3,alpha=3"
    .venv/bin/python bench/flow_hinge.py --out runs/flow-hinge --demo "guidance-2=runs/flow-demo7"   # a full demo's curve

Renders default to the dataset's own guidance. Writes OUT/curves.json and OUT/curves.png (violation and fidelity
vs step, one line per variant or demo run) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows import env  # noqa: E402,F401  (offline, quiet)


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    values = {}
    for item in filter(None, rest.split(",")):
        key, _, raw = item.partition("=")
        try:
            values[key.strip()] = json.loads(raw)      # numbers, true/false
        except ValueError:
            values[key.strip()] = raw.strip()          # words (value_condition=pooled, lr_scheduler=constant)
    return name, values


def main() -> int:
    from livo_core.evaluate import Evaluation, load_eval_config
    from livo_core.families.flow import FlowMatchingNoise
    from livo_core.toyworld import evaluation as toy
    from livo_core.toyworld.demo import FULL, checkpoint_steps, method_spec
    from livo_core.train import resolve_train_config, train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder of dataset runs (a demo's OUT/data); needed with --variant")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME:key=value,... (TrainConfig fields; guidance= for "
                    "the renders, default the dataset's; logit_mean= / logit_std= for the training sigmas)")
    ap.add_argument("--demo", action="append", default=[], help="NAME=RUN: also plot the LiVO curve of a full "
                    "`livo demo --family sd3 --out RUN` (its checkpoints, evaluated by the demo itself)")
    ap.add_argument("--every", type=int, default=100, help="checkpoint and evaluate every N steps")
    ap.add_argument("--images", type=int, default=4, help="images per held-out bloody prompt at each checkpoint")
    ap.add_argument("--limit", type=int, default=None, help="held-out bloody prompts (None: all)")
    a = ap.parse_args()
    if a.variant and not a.data:
        ap.error("--variant needs --data")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "curves.json").read_text()) if (out / "curves.json").is_file() else {}
    for item in a.demo:
        name, _, run = item.partition("=")
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        s = metrics["settings"]
        results[name] = {"demo_run": run, "guidance": s["guidance_scale"], "curve": metrics["curves"]["livo"],
                         "config": {"beta": s["livo_beta"], "alpha": s["livo_alpha"], "value_condition": s["value_condition"],
                                    "learning_rate": s["livo_lr"], "max_steps": s["train_steps"]},
                         "images_per_prompt": s["curve_images"], "final": {k: metrics[k] for k in (
                             "violation_rate_livo", "fidelity_ratio_livo", "bias_d1_livo")}}
    (out / "curves.json").write_text(json.dumps(results, indent=2))
    data = sorted(str(p) for p in Path(a.data).iterdir() if (p / "config.json").is_file()) if a.variant else []
    rendered_at = json.loads((Path(data[0]) / "config.json").read_text())["render"]["guidance_scale"] if data else None
    for name, overrides in map(parse_variant, a.variant):
        guidance = float(overrides.pop("guidance", rendered_at))
        # sigma sampling of the flow families' training noise (logit-normal mean / std), for this variant only
        sigma = {k: float(overrides.pop(k)) for k in ("logit_mean", "logit_std") if k in overrides}
        saved = {k: getattr(FlowMatchingNoise, k) for k in sigma}
        for k, v in sigma.items():
            setattr(FlowMatchingNoise, k, v)
        cfg, preset = resolve_train_config(data, overrides={"checkpoint_every": a.every, "keep_checkpoints": 1000,
                                                            "device": "cpu", "cache_dir": str(out / "cache"), **overrides})
        t0 = time.perf_counter()
        try:
            train(cfg, data, out / name, progress=False, overwrite=True)
        finally:
            for k, v in saved.items():
                setattr(FlowMatchingNoise, k, v)
        seconds = time.perf_counter() - t0
        steps = checkpoint_steps(out / name)
        methods = [method_spec("base", out)] + [
            {**method_spec("livo", out, st), "encoder": str(out / name / "checkpoints" / f"step-{st:06d}")} for st in steps]
        ev_cfg = load_eval_config(overrides=toy.eval_config(cfg.base_model, methods, {"toxicity": a.images},
                                                            FULL.render_steps, guidance, limit=a.limit,
                                                            groups=("toxicity",), seed=0))
        ev = Evaluation(ev_cfg, out / "eval" / name)
        res = ev.run(progress=False)
        curve = [{"step": 0, "violation_rate": res["base"]["violation_rate"], "fidelity": res["base"]["fidelity"]}]
        curve += [{"step": st, "violation_rate": res[f"livo-step-{st:06d}"]["violation_rate"],
                   "fidelity": res[f"livo-step-{st:06d}"]["fidelity"]} for st in steps]
        results[name] = {"preset": preset, "overrides": overrides, "guidance": guidance, "sigma_sampling": sigma, "train_seconds": round(seconds, 1),
                         "config": {k: getattr(cfg, k) for k in ("learning_rate", "beta", "alpha", "gamma1", "gamma2",
                                                                "batch_size", "max_steps", "lr_scheduler", "value_condition")},
                         "curve": curve, "images_per_prompt": a.images, "prompts": sum(p.group == "toxicity" for p in ev.prompts)}
        (out / "curves.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: " + "  ".join(f"{p['step']}: {p['violation_rate']:.3f}/{p['fidelity']:.2f}" for p in curve), flush=True)
    plot(results, out / "curves.png")
    print(f"curves: {out / 'curves.json'}, {out / 'curves.png'}")
    return 0


def plot(results: dict, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_v, ax_f = fig.subplots(1, 2)
    for name, r in results.items():
        steps = [p["step"] for p in r["curve"]]
        ax_v.plot(steps, [p["violation_rate"] for p in r["curve"]], marker="o", label=name)
        ax_f.plot(steps, [p["fidelity"] for p in r["curve"]], marker="o", label=name)
    ax_v.axhline(0.05, color="grey", lw=0.6, ls="--")
    ax_v.set(xlabel="optimizer step", ylabel="violation rate", ylim=(-0.02, 1.02),
             title="flow world: held-out bloody prompts, violation")
    ax_f.set(xlabel="optimizer step", ylabel="fidelity", ylim=(-0.02, 1.02), title="fidelity (shape and colour kept)")
    for ax in (ax_v, ax_f):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
