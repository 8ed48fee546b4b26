"""The demo's measurement, apart from Prefect: its settings (FULL, QUICK), the configs of each stage, the
evaluation through the general stage, the metrics, targets, curves and report. flows/demo.py runs the
stages as Prefect tasks and a flow (`livo demo`)."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, Field

from livo_core.errors import LivoError  # noqa: F401  (raised by the helpers below)
from livo_core.paths import TOYWORLD_DIR


# --------------------------------------------------------------------------- settings
class DemoSettings(BaseModel):
    """Sizes and training settings of the demo. FULL is the measured run; QUICK a smoke test of every stage."""

    prompts_per_value: int = Field(description="Template prompt pairs per value (dataset flow).")
    images_per_prompt: dict[str, int] = Field(description="Image pairs (seeds) per prompt, per value kind: "
                                              "the bias value has few distinct prompts, so it gets more seeds.")
    render_steps: int = Field(20, description="Denoising steps, for the dataset and the evaluation.")
    guidance_scale: float = Field(5.0, description="Classifier-free guidance, for the dataset and the evaluation.")
    train_steps: int = Field(description="Optimizer steps of every trained method (the shared step budget).")
    batch_size: int = Field(description="Pairs per step, every trained method.")
    eval_every: int = Field(description="Checkpoint and evaluate violation/fidelity every N steps.")
    livo_lr: float = Field(description="LiVO value encoder learning rate.")
    livo_beta: float = Field(30.0, description="LiVO beta. With gamma1 = 1 the aligned margin is gamma1 / beta = 0.033 in "
                             "denoising MSE. Measured on the toy world (held-out violation, 16 images per bloody prompt, "
                             "800 steps, cosine lr, two training seeds each): beta = alpha = 30 with lr 2e-3: 9.0 / 4.9%, "
                             "3e-3: 5.6 / 3.5%, 5e-3: 4.2 / 1.4%, 8e-3: 2.8 / 3.5% (fidelity 0.92 / 0.88); beta 100 / "
                             "alpha 50 at 3e-3: 7-9%; the paper's 1000 / 500 (margins 0.001, met at once): 35% at 400 steps. "
                             "Shorter runs (12 images per bloody prompt, one seed): 400 steps at 5e-3: 6.5%, at 8e-3: 1.9% "
                             "(fidelity 0.94, D1 0.03); 500 steps at 5e-3: 4.6%; 600 at 5e-3: 0.9%; batch 8 x 600 at 5e-3: 12%.")
    livo_alpha: float = Field(30.0, description="LiVO alpha (violating margin gamma2 / alpha = 0.017; the paper's 500: 0.001).")
    livo_gamma1: float = Field(1.0, description="LiVO gamma1 (the aligned hinge's margin, before dividing by beta).")
    livo_gamma2: float = Field(0.5, description="LiVO gamma2 (the violating hinge's margin, before dividing by alpha).")
    value_condition: str = Field("token", description="How the value encoders condition the model (TrainConfig.value_condition): "
                                 "token on the UNet world; pooled on the flow world, where it measured far better (docs/demo.md).")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule of every trained method (TrainConfig.lr_scheduler). "
                              "Cosine decay to 0 ends training on a settled encoder; with a constant 3e-3, violation "
                              "measured at successive checkpoints jumped between 6% and 20%.")
    dpo_encoder_lr: float = Field(description="Learning rate of the value encoder trained with the DPO loss.")
    dpo_unet_lr: float = Field(description="Learning rate of the UNet trained with Diffusion-DPO.")
    beta_dpo: float = Field(5000.0, description="Diffusion-DPO beta (both DPO baselines).")
    eval_images: int = Field(description="Images per held-out toxic or harmless prompt in the final evaluation.")
    bias_eval_images: int = Field(description="Images per held-out bias prompt in the final evaluation (one prompt: "
                                  "D1 needs many; even, so mixing splits them).")
    curve_images: int = Field(description="Images per held-out toxic prompt at each checkpoint.")
    eval_prompts_per_group: int | None = Field(None, description="Cap on toxic and harmless held-out prompts (None: all).")
    mix: float = Field(0.5, description="Bias value: share of images generated with the value token (the paper's mixing).")
    seed: int = Field(0, description="Seeds data, training and evaluation.")
    baselines: bool = Field(False, description="Also train and evaluate the two DPO baselines (DPO loss on the value encoder, "
                            "Diffusion-DPO on the UNet): about 2.5x the time (`livo demo --baselines`).")

    @property
    def methods(self) -> tuple[str, ...]:
        return METHODS if self.baselines else tuple(m for m in METHODS if m not in BASELINES)

    @property
    def trained(self) -> tuple[str, ...]:
        return tuple(m for m in TRAINED if m in self.methods)


def _toy_recipe(preset: str = "toyworld"):
    """A toy world's training preset (livo_core/data/configs/train-toyworld*.toml): `livo train` and the Prefect
    training flow use the same recipe on that world's data, so the demo measures what they run."""
    from livo_core.train import load_train_config

    return load_train_config(preset=preset)


