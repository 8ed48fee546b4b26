"""Where the data shipped inside the package live: value files, seed lists, presets, model shapes, the toy
world, prompt templates. Found through importlib.resources, so an installed wheel finds them exactly as a
source checkout does (`pip install -e` or not)."""

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(str(files("livo_core")))
DATA_DIR = PACKAGE_DIR / "data"
PROMPTS_DIR = PACKAGE_DIR / "prompts"
TOYWORLD_DIR = DATA_DIR / "toyworld"
PRESETS_DIR = DATA_DIR / "configs"
# Relative paths inside shipped presets ("livo_core/data/toyworld/values.yaml") are relative to the package.
ROOT = PACKAGE_DIR


def data_path(*parts: str) -> Path:
    return DATA_DIR.joinpath(*parts)


def prompt_template(name: str) -> str:
    """Text of an LLM prompt template in `livo_core/prompts/` (e.g. "toxicity_pairs.txt")."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")
