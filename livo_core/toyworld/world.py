"""The toy world: procedural 32x32 scenes and their captions, rendered deterministically.

The spec (colours, shapes, priors, held-out combinations) lives in `livo_core/data/toyworld/world.yaml`; this
module parses captions of the world's one grammar, fills in what a caption leaves out from the world's
priors (that is where the bias lives: "a doctor" wears a white coat 90% of the time), and draws the
scene with numpy. The same (caption, seed) always gives the same image.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from livo_core.errors import LivoError
from livo_core.paths import TOYWORLD_DIR

RGB = tuple[int, int, int]


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so lru_cache can key on it
class World:
    """`world.yaml`, read once."""

    size: int
    palette: dict[str, RGB]            # subject colours
    shapes: tuple[str, ...]
    backgrounds: dict[str, RGB]        # plain dark backgrounds
    two_tone: str                      # name of the split background
    head: RGB
    coats: dict[str, RGB]              # doctor's coat colour = the bias attribute
    coat_prior: dict[str, float]
    splatter: RGB
    splatter_discs: tuple[int, int]
    splatter_radius: tuple[float, float]
    captions: dict[str, float]         # caption sampling probabilities
    held_out_subjects: tuple[str, ...]
    held_out_backgrounds: tuple[str, ...]

    @property
    def background_names(self) -> list[str]:
        return [*self.backgrounds, self.two_tone]

    def training_subjects(self) -> list[str]:
        """'<colour> <shape>' combinations that training prompts may use (the rest are held out)."""
        return [f"{c} {s}" for c in self.palette for s in self.shapes if f"{c} {s}" not in self.held_out_subjects]

    def training_backgrounds(self) -> list[str]:
        return [b for b in self.background_names if b not in self.held_out_backgrounds]


@lru_cache(maxsize=4)
def load_world(path: Path | str = TOYWORLD_DIR / "world.yaml") -> World:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    rgb = lambda d: {k: tuple(v) for k, v in d.items()}  # noqa: E731
    doc = raw["doctor"]
    return World(
        size=raw["image_size"],
        palette=rgb(raw["palette"]),
        shapes=tuple(raw["shapes"]),
        backgrounds=rgb(raw["backgrounds"]),
        two_tone=raw["two_tone"],
        head=tuple(doc["head"]),
        coats=rgb(doc["coats"]),
        coat_prior=dict(doc["coat_prior"]),
        splatter=tuple(raw["splatter"]["colour"]),
        splatter_discs=tuple(raw["splatter"]["discs"]),
        splatter_radius=tuple(raw["splatter"]["radius"]),
        captions=dict(raw["captions"]),
        held_out_subjects=tuple(raw["held_out"]["subjects"]),
        held_out_backgrounds=tuple(raw["held_out"]["backgrounds"]),
    )


# --------------------------------------------------------------------------- captions <-> scenes
@dataclass(frozen=True)
class Scene:
    """What a scene shows. None = not said by the caption (filled from the priors by `complete`)."""

    subject: str                    # "circle" | "square" | "triangle" | "doctor"
    colour: str | None = None       # shapes: a palette colour
    coat: str | None = None         # doctor: the coat colour (bias attribute)
    bloody: bool = False
    background: str | None = None   # a background name or "two-tone"


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


@lru_cache(maxsize=4)
def _caption_regex(world: World) -> re.Pattern:
    bg = rf"(?: on a (?P<background>{_alternatives(world.background_names)}) background)?"
    shape = rf"(?:(?P<colour>{_alternatives(world.palette)}) )?(?P<shape>{_alternatives(world.shapes)})"
    doctor = rf"(?P<doctor>doctor)(?: in a (?P<coat>{_alternatives(world.coats)}) coat)?"
    return re.compile(rf"a (?P<bloody>bloody )?(?:{shape}|{doctor}){bg}")


def parse_caption(caption: str, world: World | None = None) -> Scene:
    """'a bloody blue circle on a navy background' -> Scene(circle, blue, None, True, navy)."""
    world = world or load_world()
    m = _caption_regex(world).fullmatch(" ".join(caption.lower().split()))
    if m is None:
        raise LivoError(
            f"caption {caption!r} is not in the toy world's grammar: write e.g. 'a bloody blue circle on a navy "
            "background' or 'a doctor in a green coat' (see livo_core/data/toyworld/world.yaml)")
    return Scene(
        subject="doctor" if m["doctor"] else m["shape"],
        colour=m["colour"],
        coat=m["coat"],
        bloody=bool(m["bloody"]),
        background=m["background"],
    )


def caption_of(scene: Scene) -> str:
    """The caption that names exactly what `scene` names."""
    words = ["a"] + (["bloody"] if scene.bloody else [])
    if scene.subject == "doctor":
        words.append("doctor" + (f" in a {scene.coat} coat" if scene.coat else ""))
    else:
        words.append(f"{scene.colour} {scene.subject}" if scene.colour else scene.subject)
    if scene.background:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def complete(scene: Scene, rng: np.random.Generator, world: World | None = None) -> Scene:
    """Fill what the caption left out from the world's priors: uniform colours/backgrounds, biased coats."""
    world = world or load_world()
    colour, coat = scene.colour, scene.coat
    if scene.subject != "doctor" and colour is None:
        colour = str(rng.choice(list(world.palette)))
    if scene.subject == "doctor" and coat is None:
        names = list(world.coat_prior)
        coat = names[int(rng.choice(len(names), p=[world.coat_prior[n] for n in names]))]
    background = scene.background or str(rng.choice(world.background_names))
    return replace(scene, colour=colour, coat=coat, background=background)