def _full(preset: str, **world) -> DemoSettings:
    """The measured demo on a world: its training preset's recipe, then the world's own settings (WORLDS)."""
    r = _toy_recipe(preset)
    recipe = dict(train_steps=r.max_steps, batch_size=r.batch_size, eval_every=r.checkpoint_every,
                  livo_lr=r.learning_rate, livo_beta=r.beta, livo_alpha=r.alpha, livo_gamma1=r.gamma1,
                  livo_gamma2=r.gamma2, value_condition=r.value_condition, lr_scheduler=r.lr_scheduler)
    return DemoSettings(**{**dict(prompts_per_value=48, images_per_prompt={"toxicity": 6, "bias": 12}, dpo_encoder_lr=5e-3,
                                  dpo_unet_lr=1e-4, eval_images=12, bias_eval_images=48, curve_images=4, **recipe),
                           **world})


FULL = _full("toyworld")
QUICK = DemoSettings(prompts_per_value=8, images_per_prompt={"toxicity": 1, "bias": 2}, render_steps=10,
                     train_steps=4, batch_size=4, eval_every=2, livo_lr=1e-4, dpo_encoder_lr=1e-4,
                     dpo_unet_lr=1e-4, eval_images=2, bias_eval_images=2, curve_images=2, eval_prompts_per_group=2)

# The worlds the demo runs on: family -> (model folder in the world's folder, its training preset, the demo
# settings that differ there; they apply to the quick run too). The flow world renders its dataset and evaluation
# at guidance 2: at 5 its guidance paints red-orange edge pixels on 12.5% of the held-out harmless images (a floor
# under any value's violation rate), at 3 on 6%, at 2 on 3% (docs/demo.md). The UNet world: its measured FULL.
WORLDS = {"sd": ("model", "toyworld", {}),
          "sd3": ("model-sd3", "toyworld-sd3", {"guidance_scale": 2.0})}


def world_model(world_dir: Path, family: str = "sd") -> Path:
    """The world model of a family inside a toy world folder (model/ for the UNet world, model-sd3/ for the flow one)."""
    if family not in WORLDS:
        raise LivoError(f"no toy world of family {family!r}: choose {' or '.join(WORLDS)}")
    return Path(world_dir) / WORLDS[family][0]


def demo_settings(family: str = "sd", quick: bool = False, baselines: bool = False) -> DemoSettings:
    """The demo's settings on a family's world: QUICK, or FULL with that world's training preset."""
    world_model(TOYWORLD_DIR, family)   # an unknown family: one line
    if quick:   # the quick run keeps the world's way of conditioning, so its smoke test covers it
        s = QUICK.model_copy(update={"value_condition": _toy_recipe(WORLDS[family][1]).value_condition,
                                     **WORLDS[family][2]})
    else:
        s = _full(WORLDS[family][1], **WORLDS[family][2])
    return s.model_copy(update={"baselines": baselines})


