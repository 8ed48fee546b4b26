"""One validated run config for every livo job.

Defaults are the embedded toy world (no GPU, no LLM key, no downloads). A real run changes the config:
see `livo_core/data/configs/sd15.toml`. Load with `load_config(path, overrides)`; an invalid config raises a
LivoError that names the field, before any work is done.

One rule for relative paths: a relative path written in a config file (values_file, seeds_file, base_model,
a prompt set's path, an encoder, ...) is relative to that file's folder when something exists there, else to
the current folder; a relative path given with --set is relative to the current folder. So the presets
shipped in livo_core/data/configs name the package's own data ("../toyworld/model") and work from any
folder and from an installed wheel.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from livo_core.classifiers import ClassifierChoice
from livo_core.errors import LivoError
from livo_core.paths import PRESETS_DIR, TOYWORLD_DIR
from livo_core.secrets import redact, secret_fields


class StrictModel(BaseModel):
    """Base of every livo config: unknown keys are typos, and no field may hold an API key."""

    # inf / nan are never a setting: an infinite guidance scale renders black images without an error
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        # Runs on the raw input, before any other check, so no later message can echo the key.
        found = secret_fields(data) if isinstance(data, dict) else []
        if found:
            raise LivoError(f"config field '{found[0]}' holds what looks like an API key; keys never go in a config "
                            "(it would be stored with the run): export it in an environment variable and put that "
                            "variable's NAME in llm.api_key_env")
        return data


_Strict = StrictModel

MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes 64-bit seeds; image j of a prompt uses seed + j


def multiple_of_8(v: int) -> int:
    """Image sides: the VAE downsamples by 8."""
    if v % 8:
        raise ValueError(f"must be a multiple of 8, got {v}")
    return v


class LLMConfig(_Strict):
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama). None = OpenAI.")
    model: str = Field("gpt-4o-mini", description="Model name sent to the endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of the environment variable holding the key. The key itself is never stored.")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    max_retries: int = Field(2, ge=0, le=10, description="openai client retries on 429/5xx/connection errors.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-request timeout in seconds.")
    max_tokens: int = Field(2048, ge=16, le=65536, description="Most tokens a reply may have: a model that does not stop ends there instead of at the server's context limit.")
    pairs_per_request: int = Field(8, ge=1, le=50, description="Prompt pairs asked for per LLM request.")
    reask: int = Field(1, ge=0, le=5, description="Re-asks when the reply is not valid JSON for the schema.")
    structured: Literal["auto", "json_schema", "json_object_schema", "json_object", "none"] = Field(
        "auto", description="How the reply's JSON schema is sent: json_schema = OpenAI's response_format (OpenAI, vLLM, "
        "llama.cpp's llama-server, LM Studio, SGLang, Ollama); json_object_schema = llama-cpp-python's server; json_object = "
        "JSON mode without a schema; none = no response_format; auto = the first the server accepts, in that order.")
    max_concurrency: int = Field(8, ge=1, le=256, description="LLM requests in flight at once (across values and batches). "
                                 "Results do not depend on it.")
    near_duplicate: float = Field(0.8, gt=0, le=1, description="Prompts whose word sets (lower case, punctuation and "
                                  "articles dropped) have a Jaccard similarity at or above this are near duplicates: "
                                  "the later one is rejected. 1 = only exact (normalised) repeats.")
    facets_file: Path | None = Field(None, description="YAML of `settings` and `styles` lists: request k of a value asks for "
                                     "prompts set in the k-th (setting, style) combination, so requests run in parallel "
                                     "without repeating each other. None: livo_core/prompts/facets.yaml.")
    max_rounds: int = Field(4, ge=1, le=20, description="Rounds of requests per value: a round asks for what the "
                            "previous ones left missing (items rejected or duplicates).")


class RenderConfig(_Strict):
    steps: int = Field(20, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(5.0, ge=0, le=100, description="Classifier-free guidance scale.")
    height: int = Field(32, ge=8, description="Image height in pixels (multiple of 8).")
    width: int = Field(32, ge=8, description="Image width in pixels (multiple of 8).")
    batch_size: int = Field(32, ge=1, description="Images per pipeline call.")
    negative_prompt: str | None = Field(None, description="Negative prompt for every render.")

    _size = field_validator("height", "width")(lambda v: multiple_of_8(v))


class JudgeConfig(_Strict):
    clip_model: str = Field(f"local-dir:{TOYWORLD_DIR / 'clip'}", description="open_clip model name (e.g. ViT-L-14) or local-dir:<folder>.")
    clip_pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file (e.g. openai); None for local-dir models.")
    clip_min_score: float = Field(0.2, ge=-1, le=1, description="Minimum cosine similarity of each image with its render prompt.")
    classifiers: dict[str, ClassifierChoice] = Field(default_factory=dict, description="Per value id: override the classifier named in the values file.")


class RunConfig(_Strict):
    out_dir: Path | None = Field(None, description="Run directory (set by --out).")
    base_model: str = Field(str(TOYWORLD_DIR / "model"), description="The diffusion model: a local diffusers folder or hub id of a supported family (livo_core/families; SD 1.x / 2.x).")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda if available, else cpu.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto = float16 on CUDA, float32 on CPU.")
    values_file: Path = Field(TOYWORLD_DIR / "values.yaml", description="YAML file of value principles.")
    values: list[str] = Field(default_factory=list, description="Value ids to build data for; empty = all in values_file.")
    seeds_file: Path = Field(TOYWORLD_DIR / "seeds.yaml", description="YAML seed lists and templates for the offline template prompt source.")
    policy_text: str | None = Field(None, description="Short policy text; with prompt_source=llm the LLM proposes extra principles from it.")
    prompt_source: Literal["template", "llm"] = Field("template", description="template = offline seed lists; llm = OpenAI-compatible endpoint.")
    prompts_per_value: int = Field(8, ge=1, description="Prompt pairs per value principle.")
    images_per_prompt: int = Field(2, ge=1, description="Candidate image pairs (seeds) per prompt pair.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Base seed; every image's seed is derived from it and recorded.")
    shard_size: int = Field(16, ge=1, description="Candidate pairs per shard.")
    render: RenderConfig = Field(default_factory=RenderConfig, description="How the aligned and violating images are rendered.")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="The OpenAI-compatible endpoint of prompt_source = llm (and policy_text).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="What keeps a pair: CLIP agreement with the prompts and the value's safety classifier.")

    def config_hash(self) -> str:
        """Hash of everything that changes the data (not where it is written)."""
        payload = self.model_dump(mode="json", exclude={"out_dir"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        """Write as JSON. Holds no secret: the LLM key is only ever named, never stored."""
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LivoError(f"config file {path} not found: pass an existing .toml, .yaml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise LivoError(f"config file {path}: unknown extension {path.suffix!r}; use .toml, .yaml or .json")
    except LivoError:
        raise
    except Exception as e:  # parse errors of any of the three formats
        raise LivoError(f"config file {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]}); fix its syntax") from e
    if not isinstance(data, dict):
        raise LivoError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return resolve_relative_paths(data, path.resolve().parent)


# Keys whose string values may be file or folder paths (in any section of any livo config).
PATH_KEYS = frozenset({"values_file", "seeds_file", "base_model", "path", "encoder", "unet", "facets_file",
                       "fid_weights", "init_value_encoder", "policy_file", "run_dir", "clip_model", "file", "fid_reference"})


def resolve_relative_paths(data: Any, base: Path) -> Any:
    """Make every relative path of PATH_KEYS absolute against `base` when it exists there (see the module
    docstring); hub ids ("org/model") and open_clip names are left alone because nothing of that name is there."""
    if isinstance(data, list):
        return [resolve_relative_paths(x, base) for x in data]
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        if key in PATH_KEYS and isinstance(value, str) and value:
            prefix = "local-dir:" if value.startswith("local-dir:") else ""
            raw = value[len(prefix):]
            if raw and not Path(raw).expanduser().is_absolute() and (base / raw).exists():
                value = prefix + str((base / raw).resolve())
        out[key] = resolve_relative_paths(value, base)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LivoError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`render.steps=10` -> ("render.steps", 10); values are parsed as YAML scalars/lists (true/false are
    booleans; yes/no/on/off stay words)."""
    if "=" not in item:
        raise LivoError(redact(f"override {item!r} must look like section.field=value (e.g. render.steps=10)"))
    key, raw = item.split("=", 1)
    if raw.strip().lower() in ("yes", "no", "on", "off", "y", "n"):
        return key.strip(), raw.strip()   # YAML 1.1 reads these as booleans: mixed_precision=no means "no"
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        where = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise LivoError(redact(f"override {key.strip()!r}: its value {raw!r} is not valid YAML{where}; quote it "
                               f"(--set '{key.strip()}=\"...\"') or fix the brackets")) from None


