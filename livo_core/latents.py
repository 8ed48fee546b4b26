"""Training data: dataset shards -> cached VAE latents and prompt embeddings -> batches, in bounded memory.

Everything that does not depend on the value encoder is computed once, per data shard, and cached on disk
as one PIECE per shard (keyed by the shard's content hash), memory-mapped during training:

    CACHE/<model key>/<piece>.latents.npy   (n, 2, F, 4, h, w) posterior means (x scaling_factor) of the aligned
                                            [:, 0] and violating [:, 1] image; F = 2 with random_flip (the
                                            second view is the mirrored image), else 1
    CACHE/<model key>/<piece>.std.npy       the same shape: posterior std (only with latent_sampling="sample")
    CACHE/<model key>/<piece>.embeds.npy    (U, L, D) SD's frozen embeddings of the shard's U distinct captions
    CACHE/<model key>/<piece>.json          written LAST: rows, caption / value text per row, group ids, pair
                                            ids, and each array's size and sha256

So the cache only grows: a new night's shards add pieces, no existing piece is ever rewritten. A piece
without its .json, or whose arrays do not match the sizes and hashes in it, is not used: it is computed
again (a killed precompute, a damaged disk). Precompute streams each shard `encode_batch` rows at a time:
memory is bounded by a shard, never by the dataset. Training reads rows through memory maps: the pages
of a batch, not the whole cache, are in memory.

A lock on CACHE/<model key> is held while pieces are computed, so trainers sharing a cache (the nightly
flow's ROOT/cache, two runs at once) never write the same piece at once: the second waits, then reuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from livo_core.errors import LivoError
from livo_core.faults import kill_point
from livo_core.files import atomic_write, atomic_write_text, sha256_file
from livo_core.shards import Shard, ShardError, iter_shard_batches, verify_shard

log = logging.getLogger("livo.train")

PIECE_FORMAT = 1
META_COLUMNS = ["caption", "value", "pair_id", "group_id"]


# --------------------------------------------------------------------------- naming
def model_key(base_model: str, dtype: torch.dtype, resolution: int | None) -> str:
    """Names a cache folder: same model weights + dtype + resolution -> same latents and embeddings."""
    fingerprint = []
    folder = Path(base_model).expanduser()
    if folder.is_dir():  # a local folder can be rebuilt under the same name: include its weight files' stats
        for sub in ("vae", "text_encoder"):
            for f in sorted((folder / sub).glob("*")):
                st = f.stat()
                fingerprint.append([f"{sub}/{f.name}", st.st_size, st.st_mtime_ns])
        base_model = str(folder.resolve())
    payload = json.dumps([base_model, str(dtype), resolution, fingerprint])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def piece_name(shard: Shard, flip: bool, sample: bool) -> str:
    """A shard's piece name: its content, and which views the piece holds."""
    return f"{shard.key[:24]}-f{int(flip)}s{int(sample)}"


# --------------------------------------------------------------------------- images
def image_tensor(data: bytes, resolution: int | None, flip: bool = False) -> torch.Tensor:
    """PNG/JPEG bytes -> (3, H, W) in [-1, 1], as SD's VAE expects (mirrored left-right when flip)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ShardError(f"an image does not decode ({type(e).__name__})") from None
    if resolution is not None:  # shorter side to `resolution`, then centre crop (diffusers' training scripts)
        scale = resolution / min(img.size)
        img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return x.permute(2, 0, 1)


@torch.no_grad()
def encode_images(vae, images: list[torch.Tensor], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) images -> posterior (mean, std), each (N, 4, H/8, W/8), scaled like SD's pipeline.

    The mean, not a sample, is the default training latent: deterministic, so a cached latent is the same
    latent every time (`latent_sampling="sample"` draws mean + std * noise per step, as the authors' code).
    """
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(torch.stack(images[i:i + batch_size]).to(vae.device, vae.dtype)).latent_dist
        means.append(((dist.mean - shift) * scale).cpu())
        stds.append((dist.std * scale).cpu())
    return torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------- one piece
