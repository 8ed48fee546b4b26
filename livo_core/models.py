"""Loading models for real runs, and building tiny ones from config files for tests and benches.

Real users load Stable Diffusion and CLIP with `from_pretrained(local folder or hub id)`. Here, with no
model hub, tests build tiny models of the same classes from `livo_core/data/model_configs/*.json` and save them as
ordinary diffusers / open_clip folders, so every code path is the one real weights take.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from livo_core.errors import LivoError
from livo_core.paths import data_path


# --------------------------------------------------------------------------- device and dtype
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LivoError("device=cuda asked for but no CUDA GPU is visible; use device=auto or device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, cuda: str = "float16") -> torch.dtype:
    """auto: `cuda` (the model family's half precision) on a GPU, float32 elsewhere."""
    if dtype == "auto":
        # half precision halves memory and doubles speed on GPUs; CPUs lack fast fp16 kernels.
        return getattr(torch, cuda) if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


# --------------------------------------------------------------------------- offline CLIP tokenizer
def write_clip_tokenizer(folder: Path) -> Path:
    """Write a CLIPTokenizer (vocab.json + merges.txt) built from the BPE vocab bundled in open_clip.

    Gives ids identical to the real CLIP tokenizer (SD 1.5's), without a download.
    """
    import open_clip.tokenizer as oct

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_symbols = list(oct.bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def t5_tokenizer(vocab_size: int = 32000, model_max_length: int = 512):
    """A T5TokenizerFast for random-weight models (no download): T5's special ids (<pad> 0, </s> 1, <unk> 2), a
    SentencePiece-style unigram vocabulary of whole lower-case words from CLIP's vocabulary, "</s>" appended as T5
    does. Not T5's own vocabulary: ids differ from the real tokenizer's, shapes and padding do not (real models load
    their tokenizer from their folder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = [w[:-4] for w in json.loads((_offline_tokenizer_dir() / "vocab.json").read_text()) if w.endswith("</w>")]
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for w in words:
        if len(pieces) >= vocab_size:
            break
        if w.isalnum():
            pieces.setdefault("\u2581" + w.lower(), -float(len(pieces)) / vocab_size)
    tok = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=model_max_length)


def clip_tokenizer(folder: Path | None = None):
    """A CLIPTokenizer from `folder`, or the offline one (cached under the package's build dir)."""
    from transformers import CLIPTokenizer

    if folder is None:
        folder = _offline_tokenizer_dir()
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


@lru_cache(maxsize=1)
def _offline_tokenizer_dir() -> Path:
    cache = Path(os.environ.get("LIVO_CACHE", Path.home() / ".cache" / "livo")) / "clip_tokenizer"
    if not (cache / "merges.txt").exists():
        write_clip_tokenizer(cache)
    return cache


# --------------------------------------------------------------------------- tiny models from configs
def model_config(name: str) -> dict:
    """A shape config of `livo_core/data/model_configs/<name>.json` (its "_comment" dropped)."""
    cfg = json.loads(data_path("model_configs", f"{name}.json").read_text())
    cfg.pop("_comment", None)
    return cfg


def build_tiny_clip(folder: Path, config: str = "tiny-clip", seed: int = 0) -> str:
    """Build a random-weight open_clip model from a config, save it, return its `local-dir:` name."""
    import open_clip
    from safetensors.torch import save_file

    cfg = model_config(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


# --------------------------------------------------------------------------- loading for real runs
def check_model_source(name: str, what: str = "base_model") -> None:
    """Fail early, with the fix, when a local model folder is missing or is not a diffusers folder (hub ids pass
    through: they are checked when loaded). Its family checks its parts (livo_core.families.family_for)."""
    folder = Path(name).expanduser()
    looks_local = name.startswith(("/", ".", "~")) or os.sep in name and not _looks_like_hub_id(name) or folder.is_dir()
    if not looks_local:
        return
    if not folder.exists():
        raise LivoError(f"{what} folder {name} does not exist: point {what} at a diffusers model folder or a hub id")
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise LivoError(f"{what} {name} is not a diffusers model folder (no model_index.json): point {what} "
                        "at a folder saved by a diffusers pipeline's save_pretrained (unet/, vae/, text_encoder/, ...)")


def model_folder(name: str, what: str = "base_model") -> Path | None:
    """The local folder of a model name: the folder itself, or a hub id's cached snapshot. None: a hub id not
    cached yet while downloads are allowed (it is fetched when loaded). Offline and not cached: a LivoError."""
    check_model_source(name, what)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise LivoError(f"{what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                            "download it first (huggingface-cli download) or give a local folder") from None
        return None


def model_identity(name: str, what: str = "base_model") -> str:
    """What identifies a model's weights: a local folder's content digest, or a hub id at its cached revision."""
    from livo_core.files import content_digest

    folder = model_folder(name, what)
    if folder is None:
        return f"hub:{name}@unresolved"
    if Path(name).expanduser().is_dir():
        return f"folder:{content_digest(folder)[:16]}"
    return f"hub:{name}@{folder.name}"   # snapshots/<commit>


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
