"""The trainer on a tiny random-weight SD and real Parquet shards: gradients, caches, logs, exact resume,
learning, the Prefect flow and the CLI."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel

from livo_core.encoder import ValueEncoder
from livo_core.errors import LivoError
from livo_core.latents import get_batch, model_key
from livo_core.shards import read_shards, write_shard
from helpers import ALIGNED_PROMPT, CAPTIONS, PRINCIPLE, VIOLATING_PROMPT, make_run, synthetic_pair  # noqa: F401
from livo_core.train import TrainConfig, compute_loss, denoising_errors, load_model_parts, load_train_config, load_training_data, train

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds contention on a busy 2-core machine (7x slower when loaded).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_model(tiny_sd, tmp_path_factory) -> Path:
    """The tiny SD with a VAE scaling factor that gives the test images unit-variance latents.

    SD's own factor (0.18215) does that for SD's VAE; a random VAE needs its own, or every latent is ~0
    and the UNet sees nothing but noise.
    """
    folder = tmp_path_factory.mktemp("sd") / "tiny_sd"
    shutil.copytree(tiny_sd, folder)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    rng = np.random.default_rng(0)
    images = [np.asarray(im, np.float32) for pair in (synthetic_pair(rng, 32) for _ in range(4)) for im in pair]
    x = torch.from_numpy(np.stack(images) / 127.5 - 1).permute(0, 3, 1, 2)
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std().item()
    cfg_file = folder / "vae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["scaling_factor"] = 1.0 / std
    cfg_file.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def run_dir(sd_model, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("data") / "run", sd_model)


def small_cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=1e-3, batch_size=4, max_steps=4, checkpoint_every=2, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def pairs_of(run: Path, sd, cache: Path, **kw):
    """The training data of `run` (cache pieces in `cache`), as the trainer loads it."""
    cfg = small_cfg(base_model=str(sd.base_model) if hasattr(sd, "base_model") else None, **kw)
    return load_training_data([run], sd, cfg, cache, torch.device("cpu"), torch.float32, progress=False)


def load_sd(folder: Path):
    sd = load_model_parts(str(folder))
    sd.base_model = str(folder)
    return sd


# --------------------------------------------------------------------------- one step
def test_gradients_reach_only_the_value_encoder_and_the_unet_runs_twice(sd_model, run_dir, tmp_path):
    sd = load_sd(sd_model)
    enc = ValueEncoder.from_text_encoder(sd.text_encoder)
    data = pairs_of(run_dir, sd, tmp_path)
    calls = []
    sd.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))

    terms = compute_loss(sd.family, enc, sd.unet, sd.noise_scheduler, get_batch(data, [0, 1, 2]), TrainConfig(), torch.Generator().manual_seed(0))
    terms["loss"].backward()

    assert calls == [6, 6]   # one theta call and one ref call, each on cat(w, l) of 3 pairs
    assert all(p.grad is None and not p.requires_grad for m in (sd.unet, sd.vae, sd.text_encoder) for p in m.parameters())
    grads = [p.grad for p in enc.parameters()]
    assert all(g is not None for g in grads)
    assert enc.text_model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert set(terms) == {"loss", "hinge_w", "hinge_l", "gap_w", "gap_l", "share_past_margin", "pref_acc"}


def test_theta_equals_ref_without_the_value_token(sd_model, run_dir, tmp_path):
    sd = load_sd(sd_model)
    enc = ValueEncoder.from_text_encoder(sd.text_encoder)
    data = pairs_of(run_dir, sd, tmp_path)
    batch = get_batch(data, [0, 1])
    tw, rw, tl, rl, _ = denoising_errors(sd.family, enc, sd.unet, sd.noise_scheduler, batch, torch.Generator().manual_seed(0), prepend=False)
    assert torch.equal(tw, rw) and torch.equal(tl, rl)
    tw, rw, tl, rl, _ = denoising_errors(sd.family, enc, sd.unet, sd.noise_scheduler, batch, torch.Generator().manual_seed(0))
    assert not torch.equal(tw, rw)   # the value token changes the UNet's prediction


def _pieces(folder: Path) -> dict[str, tuple[int, int]]:
    """Cache files -> (inode, mtime): a rewritten piece gets a new inode (atomic rename) or mtime."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_cache_pieces_per_shard_hold_latents_and_embeddings(sd_model, run_dir, tmp_path):
    sd = load_sd(sd_model)
    key = model_key(str(sd_model), torch.float32, None)
    first = pairs_of(run_dir, sd, tmp_path)
    assert len(first) == 16 and first.latent_shape == (4, 4, 4)
    assert first.prompt_embed(0).shape == (77, 32) and len(first.pieces) == 1 and first.pieces[0].captions == CAPTIONS
    # the latent is the VAE posterior mean times the scaling factor
    df, _ = read_shards([run_dir])
    img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(df["jpg_1"][3])), np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        want = sd.vae.encode(img[None]).latent_dist.mean[0] * sd.vae.config.scaling_factor
    assert torch.allclose(first.latent(3, 1), want, atol=1e-5)
    assert torch.equal(first.prompt_embed(5), sd.family.encode_prompts(sd, [CAPTIONS[1]])[0])
    files = sorted(p.name.split(".", 1)[1] for p in (tmp_path / key).iterdir() if p.name != ".lock")
    assert files == ["embeds.npy", "json", "latents.npy"]

    encoded = []
    sd.vae.encoder.register_forward_hook(lambda *a: encoded.append(1))
    sd.text_encoder.register_forward_hook(lambda *a: encoded.append(1))
    second = pairs_of(run_dir, sd, tmp_path)
    assert encoded == []   # everything came from the cache
    assert torch.equal(second.latent(7, 0), first.latent(7, 0))
    assert model_key(str(sd_model), torch.float16, None) != key != model_key(str(sd_model), torch.float32, 64)