def sample_caption(rng: np.random.Generator, world: World | None = None) -> str:
    """One training caption, drawn with the probabilities of world.yaml `captions`."""
    world = world or load_world()
    p = world.captions
    bloody = bool(rng.random() < p["bloody"])
    background = str(rng.choice(world.background_names)) if rng.random() < p["name_background"] else None
    if rng.random() < p["doctor"]:
        coat = str(rng.choice(list(world.coats))) if rng.random() < p["name_coat"] else None
        scene = Scene("doctor", coat=coat, bloody=bloody, background=background)
    else:
        colour = str(rng.choice(list(world.palette))) if rng.random() < p["name_colour"] else None
        scene = Scene(str(rng.choice(world.shapes)), colour=colour, bloody=bloody, background=background)
    return caption_of(scene)


# --------------------------------------------------------------------------- drawing
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    # Pixel centres, so shapes are symmetric around fractional centres.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return yy, xx


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a circle / square / upward triangle of 'radius' r centred at (cx, cy)."""
    yy, xx = _grid(size)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = 0.85 * r  # about the circle's area, so size does not give the shape away
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    if shape == "triangle":
        top, bottom = cy - r, cy + r
        t = (yy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= 1.15 * r * t)  # base 2.3 r: area near the others
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, rng: np.random.Generator, world: World) -> np.ndarray:
    s = world.size
    img = np.empty((s, s, 3), np.uint8)
    if scene.background == world.two_tone:
        a, b = rng.choice(list(world.backgrounds), size=2, replace=False)
        cut = int(rng.integers(s // 3, 2 * s // 3 + 1))
        img[:] = world.backgrounds[str(a)]
        if rng.random() < 0.5:
            img[cut:] = world.backgrounds[str(b)]     # top / bottom
        else:
            img[:, cut:] = world.backgrounds[str(b)]  # left / right
    else:
        img[:] = world.backgrounds[scene.background]
    return img


def _doctor(img: np.ndarray, scene: Scene, rng: np.random.Generator, world: World) -> np.ndarray:
    """Draw a tan head over a trapezoid coat reaching the bottom edge; return the coat's mask."""
    s = world.size
    yy, xx = _grid(s)
    k = rng.uniform(0.9, 1.1)                       # figure scale
    cx = rng.uniform(12.0, 20.0)
    head_r = 4.0 * k
    head_cy = head_r + rng.uniform(2.5, 4.5)
    head = (xx - cx) ** 2 + (yy - head_cy) ** 2 <= head_r ** 2
    top = head_cy + head_r + 1.0                     # a one-pixel neck gap keeps head and coat apart
    t = np.clip((yy - top) / (s - top), 0, 1)
    half_width = k * (6.0 + 3.0 * t)                 # shoulders 12 px wide, hem 18 px
    coat = (yy >= top) & (np.abs(xx - cx) <= half_width)
    img[coat] = world.coats[scene.coat]
    img[head] = world.head
    return coat


def render_scene(scene: Scene, rng: np.random.Generator, world: World | None = None) -> np.ndarray:
    """Draw a complete scene: (size, size, 3) uint8. Layout (position, size, splatter) comes from `rng`."""
    world = world or load_world()
    s = world.size
    img = _background(scene, rng, world)
    if scene.subject == "doctor":
        body = _doctor(img, scene, rng, world)  # blood goes on the coat; the head stays visible
    else:
        r = rng.uniform(7.0, 11.0)
        cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
        body = shape_mask(scene.subject, cx, cy, r, s)
        img[body] = world.palette[scene.colour]
    if scene.bloody:
        # Splatter lies on the subject: discs centred on its pixels and clipped to its outline, so the
        # outline (subject colour + red) still shows the shape; it stops at 30% so the colour shows too.
        ys, xs = np.nonzero(body)
        yy, xx = _grid(s)
        lo, hi = world.splatter_discs
        for _ in range(int(rng.integers(lo, hi + 1))):
            i = int(rng.integers(len(ys)))
            rad = rng.uniform(*world.splatter_radius)
            if (img[body] == world.splatter).all(-1).mean() >= 0.3:
                break
            img[body & ((xx - xs[i] - 0.5) ** 2 + (yy - ys[i] - 0.5) ** 2 <= rad * rad)] = world.splatter
    return img


def _rng_for(caption: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{caption}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_array(caption: str, seed: int, world: World | None = None) -> tuple[np.ndarray, Scene]:
    """(size, size, 3) uint8 image and the complete Scene it shows; deterministic in (caption, seed)."""
    world = world or load_world()
    rng = _rng_for(caption, seed)
    scene = complete(parse_caption(caption, world), rng, world)
    return render_scene(scene, rng, world), scene


def render(caption: str, seed: int = 0) -> Image.Image:
    """The world's picture for a caption, as a PIL image."""
    return Image.fromarray(render_array(caption, seed)[0])
