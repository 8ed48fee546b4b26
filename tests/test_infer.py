"""LiVOPipeline on a tiny random-weight SD with a fresh value encoder: what reaches the UNet, the bias
mixing, equality with plain SD when no value applies, loading, and `livo generate` / `livo retrieve`."""

import numpy as np
import pytest
import torch

from flows.cli import main
from livo_core.encoder import ValueEncoder, tokenize, value_text
from livo_core.errors import LivoError
from livo_core.infer import LiVOPipeline, load_livo_pipeline, value_mask
from livo_core.families import family_for
from livo_core.paths import DATA_DIR
from livo_core.values import load_values

VALUES = load_values(DATA_DIR / "values.yaml")
BY_ID = {v.id: v for v in VALUES}
FAST = dict(steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return family_for(str(tiny_sd)).load_pipeline(str(tiny_sd), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def encoder(pipe):
    torch.manual_seed(1)
    enc = ValueEncoder.from_text_encoder(pipe.text_encoder)
    # A fresh copy equals SD's text encoder; nudge it so the value token is not SD's own pooled output.
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


@pytest.fixture(scope="module")
def livo(pipe, encoder):
    return LiVOPipeline(pipe, encoder, VALUES, mix=0.5)


class UNetSpy:
    """Records the cross-attention conditioning of every UNet call (a real forward pre-hook)."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append(kwargs["encoder_hidden_states"].detach().clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def plain_sd(pipe, prompt, seeds, guidance_scale=7.5):
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(prompt, num_images_per_prompt=len(seeds), generator=gens, num_inference_steps=FAST["steps"],
                guidance_scale=guidance_scale, height=FAST["height"], width=FAST["width"]).images


def test_toxicity_value_token_is_prepended_for_every_image(livo, pipe, encoder):
    prompt, value = "a bloody warrior", BY_ID["bloody-inappropriate"]
    with UNetSpy(pipe.unet) as spy:
        out = livo(prompt, num_images=2, seed=3, **FAST)
    assert out.value.id == value.id and out.used_value_mask == [True, True] and out.retrieval.method == "keyword"
    assert len(spy.calls) == FAST["steps"] and all(c.shape == (4, 78, 32) for c in spy.calls)  # CFG: 2 negative + 2 positive

    # the conditioning is [value token of "<principle>, <prompt>"; SD's own 77 prompt embeddings]; the
    # negative branch is SD's own 77 negative embeddings + one more padding token (its last one repeated)
    negative, positive = spy.calls[0][:2], spy.calls[0][2:]
    with torch.no_grad():
        ids, _ = tokenize(pipe.tokenizer, [value_text(value.principle, prompt), value_text(value.principle, "")], 77)
        tokens = encoder(ids)                                                   # (2, 1, 32)
        sd_pos, sd_neg = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    torch.testing.assert_close(positive[:, 1:], sd_pos.expand(2, -1, -1))
    torch.testing.assert_close(positive[:, 0], tokens[0].expand(2, -1))
    torch.testing.assert_close(negative[:, :77], sd_neg.expand(2, -1, -1))
    torch.testing.assert_close(negative[:, 77], sd_neg[:, 76].expand(2, -1))

    # value_in_negative=True: the negative branch gets its own value token, of "<principle>, "
    livo.value_in_negative = True
    try:
        with UNetSpy(pipe.unet) as spy:
            livo(prompt, num_images=2, seed=3, **FAST)
    finally:
        livo.value_in_negative = False
    negative = spy.calls[0][:2]
    torch.testing.assert_close(negative[:, 1:], sd_neg.expand(2, -1, -1))
    torch.testing.assert_close(negative[:, 0], tokens[1].expand(2, -1))
    assert not torch.allclose(tokens[0], tokens[1])


def test_bias_value_mixes_value_and_plain_samples(livo, pipe):
    with UNetSpy(pipe.unet) as spy:
        out = livo("a photo of a doctor", num_images=4, seed=1, **FAST)
    assert out.value.id == "gender-equality"
    assert out.used_value_mask == value_mask(4, 0.5, 1) and sum(out.used_value_mask) == 2
    k = sum(out.used_value_mask)
    lengths = sorted({(c.shape[0], c.shape[1]) for c in spy.calls})
    assert lengths == sorted({(2 * (4 - k), 77), (2 * k, 78)})   # plain images: 77 tokens; value images: 78
    assert len(out.images) == 4 and out.seeds == [1, 2, 3, 4]

    # each image keeps its own seed: the plain ones equal plain SD at that seed, alone in their batch
    for i, used in enumerate(out.used_value_mask):
        if not used:
            assert np.abs(pixels([out.images[i]]).astype(int) - pixels(plain_sd(pipe, "a photo of a doctor", [1 + i])).astype(int)).max() <= 1


def test_value_mask_share_rounding_and_determinism():
    assert value_mask(4, 0.5, 7) == value_mask(4, 0.5, 7)
    assert value_mask(5, 0.0, 0) == [False] * 5 and value_mask(5, 1.0, 0) == [True] * 5
    for n, mix in [(1, 0.5), (3, 0.5), (4, 0.3)]:
        counts = [sum(value_mask(n, mix, s)) for s in range(2000)]
        assert set(counts) <= {int(np.floor(mix * n)), int(np.ceil(mix * n))}
        assert abs(np.mean(counts) / n - mix) < 0.03           # the expected share is exactly mix
    # which images get the value varies with the seed
    assert len({tuple(value_mask(4, 0.5, s)) for s in range(50)}) > 3
    with pytest.raises(LivoError, match="mix"):
        value_mask(4, 1.5, 0)


def test_mix_setting_is_honoured(pipe, encoder):
    for mix, expected in [(0.0, 0), (1.0, 3)]:
        out = LiVOPipeline(pipe, encoder, VALUES, mix=mix)("a photo of a nurse", num_images=3, seed=0, **FAST)
        assert sum(out.used_value_mask) == expected


def test_no_value_equals_plain_stable_diffusion(livo, pipe):
    prompt, seeds = "a bloody warrior", [5, 6, 7]
    reference = pixels(plain_sd(pipe, prompt, seeds))
    off = livo(prompt, num_images=3, seed=5, use_value=False, **FAST)
    assert off.value is None and off.retrieval is None and off.used_value_mask == [False] * 3
    np.testing.assert_array_equal(pixels(off.images), reference)
    # with the value the same seeds give different images: the value token changes the conditioning
    on = livo(prompt, num_images=3, seed=5, **FAST)
    assert not np.array_equal(pixels(on.images), reference)
    # a harmless prompt retrieves no value: plain SD
    apple = livo("a red apple on a table", num_images=2, seed=0, **FAST)
    assert apple.value is None and apple.retrieval.method == "none"
    np.testing.assert_array_equal(pixels(apple.images), pixels(plain_sd(pipe, "a red apple on a table", [0, 1])))


def test_given_value_id_overrides_retrieval_and_unknown_ids_fail(livo, pipe):
    out = livo("a red apple on a table", value_id="zombie-inappropriate", num_images=1, **FAST)
    assert out.value.id == "zombie-inappropriate" and out.retrieval.method == "given" and out.used_value_mask == [True]
    with pytest.raises(LivoError, match="unknown value id 'kindness'"):
        livo("a red apple", value_id="kindness")


def test_encoder_of_another_width_is_refused(pipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    wide = ValueEncoder(CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, vocab_size=49408)))
    with pytest.raises(LivoError, match="value encoder width 64 does not match the sd model"):
        LiVOPipeline(pipe, wide, VALUES)


@pytest.fixture(scope="module")
def training_dir(encoder, tmp_path_factory):
    """A training output dir: out/value_encoder/ holds the encoder."""
    out = tmp_path_factory.mktemp("train_out")
    encoder.save_pretrained(out / "value_encoder")
    return out


@pytest.mark.slow  # 20-35 s on a shared 2-core machine (pipeline loads + CLI runs)
def test_load_livo_pipeline_from_a_training_dir_or_the_encoder_folder(tiny_sd, training_dir, livo):
    for folder in (training_dir, training_dir / "value_encoder"):
        loaded = load_livo_pipeline(str(tiny_sd), folder, DATA_DIR / "values.yaml", device="cpu")
        a = loaded("a zombie walking in the street", num_images=1, seed=2, **FAST)
        b = livo("a zombie walking in the street", num_images=1, seed=2, **FAST)
        np.testing.assert_array_equal(pixels(a.images), pixels(b.images))
    with pytest.raises(LivoError, match="no value encoder"):
        load_livo_pipeline(str(tiny_sd), training_dir / "missing", DATA_DIR / "values.yaml", device="cpu")


# ---------------------------------------------------------------------- the CLI
def cli_args(tiny_sd):
    return ["--base-model", str(tiny_sd), "--device", "cpu", "--set", f"values_file={DATA_DIR / 'values.yaml'}",
            "--set", "render.steps=2", "--set", "render.height=32", "--set", "render.width=32"]


@pytest.mark.slow  # 20-35 s on a shared 2-core machine (pipeline loads + CLI runs)
def test_cli_generate_writes_a_grid_and_reports_the_value(tiny_sd, training_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "doctor.png"
    rc = main(["generate", "a photo of a doctor", "--encoder", str(training_dir), "--out", str(out),
               "--num-images", "4", "--seed", "1", "--no-clip", *cli_args(tiny_sd)])
    text = capsys.readouterr().out
    assert rc == 0 and "value: gender-equality on 2/4 images" in text and "keyword" in text
    assert Image.open(out).size == (64, 64)                      # 2 x 2 grid of 32 x 32

    one = tmp_path / "apple.png"
    assert main(["generate", "a red apple on a table", "--encoder", str(training_dir), "--out", str(one),
                 "--num-images", "1", "--no-clip", *cli_args(tiny_sd)]) == 0
    assert "not applicable" in capsys.readouterr().out and Image.open(one).size == (32, 32)

    assert main(["generate", "a photo of a doctor", "--encoder", str(training_dir), "--out", str(tmp_path / "m.png"),
                 "--num-images", "2", "--mix", "1", "--value", "racial-equality", *cli_args(tiny_sd)]) == 0
    assert "value: racial-equality on 2/2 images (given" in capsys.readouterr().out

    # --layout and --scheduler reach the pipeline: the same seeds give other images under each
    import numpy as np

    def generate(name, *extra):
        assert main(["generate", "a photo of a doctor", "--encoder", str(training_dir), "--out", str(tmp_path / name),
                     "--num-images", "2", "--mix", "1", "--value", "racial-equality", *extra, *cli_args(tiny_sd)]) == 0
        return np.asarray(Image.open(tmp_path / name))

    livo = generate("m.png")
    assert np.array_equal(generate("again.png", "--layout", "livo", "--scheduler", "default"), livo)
    assert not np.array_equal(generate("official.png", "--layout", "official"), livo)
    assert not np.array_equal(generate("dpm.png", "--scheduler", "dpm++"), livo)


def test_cli_generate_bad_input_is_one_line_error(tiny_sd, training_dir, tmp_path, capsys):
    rc = main(["generate", "a cat", "--encoder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png"),
               "--no-clip", *cli_args(tiny_sd)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("livo: error: no value encoder") and err.count("\n") == 1
    rc = main(["generate", "a cat", "--encoder", str(training_dir), "--out", str(tmp_path / "x.png"),
               "--value", "kindness", *cli_args(tiny_sd)])
    assert rc == 2 and "unknown value id 'kindness'" in capsys.readouterr().err
    rc = main(["generate", "a cat", "--encoder", str(training_dir), "--out", str(tmp_path / "x.png"),
               "--scheduler", "fastest", *cli_args(tiny_sd)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("livo: error: unknown --scheduler 'fastest'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exited:   # argparse's choices: the same one line, exit 2
        main(["generate", "a cat", "--encoder", str(training_dir), "--out", str(tmp_path / "x.png"),
              "--layout", "authors", *cli_args(tiny_sd)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("livo: error:") and "--layout" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_retrieve_keywords(capsys):
    values = ["--set", f"values_file={DATA_DIR / 'values.yaml'}", "--no-clip"]
    assert main(["retrieve", "a naked woman on the beach", *values]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "nudity-inappropriate" and "'naked'" in lines[1] and "[keyword]" in lines[1]
    assert main(["retrieve", "a mountain landscape at sunset", *values]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "not applicable"
    assert main(["retrieve", "a photo of a doctor", "--values-file", str(DATA_DIR / "values.yaml"), "--no-clip",
                 "--values", "racial-equality"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "racial-equality"


# --------------------------------------------------------------------------- the authors' token layout
def authors_generate(pipe, value_encoder, prompt: str, value: str, num_images: int, generators, **call):
    """Transcribed from the authors' evaluation/methods.py, LiVO.generate (use_value=True), on our pipe."""
    input_ids = pipe.tokenizer(prompt, max_length=pipe.tokenizer.model_max_length - 1, truncation=True,
                               return_tensors="pt").input_ids.to(pipe.device)
    prompt_embeds = pipe.text_encoder(input_ids)[0]
    value_input_ids = pipe.tokenizer(value + ', ' + prompt, truncation=True, return_tensors="pt").input_ids.to(pipe.device)
    value_embeds = value_encoder(value_input_ids)[1]
    concat_embeds = torch.cat([value_embeds.unsqueeze(1), prompt_embeds], dim=1)
    return pipe(prompt_embeds=concat_embeds, num_images_per_prompt=num_images, generator=generators, **call).images


@pytest.mark.parametrize("prompt", ["a bloody warrior in a forest",
                                    "a bloody " + " ".join(["very"] * 90) + " long prompt"])   # truncated at 76 tokens
def test_official_layout_gives_the_unet_exactly_the_authors_conditioning(pipe, encoder, prompt):
    livo = LiVOPipeline(pipe, encoder, VALUES, layout="official")
    value = BY_ID["bloody-inappropriate"]
    call = dict(num_inference_steps=FAST["steps"], height=FAST["height"], width=FAST["width"], guidance_scale=7.5)
    with UNetSpy(pipe.unet) as ours:
        out = livo(prompt, value_id=value.id, num_images=2, seed=5, steps=FAST["steps"], guidance_scale=7.5,
                   height=FAST["height"], width=FAST["width"])
    with UNetSpy(pipe.unet) as theirs, torch.no_grad():
        images = authors_generate(pipe, encoder.text_model, prompt, value.principle, 2,
                                  [torch.Generator("cpu").manual_seed(5 + i) for i in range(2)], **call)
    n = min(len(pipe.tokenizer(prompt).input_ids), 76)
    assert ours.calls[0].shape == (4, n + 1, 32)          # negatives ("" padded to n + 1) then valued, 2 images each
    assert len(ours.calls) == len(theirs.calls) and all(torch.equal(a, b) for a, b in zip(ours.calls, theirs.calls))
    assert (pixels(out.images) == pixels(images)).all()
    # the negative half is SD's "" padded to n + 1 tokens: not the livo layout's 77 + a copied row
    empty = pipe.tokenizer([""], padding="max_length", max_length=n + 1, return_tensors="pt").input_ids
    assert torch.equal(ours.calls[0][:2], pipe.text_encoder(empty)[0].expand(2, -1, -1))
    assert torch.equal(ours.calls[0][2:, 0], encoder(pipe.tokenizer(value_text(value.principle, prompt), truncation=True,
                                                                      return_tensors="pt").input_ids)[:, 0].expand(2, -1))


def test_livo_layout_is_78_tokens_and_schedulers_can_be_chosen(pipe, encoder):
    from livo_core.infer import SCHEDULERS, set_scheduler

    livo = LiVOPipeline(pipe, encoder, VALUES)
    with UNetSpy(pipe.unet) as spy:
        livo("a bloody warrior", value_id="bloody-inappropriate", num_images=1, **FAST)
    assert spy.calls[0].shape == (2, 78, 32)
    original = pipe.scheduler
    try:
        import importlib.util

        for name in SCHEDULERS:
            if name == "lms" and importlib.util.find_spec("scipy") is None:   # LMS integrates with scipy: one line without it
                with pytest.raises(LivoError, match="scheduler lms needs scipy"):
                    set_scheduler(pipe, name)
                continue
            set_scheduler(pipe, name)
            livo("a bloody warrior", value_id="bloody-inappropriate", num_images=1, **FAST)
        set_scheduler(pipe, "ddpm")
        assert type(pipe.scheduler).__name__ == "DDPMScheduler"
        set_scheduler(pipe, "dpm++")
        assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
        with pytest.raises(LivoError, match="unknown scheduler"):
            set_scheduler(pipe, "heun2")
    finally:
        pipe.scheduler = original
    with pytest.raises(LivoError, match="token layout"):
        LiVOPipeline(pipe, encoder, VALUES, layout="authors")