@dataclass
class Piece:
    """One shard's cached tensors (memory-mapped on demand) and its rows' texts."""

    folder: Path
    name: str
    rows: int
    captions: list[str]             # the shard's distinct captions (rows of embeds.npy)
    caption_index: np.ndarray       # (rows,) row of embeds.npy per pair
    values: list[str]               # distinct value texts
    value_index: np.ndarray         # (rows,)
    pair_ids: list[str]
    group_ids: list[str | None]
    has_std: bool

    def path(self, what: str) -> Path:
        return self.folder / f"{self.name}.{what}"


def _meta_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


def load_piece(folder: Path, name: str, verify: bool) -> Piece | None:
    """The piece, if complete and intact (sizes always, sha256 when verify); else None (compute it again)."""
    meta_path = _meta_path(folder, name)
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != PIECE_FORMAT:
            return None
        arrays = meta["arrays"]
        for what, info in arrays.items():
            path = folder / f"{name}.{what}"
            if path.stat().st_size != info["bytes"] or (verify and sha256_file(path) != info["sha256"]):
                log.warning("cache piece %s is damaged (%s); computing it again", path, what)
                return None
        return Piece(folder, name, meta["rows"], meta["captions"], np.asarray(meta["caption_index"], dtype=np.int64),
                     meta["values"], np.asarray(meta["value_index"], dtype=np.int64), meta["pair_ids"],
                     meta["group_ids"], "std.npy" in arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_array(path: Path, array: np.ndarray) -> dict:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:   # a file object: np.save would add ".npy" to the temporary's name
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    atomic_write(path, write)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), "shape": list(array.shape), "dtype": str(array.dtype)}


def compute_piece(shard: Shard, folder: Path, name: str, sd, resolution: int | None, flip: bool, sample: bool,
                  encode_batch: int = 16) -> Piece:
    """Encode one shard's images and captions and write its piece (see the module docstring)."""
    verify_shard(shard)   # the bytes about to be trained on match the shard's marker
    means, stds, meta_rows = [], [], []
    views = (False, True) if flip else (False,)
    for frame in iter_shard_batches(shard, ["jpg_0", "jpg_1", *META_COLUMNS], encode_batch):
        images = [image_tensor(b, resolution, f) for b in list(frame["jpg_0"]) + list(frame["jpg_1"]) for f in views]
        sizes = {tuple(x.shape) for x in images}
        if len(sizes) > 1:
            raise LivoError(f"the images of shard {shard.shard_id} have different sizes {sorted(sizes)}: set resolution "
                            "(e.g. resolution=512) in the training config")
        mean, std = encode_images(sd.vae, images, encode_batch)        # (2 * n * F, 4, h, w)
        n, f = len(frame), len(views)
        means.append(mean.view(2, n, f, *mean.shape[1:]).transpose(0, 1))   # (n, 2, F, 4, h, w)
        if sample:
            stds.append(std.view(2, n, f, *std.shape[1:]).transpose(0, 1))
        meta_rows += frame[META_COLUMNS].to_dict("records")
    if not meta_rows:
        raise LivoError(f"shard {shard.shard_id} has no rows to cache")
    captions = list(dict.fromkeys(r["caption"] for r in meta_rows))
    values = list(dict.fromkeys(r["value"] for r in meta_rows))
    embeds = torch.cat([sd.family.encode_prompts(sd, captions[i:i + 64]).cpu()
                        for i in range(0, len(captions), 64)])         # (U, L, D)

    arrays = {"latents.npy": _save_array(folder / f"{name}.latents.npy", torch.cat(means).numpy()),
              "embeds.npy": _save_array(folder / f"{name}.embeds.npy", embeds.numpy())}
    if sample:
        arrays["std.npy"] = _save_array(folder / f"{name}.std.npy", torch.cat(stds).numpy())
    caption_row = {c: i for i, c in enumerate(captions)}
    value_row = {v: i for i, v in enumerate(values)}
    meta = {"format": PIECE_FORMAT, "shard": f"{shard.run_dir}/{shard.shard_id}", "shard_sha256": shard.sha256,
            "rows": len(meta_rows), "captions": captions, "values": values,
            "caption_index": [caption_row[r["caption"]] for r in meta_rows],
            "value_index": [value_row[r["value"]] for r in meta_rows],
            "pair_ids": [r["pair_id"] for r in meta_rows],
            "group_ids": [r["group_id"] if isinstance(r["group_id"], str) else None for r in meta_rows],
            "arrays": arrays}
    atomic_write_text(_meta_path(folder, name), json.dumps(meta))   # last: the piece is complete
    kill_point("train.piece")
    return load_piece(folder, name, verify=False)