def format_validation_error(e: ValidationError, what: str) -> str:
    """The first problem of a pydantic error as one line naming the field (values redacted, never a key)."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(config)"
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) or err.get("type") == "extra_forbidden" else f" (got {got!r})"
    more = f"; and {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
    return redact(f"invalid {what} field '{field}': {err['msg']}{got_s}{more}")


def load_settings(model: type[BaseModel], path: Path | str | None, overrides: dict[str, Any] | None, what: str):
    """Config file (optional .toml/.yaml/.json) + dotted overrides -> a validated `model`, or a LivoError naming the field."""
    data = _read_file(Path(path)) if path else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise LivoError(format_validation_error(e, what)) from None


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Config file (optional) + dotted overrides -> validated RunConfig, or a LivoError naming the field."""
    return load_settings(RunConfig, path, overrides, "config")


# --------------------------------------------------------------------------- presets and `livo config show`
# Every shipped preset: job kind -> preset name -> file in livo_core/data/configs (a preset is a config file).
PRESETS: dict[str, dict[str, str]] = {
    "dataset": {"sd15": "sd15.toml"},
    "train": {"toyworld": "train-toyworld.toml", "toyworld-sd3": "train-toyworld-sd3.toml", "published": "train-sd15.toml"},
    "evaluate": {"official": "eval-official.toml", "toyworld": "eval-toyworld.toml", "i2p-original": "eval-i2p-original.toml",
                 "safetydpo-ip": "eval-safetydpo-ip.toml", "unlearndiffatk-nudity": "eval-unlearndiffatk-nudity.toml",
                 "heim-bias": "eval-heim-bias.toml"},
    "nightly": {},
}


