"""One evaluation: check every input, render what is missing, judge, score, report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from livo_core.classifiers import CLASSIFIERS
from livo_core.errors import LivoError
from livo_core.evaluate.config import EvalConfig, VLMJudgeConfig
from livo_core.evaluate.judging import JudgeCache, judge_generated
from livo_core.evaluate.kinds import method_class
from livo_core.evaluate.methods import Method, build_methods, check_method_list, check_methods, describe_method
from livo_core.evaluate.prompts import load_prompts, prompt_key, prompt_settings
from livo_core.evaluate.report import write_report
from livo_core.evaluate.scores import clip_scores, fid_against, method_metrics, reference_images
from livo_core.evaluate.store import Generated, Store, render_all
from livo_core.files import atomic_write_text

class Evaluation:
    """An evaluation's prompts, models, store and judges, loaded on first use (once per process).

    run():   render every missing (method, prompt), judge every image, compute metrics, write the report.
    The Prefect flow (flows/evaluation.py) calls render() / judge() per method and prompt chunk, then report().
    """

    def __init__(self, cfg: EvalConfig, out: Path | str):
        from livo_core.values import load_values

        self.cfg, self.out = cfg, Path(out)
        self.store = Store(self.out)
        self.cache = JudgeCache(self.out / "cache" / "judge")
        self.values = {v.id: v for v in load_values(cfg.values_file)}
        self.prompts = load_prompts(cfg)
        for p in self.prompts:
            for vid in (p.value_id, p.judge_value):
                if vid is not None and vid not in self.values:
                    raise LivoError(f"prompt set {p.set!r} names value {vid!r}, which is not in {cfg.values_file}: "
                                    f"choose one of {', '.join(self.values)}")
        self.by_id = {p.id: p for p in self.prompts}
        self._descriptions: dict[str, dict] | None = None
        self._methods: dict[str, Method] | None = None
        self._classifiers: dict | None = None
        self._quality = None

    # ---- what is checked before any work, and what makes stored images reusable
    def check(self, overwrite: bool = False) -> None:
        """Every input, before anything is written or rendered: methods, models (present, of matching widths),
        sampler, retriever, judges (models present, keys in the environment, one probe request to a VLM
        endpoint), and that stored images (a rerun into the same folder) were made by the same methods.
        Raises LivoError. Loads no diffusion model."""
        from livo_core.infer import SCHEDULERS

        cfg = self.cfg
        check_eval_out(self.out)
        check_method_list(cfg)
        if cfg.inference.scheduler not in SCHEDULERS:
            raise LivoError(f"unknown scheduler {cfg.inference.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        check_methods(cfg, self.values, _token_width(cfg.base_model))
        if any(method_class(m.kind).uses_value for m in cfg.methods):
            if cfg.retriever == "clip":
                _check_clip_model(cfg.clip_model, "retriever = clip")
            if cfg.retriever == "llm":
                from livo_core.llm import LLMClient

                LLMClient(cfg.llm)   # the key is in the environment (or the endpoint is local)
        self._check_judges()
        if cfg.fid_reference is not None:
            reference_images(cfg.fid_reference)   # a folder of at least 2 readable images, before any render
        descriptions = self.descriptions()
        for name, desc in descriptions.items():
            rec = self.store.method_record(name)
            if rec is not None and rec.get("fingerprint") != _fingerprint(desc) and not overwrite:
                old = rec.get("description", {})
                changed = sorted(k for k in set(old) | set(desc) if old.get(k) != desc.get(k)) or ["its configuration"]
                raise LivoError(f"{self.out} holds images of method {name!r} made with another {', '.join(changed)}: "
                                "evaluate into a new --out, or pass --overwrite to render that method again")

    def _check_judges(self) -> None:
        from livo_core.classifiers import resolve_choice

        for vid in sorted({p.judge_value for p in self.prompts if p.judge_value}):
            value, choice = self.values[vid], self.cfg.judge_choice(self.values[vid])
            name = choice.name
            if name == "vlm":
                from livo_core.llm import LLMClient

                LLMClient((choice.vlm or VLMJudgeConfig()).llm).probe()   # key present, endpoint answering
                continue
            entry = resolve_choice(value, choice)[0]   # a registered name judging this kind of value, by its protocol
            if entry.needs_clip:
                _check_clip_model(self.cfg.clip_model, f"value {vid} is judged by {name}, which")
            if entry.needs_file:
                from livo_core.protocols import load_q16_prompts

                if choice.file is None:
                    raise LivoError(f"value {vid} is judged by {name}, which needs its file: set judges.{vid}.file "
                                    "(Q16's prompts.p)")
                load_q16_prompts(choice.file)         # missing, a pickle with code, the wrong shape -> one line

    def descriptions(self) -> dict[str, dict]:
        """Per method: everything that shapes its images (the fingerprint is a hash of it)."""
        if self._descriptions is None:
            from livo_core.models import model_identity, resolve_device

            cfg = self.cfg
            base = model_identity(cfg.base_model)
            common = {"base_model": base, "device": resolve_device(cfg.device).type, "dtype": cfg.dtype,
                      "inference": cfg.inference.model_dump(mode="json", exclude={"layout", "mix"})}
            out = {}
            for m in cfg.methods:
                out[m.name] = {**common, **describe_method(m, cfg)}
            self._descriptions = out
        return self._descriptions

    def claim(self, method: str, overwrite: bool = False) -> None:
        """Record the method's fingerprint in its image folder before rendering; a folder of another
        fingerprint is emptied first when `overwrite` (check() refused it otherwise)."""
        import shutil

        desc = self.descriptions()[method]
        fp = _fingerprint(desc)
        self.store.fingerprints[method] = fp
        rec = self.store.method_record(method)
        if rec is not None and rec.get("fingerprint") == fp:
            return
        if rec is not None and overwrite:
            shutil.rmtree(self.store.root / method, ignore_errors=True)
        atomic_write_text(self.store.root / method / "method.json",
                          json.dumps({"fingerprint": fp, "description": desc}, indent=1, sort_keys=True))

    # ---- models (loaded once)
    def methods(self) -> dict[str, Method]:
        if self._methods is None:
            from livo_core.families import family_for
            from livo_core.infer import set_scheduler

            family = family_for(self.cfg.base_model)
            pipe = set_scheduler(family.load_pipeline(self.cfg.base_model, device=self.cfg.device, dtype=self.cfg.dtype),
                                 self.cfg.inference.scheduler)
            self._methods = {m.name: m for m in build_methods(self.cfg, pipe, list(self.values.values()), self._retriever(pipe))}
        return self._methods

    def _retriever(self, pipe):
        from livo_core.retrieve import ValueRetriever

        clip = llm = None
        if self.cfg.retriever == "clip":
            if not self.cfg.clip_model:
                raise LivoError("retriever = clip needs clip_model (the judge CLIP)")
            from livo_core.judge import ClipScorer

            clip = ClipScorer(self.cfg.clip_model, self.cfg.clip_pretrained, device=self.cfg.device)
        if self.cfg.retriever == "llm":
            from livo_core.llm import LLMClient

            llm = LLMClient(self.cfg.llm, self.out / "cache" / "llm")
        return ValueRetriever(list(self.values.values()), clip=clip, llm=llm)

    def classifiers(self) -> dict:
        if self._classifiers is None:
            from livo_core.judge import VLMClassifier, make_classifier

            needed = sorted({p.judge_value for p in self.prompts if p.judge_value})
            clip = None
            out = {}
            for vid in needed:
                value, choice = self.values[vid], self.cfg.judge_choice(self.values[vid])
                if choice.name == "vlm":
                    vlm = choice.vlm or VLMJudgeConfig()
                    out[vid] = VLMClassifier(vlm.llm, value, threshold=choice.threshold, question=vlm.question)
                    out[vid].rule = choice.rule
                    continue
                name = choice.name
                if CLASSIFIERS[name].needs_clip and clip is None:
                    if not self.cfg.clip_model:
                        raise LivoError(f"value {vid} is judged by {name}: set clip_model (e.g. ViT-L-14 with clip_pretrained = openai)")
                    from livo_core.judge import ClipScorer

                    clip = ClipScorer(self.cfg.clip_model, self.cfg.clip_pretrained, device=self.cfg.device)
                out[vid] = make_classifier(value, choice, clip)
            self._classifiers = out
        return self._classifiers

    def quality(self):
        if self._quality is None and self.cfg.quality == "toyworld":
            from livo_core.toyworld.evaluation import ToyFidelity

            self._quality = ToyFidelity()
        return self._quality

    # ---- the stages
    def chunks(self) -> list[list[str]]:
        ids = [p.id for p in self.prompts]
        return [ids[i:i + self.cfg.chunk_size] for i in range(0, len(ids), self.cfg.chunk_size)]

    def render(self, method: str, prompt_ids: list[str], progress=None) -> int:
        if method not in self.store.fingerprints:
            self.claim(method)
        prompts = [self.by_id[i] for i in prompt_ids]
        todo = [p for p in prompts if not self.store.done(method, p, prompt_key(p, prompt_settings(self.cfg, p)))]
        if progress is not None:
            progress.update(len(prompts) - len(todo))
        if not todo:   # every image stored: no model is loaded
            return 0
        return render_all([self.methods()[method]], todo, self.store, progress, group=self.cfg.chunk_size)

    def generated(self, method: str, prompt_ids: list[str] | None = None, progress=None) -> list[Generated]:
        """The stored images of a method, judged (from the judge cache, or now)."""
        if method not in self.store.fingerprints:
            self.store.fingerprints[method] = _fingerprint(self.descriptions()[method])
        prompts = [self.by_id[i] for i in prompt_ids] if prompt_ids else self.prompts
        gens = [self.store.load(method, p) for p in prompts]
        judge_generated(gens, self.classifiers(), self.values, self.cache, self.quality(), progress)
        return gens

    def report(self, write: bool = True) -> dict:
        """Metrics of every method (metrics.json), report.md, per_prompt.csv, grids; returns the metrics.

        write=False only computes (an evaluation that shares another's folder, e.g. the demo's curves)."""
        names = [m.name for m in self.cfg.methods]
        gens = {name: self.generated(name) for name in names}
        base = gens[names[0]]
        results = {name: method_metrics(g, self.values, self.cfg.toxicity_k, base=base, quality=self.quality(),
                                        short_group=self.cfg.prob_short_group)
                   for name, g in gens.items()}
        if self.cfg.clip_score_model:
            from livo_core.judge import make_clip_scorer

            scorer = make_clip_scorer(self.cfg.clip_score_model, device=self.cfg.device)
            for name, g in gens.items():
                results[name]["clip_score"] = clip_scores(g, scorer)
        if self.cfg.fid and len(names) > 1:
            from livo_core.metrics import inception_extractor

            extractor = self.fid_extractor or inception_extractor(self.cfg.fid_weights)
            for name in names[1:]:
                results[name]["fid"] = fid_against(gens[name], base, extractor)
        if self.cfg.fid_reference is not None:   # against real images (COCO), every method including base
            from livo_core.metrics import fid_from_features, image_features, inception_extractor

            extractor = self.fid_extractor or inception_extractor(self.cfg.fid_weights)
            real = image_features(reference_images(self.cfg.fid_reference), extractor)
            for name, g in gens.items():
                results[name]["fid_real"] = fid_from_features(image_features([im for x in g for im in x.images()], extractor), real)
        if write:
            judges = {vid: {"name": c.name, "version": c.version, "threshold": float(c.threshold), "rule": c.rule}
                      for vid, c in self.classifiers().items()}
            write_report(self.out, self.cfg, results, gens, judges)
        return results

    fid_extractor = None   # tests set a small feature extractor (no Inception download)

    def run(self, progress: bool = True) -> dict:
        from livo_core.progress import Progress

        with Progress(total=len(self.prompts) * len(self.cfg.methods), desc="evaluate: render", unit="prompt",
                      disable=not progress) as bar:
            for m in self.cfg.methods:
                self.render(m.name, [p.id for p in self.prompts], bar)
        return self.report()


def _fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def check_eval_out(out: Path) -> None:
    """--out must be new, empty, or an earlier evaluation's folder (never a dataset run or a training output)."""
    from livo_core.files import check_writable

    check_writable(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not ((out / "eval_config.json").is_file() or (out / "images").is_dir()):
        what = ("a dataset run" if (out / "shards").is_dir() else "a training output" if (out / "value_encoder").is_dir()
                else "other files")
        raise LivoError(f"--out {out} holds {what}, not an evaluation: evaluate into a new folder")


def _token_width(base_model: str) -> int | None:
    """The width of the tokens base_model's denoiser reads (None: not known before loading)."""
    from livo_core.families import family_for
    from livo_core.models import model_folder

    folder = model_folder(base_model)
    return family_for(base_model).folder_token_width(folder) if folder else None


def _check_clip_model(name: str | None, who: str) -> None:
    if not name:
        raise LivoError(f"{who} needs clip_model: set clip_model (e.g. ViT-L-14 with clip_pretrained = openai, or local-dir:<folder>)")
    if name.startswith("local-dir:"):
        from livo_core.judge import check_local_clip_dir

        check_local_clip_dir(name, "clip_model")
