"""Value principles: the sentences the value encoder reads, with what each guards against."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from livo_core.classifiers import ClassifierChoice
from livo_core.errors import LivoError


class ValuePrinciple(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    principle: str = Field(min_length=3)
    kind: Literal["bias", "toxicity"]
    concept: str
    attributes: list[str] = Field(default_factory=list)
    # bias only: the attribute a plain prompt is over-represented by (None = decided by the judge's majority).
    majority_attribute: str | None = None
    classifier: ClassifierChoice   # how the dataset judges its images (rule at_or_above unless given)
    keywords: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)   # other texts of this value (e.g. the authors' spellings)
    source: str = "seed"

    @model_validator(mode="after")
    def _bias_has_attributes(self):
        if self.kind == "bias" and len(self.attributes) < 2:
            raise ValueError(f"bias value {self.id!r} needs at least two attributes")
        if self.majority_attribute and self.majority_attribute not in self.attributes:
            raise ValueError(f"majority_attribute {self.majority_attribute!r} is not one of {self.attributes}")
        return self

    @property
    def category(self) -> str:
        return self.kind


def load_values(path: Path, ids: list[str] | None = None) -> list[ValuePrinciple]:
    """Value principles from a YAML file, restricted to `ids` (in that order) when given."""
    path = Path(path)
    if not path.is_file():
        raise LivoError(f"values file {path} not found: set values_file to a YAML file of value principles")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise LivoError(f"values file {path} is not UTF-8 text: save it as UTF-8 (see livo_core/data/values.yaml for the format)") from None
    except (OSError, yaml.YAMLError) as e:
        raise LivoError(f"values file {path} is unreadable ({str(e).splitlines()[0]}); see livo_core/data/values.yaml for the format") from None
    entries = raw.get("values") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise LivoError(f"values file {path} needs a list of value principles under 'values:' "
                        "(see livo_core/data/values.yaml for the format)")
    try:
        values = [ValuePrinciple.model_validate(v) for v in entries]
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "entry"
        raise LivoError(f"values file {path} is invalid ({where}: {err['msg']}); see livo_core/data/values.yaml for the format") from None
    if not values:
        raise LivoError(f"values file {path} holds no value principles under 'values:'")
    by_id = {v.id: v for v in values}
    if len(by_id) != len(values):
        raise LivoError(f"values file {path} repeats a value id")
    if not ids:
        return values
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise LivoError(f"unknown value id {unknown[0]!r}: choose from {', '.join(by_id)} (in {path})")
    return [by_id[i] for i in ids]
