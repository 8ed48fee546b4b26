"""`livo retrieve` and `livo generate`: plain functions (no Prefect flow), the app layer over
`livo_core.retrieve` and `livo_core.infer`.

Both read the run config (--config / --set / direct flags): `values_file` and `values` choose the value
principles, `judge.clip_model` is the CLIP model of the retriever's similarity step, `llm` the endpoint
of `--use-llm`, and `render` the sampling settings of `generate`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from livo_core.errors import LivoError


def llm_cache_dir() -> Path:
    """LLM answers of interactive commands are cached here (same place as the offline tokenizer)."""
    return Path(os.environ.get("LIVO_CACHE", Path.home() / ".cache" / "livo")) / "llm"


def build_retriever(cfg, values, use_clip: bool = True, use_llm: bool = False, min_similarity: float | None = None):
    """The retriever the CLI uses: keywords, then the configured CLIP model (unless --no-clip), then the LLM."""
    from livo_core.retrieve import ValueRetriever

    clip = None
    if use_clip:
        from livo_core.judge import ClipScorer

        clip = ClipScorer(cfg.judge.clip_model, cfg.judge.clip_pretrained, device=cfg.device)
    llm = None
    if use_llm:
        from livo_core.llm import LLMClient

        llm = LLMClient(cfg.llm, llm_cache_dir())
    kw = {} if min_similarity is None else {"min_similarity": min_similarity}
    return ValueRetriever(values, clip=clip, llm=llm, **kw)


def _config_and_values(args: argparse.Namespace):
    from flows.args import config_from_args
    from livo_core.values import load_values

    cfg = config_from_args(args)
    if getattr(args, "values_file", None):
        cfg = cfg.model_copy(update={"values_file": Path(args.values_file)})
    return cfg, load_values(cfg.values_file, cfg.values)


def cli_retrieve(args: argparse.Namespace) -> int:
    """Print the value id (or "not applicable") on the first line, then how it was chosen."""
    cfg, values = _config_and_values(args)
    retriever = build_retriever(cfg, values, use_clip=not args.no_clip, use_llm=args.use_llm,
                                min_similarity=args.min_similarity)
    found = retriever(args.prompt)
    print(found.value_id or "not applicable")
    print(f"reason: {found.reason} [{found.method}]")
    return 0


def cli_generate(args: argparse.Namespace) -> int:
    """Generate images with the value encoder; write one PNG (a grid when --num-images > 1)."""
    from livo_core.infer import image_grid, load_livo_pipeline

    from livo_core.encoder import ValueEncoder
    from livo_core.files import check_writable
    from livo_core.families import check_encoder_fits, family_for
    from livo_core.models import resolve_device

    cfg, values = _config_and_values(args)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise LivoError(f"--out {out}: give an image file name ending in .png")
    from livo_core.config import MAX_SEED

    if not 1 <= args.num_images <= 1000:
        raise LivoError(f"--num-images must be 1 to 1000, got {args.num_images}")
    if not 0 <= args.seed <= MAX_SEED - args.num_images:
        raise LivoError(f"--seed {args.seed} is out of range: give 0 to {MAX_SEED - args.num_images} (image j uses seed + j)")
    from livo_core.infer import SCHEDULERS

    if args.scheduler not in SCHEDULERS:
        raise LivoError(f"unknown --scheduler {args.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    # Everything checkable before minutes of rendering: the output, the device, the models.
    check_writable(out, "--out", file=True)
    resolve_device(cfg.device)
    family_for(cfg.base_model)
    check_encoder_fits(args.encoder, cfg.base_model)   # another family or width: one line before any weights load
    encoder = ValueEncoder.from_pretrained(args.encoder)
    retriever = None
    if args.value is None:   # the retriever only runs when no value is given
        retriever = build_retriever(cfg, values, use_clip=not args.no_clip, min_similarity=args.min_similarity)
    pipe = load_livo_pipeline(cfg.base_model, encoder, cfg.values_file, device=cfg.device, dtype=cfg.dtype,
                              value_ids=cfg.values or None, retriever=retriever,
                              mix=0.5 if args.mix is None else args.mix, layout=args.layout, scheduler=args.scheduler)
    r = cfg.render
    result = pipe(args.prompt, value_id=args.value, num_images=args.num_images, seed=args.seed, steps=r.steps,
                  guidance_scale=r.guidance_scale, negative_prompt=r.negative_prompt, height=r.height, width=r.width)

    out.parent.mkdir(parents=True, exist_ok=True)
    (image_grid(result.images) if len(result.images) > 1 else result.images[0]).save(out)
    used = sum(result.used_value_mask)
    if result.value is None:
        print(f"value: not applicable ({result.retrieval.reason}); plain Stable Diffusion on all {len(result.images)} images")
    else:
        print(f"value: {result.value.id} on {used}/{len(result.images)} images "
              f"({result.retrieval.method}: {result.retrieval.reason})")
    print(f"wrote {out} ({len(result.images)} image(s), seeds {result.seeds[0]}..{result.seeds[-1]})")
    return 0