METHODS = ("base", "livo", "negative-prompt", "dpo-encoder", "dpo-unet")
TRAINED = ("livo", "dpo-encoder", "dpo-unet")
BASELINES = ("dpo-encoder", "dpo-unet")   # trained only with --baselines


def demo_values():
    """(toxic value, bias value) of the toy world's values file: the bloody-content value and the doctor's."""
    from livo_core.values import load_values

    values = load_values(TOYWORLD_DIR / "values.yaml")
    toxic = [v for v in values if v.kind == "toxicity" and "blood" in (v.concept + " " + " ".join(v.keywords)).lower()]
    bias = [v for v in values if v.kind == "bias"]
    if not toxic or not bias:
        raise LivoError(f"{TOYWORLD_DIR / 'values.yaml'} needs a toxicity value about blood and a bias value for the demo")
    return toxic[0], bias[0]


def dataset_config(s: DemoSettings, value, run_dir: Path, world_dir: Path = TOYWORLD_DIR, family: str = "sd") -> dict:
    """The dataset flow's RunConfig (the toy world defaults) for one value, as the flow takes it."""
    from livo_core.config import load_config

    cfg = load_config(overrides={
        "base_model": str(world_model(world_dir, family)), "judge.clip_model": f"local-dir:{world_dir / 'clip'}",
        "values": [value.id], "prompts_per_value": s.prompts_per_value,
        "images_per_prompt": s.images_per_prompt[value.kind], "seed": s.seed, "shard_size": 64,
        "render.steps": s.render_steps, "render.guidance_scale": s.guidance_scale, "render.batch_size": 64,
        "device": "cpu", "out_dir": str(run_dir)})
    return cfg.model_dump(mode="json")


def train_configs(s: DemoSettings, cache_dir: Path) -> dict:
    """TrainConfig of each trained method: the same data order, batch, steps and checkpoints; own lr and loss."""
    from livo_core.train import TrainConfig

    common = dict(batch_size=s.batch_size, max_steps=s.train_steps, checkpoint_every=s.eval_every,
                  keep_checkpoints=None, seed=s.seed, log_every=5, device="cpu", cache_dir=cache_dir,
                  beta_dpo=s.beta_dpo, lr_scheduler=s.lr_scheduler)
    return {
        "livo": TrainConfig(loss="livo", learning_rate=s.livo_lr, beta=s.livo_beta, alpha=s.livo_alpha,
                            gamma1=s.livo_gamma1, gamma2=s.livo_gamma2, value_condition=s.value_condition, **common),
        "dpo-encoder": TrainConfig(loss="dpo", learning_rate=s.dpo_encoder_lr, value_condition=s.value_condition, **common),
        "dpo-unet": TrainConfig(loss="dpo", trains="unet", learning_rate=s.dpo_unet_lr, **common),
    }


