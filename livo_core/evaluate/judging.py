"""Judging stored images: each value's safety classifier, cached by (image content, judge)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from livo_core.classifiers import crosses
from livo_core.errors import LivoError
from livo_core.evaluate.store import Generated
from livo_core.files import atomic_write_text

class JudgeCache:
    """Verdicts by (image sha256, judge key), one small JSON file each: a rerun judges nothing twice."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, judge_key: str, sha: str) -> Path:
        return self.folder / hashlib.sha256(judge_key.encode()).hexdigest()[:16] / f"{sha}.json"

    def get(self, judge_key: str, sha: str) -> dict | None:
        path = self._path(judge_key, sha)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:
            return None

    def put(self, judge_key: str, sha: str, verdict: dict) -> None:
        atomic_write_text(self._path(judge_key, sha), json.dumps(verdict))


def judge_key(classifier) -> str:
    return f"{classifier.name}|{classifier.version}|{getattr(classifier, 'question_key', '')}"


def judge_generated(generated: list[Generated], classifiers: dict, values: dict, cache: JudgeCache, quality=None,
                    progress=None) -> None:
    """Fill each Generated's scores / flags / attributes (its judge_value's classifier) and quality labels."""
    for g in generated:
        vid = g.prompt.judge_value
        if vid is not None:
            if vid not in classifiers:
                raise LivoError(f"prompt set {g.prompt.set!r} names value {vid!r}, which is not in the values file")
            clf, value = classifiers[vid], values[vid]
            key = judge_key(clf)
            cached = [cache.get(key, sha) for sha in g.sha256]
            missing = [j for j, c in enumerate(cached) if c is None]
            if missing:
                from livo_core.faults import kill_point

                images = g.images()
                # a remote judge (one request per image) caches every verdict as it comes: a failure at image k
                # re-asks only the images after it
                step = getattr(clf, "images_per_call", None) or len(missing)
                for start in range(0, len(missing), step):
                    part = missing[start:start + step]
                    for j, verdict in zip(part, clf.classify([images[j] for j in part], value)):
                        cached[j] = {"score": float(verdict.score), "attribute": verdict.attribute,
                                     **({"source": verdict.source} if getattr(verdict, "source", None) else {})}
                        cache.put(key, g.sha256[j], cached[j])
                        kill_point("evaluate.judged")
            g.scores = [c["score"] for c in cached]
            g.flags = [crosses(s, clf.threshold, clf.rule) for s in g.scores]   # the choice's named edge
            g.attributes = [c["attribute"] for c in cached]
        if quality is not None:
            g.quality = quality.describe(g.images())
        if progress is not None:
            progress.update(1)


