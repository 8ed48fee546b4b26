"""The flow-matching toy world: an SD 3-architecture transformer trained from scratch on the toy world's scenes.

    `livo toyworld build --family sd3` -> data/toyworld/model-sd3/ (a StableDiffusion3Pipeline folder) + build-sd3.json

It reuses the UNet world's VAE (4 latent channels, 16 x 16 latents for 32 px scenes) and renders the same caption
pool. Its text conditioning is SD 3's without T5: two CLIP towers (each initialised from the UNet world's trained
text tower, 128 wide; a projection each, initialised to the identity) give 77 rows of 128 + 128 = 256 = the joint
width. No rows stand where T5's would be: diffusers fills a model without T5 with 256 zero rows, which after the
context embedder are one repeated token that would triple the attention cost of a 64-token image; the folder's
livo.json says `t5_rows: 0` (and the training preset that fits the model) and the sd3 family reads it. The pooled
vector is the two towers' projected pooled outputs (256). The towers train jointly with the transformer, as the
UNet world's tower trained with its UNet. The objective is SD 3's: flow matching with logit-normal sigmas, the
velocity target, uniform weighting, 10% empty captions for guidance. Deterministic for a seed with one thread.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from livo_core.models import clip_tokenizer
from livo_core.paths import TOYWORLD_DIR
from livo_core.toyworld.build import (LATENT_SIZE, TEXT_WIDTH, _cosine_lr, _log, _to_unit, _update, encode_pool,
                                     render_pool)

TRAINING_PRESET = "toyworld-sd3"   # livo_core/data/configs/train-toyworld-sd3.toml: the hinge in velocity units
JOINT_WIDTH = 2 * TEXT_WIDTH     # the two towers side by side (no zero padding needed)


@dataclass
class FlowBuildSettings:
    pool: int = 24_000
    steps: int = 1500
    batch: int = 64
    lr: float = 5e-4
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0           # SD 3 shifts sigmas by 3 for 1024 px; a 32 px world needs none
    warmup: int = 100
    t5_rows: int = 0             # zero rows where T5's would be (SD 3 without T5 has 256: identical rows that
                                 # would triple the attention cost; the folder records the count for the sd3 family)

    def scaled(self, steps: int) -> "FlowBuildSettings":
        """A smaller build of `steps` steps (under 100: a smoke test with batches of 8)."""
        tiny = steps < 100
        return replace(self, steps=steps, pool=min(self.pool, max(256, steps * self.batch)),
                       warmup=min(self.warmup, max(1, steps // 10)), batch=8 if tiny else self.batch)


def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=JOINT_WIDTH,
                                 caption_projection_dim=128, pooled_projection_dim=JOINT_WIDTH, pos_embed_max_size=LATENT_SIZE)


def make_towers(world_model: Path):
    """Two CLIPTextModelWithProjection initialised from the UNet world's text tower, projections = identity."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    world = CLIPTextModel.from_pretrained(str(world_model / "text_encoder"), dtype=torch.float32)
    inner = world.state_dict()
    towers = []
    for _ in range(2):
        tower = CLIPTextModelWithProjection(world.config)
        missing = tower.text_model.load_state_dict(inner if not any(k.startswith("text_model.") for k in inner)
                                                   else {k.removeprefix("text_model."): v for k, v in inner.items()})
        assert not missing.missing_keys, missing
        with torch.no_grad():
            tower.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
        towers.append(tower)
    return towers