def test_new_shards_add_pieces_and_rewrite_none(sd_model, tmp_path):
    run = make_run(tmp_path / "run", sd_model, n_pairs=6)
    sd = load_sd(sd_model)
    pairs_of(run, sd, tmp_path / "cache")
    before = _pieces(tmp_path / "cache")
    make_run(run, sd_model, n_pairs=4, seed=7, shard_id="no-red-00001")   # a second shard in the same run
    encoded = []
    sd.vae.encoder.register_forward_hook(lambda m, i, o: encoded.append(i[0].shape[0]))
    data = pairs_of(run, sd, tmp_path / "cache")
    assert sum(encoded) == 8 and len(data) == 10   # only the new shard's 4 aligned + 4 violating images
    after = _pieces(tmp_path / "cache")
    assert {k: after[k] for k in before} == before and len(after) == len(before) + 3


def test_a_damaged_or_partial_piece_is_computed_again(sd_model, run_dir, tmp_path):
    sd = load_sd(sd_model)
    first = pairs_of(run_dir, sd, tmp_path)
    folder = tmp_path / model_key(str(sd_model), torch.float32, None)
    latents = next(folder.glob("*.latents.npy"))
    data = bytearray(latents.read_bytes())
    data[-5] ^= 0xFF          # one flipped byte in the cached latents
    latents.write_bytes(bytes(data))
    again = pairs_of(run_dir, sd, tmp_path)
    assert torch.equal(again.latent(2, 1), first.latent(2, 1))   # recomputed, not trained on
    next(folder.glob("*.json")).unlink()   # a piece without its .json (killed before it was written)
    encoded = []
    sd.vae.encoder.register_forward_hook(lambda *a: encoded.append(1))
    pairs_of(run_dir, sd, tmp_path)
    assert encoded


