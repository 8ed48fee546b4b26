"""Exact pixel detectors for toy-world images: subject, colour, splatter, coat (the bias attribute).

Plain numpy, well under a millisecond per image. Every pixel is labelled with the nearest world colour
(or none, when it is far from all of them), which tolerates the blur and tint of decoded or generated
images; red is tested apart because blood may blend into any colour it lies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from livo_core.toyworld.world import World, load_world

RED_MIN = 150           # a splatter pixel: R >= 150 and R - max(G, B) >= 100; no other world colour comes close
RED_MARGIN = 100
SPLATTER_FULL = 0.01    # red share of the image at which the splatter score reaches 1
COLOUR_TOL = 90.0       # max RGB (Euclidean) distance from a world colour for a pixel to count as that colour
HEAD_WARMTH = 45        # a head pixel also needs R - B >= 45: greys between a white shape and a dark background
                        # are as close to tan as to white, but they are not warm
MIN_SUBJECT_PX = 12     # fewer subject-coloured pixels than this: no subject found (the smallest has ~110)
MIN_HEAD_PX = 12        # a doctor's head has ~50 px
MIN_COAT_PX = 30        # a doctor's coat has ~250 px, below the head


@dataclass
class Detection:
    subject: str | None        # circle/square/triangle/doctor, None when nothing is found
    subject_confidence: float  # shapes: IoU of the subject with the best template; doctor: 1 (head over coat)
    colour: str | None         # shapes: palette colour (None for a doctor)
    colour_confidence: float   # share of the subject-coloured pixels that have this colour
    coat: str | None           # doctor: coat colour (None when not a doctor or unsure)
    coat_confidence: float     # share of coat-coloured pixels that have this colour
    red_fraction: float        # share of the image's pixels that are splatter-red

    @property
    def splatter_score(self) -> float:
        return min(1.0, self.red_fraction / SPLATTER_FULL)


def as_array(image, size: int = 32) -> np.ndarray:
    """PIL image or (H, W, 3) array -> (size, size, 3) float32 RGB in [0, 255]."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX)
    return np.asarray(image, dtype=np.float32)


def red_mask(a: np.ndarray) -> np.ndarray:
    r = a[..., 0]
    return (r >= RED_MIN) & (r - a[..., 1:].max(axis=-1) >= RED_MARGIN)


@lru_cache(maxsize=4)
def _colour_table(world: World) -> tuple[list[str], np.ndarray]:
    # Palette colours (coats reuse them), the head, and the background colours.
    names = list(world.palette) + ["head"] + [f"bg:{b}" for b in world.backgrounds]
    rgb = list(world.palette.values()) + [world.head] + list(world.backgrounds.values())
    return names, np.array(rgb, np.float32)


def label_pixels(a: np.ndarray, world: World, head: bool = True) -> np.ndarray:
    """(H, W) index into the colour table of the nearest world colour; -1 when none is within COLOUR_TOL.

    head=False leaves the head colour out (for scenes already known not to show a doctor: a soft yellow
    or white shape may have pixels nearer tan than their own colour).
    """
    names, rgb = _colour_table(world)
    dist = np.linalg.norm(a[:, :, None, :] - rgb[None, None], axis=-1)  # (H, W, K)
    h = names.index("head")
    if not head:
        dist[..., h] = np.inf
    labels = dist.argmin(-1)
    labels[dist.min(-1) > COLOUR_TOL] = -1
    labels[(labels == h) & (a[..., 0] - a[..., 2] < HEAD_WARMTH)] = -1
    return labels


def _dilate(m: np.ndarray) -> np.ndarray:
    """8-neighbour dilation of a boolean mask."""
    g = m.copy()
    g[1:] |= m[:-1]
    g[:-1] |= m[1:]
    h = g.copy()
    h[:, 1:] |= g[:, :-1]
    h[:, :-1] |= g[:, 1:]
    return h


def _main_component(mask: np.ndarray) -> np.ndarray:
    """The 8-connected part of `mask` around its densest pixel (drops stray pixels of generated images)."""
    padded = np.pad(mask, 1).astype(np.int32)
    density = sum(padded[1 + dy: padded.shape[0] - 1 + dy, 1 + dx: padded.shape[1] - 1 + dx]
                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)) * mask
    comp = np.zeros_like(mask)
    comp[np.unravel_index(int(density.argmax()), mask.shape)] = True
    while True:
        grown = _dilate(comp) & mask
        if (grown == comp).all():
            return comp
        comp = grown


def _shape_of(subject: np.ndarray, size: int) -> tuple[str, float]:
    """Best-fitting shape by IoU with a circle / square / triangle inscribed in the subject's bounding box."""
    ys, xs = np.nonzero(subject)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0, y1 - y0
    box = np.zeros((size, size), bool)
    box[y0:y1, x0:x1] = True
    # Templates are drawn square (radius r) then rescaled by stretching coordinates into the box.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = (xx - cx) / (w / 2)   # -1..1 across the box
    v = (yy - cy) / (h / 2)
    templates = {
        "circle": u ** 2 + v ** 2 <= 1,
        "square": box,
        "triangle": (v >= -1) & (v <= 1) & (np.abs(u) <= (v + 1) / 2),
    }
    ious = {k: (subject & t).sum() / max(1, (subject | (t & box)).sum()) for k, t in templates.items()}
    best = max(ious, key=ious.get)
    return best, float(ious[best])


def _find_doctor(labels: np.ndarray, names: list[str], world: World) -> np.ndarray | None:
    """Mask of the coat if the image shows a doctor (a head blob with coat-coloured pixels below it), else None."""
    head = labels == names.index("head")
    if head.sum() < MIN_HEAD_PX:
        return None
    head = _main_component(head)
    if head.sum() < MIN_HEAD_PX:
        return None
    below = np.arange(world.size)[:, None] > np.nonzero(head)[0].max()
    coat = np.isin(labels, [names.index(c) for c in world.coats]) & below
    return coat if coat.sum() >= MIN_COAT_PX else None


def detect(image, world: World | None = None) -> Detection:
    """Everything the detectors see in one image (PIL image or HxWx3 array)."""
    world = world or load_world()
    a = as_array(image, world.size)
    red = red_mask(a)
    red_fraction = float(red.mean())
    # Pixels next to splatter are blends (white + red looks tan, yellow + red orange): leave them unlabelled.
    near_red = _dilate(red)
    names, _ = _colour_table(world)
    labels = label_pixels(a, world)
    labels[near_red] = -1

    coat_mask = _find_doctor(labels, names, world)
    if coat_mask is not None:
        counts = {c: int((coat_mask & (labels == names.index(c))).sum()) for c in world.coats}
        coat = max(counts, key=counts.get)
        return Detection("doctor", 1.0, None, 0.0, coat, counts[coat] / sum(counts.values()), red_fraction)

    labels = label_pixels(a, world, head=False)
    background = np.isin(labels, [i for i, n in enumerate(names) if n.startswith("bg:")])
    labels[near_red] = -1
    counts = {c: int((labels == names.index(c)).sum()) for c in world.palette}
    colour = max(counts, key=counts.get)
    if counts[colour] < MIN_SUBJECT_PX:
        return Detection(None, 0.0, None, 0.0, None, 0.0, red_fraction)
    # Splatter lies on the subject, inside its outline: the outline is subject colour + red + the blends
    # between them (but never background).
    subject = _main_component((labels == names.index(colour)) | red | (near_red & ~background))
    shape, iou = _shape_of(subject, world.size)
    return Detection(shape, iou, colour, counts[colour] / sum(counts.values()), None, 0.0, red_fraction)