def make_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def condition(towers, ids: torch.Tensor, t5_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, 77) -> tokens (B, 77 + t5_rows, 256) and pooled (B, 256), as the sd3 family encodes prompts."""
    rows, pooled = [], []
    for tower in towers:
        out = tower(ids, output_hidden_states=True)
        pooled.append(out[0])
        rows.append(out.hidden_states[-2])
    clip = torch.cat(rows, dim=-1)
    zeros = torch.zeros(ids.shape[0], t5_rows, JOINT_WIDTH, dtype=clip.dtype)
    return torch.cat([clip, zeros], dim=1), torch.cat(pooled, dim=-1)


def train_transformer(mean, std, scaling, token_ids, empty_ids, world_model: Path, s: FlowBuildSettings,
                      gen: torch.Generator, progress: bool):
    from livo_core.families.flow import FlowMatchingNoise

    transformer, towers, sched = make_transformer(), make_towers(world_model), make_scheduler(s.shift)
    flow = FlowMatchingNoise()   # the sd3 family's own sigma draw and target: the world trains as livo will
    flow.logit_mean, flow.logit_std = s.logit_mean, s.logit_std
    params = list(transformer.parameters()) + [p for t in towers for p in t.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    n, t0, ema, curve = len(mean), time.time(), None, []
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr * _cosine_lr(step, s.steps, s.warmup)
        idx = torch.randint(n, (s.batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling      # (B, 4, 16, 16)
        ids = token_ids[idx].clone()
        ids[torch.rand(s.batch, generator=gen) < s.caption_dropout] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = flow.sample_timesteps(sched, s.batch, gen)
        xt, target = flow.noised(sched, x0, noise, t)
        uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)   # few distinct captions: encode each once
        tokens, pooled = condition(towers, uniq, s.t5_rows)
        pred = transformer(hidden_states=xt, timestep=t, encoder_hidden_states=tokens[inverse],
                           pooled_projections=pooled[inverse]).sample
        loss = (pred - target).pow(2).mean()
        ema = _update(opt, params, loss, ema)
        if step % 50 == 0 or step == s.steps - 1:
            curve.append([step + 1, round(ema, 5)])
            _log(progress, f"[sd3] step {step + 1}/{s.steps} loss {ema:.4f} {time.time() - t0:.0f}s")
    transformer.eval().requires_grad_(False)
    for tower in towers:
        tower.eval().requires_grad_(False)
    return transformer, towers, sched, {"loss_ema": ema, "curve": curve, "seconds": round(time.time() - t0, 1)}


def save_flow_pipeline(folder: Path, vae, transformer, towers, scheduler, t5_rows: int) -> str:
    """A StableDiffusion3Pipeline folder without T5, fp16 safetensors; returns the sha256 of its weights."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer_2 = clip_tokenizer()
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=towers[0], tokenizer=clip_tokenizer(),
                                    text_encoder_2=towers[1], tokenizer_2=tokenizer_2, text_encoder_3=None,
                                    tokenizer_3=None, scheduler=scheduler)
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    # livo's record of the model: the recipe that fits it (livo_core.train.preset_for) and its T5 row count (sd3 family)
    (folder / "livo.json").write_text(json.dumps({"training_preset": TRAINING_PRESET, "t5_rows": t5_rows}, indent=2) + "\n")
    for sub in ("text_encoder", "text_encoder_2"):   # plain from_pretrained runs in float32 (see build.mark_float32)
        path = folder / sub / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return weights_sha256(folder)


def weights_sha256(folder: Path) -> str:
    """One digest over every safetensors file of a model folder (path and bytes, in path order)."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build_flow_world(out_dir: Path | str | None = None, steps: int | None = None, seed: int = 0,
                     progress: bool = True, world: Path | str | None = None) -> dict:
    """Train the flow-matching world model; write out_dir/model-sd3 and out_dir/build-sd3.json. `world`: the UNet
    world whose VAE and text tower it starts from (default: the shipped one)."""
    import diffusers
    from diffusers import AutoencoderKL

    out = Path(out_dir) if out_dir else TOYWORLD_DIR
    world_model = Path(world or TOYWORLD_DIR) / "model"
    s = FlowBuildSettings() if steps is None else FlowBuildSettings().scaled(steps)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    images_u8, captions, _ = render_pool(s.pool, seed)
    vae = AutoencoderKL.from_pretrained(str(world_model / "vae"), dtype=torch.float32).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)   # SD 3's pipeline shifts latents by it; the world's VAE needs none
    with torch.no_grad():
        mean, std = encode_pool(vae, _to_unit(images_u8))
    tok = clip_tokenizer()
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    transformer, towers, sched, report = train_transformer(mean, std, vae.config.scaling_factor, ids, empty, world_model,
                                                           s, gen, progress)
    digest = save_flow_pipeline(out / "model-sd3", vae, transformer, towers, sched, s.t5_rows)
    build = {"family": "sd3", "training_preset": TRAINING_PRESET, "settings": asdict(s), "seed": seed,
             "seconds": round(time.time() - t0, 1), "transformer": report, "weights_sha256": digest,
             "text_conditioning": f"two CLIP towers from the UNet world's (77 rows of 128 + 128), {s.t5_rows} zero T5 "
                                  "rows, pooled = both projected pooled outputs",
             "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}}
    (out / "build-sd3.json").write_text(json.dumps(build, indent=2))
    _log(progress, f"[done] {out / 'model-sd3'} in {build['seconds']:.0f}s")
    return build
