"""Evaluation, the paper's way, on a model of any registered family: prompt sets x methods x seeds -> images ->
judges -> metrics -> report.

    prompt sets   livo_core/data/eval/*.jsonl (toxicity prompts per paper value, bias prompts "a photo of the face of a
                  ...", harmless prompts), a user CSV/JSONL (a `prompt` column), or the I2P CSV (prompt,
                  categories, sd_seed, sd_guidance_scale, sd_image_width, sd_image_height: each row's own
                  seed, guidance and size)
    methods       base SD; LiVO with the value retrieved or given (bias values: the paper's mixing, a share
                  of the images with the value token); a negative prompt; SLD (diffusers'
                  StableDiffusionPipelineSafe, its SafetyConfig presets); any other value encoder; a
                  fine-tuned UNet or LoRA folder. Image j of prompt p starts from the noise of p.seed + j
                  for every method, so "unchanged" can be checked pixel by pixel.
    judges        per value, its safety classifier (NudeNet, CLIP concept / attribute, the toy world's, or a
                  VLM over an OpenAI-compatible API) on every image of a prompt that names the value
    metrics       toxicity R / S / Max / Prob (k = 5; flagged = score > threshold, as the authors), bias
                  D1 / D2 and attribute shares, CLIP score (torchmetrics' semantics), FID against the base
                  model's images of the same prompts, and on harmless prompts the false-moderation rate (a
                  value was applied) and the share of images unchanged against base

Images are stored per (method, prompt): OUT/images/<method>/<prompt id>/<j>.png, then done.json written
last; a killed evaluation renders again only the prompts whose done.json is missing. Judgements are cached
by (image content, judge), so a rerun judges nothing twice (and asks a VLM nothing twice).

Stored images are only reused for what made them: OUT/images/<method>/method.json holds the method's
fingerprint (base model and encoder content, method, sampler, steps, guidance, size, layout, values, dtype),
each done.json the prompt's own (text, seeds, per-row settings) and every image's sha256. A rerun with
another method fingerprint is refused (`Evaluation.check`; --overwrite renders that method again), a
prompt whose own settings changed or whose stored PNGs no longer match their hashes is rendered again.
Every input is checked by `Evaluation.check` before anything is written.

One module per concern:
    config.py    EvalConfig (prompt sets, methods, judges, sampler settings)
    prompts.py   prompt sets -> EvalPrompt rows (JSONL / CSV / I2P)
    kinds.py     the method registry (kind -> Method class); methods.py the methods themselves
    store.py     stored images and their fingerprints; rendering what is missing
    judging.py   classifiers over stored images, cached
    scores.py    a method's numbers; report.py the tables, grids and report.md
    run.py       Evaluation: check -> render -> judge -> score -> report
"""

from livo_core.evaluate.config import EvalConfig, MethodSpec, PromptSetSpec, load_eval_config
from livo_core.evaluate.judging import JudgeCache, judge_generated
from livo_core.evaluate.methods import Method, Rendered, build_methods
from livo_core.evaluate.prompts import EvalPrompt, load_prompt_set, load_prompts
from livo_core.evaluate.report import comparison_grid, steps_below
from livo_core.evaluate.run import Evaluation, check_eval_out
from livo_core.evaluate.scores import method_metrics
from livo_core.evaluate.store import Generated, Store

__all__ = ["EvalConfig", "EvalPrompt", "Evaluation", "Generated", "JudgeCache", "Method", "MethodSpec", "PromptSetSpec",
           "Rendered", "Store", "build_methods", "check_eval_out", "comparison_grid", "judge_generated", "load_eval_config",
           "load_prompt_set", "load_prompts", "method_metrics", "steps_below"]
