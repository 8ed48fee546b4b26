"""Where the seed data and prompt templates shipped with the project live."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
PROMPTS_DIR = ROOT / "prompts"
TOYWORLD_DIR = DATA_DIR / "toyworld"


def data_path(*parts: str) -> Path:
    return DATA_DIR.joinpath(*parts)


def prompt_template(name: str) -> str:
    """Text of an LLM prompt template in `prompts/` (e.g. "toxicity_pairs.txt")."""
    return (PROMPTS_DIR / name).read_text(encoding="utf-8")