def preset_file(kind: str, name: str) -> Path:
    """The file of a shipped preset, or a LivoError listing the presets of that kind."""
    names = PRESETS.get(kind, {})
    if name not in names:
        listed = ", ".join(names) or "none"
        raise LivoError(f"unknown {kind} preset {name!r}: choose one of {listed}")
    return PRESETS_DIR / names[name]


def load_job_config(model: type[BaseModel], kind: str, path: Path | str | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None):
    """The one way a job's config is built: base < preset < config file < dotted overrides (sections merge key by
    key); relative paths follow the module docstring's rule. Returns a validated `model` or raises a LivoError.
    base: defaults of this run beneath everything (the nightly's train section: its model's training preset)."""
    data: dict[str, Any] = json.loads(json.dumps(base)) if base else {}
    if preset:
        _deep_merge(data, _read_file(preset_file(kind, preset)))
    if path:
        _deep_merge(data, _read_file(Path(path)))
    what = {"dataset": "config", "train": "training config", "evaluate": "evaluation config"}.get(kind, f"{kind} config")
    return load_settings(model, None, {**data, **(overrides or {})}, what)


def _deep_merge(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def describe_config(cfg: BaseModel, prefix: str = "") -> list[tuple[str, Any, str, bool]]:
    """(dotted field, value, description, is a section) of every field of a config, sections expanded."""
    rows = []
    dumped = cfg.model_dump(mode="json")   # lists and maps of sections (prompt sets, judges) as plain JSON
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            rows.append((prefix + name, None, field.description or "", True))
            rows += describe_config(value, prefix + name + ".")
        else:
            rows.append((prefix + name, dumped[name], field.description or "", False))
    return rows


def format_config(cfg: BaseModel, title: str) -> str:
    """`livo config show`: every field, its resolved value and what it means (TOML-like, help as comments)."""
    lines = [f"# {title}"]
    for key, value, help_text, section in describe_config(cfg):
        if section:
            lines += ["", f"# [{key}] {help_text}".rstrip()]
        else:
            lines.append(f"{key} = {json.dumps(value)}" + (f"    # {help_text}" if help_text else ""))
    return "\n".join(lines) + "\n"
