"""The toy world: livo's embedded default and proving ground (see docs/toyworld.md).

Procedural 32x32 scenes with captions (`world`), exact pixel detectors (`detect`), the world's safety
classifier (`classifier`), and the from-scratch build of its Stable Diffusion and CLIP models (`build`).
"""

from livo_core.toyworld.classifier import ToyWorldClassifier
from livo_core.toyworld.detect import Detection  # the detect() function: livo_core.toyworld.detect.detect
from livo_core.toyworld.world import Scene, World, caption_of, load_world, parse_caption, render, render_array

__all__ = ["Detection", "Scene", "ToyWorldClassifier", "World", "caption_of", "load_world", "parse_caption",
           "render", "render_array"]
