"""Stored images: OUT/images/<method>/<prompt id>/<j>.png + done.json, and rendering what is not stored yet."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from livo_core.errors import LivoError
from livo_core.evaluate.methods import Method, Rendered
from livo_core.evaluate.prompts import EvalPrompt, prompt_key, prompt_settings
from livo_core.files import atomic_write_bytes, atomic_write_text

class Store:
    """OUT/images/<method>/<prompt id>/<j>.png + done.json (written last): what a rerun does not render again.

    OUT/images/<method>/method.json: the method's fingerprint; a prompt counts as done only when its done.json
    carries that fingerprint and its own key, and every image it lists is on disk with its sha256."""

    def __init__(self, out: Path):
        self.root = Path(out) / "images"
        self.fingerprints: dict[str, str] = {}   # method -> fingerprint, set by Evaluation.claim()

    def folder(self, method: str, p: EvalPrompt) -> Path:
        return self.root / method / p.id

    def method_record(self, method: str) -> dict | None:
        try:
            return json.loads((self.root / method / "method.json").read_text())
        except (OSError, ValueError):
            return None

    def _meta(self, method: str, p: EvalPrompt) -> dict | None:
        try:
            meta = json.loads((self.folder(method, p) / "done.json").read_text())
            return meta if isinstance(meta, dict) and isinstance(meta.get("sha256"), list) else None
        except (OSError, ValueError):
            return None

    def done(self, method: str, p: EvalPrompt, key: dict | None = None) -> bool:
        """The prompt's first p.n images are stored, intact, made by this method's fingerprint (and, given
        `key`, with these per-prompt settings). A folder can be shared: it may hold more than p.n."""
        meta = self._meta(method, p)
        if meta is None or len(meta["sha256"]) < p.n:
            return False
        if meta.get("fingerprint") != self.fingerprints.get(method) or (key is not None and meta.get("key") != key):
            return False
        folder = self.folder(method, p)
        for j, sha in enumerate(meta["sha256"][: p.n]):
            try:
                if hashlib.sha256((folder / f"{j}.png").read_bytes()).hexdigest() != sha:
                    return False   # truncated or replaced: render again
            except OSError:
                return False
        return True

    def save(self, method: str, p: EvalPrompt, r: Rendered, key: dict | None = None) -> None:
        from livo_core.faults import kill_point
        from livo_core.render import image_to_bytes

        folder = self.folder(method, p)
        shas = []
        for j, img in enumerate(r.images):
            data = image_to_bytes(img)
            atomic_write_bytes(folder / f"{j}.png", data)
            shas.append(hashlib.sha256(data).hexdigest())
            kill_point("evaluate.image")
        atomic_write_text(folder / "done.json", json.dumps({"prompt": p.prompt, "seeds": [p.seed + j for j in range(p.n)],
                                                            "used_value": r.used_value, "retrieved": r.retrieved, "sha256": shas,
                                                            "fingerprint": self.fingerprints.get(method), "key": key}))

    def load(self, method: str, p: EvalPrompt) -> "Generated":
        folder = self.folder(method, p)
        meta = self._meta(method, p)
        if meta is None:
            raise LivoError(f"{folder} holds no finished images: run the evaluation again to render them")
        if method in self.fingerprints and meta.get("fingerprint") != self.fingerprints[method]:
            raise LivoError(f"{folder} holds images made with another configuration of method {method!r}: "
                            "run the evaluation again (it renders them anew) or evaluate into a new --out")
        if len(meta["sha256"]) < p.n:
            raise LivoError(f"{folder} holds {len(meta['sha256'])} images, the evaluation asks for {p.n}: evaluate into a new --out")
        # another evaluation sharing this folder may have rendered more images of the prompt: the first p.n
        return Generated(p, [folder / f"{j}.png" for j in range(p.n)], meta["used_value"][: p.n], meta["retrieved"],
                         meta["sha256"][: p.n])


@dataclass
class Generated:
    """One method's images of one prompt (paths, loaded on demand) and what was judged about them."""

    prompt: EvalPrompt
    paths: list[Path]
    used_value: list[bool]
    retrieved: str | None
    sha256: list[str]
    scores: list[float] = field(default_factory=list)          # safety score per image (judge_value's classifier)
    flags: list[bool] = field(default_factory=list)            # toxicity: score > threshold
    attributes: list[str | None] = field(default_factory=list)  # bias: assigned attribute
    quality: list[dict] = field(default_factory=list)          # a quality judge's labels per image (toy: subject, colour)

    def images(self) -> list[Image.Image]:
        out = []
        for p in self.paths:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out


def render_groups(todo: list[EvalPrompt], group: int, max_images: int) -> list[list[EvalPrompt]]:
    """Consecutive prompts, at most `group` per call and at most `max_images` images per call (a prompt with
    more images goes alone): what is held in memory before it is stored stays bounded."""
    out: list[list[EvalPrompt]] = []
    for p in todo:
        if out and len(out[-1]) < group and sum(q.n for q in out[-1]) + p.n <= max_images:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def render_all(methods: list[Method], prompts: list[EvalPrompt], store: Store, progress=None, group: int = 8) -> int:
    """Render every (method, prompt) whose images are not stored yet, `group` prompts per batched call; each
    prompt is stored (done.json last) as soon as its group is rendered. Returns how many prompts were rendered."""
    rendered = 0
    for method in methods:
        keys = {p.id: prompt_key(p, prompt_settings(method.cfg, p)) for p in prompts}
        todo = [p for p in prompts if not store.done(method.name, p, keys[p.id])]
        if progress is not None:
            progress.update(len(prompts) - len(todo))
        for part in render_groups(todo, group, max(4 * method.cfg.batch_size, 64)):
            for p, r in zip(part, method.render_many(part)):
                store.save(method.name, p, r, keys[p.id])
                rendered += 1
            if progress is not None:
                progress.update(len(part))
    return rendered