def release_memory() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise: 2.2 -> 1.4 GiB measured after precompute)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- the dataset
@dataclass
class Batch:
    latents_w: torch.Tensor        # (B, 4, h, w)
    latents_l: torch.Tensor        # (B, 4, h, w)
    prompt_embeds: torch.Tensor    # (B, L, D)
    value_ids: torch.Tensor        # (B, L) token ids of "<principle>, <prompt>"

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.latents_w, self.latents_l, self.prompt_embeds, self.value_ids)))


@dataclass
class PairData:
    """Every pair of the training data, as an index into cache pieces. N pairs; nothing big in memory.

    Views (random flip, posterior sampling, a new violating partner) are chosen per batch by `get_batch`.
    """

    pieces: list[Piece]
    index: np.ndarray                      # (N, 2) int64: (piece, row) of pair i
    tokenizer: object
    text_length: int
    latent_shape: tuple[int, ...]          # (4, h, w)
    _maps: OrderedDict = field(default_factory=OrderedDict, repr=False)
    groups: dict[str, np.ndarray] = field(default_factory=dict, repr=False)   # group id -> pair indices

    def __len__(self) -> int:
        return len(self.index)

    @property
    def pair_ids(self) -> list[str]:
        return [self.pieces[p].pair_ids[r] for p, r in self.index]

    def _array(self, piece: int, what: str) -> np.ndarray:
        """A memory map of one piece's array; the 64 most recent stay open (each holds a file descriptor)."""
        key = (piece, what)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        array = np.load(self.pieces[piece].path(what), mmap_mode="r")
        self._maps[key] = array
        if len(self._maps) > 64:
            self._maps.popitem(last=False)
        return array

    def value_text(self, i: int) -> str:
        from livo_core.encoder import value_text

        p, r = self.index[i]
        piece = self.pieces[p]
        return value_text(piece.values[piece.value_index[r]], piece.captions[piece.caption_index[r]])

    def latent(self, i: int, side: int, view: int = 0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pair i's latent of side 0 (aligned) / 1 (violating), view 0 / 1 (mirrored): (4, h, w).

        With `noise` (4, h, w) and a piece that holds the posterior std: mean + std * noise (a posterior sample).
        """
        p, r = self.index[i]
        mean = torch.from_numpy(np.array(self._array(p, "latents.npy")[r, side, view]))
        if noise is not None and self.pieces[p].has_std:
            std = torch.from_numpy(np.array(self._array(p, "std.npy")[r, side, view]))
            return mean + std * noise.to(mean.dtype)
        return mean

    def prompt_embed(self, i: int) -> torch.Tensor:
        p, r = self.index[i]
        return torch.from_numpy(np.array(self._array(p, "embeds.npy")[self.pieces[p].caption_index[r]]))

    def group_of(self, i: int) -> str | None:
        p, r = self.index[i]
        return self.pieces[p].group_ids[r]


def get_batch(data: PairData, indices, generator: torch.Generator | None = None, flip: bool = False,
              sample: bool = False, resample_violating: bool = False) -> Batch:
    """The batch of pairs `indices`. The options draw from `generator`, in this order, after the step's noise
    and timesteps: flips (B, 2), posterior noise (B, 2, 4, h, w), violating partners (B,).

    flip: each image mirrored with probability 1/2, aligned and violating independently (torchvision's
    RandomHorizontalFlip on each, as the authors' dataset). sample: a posterior sample instead of the mean.
    resample_violating: the violating image of a random pair of the same group (an imported scene), as the
    authors' dataset draws a fresh violating image of the scene every time.
    """
    from livo_core.encoder import tokenize

    idx = [int(i) for i in np.asarray(indices)]
    B = len(idx)
    views = torch.randint(0, 2, (B, 2), generator=generator) if flip else torch.zeros(B, 2, dtype=torch.long)
    noise = torch.randn((B, 2, *data.latent_shape), generator=generator) if sample else None
    partner = list(idx)
    if resample_violating:
        draws = torch.rand(B, generator=generator)
        for k, i in enumerate(idx):
            group = data.group_of(i)
            if group is not None and group in data.groups:
                members = data.groups[group]
                partner[k] = int(members[min(int(draws[k] * len(members)), len(members) - 1)])
    w = torch.stack([data.latent(i, 0, int(views[k, 0]), None if noise is None else noise[k, 0]) for k, i in enumerate(idx)])
    l_ = torch.stack([data.latent(j, 1, int(views[k, 1]), None if noise is None else noise[k, 1]) for k, j in enumerate(partner)])
    embeds = torch.stack([data.prompt_embed(i) for i in idx])
    value_ids, _ = tokenize(data.tokenizer, [data.value_text(i) for i in idx], data.text_length)
    return Batch(w, l_, embeds, value_ids)


def prepare_pairs(shards: list[Shard], sd, cache_dir: Path, key: str, resolution: int | None, device, dtype,
                  flip: bool = False, sample: bool = False, verify: bool = True, encode_batch: int = 16,
                  progress: bool = True) -> PairData:
    """Cache pieces of every shard (computing only the missing ones) -> PairData over all their pairs.

    Shards that fail their check while being encoded (damaged since they were listed) are skipped by name.
    """
    from livo_core.encoder import text_length
    from livo_core.lock import RunLock
    from livo_core.progress import Progress

    folder = Path(cache_dir) / key
    names = [piece_name(s, flip, sample) for s in shards if s.rows]
    todo = [(s, n) for s, n in zip([s for s in shards if s.rows], names) if load_piece(folder, n, verify) is None]
    if todo:
        with RunLock(folder, purpose="livo train cache", timeout_s=24 * 3600):
            t0, encoded = time.perf_counter(), 0
            with Progress(total=len(todo), desc="cache latents", unit="shard", disable=not progress) as bar:
                for shard, name in todo:
                    if load_piece(folder, name, verify) is None:   # another trainer may have made it meanwhile
                        sd.vae.to(device)
                        for text_encoder in sd.text_encoders():
                            text_encoder.to(device, dtype)
                        try:
                            compute_piece(shard, folder, name, sd, resolution, flip, sample, encode_batch)
                        except ShardError as e:
                            log.warning("skipping %s/shards/%s.parquet: %s", shard.run_dir, shard.shard_id, e)
                        encoded += shard.rows
                    bar.update(1)
            log.info("cached %d pairs of %d shard(s) in %.1f s (%s)", encoded, len(todo), time.perf_counter() - t0, folder)
        release_memory()
    pieces = [p for p in (load_piece(folder, n, verify=False) for n in names) if p is not None]
    if not pieces:
        raise LivoError("no pairs left to train on: every shard was skipped (see the warnings above)")
    shapes = {tuple(np.load(p.path("latents.npy"), mmap_mode="r").shape[3:]) for p in pieces}
    if len(shapes) > 1:   # shards rendered at different sizes
        raise LivoError(f"the images' latents have different sizes {sorted(shapes)}: set resolution (e.g. resolution=512) "
                        "in the training config")
    index = np.concatenate([np.stack([np.full(p.rows, k), np.arange(p.rows)], axis=1) for k, p in enumerate(pieces)])
    data = PairData(pieces, index.astype(np.int64), sd.tokenizer, text_length(sd.tokenizer, sd.text_encoder), shapes.pop())
    groups: dict[str, list[int]] = {}
    for i, (p, r) in enumerate(index):
        g = pieces[p].group_ids[r]
        if g is not None:
            groups.setdefault(g, []).append(i)
    data.groups = {g: np.asarray(m) for g, m in groups.items()}
    return data