def test_flip_sampling_and_violating_partner_options(sd_model, tmp_path):
    run = make_run(tmp_path / "run", sd_model, n_pairs=6)
    sd = load_sd(sd_model)
    plain = pairs_of(run, sd, tmp_path / "c")
    both = pairs_of(run, sd, tmp_path / "c", random_flip=True, latent_sampling="sample")
    # equal up to float kernels: on some CPUs (AMD EPYC here) oneDNN picks another kernel for a batch holding both
    # views, which moves the 6th decimal (the Intel machines gave identical bits)
    assert torch.allclose(both.latent(1, 0), plain.latent(1, 0), atol=1e-5)
    df, _ = read_shards([run])
    mirrored = Image.open(io.BytesIO(df["jpg_0"][1])).transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(mirrored, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        dist = sd.vae.encode(x).latent_dist
    assert torch.allclose(both.latent(1, 0, view=1), dist.mean[0] * sd.vae.config.scaling_factor, atol=1e-5)
    # a posterior sample: mean + std * noise, std of the same (unmirrored) image
    x0 = torch.from_numpy(np.asarray(Image.open(io.BytesIO(df["jpg_0"][1])), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        std0 = sd.vae.encode(x0).latent_dist.std[0] * sd.vae.config.scaling_factor
    noise = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(both.latent(1, 0, noise=noise), plain.latent(1, 0) + std0 * noise, atol=1e-5)
    assert not torch.allclose(both.latent(1, 0, noise=noise), plain.latent(1, 0))
    g = torch.Generator().manual_seed(0)
    batches = [get_batch(both, range(6), g, flip=True, sample=True) for _ in range(2)]
    assert not torch.equal(batches[0].latents_w, batches[1].latents_w)   # new flips and posterior samples each step
    # resample_violating: a pair of a group may get the violating image of another pair of its group
    grouped = make_run(tmp_path / "grouped", sd_model, n_pairs=4, seed=3)
    import pyarrow.parquet as pq

    rows = pq.read_table(grouped / "shards" / "no-red-00000.parquet").to_pylist()
    for r in rows:
        r["group_id"] = "scene-a"
    write_shard(grouped, "no-red-00000", rows, [], {})
    data = pairs_of(grouped, sd, tmp_path / "g")
    partners = set()
    for seed in range(6):
        b = get_batch(data, [0], torch.Generator().manual_seed(seed), resample_violating=True)
        partners.add(next(j for j in range(4) if torch.equal(b.latents_l[0], data.latent(j, 1))))
    assert len(partners) > 1


# --------------------------------------------------------------------------- the loop
def test_train_outputs_and_resume_gives_the_identical_loss_sequence(sd_model, run_dir, tmp_path):
    cfg = small_cfg(max_steps=6, checkpoint_every=3)
    whole = train(cfg, [run_dir], tmp_path / "whole", progress=False)

    half = train(cfg.model_copy(update={"max_steps": 3}), [run_dir], tmp_path / "split", progress=False)
    assert half.steps == 3
    resumed = train(cfg, [run_dir], tmp_path / "split", resume="latest", progress=False)
    assert resumed.steps == 6

    a, b = pd.read_csv(whole.log_csv), pd.read_csv(resumed.log_csv)
    assert list(a["step"]) == list(b["step"]) == [1, 2, 3, 4, 5, 6]
    assert a.equals(b)   # every logged number, bit for bit
    assert a["loss"].nunique() > 1
    wa, wb = (load_file(str(r.value_encoder / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    out = tmp_path / "whole"
    for name in ("train_log.csv", "train_log.jsonl", "loss.png", "train_config.json", "value_encoder/config.json"):
        assert (out / name).is_file(), name
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "train_config.json").read_text())["base_model"] == str(sd_model)   # read from the run
    ckpt = out / "checkpoints" / "step-000006"
    for name in ("value_encoder/model.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng-0.pt", "state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "state.json").read_text())["samples_seen"] == 24
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert CLIPTextModel.from_pretrained(str(whole.value_encoder)).config.hidden_size == 32
    assert whole.last_metrics["step"] == 6 and set(whole.last_metrics) >= {"loss", "gap_w", "gap_l", "lr"}


def test_resume_drops_log_rows_past_the_checkpoint(sd_model, run_dir, tmp_path):
    out = tmp_path / "out"
    train(small_cfg(max_steps=3, checkpoint_every=2), [run_dir], out, progress=False)   # checkpoints at 2 and 3
    shutil.rmtree(out / "checkpoints" / "step-000003")   # as if killed after logging step 3
    res = train(small_cfg(max_steps=4, checkpoint_every=2), [run_dir], out, resume="latest", progress=False)
    assert list(pd.read_csv(res.log_csv)["step"]) == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in res.log_csv.with_suffix(".jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_dpo_loss_min_snr_and_warm_start(sd_model, run_dir, tmp_path):
    first = train(small_cfg(max_steps=2, keep_checkpoints=1), [run_dir], tmp_path / "a", progress=False)
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-000002"]
    res = train(small_cfg(max_steps=2, loss="dpo", min_snr_gamma=5.0, init_value_encoder=first.value_encoder),
                [run_dir], tmp_path / "b", progress=False)
    log = pd.read_csv(res.log_csv)
    assert np.isfinite(log["loss"]).all() and (log["hinge_w"] == 0).all()


def test_damaged_shards_are_skipped_by_name(sd_model, run_dir, tmp_path, caplog):
    data = tmp_path / "run"
    shutil.copytree(run_dir, data)
    bad = data / "shards" / "no-red-00001.parquet"
    bad.write_bytes(b"PAR1 not really")
    (data / "shards" / "no-red-00001.complete.json").write_text(json.dumps({"rows": 3, "bytes": bad.stat().st_size}))
    with caplog.at_level(logging.WARNING, logger="livo.train"):
        res = train(small_cfg(max_steps=1), [data], tmp_path / "out", progress=False)
    assert res.steps == 1
    assert any("no-red-00001.parquet" in r.getMessage() for r in caplog.records)


def test_bad_inputs_are_livo_errors(sd_model, run_dir, tmp_path):
    with pytest.raises(LivoError, match="more than once"):
        train(small_cfg(), [run_dir, run_dir], tmp_path / "twice", progress=False)
    assert not (tmp_path / "twice").exists()
    empty = tmp_path / "empty"
    (empty / "shards").mkdir(parents=True)
    with pytest.raises(LivoError, match="no complete shards"):
        train(small_cfg(), [empty], tmp_path / "o", progress=False)
    small, large = make_run(tmp_path / "s", sd_model, n_pairs=2, size=32), make_run(tmp_path / "l", sd_model, n_pairs=2, size=64, seed=1)
    with pytest.raises(LivoError, match="resolution"):
        train(small_cfg(), [small, large], tmp_path / "o2", progress=False)
    nocfg = make_run(tmp_path / "nocfg", sd_model, n_pairs=2)
    (nocfg / "config.json").unlink()
    with pytest.raises(LivoError, match="base_model"):
        train(small_cfg(), [nocfg], tmp_path / "o3", progress=False)


def test_load_train_config(tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text("learning_rate: 1.0e-4\nmax_steps: 20\n")
    cfg = load_train_config(f, {"batch_size": 2})
    assert (cfg.learning_rate, cfg.max_steps, cfg.batch_size, cfg.beta, cfg.alpha) == (1e-4, 20, 2, 1000.0, 500.0)
    with pytest.raises(LivoError, match="'learnig_rate'"):
        load_train_config(None, {"learnig_rate": 1})
    with pytest.raises(LivoError, match="'loss'"):
        load_train_config(None, {"loss": "kto"})


# --------------------------------------------------------------------------- learning
def teach_unet(sd_folder: Path, run_dir: Path, cache: Path, steps: int = 200) -> None:
    """Teach the tiny UNet what its two prompts mean: plain diffusion training on the run's images, aligned
    images captioned ALIGNED_PROMPT, violating ones VIOLATING_PROMPT. LiVO assumes an SD that knows its
    concepts (the value token steers it away from one); a random UNet is nearly deaf to its text."""
    sd = load_sd(sd_folder)
    data = pairs_of(run_dir, sd, cache)
    latents = torch.cat([torch.stack([data.latent(i, side) for i in range(len(data))]) for side in (0, 1)])  # (2N, 4, 4, 4)
    prompts = sd.family.encode_prompts(sd, [ALIGNED_PROMPT, VIOLATING_PROMPT])  # (2, 77, D)
    which = torch.arange(len(latents)) // len(data)  # 0 = aligned, 1 = violating
    unet = sd.unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (16,), generator=g)
        noise = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        pred = unet(sd.noise_scheduler.add_noise(latents[idx], noise, t), t, prompts[which[idx]]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.save_pretrained(str(sd_folder / "unet"))


@pytest.fixture(scope="module")
def taught_sd(sd_model, tmp_path_factory) -> tuple[Path, Path]:
    """(SD folder whose UNet knows "plain blue" from "red blobs on blue", a run captioned with the latter)."""
    root = tmp_path_factory.mktemp("taught")
    shutil.copytree(sd_model, root / "sd")
    run = make_run(root / "run", root / "sd", captions=[VIOLATING_PROMPT])
    teach_unet(root / "sd", run, root / "cache")
    return root / "sd", run


def mean_gaps(encoder, sd, data, draws: int = 16) -> tuple[float, float]:
    """Mean theta - ref gap of aligned and violating images over every pair x `draws` fixed noise draws."""
    g = torch.Generator().manual_seed(1234)
    gw, gl = [], []
    with torch.no_grad():
        for _ in range(draws):
            tw, rw, tl, rl, _ = denoising_errors(sd.family, encoder.eval(), sd.unet, sd.noise_scheduler, get_batch(data, range(len(data))), g)
            gw.append(tw - rw)
            gl.append(tl - rl)
    return torch.cat(gw).mean().item(), torch.cat(gl).mean().item()


@pytest.mark.slow
def test_learning_separates_aligned_from_violating_and_the_control_learns_nothing(taught_sd, tmp_path):
    sd_folder, run = taught_sd
    # The published loss (beta 1000, alpha 500, margins 1 and 0.5); a tiny model needs a large lr.
    cfg = small_cfg(learning_rate=1e-2, batch_size=8, max_steps=60, checkpoint_every=60)
    res = train(cfg, [run], tmp_path / "livo", progress=False)
    control = train(cfg.model_copy(update={"prepend_value_token": False}), [run], tmp_path / "control", progress=False)

    sd = load_sd(sd_folder)
    data = pairs_of(run, sd, tmp_path / "livo" / "cache")
    before_w, before_l = mean_gaps(ValueEncoder.from_text_encoder(sd.text_encoder), sd, data)
    after_w, after_l = mean_gaps(ValueEncoder.from_pretrained(res.value_encoder), sd, data)
    gaps = dict(before_w=before_w, before_l=before_l, after_w=after_w, after_l=after_l)
    # aligned images became easier to denoise with the value token, violating ones harder
    assert after_w < 0 < after_l, gaps
    assert after_w < before_w - 3e-4 and after_l - after_w > 5 * abs(before_l - before_w), gaps
    log = pd.read_csv(res.log_csv)
    assert log["loss"].iloc[-20:].mean() < log["loss"].iloc[:10].mean() - 0.1

    # Control: no value token -> theta == ref at every step: gaps exactly 0, loss exactly gamma1 + gamma2,
    # and the value encoder never changes (it gets no gradient).
    clog = pd.read_csv(control.log_csv)
    assert len(clog) == 60
    assert (clog["gap_w"] == 0).all() and (clog["gap_l"] == 0).all() and (clog["loss"] == 1.5).all()
    trained = load_file(str(control.value_encoder / "model.safetensors"))
    base = {f"text_model.{k}": v for k, v in sd.text_encoder.state_dict().items()}
    assert trained.keys() == base.keys() and all(torch.equal(trained[k], base[k]) for k in trained)


# --------------------------------------------------------------------------- Prefect flow and CLI
def test_flow_and_cli(prefect_harness, sd_model, run_dir, tmp_path, capsys):
    from helpers import latest_artifact   # plain REST: prefect 3.8.8's own client gets a 422 here

    from flows.cli import main
    from flows.training import train_value_encoder

    result = train_value_encoder(data_dirs=[str(run_dir)], out_dir=str(tmp_path / "flow"),
                                 train_config=small_cfg(max_steps=2).model_dump(mode="json"))
    assert result["steps"] == 2 and Path(result["value_encoder"]).is_dir()
    assert "gap_w" in latest_artifact("livo-train-metrics")
    assert "data:image/png;base64," in latest_artifact("livo-train-report")

    cfg_file = tmp_path / "train.toml"
    cfg_file.write_text('device = "cpu"\nlearning_rate = 1e-3\nbatch_size = 4\ncheckpoint_every = 2\n')
    argv = ["train", "--data", str(run_dir), "--out", str(tmp_path / "cli"), "--train-config", str(cfg_file), "--set", "max_steps=2"]
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main([*argv[:-1], "max_steps=4", "--resume", "latest"]) == 0
    assert len(pd.read_csv(tmp_path / "cli" / "train_log.csv")) == 4
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a livo dataset run" in capsys.readouterr().err
    assert main(["train", "--data", str(run_dir), "--out", str(tmp_path / "x"), "--set", "max_step=2"]) == 2
