"""The model folder: every value encoder the nightly flow trained, and which one is in production.

    MODELS/current                          one line: the production version (replaced atomically)
    MODELS/versions/v0001/value_encoder/    the encoder (transformers CLIPTextModel folder)
    MODELS/versions/v0001/metrics.json      held-out metrics, and the promotion decision
    MODELS/versions/v0001/lineage.json      dataset run dirs + shard ids + config hashes + parent version
    MODELS/decisions.jsonl                  one line per promotion decision, promoted or not

A version folder appears in one rename, complete, or not at all. `current` only ever names a complete
version. Only the newest `keep` versions are kept; the production version is never removed.

Promotion is a rule over held-out metrics: a candidate replaces production only if it is not worse on any
listed metric by more than that metric's tolerance (`promote_if_not_worse`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from livo_core.errors import LivoError
from livo_core.files import atomic_write_text, clean_tmp_files

_VERSION = re.compile(r"^v(\d{4,})$")


# --------------------------------------------------------------------------- the promotion rule
class MetricRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field(description="Name of a held-out metric, e.g. heldout_loss.")
    direction: Literal["min", "max"] = Field(description="min = lower is better; max = higher is better.")
    tolerance: float = Field(0.0, ge=0, description="How much worse (absolute) the candidate may be and still count as not worse.")


class PromotionRule(BaseModel):
    """A candidate is promoted when it is not worse than production on every listed metric."""

    model_config = ConfigDict(extra="forbid")
    metrics: list[MetricRule] = Field(min_length=1, description="The metrics compared, each with its direction and tolerance.")


def promote_if_not_worse(candidate_metrics: dict[str, float], current_metrics: dict[str, float] | None,
                         rule: PromotionRule) -> tuple[bool, str]:
    """(promoted, reason). No production metrics (first version) promotes. A metric the candidate lacks, or
    that is NaN, counts as worse; every metric is checked, so the reason lists each one."""
    if current_metrics is None:
        return True, "no production version yet"
    worse, fine = [], []
    for r in rule.metrics:
        cand, cur = candidate_metrics.get(r.metric), current_metrics.get(r.metric)
        if cur is None or (isinstance(cur, float) and math.isnan(cur)):
            worse.append(f"{r.metric}: production has no value to compare with")
            continue
        if cand is None or (isinstance(cand, float) and math.isnan(cand)):
            worse.append(f"{r.metric}: candidate has no value")
            continue
        # How much worse the candidate is: positive = worse, in the metric's own units.
        loss = cand - cur if r.direction == "min" else cur - cand
        text = f"{r.metric} {cand:.4g} vs {cur:.4g} ({'lower' if r.direction == 'min' else 'higher'} is better, tolerance {r.tolerance:g})"
        (worse if loss > r.tolerance else fine).append(text)
    if worse:
        return False, "worse on " + "; ".join(worse) + ("; not worse on " + "; ".join(fine) if fine else "")
    return True, "not worse on " + "; ".join(fine)


# --------------------------------------------------------------------------- the model folder
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ModelRegistry:
    """MODELS/ (see the module docstring). Writers must hold a RunLock on MODELS' parent run (the nightly root)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- reading
    def versions(self) -> list[str]:
        """Complete versions, oldest first."""
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if _VERSION.match(p.name) and (p / "lineage.json").is_file()]
        return sorted(found, key=lambda v: int(v[1:]))

    def current(self) -> str | None:
        """The production version, or None before the first promotion."""
        path = self.root / "current"
        if not path.is_file():
            return None
        version = path.read_text().strip()
        if not (self.root / "versions" / version / "lineage.json").is_file():
            raise LivoError(f"{path} names {version!r}, which is not a complete version in {self.root / 'versions'}: "
                            f"write an existing version's name into it (one of {', '.join(self.versions()) or 'none'})")
        return version

    def version_dir(self, version: str) -> Path:
        path = self.root / "versions" / version
        if not (path / "lineage.json").is_file():
            raise LivoError(f"no version {version!r} in {self.root / 'versions'}: choose one of {', '.join(self.versions()) or 'none'}")
        return path

    def encoder_dir(self, version: str) -> Path:
        return self.version_dir(version) / "value_encoder"

    def metrics(self, version: str) -> dict:
        return json.loads((self.version_dir(version) / "metrics.json").read_text())

    def lineage(self, version: str) -> dict:
        return json.loads((self.version_dir(version) / "lineage.json").read_text())

    # ---- writing
    def version_of(self, key: str) -> str | None:
        """The version registered under `key` (a night), or None."""
        for version in self.versions():
            try:
                if json.loads((self.root / "versions" / version / "lineage.json").read_text()).get("key") == key:
                    return version
            except (OSError, ValueError):
                continue
        return None

    def add_version(self, encoder_dir: Path | str, metrics: dict, lineage: dict, key: str | None = None) -> str:
        """Copy a trained value encoder in as the next version (not promoted). Returns its name, e.g. "v0003".

        With a `key` (the nightly passes the night), registering the same key again returns the version
        already registered: a night killed after registering never registers twice.
        """
        encoder_dir = Path(encoder_dir)
        if key is not None and (known := self.version_of(key)):
            return known
        if not (encoder_dir / "config.json").is_file():
            raise LivoError(f"{encoder_dir} is not a value encoder folder (no config.json): pass a training output's value_encoder/")
        folder = self.root / "versions"
        folder.mkdir(parents=True, exist_ok=True)
        clean_tmp_files(folder, recursive=False)   # a copy a kill cut short
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name))]
        version = f"v{max(numbers, default=0) + 1:04d}"
        tmp = folder / f".{version}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(encoder_dir, tmp / "value_encoder")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (tmp / "lineage.json").write_text(json.dumps({"version": version, "created": _now(), "key": key, **lineage}, indent=2))
        os.rename(tmp, folder / version)   # the version appears complete, or not at all
        return version

    def set_current(self, version: str) -> None:
        """Make `version` production: `current` is replaced in one rename."""
        self.version_dir(version)
        atomic_write_text(self.root / "current", version + "\n")

    def record_decision(self, decision: dict, key: str | None = None) -> bool:
        """Add a promotion decision to MODELS/decisions.jsonl (and to the version's metrics.json).

        With a `key` (the night), a decision already recorded under it is not recorded again. The file is
        rewritten atomically with the new line: a kill never leaves half a line. False if it was there.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        past = self.decisions()
        if key is not None and any(d.get("key") == key for d in past):
            return False
        lines = [json.dumps(d) for d in past] + [json.dumps({"time": _now(), "key": key, **decision})]
        atomic_write_text(self.root / "decisions.jsonl", "\n".join(lines) + "\n")
        version = decision.get("candidate")
        if version:
            path = self.version_dir(version) / "metrics.json"
            atomic_write_text(path, json.dumps({**json.loads(path.read_text()), "decision": decision}, indent=2, sort_keys=True))
        return True

    def decisions(self) -> list[dict]:
        """Every recorded decision, oldest first (a line a kill cut short, from older versions, is skipped)."""
        path = self.root / "decisions.jsonl"
        out = []
        for line in (path.read_text().splitlines() if path.is_file() else []):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def prune(self, keep: int, protect: set[str] | frozenset = frozenset()) -> list[str]:
        """Remove all but the newest `keep` versions, never the production one nor those in `protect` (the
        versions an unfinished night still refers to). Returns the removed names."""
        if keep < 1:
            raise LivoError(f"keep_versions must be at least 1, got {keep}")
        current = self.current()
        removed = []
        for version in self.versions()[:-keep]:
            if version != current and version not in protect:
                # Renamed away first (one atomic step), then deleted: a kill never leaves half a version.
                doomed = self.root / "versions" / f".{version}.tmp-{os.getpid()}-pruned"
                os.rename(self.root / "versions" / version, doomed)
                shutil.rmtree(doomed)
                removed.append(version)
        return removed
