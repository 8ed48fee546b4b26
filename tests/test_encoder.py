"""The value encoder on a tiny random-weight SD: copy, shapes, SD-identical prompt embeddings, save/load."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTextModel

from livo_core.encoder import ValueEncoder, text_length, tokenize, value_text
from livo_core.families import family

SD = family("sd")
encode_prompts, prepend_value_token = SD.encode_prompts, SD.attach_value_token
from livo_core.errors import LivoError


@pytest.fixture(scope="module")
def pipe(tiny_sd):
    return StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)


def test_value_text():
    assert value_text("No blood or gore.", "a warrior in a forest") == "No blood or gore., a warrior in a forest"


def test_from_text_encoder_is_a_trainable_copy(pipe):
    te = pipe.text_encoder
    te.requires_grad_(False)
    enc = ValueEncoder.from_text_encoder(te)
    assert all(p.requires_grad for p in enc.parameters())
    assert not any(p.requires_grad for p in te.parameters())  # the original stays frozen
    with torch.no_grad():
        enc.text_model.get_input_embeddings().weight.add_(1.0)
    # a deep copy, not shared weights
    assert not torch.equal(enc.text_model.get_input_embeddings().weight, te.get_input_embeddings().weight)


def test_forward_is_the_pooled_output_as_one_token(pipe):
    enc = ValueEncoder.from_text_encoder(pipe.text_encoder).eval()
    ids, _ = tokenize(pipe.tokenizer, ["No blood., a knight", "Be fair., a doctor"], text_length(pipe.tokenizer, pipe.text_encoder))
    with torch.no_grad():
        token = enc(ids)
        pooled = pipe.text_encoder(ids).pooler_output
    assert token.shape == (2, 1, pipe.text_encoder.config.hidden_size)
    assert torch.equal(token[:, 0], pooled)


def test_encode_prompts_matches_the_sd_pipeline(pipe):
    prompts = ["a bloody warrior in a forest", "a photo of a doctor"]
    ours = encode_prompts(pipe, prompts)
    theirs, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert ours.shape == (2, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(ours, theirs)


def test_prepend_value_token_gives_78_tokens_value_first():
    prompt = torch.randn(3, 77, 32)
    token = torch.randn(3, 1, 32)
    out = prepend_value_token(prompt, token)
    assert out.shape == (3, 78, 32)
    assert torch.equal(out[:, 0], token[:, 0]) and torch.equal(out[:, 1:], prompt)
    with pytest.raises(ValueError):
        prepend_value_token(prompt, torch.randn(3, 32))


def test_unet_accepts_the_78_token_conditioning(pipe):
    enc = ValueEncoder.from_text_encoder(pipe.text_encoder)
    ids, _ = tokenize(pipe.tokenizer, ["No blood., a knight"], 77)
    embeds = prepend_value_token(encode_prompts(pipe, ["a knight"]), enc(ids))
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), embeds).sample
    assert out.shape == (1, 4, 8, 8)


def test_save_load_round_trip_in_transformers_format(pipe, tmp_path):
    enc = ValueEncoder.from_text_encoder(pipe.text_encoder)
    with torch.no_grad():  # make it differ from the base text encoder
        for p in enc.parameters():
            p.add_(0.01)
    folder = enc.save_pretrained(tmp_path / "out" / "value_encoder")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()

    ids, _ = tokenize(pipe.tokenizer, ["No blood., a knight"], 77)
    with torch.no_grad():
        want = enc(ids)
        # the folder itself and a training output dir (value_encoder/ inside) both load
        for where in (folder, tmp_path / "out"):
            assert torch.equal(ValueEncoder.from_pretrained(where).eval()(ids), want)
        # plain transformers loads it: the value token is its pooled output
        plain = CLIPTextModel.from_pretrained(str(folder)).eval()
        assert torch.equal(plain(ids).pooler_output, want[:, 0])
    # SD 1.5's key names, which transformers 4.x and 5.x both read
    saved = load_file(str(folder / "model.safetensors"))
    assert "text_model.final_layer_norm.bias" in saved and all(k.startswith("text_model.") for k in saved)


def test_a_value_encoder_trained_elsewhere_loads(pipe, tmp_path):
    # e.g. the official LiVO release: a CLIPTextModel saved with save_pretrained
    pipe.text_encoder.save_pretrained(str(tmp_path / "elsewhere"))
    enc = ValueEncoder.from_pretrained(tmp_path / "elsewhere")
    assert isinstance(enc.text_model, CLIPTextModel)


def test_missing_value_encoder_is_a_livo_error(tmp_path):
    with pytest.raises(LivoError, match="no value encoder"):
        ValueEncoder.from_pretrained(tmp_path)