# --------------------------------------------------------------------------- stage functions (plain, no Prefect)
def trained_params(method: str, train_dir: Path) -> int:
    """Parameters the method trained: the whole value encoder, or the whole denoiser (UNet or transformer)."""
    from livo_core.baselines import count_params

    if method == "dpo-unet":   # counted from the saved weights: any family's denoiser
        from safetensors import safe_open

        total = 0
        for f in sorted((train_dir / "unet").glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return total
    from livo_core.encoder import ValueEncoder

    return count_params(ValueEncoder.from_pretrained(train_dir / "value_encoder"))


def checkpoint_steps(train_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step-")) for p in (train_dir / "checkpoints").glob("step-*[0-9]"))


def method_spec(name: str, train_root: Path, step: int | None = None) -> dict:
    """One evaluated method (see METHODS) as an evaluation MethodSpec; `step` picks a checkpoint of a trained one."""
    from livo_core.baselines import NEGATIVE_PROMPT

    trained = train_root / name / ("checkpoints/step-%06d" % step if step else "")
    label = f"{name}-step-{step:06d}" if step else name
    if name == "base":
        return {"name": "base", "kind": "base"}
    if name == "negative-prompt":
        return {"name": label, "kind": "negative-prompt", "negative_prompt": NEGATIVE_PROMPT}
    if name in ("livo", "dpo-encoder"):   # the value is retrieved from the prompt, as a user gets it
        return {"name": label, "kind": "livo", "encoder": str(trained)}
    if name == "dpo-unet":
        return {"name": label, "kind": "unet", "unet": str(trained / "unet")}
    raise LivoError(f"unknown demo method {name!r}: choose from {', '.join(METHODS)}")


METHOD_INFO = {
    "base": "nothing",
    "livo": "value encoder, LiVO loss",
    "negative-prompt": None,   # filled with the negative prompt
    "dpo-encoder": "value encoder, Diffusion-DPO loss",
    "dpo-unet": "UNet (all weights), Diffusion-DPO loss",
}


def run_evaluation(s: DemoSettings, out: Path, base_model: str, progress: bool = True) -> dict:
    """The general evaluation stage (livo_core.evaluate) on the toy world's held-out prompts: every method,
    then violation / fidelity at every checkpoint of each trained method. Writes OUT/grid.png.

    Returns plain data (JSON-able): results per method, curves per trained method, retrievals, params.
    """
    from livo_core.baselines import NEGATIVE_PROMPT
    from livo_core.evaluate import Evaluation, comparison_grid, load_eval_config
    from livo_core.progress import Progress
    from livo_core.toyworld import evaluation as toy

    train_root = out / "train"
    images = {"toxicity": s.eval_images, "harmless": s.eval_images, "bias": s.bias_eval_images}
    cfg = load_eval_config(overrides=toy.eval_config(
        base_model, [method_spec(m, train_root) for m in s.methods], images, s.render_steps, s.guidance_scale,
        limit=s.eval_prompts_per_group, mix=s.mix, seed=s.seed))
    main = Evaluation(cfg, out / "eval")
    steps = {m: checkpoint_steps(train_root / m) for m in s.trained}
    curve_cfg = load_eval_config(overrides=toy.eval_config(
        base_model, [method_spec("base", train_root)] + [method_spec(m, train_root, st) for m, sts in steps.items() for st in sts],
        {"toxicity": s.curve_images}, s.render_steps, s.guidance_scale, limit=s.eval_prompts_per_group,
        groups=("toxicity",), mix=s.mix, seed=s.seed))
    # The curves share the evaluation's folder: their base images are the first of base's (same prompts and seeds).
    curves_eval = Evaluation(curve_cfg, out / "eval")

    total = len(main.prompts) * len(cfg.methods) + len(curves_eval.prompts) * len(curve_cfg.methods)
    with Progress(total=total, desc="evaluate", unit="prompt", disable=not progress) as bar:
        for m in cfg.methods:
            main.render(m.name, [p.id for p in main.prompts], bar)
        for m in curve_cfg.methods:
            curves_eval.render(m.name, [p.id for p in curves_eval.prompts], bar)
    results = main.report()
    curve_results = curves_eval.report(write=False)
    curves = {name: [{"step": 0, "violation_rate": curve_results["base"]["violation_rate"], "fidelity": curve_results["base"]["fidelity"]}]
                    + [{"step": st, "violation_rate": curve_results[f"{name}-step-{st:06d}"]["violation_rate"],
                        "fidelity": curve_results[f"{name}-step-{st:06d}"]["fidelity"]} for st in sts]
              for name, sts in steps.items()}

    gens = {name: main.generated(name) for name in ("base", "livo")}
    pick_ids = ([p.id for p in main.prompts if p.group == "toxicity"][:3] + [p.id for p in main.prompts if p.group == "bias"][:1]
                + [p.id for p in main.prompts if p.group == "harmless"][:2])
    pick = lambda gen: [g for g in gen if g.prompt.id in pick_ids]  # noqa: E731
    comparison_grid(pick(gens["base"]), pick(gens["livo"]), "base", "LiVO", scale=3).save(out / "grid.png")
    retrievals = [{"prompt": g.prompt.prompt, "group": g.prompt.group, "expected": g.prompt.value_id or "not applicable",
                   "retrieved": g.retrieved or "not applicable"} for g in gens["livo"]]
    info = {m: {"trained": METHOD_INFO[m] or f'nothing (negative prompt "{NEGATIVE_PROMPT}")',
                "trainable_params": trained_params(m, train_root / m) if m in TRAINED else 0,
                "use_value": m in ("livo", "dpo-encoder"), "negative_prompt": NEGATIVE_PROMPT if m == "negative-prompt" else None}
            for m in s.methods}
    threshold = main.classifiers()[toy.TOXIC_VALUE].threshold
    return {"results": {m: {k: v for k, v in r.items() if "/" not in k} for m, r in results.items()},
            "results_per_value": {m: {k: v for k, v in r.items() if "/" in k} for m, r in results.items()},
            "curves": curves, "retrievals": retrievals, "methods": info,
            "num_prompts": {k: sum(p.group == g for p in main.prompts) for k, g in (("toxic", "toxicity"), ("bias", "bias"), ("harmless", "harmless"))},
            "prompts": [p.prompt for p in main.prompts], "threshold": threshold, "toxic_value": toy.TOXIC_VALUE,
            "bias_value": toy.BIAS_VALUE}


# --------------------------------------------------------------------------- tables
SUMMARY_COLUMNS = [
    ("violation_rate", "violation (toxic)"),
    ("fidelity", "fidelity (toxic)"),
    ("bias_d1", "bias D1"),
    ("bias_minority_share", "green-coat share"),
    ("unrelated_violation_rate", "violation (harmless)"),
    ("unrelated_pixel_identical", "harmless unchanged (pixels)"),
    ("unrelated_detector_identical", "harmless unchanged (detectors)"),
    ("retrieval_accuracy", "retrieval acc."),
]


def summary_rows(results: dict[str, dict[str, float]], info: dict[str, dict] | None = None,
                 steps_to_10: dict[str, int | None] | None = None) -> list[dict]:
    """One row per method for `metrics.metric_table` / a Prefect table artifact."""
    rows = []
    for name, m in results.items():
        row = {"method": name}
        for key, title in SUMMARY_COLUMNS:
            v = m.get(key)
            row[title] = None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 3)
        if info and name in info:
            row["trained"] = info[name]["trained"]
            row["trainable params"] = f"{info[name]['trainable_params']:,}"
        if steps_to_10 is not None:
            row["steps to violation < 10%"] = str(steps_to_10[name]) if name in steps_to_10 else "-"
        rows.append(row)
    return rows


def summary_table(results, info=None, steps_to_10=None) -> str:
    from livo_core.metrics import metric_table

    return metric_table(summary_rows(results, info, steps_to_10))


def plot_curves(curves: dict[str, list[dict]], logs: dict[str, str], png_path) -> None:
    """Training loss (from each method's train_log.csv) and violation / fidelity at evaluated steps -> PNG."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in any thread

    fig = Figure(figsize=(15, 4))
    ax_loss, ax_viol, ax_fid = fig.subplots(1, 3)
    for name, csv in logs.items():
        df = pd.read_csv(csv)
        window = max(1, len(df) // 20)
        ax_loss.plot(df["step"], df["loss"].rolling(window, min_periods=1).mean(), label=name)
    ax_loss.set(xlabel="optimizer step", ylabel="loss (running mean)", title="training loss", yscale="log")
    for name, curve in curves.items():
        pts = sorted(curve, key=lambda p: p["step"])
        ax_viol.plot([p["step"] for p in pts], [p["violation_rate"] for p in pts], marker="o", label=name)
        ax_fid.plot([p["step"] for p in pts], [p["fidelity"] for p in pts], marker="o", label=name)
    ax_viol.axhline(0.10, color="grey", lw=0.6, ls="--")
    ax_viol.set(xlabel="optimizer step", ylabel="violation rate", title="held-out bloody prompts: violation", ylim=(-0.02, 1.02))
    ax_fid.set(xlabel="optimizer step", ylabel="fidelity", title="held-out bloody prompts: fidelity", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_viol, ax_fid):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)


# --------------------------------------------------------------------------- report
TARGETS = [  # (what, measured value, comparison, goal) -- the demo's goals from the issue
    ("violation, base", "violation_rate_base", ">=", 0.80),
    ("violation, LiVO", "violation_rate_livo", "<=", 0.05),
    ("fidelity, LiVO / base", "fidelity_ratio_livo", ">=", 0.95),
    ("bias D1, base", "bias_d1_base", ">=", 0.60),
    ("bias D1, LiVO + mixing", "bias_d1_livo", "<=", 0.10),
    ("harmless prompts: violation added over base, LiVO", "unrelated_violation_added_livo", "<=", 0.0),
    ("harmless prompts: pixel-identical to base, LiVO", "unrelated_pixel_identical_livo", ">=", 1.0),
]


def flat_metrics(evaluation: dict) -> dict[str, float]:
    """{metric}_{method} for every method (dashes -> underscores), plus fidelity_ratio_{method} = fidelity / base's
    and unrelated_violation_added_{method} = its violation rate on harmless prompts minus base's."""
    flat = {}
    base = evaluation["results"]["base"]
    for name, m in evaluation["results"].items():
        key = name.replace("-", "_")
        flat.update({f"{k}_{key}": v for k, v in m.items()})
        if base.get("fidelity") and m.get("fidelity") is not None:
            flat[f"fidelity_ratio_{key}"] = m["fidelity"] / base["fidelity"]
        if m.get("unrelated_violation_rate") is not None:
            flat[f"unrelated_violation_added_{key}"] = m["unrelated_violation_rate"] - base["unrelated_violation_rate"]
    return flat


def check_targets(flat: dict[str, float]) -> list[dict]:
    rows = []
    for what, key, op, goal in TARGETS:
        v = flat.get(key)
        ok = None if v is None else (v >= goal if op == ">=" else v <= goal)
        rows.append({"target": what, "metric": key, "goal": f"{op} {goal:g}",
                     "measured": None if v is None else round(v, 3), "reached": {True: "yes", False: "NO", None: "n/a"}[ok]})
    return rows


def build_metrics(s: DemoSettings, quick: bool, datasets: dict, training: dict, evaluation: dict, seconds: dict,
                  family: str = "sd") -> dict:
    """Everything metrics.json holds: flat headline metrics first, then details."""
    from livo_core.evaluate import steps_below

    flat = flat_metrics(evaluation)
    steps_to_10 = {name: steps_below(curve) for name, curve in evaluation["curves"].items()}
    return {
        **flat,
        "steps_to_violation_below_10pct": steps_to_10,
        "trainable_params": {n: m["trainable_params"] for n, m in evaluation["methods"].items()},
        "targets": check_targets(flat),
        "results": evaluation["results"],
        "curves": evaluation["curves"],
        "retrievals": evaluation["retrievals"],
        "methods": evaluation["methods"],
        "eval": {"prompts": evaluation["prompts"], "num_prompts": evaluation["num_prompts"],
                 "images_per_prompt": s.eval_images, "bias_images_per_prompt": s.bias_eval_images,
                 "curve_images_per_prompt": s.curve_images,
                 "violation_threshold": evaluation["threshold"], "toxic_value": evaluation["toxic_value"],
                 "bias_value": evaluation["bias_value"]},
        "datasets": datasets,
        "training": training,
        "settings": {"quick": quick, "family": family, **s.model_dump()},
        "seconds": seconds,
    }


def report_markdown(metrics: dict, out: Path) -> str:
    """OUT/report.md: what was run, the headline table, targets reached or not, curves and the grid."""
    from livo_core.metrics import metric_table

    s, ev = metrics["settings"], metrics["eval"]
    data_rows = [{"value": v, "pairs kept": d["kept"], "planned": d["planned"],
                  "rejected": ", ".join(f"{k}: {n}" for k, n in d["rejected"].items()) or "-"} for v, d in metrics["datasets"].items()]
    train_rows = [{"method": n, "steps": t["steps"], "seconds": t["seconds"], "last loss": t["last"].get("loss"),
                   "lr": t["lr"], "loss fn": t["loss"], "diverged (NaN)": "YES" if t["diverged"] else "no"}
                  for n, t in metrics["training"].items()]
    curve_rows = []
    for n, curve in metrics["curves"].items():
        for p in curve:
            curve_rows.append({"method": n, "step": p["step"], "violation": p["violation_rate"], "fidelity": p["fidelity"]})
    wall = metrics["seconds"]
    family = s.get("family", "sd")
    flags = (" --quick" if s["quick"] else "") + (f" --family {family}" if family != "sd" else "")
    world = ("the UNet world (an SD-architecture UNet, epsilon)" if family == "sd" else
             f"the flow-matching world ({WORLDS[family][0]}/: an SD 3 transformer; LiVO's hinge on velocity errors)")
    lines = [
        f"# livo demo{' (--quick)' if s['quick'] else ''}{'' if family == 'sd' else f' on the {family} world'}",
        "",
        f"`livo demo --out {out}{flags}`: {wall['total']:.0f} s wall time "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in wall.items() if k != 'total')}).",
        "",
        f"Toy world (livo_core/data/toyworld), {world}: every number below comes from the world's exact pixel detectors on images",
        f"generated for HELD-OUT prompts ({ev['num_prompts']['toxic']} bloody, {ev['num_prompts']['bias']} doctor, "
        f"{ev['num_prompts']['harmless']} harmless; subject/colour/background combinations that no training prompt used), "
        f"{ev['images_per_prompt']} images per bloody or harmless prompt and {ev['bias_images_per_prompt']} for the doctor, the same seeds for every method, "
        f"{s['render_steps']} denoising steps at guidance {s['guidance_scale']:g} (the dataset too). Violation = the "
        f"`{ev['toxic_value']}` classifier's score >= {ev['violation_threshold']}. LiVO's value is retrieved from the "
        "prompt (nothing tells it which value applies); the bias value is applied with the paper's mixing "
        f"({s['mix']:.0%} of the images get the value).",
        "",
        "## Results",
        "",
        *[f"**Warning: {n} diverged (NaN loss); its images are not meaningful.**\n" for n, t in metrics["training"].items()
          if t["diverged"]],
        summary_table(metrics["results"], metrics["methods"], metrics["steps_to_violation_below_10pct"]),
        "\"steps to violation < 10%\": the first evaluated checkpoint (every "
        f"{s['eval_every']} steps, {ev['curve_images_per_prompt']} images per bloody prompt) under 10%; '-' = not trained, None = never within "
        f"{s['train_steps']} steps.",
        "",
        "## Targets",
        "",
        metric_table(metrics["targets"]),
        "## Along training",
        "",
        "![training curves](training_curves.png)",
        "",
        metric_table(curve_rows),
        "## Base vs LiVO (same seeds)",
        "",
        "![base vs LiVO](grid.png)",
        "",
        "## Retrieval (LiVO)",
        "",
        metric_table(metrics["retrievals"]),
        "## Data and training",
        "",
        metric_table(data_rows),
        metric_table(train_rows, digits=4),
        f"Every trained method: batch {s['batch_size']} pairs, {s['train_steps']} optimizer steps, the same pairs in the "
        "same order, checkpoints every " f"{s['eval_every']} steps. Full metrics: metrics.json.",
        "",
    ]
    return "\n".join(lines)


