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
MIN_SUBJECT_PX = 20     # fewer subject-coloured pixels than this: no subject found
MIN_HEAD_PX = 12        # a doctor's head has ~50 px
MIN_COAT_PX = 30        # a doctor's coat has ~250 px


@dataclass
class Detection:
    subject: str | None        # circle/square/triangle/doctor, None when nothing is found
    subject_confidence: float  # shapes: IoU of the subject with the best template; doctor: 1
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


def label_pixels(a: np.ndarray, world: World) -> np.ndarray:
    """(H, W) index into the colour table of the nearest world colour; -1 when none is within COLOUR_TOL."""
    names, rgb = _colour_table(world)
    dist = np.linalg.norm(a[:, :, None, :] - rgb[None, None], axis=-1)  # (H, W, K)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > COLOUR_TOL] = -1
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


def detect(image, world: World | None = None) -> Detection:
    """Everything the detectors see in one image (PIL image or HxWx3 array)."""
    world = world or load_world()
    a = as_array(image, world.size)
    red = red_mask(a)
    red_fraction = float(red.mean())
    names, _ = _colour_table(world)
    labels = label_pixels(a, world)
    labels[red] = -1

    head = labels == names.index("head")
    if head.sum() >= MIN_HEAD_PX:
        # A doctor: the coat is the coat-coloured pixels below the head's centre.
        below = np.arange(world.size)[:, None] > np.nonzero(head)[0].mean()
        counts = {c: int(((labels == names.index(c)) & below).sum()) for c in world.coats}
        total = sum(counts.values())
        coat = max(counts, key=counts.get)
        if total < MIN_COAT_PX:
            return Detection("doctor", 1.0, None, 0.0, None, 0.0, red_fraction)
        return Detection("doctor", 1.0, None, 0.0, coat, counts[coat] / total, red_fraction)

    counts = {c: int((labels == names.index(c)).sum()) for c in world.palette}
    colour = max(counts, key=counts.get)
    if counts[colour] < MIN_SUBJECT_PX:
        return Detection(None, 0.0, None, 0.0, None, 0.0, red_fraction)
    # Splatter lies on the subject, inside its outline: the outline is subject colour + red.
    subject = _main_component((labels == names.index(colour)) | red)
    shape, iou = _shape_of(subject, world.size)
    return Detection(shape, iou, colour, counts[colour] / sum(counts.values()), None, 0.0, red_fraction)
