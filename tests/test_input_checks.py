"""Every input of `livo evaluate`, `livo generate` and `livo import-livo-data` is checked before any work:
one `livo: error:` line, a non-zero exit, no traceback, no `unexpected` error, nothing created. Also what a
rerun of an evaluation may reuse: only images of the same configuration, intact."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from helpers import snapshot

TOY_VALUES = Path(__file__).resolve().parent.parent / "livo_core" / "data" / "toyworld" / "values.yaml"


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_sd):
    """A folder with an evaluation config on the tiny SD, encoders and broken inputs of every kind."""
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers import synthetic_run
    from livo_core.encoder import ValueEncoder
    from livo_core.families import family_for

    w = tmp_path_factory.mktemp("inputs")
    pipe = family_for(str(tiny_sd)).load_pipeline(str(tiny_sd), device="cpu")
    ValueEncoder.from_text_encoder(pipe.text_encoder).save_pretrained(w / "encoder")
    wide = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_size": 64, "intermediate_size": 64}))
    ValueEncoder(wide).save_pretrained(w / "wide-encoder")
    (w / "not-a-unet").mkdir()
    (w / "not-a-unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    synthetic_run(w / "dataset-run")

    def jsonl(name: str, rows: list[dict]) -> None:
        (w / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("prompts.jsonl", [{"prompt": "a bloody circle"}, {"prompt": "a bloody square"}])
    jsonl("weird-group.jsonl", [{"prompt": "a bloody circle", "group": "weird"}])
    jsonl("huge-seed.jsonl", [{"prompt": "a bloody circle", "seed": 1e30}])
    jsonl("unknown-value.jsonl", [{"prompt": "a bloody circle", "value_id": "no-such-value"}])
    i2p = "prompt,categories,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
    (w / "i2p-33.csv").write_text(i2p + "a bloody fight,violence,1,7,33,32\n")
    (w / "i2p-neg.csv").write_text(i2p + "a bloody fight,violence,1,7,-32,32\n")
    (w / "i2p-nan.csv").write_text(i2p + "a bloody fight,violence,1,inf,32,32\n")
    (w / "bom.csv").write_bytes("\ufeffprompt\na bloody circle\n".encode("utf-8"))
    (w / "no-prompt.csv").write_text("text\na bloody circle\n")

    def config(name: str, prompt_file: str = "prompts.jsonl", group: str = "toxicity", **extra) -> None:
        cfg = {"base_model": str(tiny_sd), "values_file": str(TOY_VALUES), "device": "cpu", "encoder": str(w / "encoder"),
               "prompt_sets": [{"name": "p", "path": str(w / prompt_file), "group": group, "value_id": "bloody-inappropriate"}],
               "images_per_prompt": 2, "inference": {"steps": 1, "height": 32, "width": 32}, "fid": False, "grids": 0}
        for k, v in extra.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        (w / name).write_text(yaml.safe_dump(cfg))

    config("eval.yaml")
    for f in ("weird-group.jsonl", "huge-seed.jsonl", "unknown-value.jsonl", "i2p-33.csv", "i2p-neg.csv", "i2p-nan.csv",
              "no-prompt.csv"):
        config(f"eval-{f}.yaml", f)
    config("eval-dup.yaml", methods=[{"name": "base", "kind": "base"}, {"name": "x", "kind": "livo"}, {"name": "x", "kind": "livo"}])
    config("eval-unet.yaml", methods=[{"name": "base", "kind": "base"}, {"name": "u", "kind": "unet", "unet": str(w / "not-a-unet")}])
    config("eval-clip-judge.yaml", judges={"bloody-inappropriate": {"name": "clip_concept"}})
    config("eval-vlm-no-key.yaml", judges={"bloody-inappropriate": {"name": "vlm", "vlm": {
        "llm": {"base_url": "https://vlm.example.invalid/v1", "model": "llava", "api_key_env": "LIVO_TEST_NO_SUCH_KEY"}}}})
    config("eval-hub.yaml", base_model="nobody-has/this-model")

    class Evil:   # a "prompts.p" that would run a command when unpickled
        def __reduce__(self):
            return (os.system, (f"touch {w / 'pickle-ran'}",))

    import pickle

    (w / "evil.p").write_bytes(pickle.dumps(Evil()))
    toy_clip = f"local-dir:{TOY_VALUES.parent / 'clip'}"
    config("eval-q16-evil.yaml", clip_model=toy_clip, judges={"bloody-inappropriate": {"name": "q16", "file": str(w / "evil.p")}})
    config("eval-q16-no-file.yaml", clip_model=toy_clip, judges={"bloody-inappropriate": {"name": "q16"}})
    config("eval-protocol-threshold.yaml", judges={"bloody-inappropriate": {"name": "nudenet-i2p-v2-5", "threshold": 0.5}})
    config("eval-unknown-protocol.yaml", judges={"bloody-inappropriate": {"name": "nudenet-v9"}})

    # import-livo-data sources: SRC/<type>/<scene>/metadata.jsonl + images
    def source(name: str, rows: list[dict], images: dict[str, bytes] | None = None, encoding: str = "utf-8") -> None:
        scene = w / name / "nudity" / "scene-1"
        scene.mkdir(parents=True)
        for fname, data in (images or {}).items():
            (scene / fname).write_bytes(data)
        (scene / "metadata.jsonl").write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))

    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, format="PNG")
    png = buf.getvalue()
    row = lambda f, label: {"file_name": f, "prompt": "a nude café painting", "value": "Nudity is inappropriate", "label": label}  # noqa: E731
    source("src-latin1", [row("a.png", 1), row("b.png", 0)], {"a.png": png, "b.png": png}, encoding="latin-1")
    source("src-truncated", [row("a.png", 1), row("b.png", 0)], {"a.png": png, "b.png": png[: len(png) // 2]})
    source("src-escape", [row("a.png", 1), row("../../../secret.png", 0)], {"a.png": png})
    (w / "secret.png").write_bytes(png)
    source("src-absolute", [row("a.png", 1), row(str(w / "secret.png"), 0)], {"a.png": png})
    return w


E = "evaluate --out {w}/new --config {w}/"
CASES = [
    ("evaluate: I2P width 33", E + "eval-i2p-33.csv.yaml", "sd_image_width = '33' is out of range"),
    ("evaluate: I2P width -32", E + "eval-i2p-neg.csv.yaml", "sd_image_width = '-32' is out of range"),
    ("evaluate: I2P guidance inf", E + "eval-i2p-nan.csv.yaml", "is not a finite number"),
    ("evaluate: a seed of 1e30", E + "eval-huge-seed.jsonl.yaml", "seed = 1e+30 is out of range"),
    ("evaluate: row group weird", E + "eval-weird-group.jsonl.yaml", "group 'weird' is not one of"),
    ("evaluate: row names an unknown value", E + "eval-unknown-value.jsonl.yaml", "'no-such-value', which is not in"),
    ("evaluate: no prompt column", E + "eval-no-prompt.csv.yaml", "needs a `prompt` column"),
    ("evaluate: inference.height=33", E + "eval.yaml --set inference.height=33", "multiple of 8"),
    ("evaluate: inference.height=0", E + "eval.yaml --set inference.height=0", "inference.height"),
    ("evaluate: guidance inf", E + "eval.yaml --set inference.guidance_scale=inf", "finite number"),
    ("evaluate: guidance NaN", E + "eval.yaml --set inference.guidance_scale=nan", "finite number"),
    ("evaluate: images_per_prompt 10^6", E + "eval.yaml --set images_per_prompt=1000000", "images_per_prompt"),
    ("evaluate: duplicate method names", E + "eval-dup.yaml", "x given twice"),
    ("evaluate: unknown scheduler", E + "eval.yaml --set inference.scheduler=warp", "unknown scheduler 'warp'"),
    ("evaluate: encoder width != UNet width", E + "eval.yaml --encoder {w}/wide-encoder", "trained for a sd model (64-wide value token)"),
    ("evaluate: retriever clip without a model", E + "eval.yaml --set retriever=clip", "retriever = clip needs clip_model"),
    ("evaluate: a unet folder that is no UNet", E + "eval-unet.yaml", "is neither a UNet folder"),
    ("evaluate: a CLIP judge without a CLIP model", E + "eval-clip-judge.yaml", "needs clip_model"),
    ("evaluate: a remote VLM without its key", E + "eval-vlm-no-key.yaml", "LIVO_TEST_NO_SUCH_KEY"),
    ("evaluate: an uncached hub id", E + "eval-hub.yaml", "not in the local Hugging Face cache"),
    ("evaluate: Q16 prompts that are a pickle with code", E + "eval-q16-evil.yaml", "is a pickle that calls posix.system"),
    ("evaluate: Q16 without its prompts file", E + "eval-q16-no-file.yaml", "needs its file: set judges.bloody-inappropriate.file"),
    ("evaluate: a protocol given another threshold", E + "eval-protocol-threshold.yaml", "is a published protocol (at_or_above 0.6)"),
    ("evaluate: an unknown protocol name", E + "eval-unknown-protocol.yaml", "unknown safety classifier 'nudenet-v9'"),
    ("evaluate: --out is a dataset run", "evaluate --out {w}/dataset-run --config {w}/eval.yaml", "holds a dataset run"),
    ("generate: --seed 2^70", "generate 'a bloody circle' --encoder {w}/encoder --out {w}/new.png --seed 1180591620717411303424",
     "--seed 1180591620717411303424 is out of range"),
    ("generate: infinite guidance", "generate 'a bloody circle' --encoder {w}/encoder --out {w}/new.png --set render.guidance_scale=inf",
     "finite number"),
    ("generate: --num-images 0", "generate 'a bloody circle' --encoder {w}/encoder --out {w}/new.png --num-images 0", "--num-images"),
    ("import: latin-1 metadata.jsonl", "import-livo-data {w}/src-latin1 --out {w}/new", "src-latin1/nudity/scene-1/metadata.jsonl is not UTF-8"),
    ("import: an undecodable image", "import-livo-data {w}/src-truncated --out {w}/new", "b.png is not a readable image"),
    ("import: file_name ../../../x", "import-livo-data {w}/src-escape --out {w}/new", "points outside the source folder"),
    ("import: an absolute file_name", "import-livo-data {w}/src-absolute --out {w}/new", "points outside the source folder"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(w, capfd, monkeypatch, case, argv, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIVO_TEST_NO_SUCH_KEY", raising=False)
    if argv.startswith("generate"):   # generate reads a dataset config: the tiny SD and the toy values
        argv += f" --base-model {{tiny}} --set values_file={TOY_VALUES} --set device=cpu"
    before = snapshot(w)
    code = main(shlex.split(argv.format(w=w, tiny=_tiny(w))))
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("livo: error: "), (code, err[-2000:])
    assert expected in lines[0], lines[0]
    assert "unexpected" not in lines[0] and "Traceback" not in out + err
    assert snapshot(w) == before, "a refused command created or changed files"


def _tiny(w: Path) -> str:
    return yaml.safe_load((w / "eval.yaml").read_text())["base_model"]


def test_a_bom_csv_has_its_prompt_column(w):
    from livo_core.evaluate import PromptSetSpec, load_prompt_set

    prompts = load_prompt_set(PromptSetSpec(name="b", path=w / "bom.csv", group="harmless"), 1, 0)
    assert [p.prompt for p in prompts] == ["a bloody circle"]


# ------------------------------------------------------------------ what a rerun may reuse
def test_rerun_with_another_encoder_is_refused_and_damaged_images_are_rendered_again(w, tmp_path, capfd, prefect_harness):
    from livo_core.evaluate import Evaluation, load_eval_config

    out = tmp_path / "eval"
    args = ["evaluate", "--out", str(out), "--config", str(w / "eval.yaml")]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    pngs = sorted((out / "images" / "livo").rglob("*.png"))
    record = json.loads((out / "images" / "livo" / "method.json").read_text())
    assert len(pngs) == 4 and record["description"]["encoder"]

    # another encoder (same width, other weights): refused, nothing touched
    other = tmp_path / "other-encoder"
    from livo_core.encoder import ValueEncoder

    enc = ValueEncoder.from_pretrained(w / "encoder")
    with __import__("torch").no_grad():
        for param in enc.text_model.parameters():
            param.add_(0.01)
    enc.save_pretrained(other)
    before = snapshot(out)
    capfd.readouterr()
    assert main([*args, "--encoder", str(other)]) == 2
    err = capfd.readouterr().err
    assert "method 'livo' made with another encoder" in err and "--overwrite" in err and err.count("\n") == 1
    assert snapshot(out) == before

    # a truncated PNG and a replaced one: the rerun renders that prompt again, the same bytes come back
    pngs[0].write_bytes(pngs[0].read_bytes()[:40])
    good = pngs[1].read_bytes()
    pngs[1].write_bytes(pngs[2].read_bytes())
    cfg = load_eval_config(w / "eval.yaml")
    ev = Evaluation(cfg, out)
    ev.check()
    assert ev.render("livo", [p.id for p in ev.prompts]) >= 1
    assert pngs[1].read_bytes() == good
    assert ev.report(write=False)["livo"] == metrics["livo"]

    # --overwrite renders the changed method again, and only it
    base_before = {p: p.read_bytes() for p in (out / "images" / "base").rglob("*.png")}
    assert main([*args, "--encoder", str(other), "--overwrite"]) == 0
    assert json.loads((out / "images" / "livo" / "method.json").read_text())["fingerprint"] != record["fingerprint"]
    assert {p: p.read_bytes() for p in (out / "images" / "base").rglob("*.png")} == base_before


def test_a_changed_row_setting_renders_that_prompt_again(w, tmp_path):
    """A prompt's id hashes its text and seed; its other row settings are in done.json's key."""
    from livo_core.evaluate import Evaluation, load_eval_config

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a bloody circle", "guidance_scale": 2.0}) + "\n")
    cfg = yaml.safe_load((w / "eval.yaml").read_text())
    cfg["prompt_sets"][0]["path"] = str(rows)
    cfg["methods"] = [{"name": "base", "kind": "base"}]
    ev = Evaluation(load_eval_config(None, cfg), tmp_path / "e")
    ids = [p.id for p in ev.prompts]
    assert ev.render("base", ids) == 1 and ev.render("base", ids) == 0
    rows.write_text(json.dumps({"prompt": "a bloody circle", "guidance_scale": 9.0}) + "\n")
    ev2 = Evaluation(load_eval_config(None, cfg), tmp_path / "e")
    assert [p.id for p in ev2.prompts] == ids and ev2.render("base", ids) == 1


# ------------------------------------------------------------------ the VLM judge
@pytest.mark.parametrize("token, word", [("Yes", "yes"), (" yes", "yes"), ("Yes.", "yes"), ("\u2581Yes", "yes"),
                                         ("\u0120No", "no"), ("NO,", "no"), ("Yesterday", None), ("None", None), ("", None)])
def test_logprob_tokens_are_normalised(token, word):
    from livo_core.judge import yes_no_token

    assert yes_no_token(token) == word


@pytest.mark.parametrize("text, word", [("Yes", "yes"), ("no.", "no"), ("  No, it is not", "no"), ("Yes!", "yes"),
                                        ("None", None), ("Nothing here", None), ("Yesterday", None), ("maybe", None)])
def test_text_answers_are_read_by_whole_word(text, word):
    from livo_core.judge import yes_no_word

    assert yes_no_word(text) == word


def test_yes_no_score_sums_variants_and_is_safe_at_extremes():
    import math

    from livo_core.errors import LivoError
    from livo_core.judge import yes_no_score

    p = yes_no_score([("Yes", math.log(0.3)), ("\u2581Yes", math.log(0.1)), ("No.", math.log(0.4)), ("Maybe", -0.1)], "E")
    assert p == pytest.approx(0.4 / 0.8)
    assert yes_no_score([("Yes", -2000.0), ("No", -1000.0)], "E") == pytest.approx(0.0)   # no underflow to 0/0
    assert yes_no_score([("Maybe", -0.1)], "E") is None
    for bad in (1000.0, float("nan"), float("inf")):
        with pytest.raises(LivoError, match="not a log-probability"):
            yes_no_score([("Yes", bad), ("No", -1.0)], "E")


def _vlm_eval(w: Path, server, out: Path, n: int = 4):
    from livo_core.evaluate import Evaluation, load_eval_config

    cfg = yaml.safe_load((w / "eval.yaml").read_text())
    cfg.update(images_per_prompt=n, methods=[{"name": "base", "kind": "base"}],
               judges={"bloody-inappropriate": {"name": "vlm", "vlm": {"llm": {"base_url": server.base_url, "model": "llava-test",
                                                                                   "max_retries": 0}}}})
    cfg["prompt_sets"][0]["limit"] = 1
    return Evaluation(load_eval_config(None, cfg), out)


def test_a_vlm_failure_at_image_k_re_asks_only_the_unanswered_images(w, tmp_path):
    from openai_server import OpenAIServer

    from livo_core.errors import LivoError

    with OpenAIServer() as server:
        server.reply("Yes", logprobs=[("Yes", -0.1), ("No", -2.4)]).reply("No").error(400, "image too large")
        ev = _vlm_eval(w, server, tmp_path / "e")
        ev.check()
        assert server.probes == 1                      # one probe before any work
        with pytest.raises(LivoError, match=f"{server.base_url}.*HTTP 400"):
            ev.run(progress=False)
        assert server.count == 3
        server.default = lambda body: ("Yes", [("Yes", -0.2), ("No", -1.8)])
        scores = _vlm_eval(w, server, tmp_path / "e").report(write=False)
        assert server.count == 3 + 2                   # images 3 and 4 only
        assert scores["base"]["violation_rate"] == pytest.approx(3 / 4)


@pytest.mark.parametrize("reply, expected", [
    ("raw:{not json", "not valid OpenAI JSON"),
    ("raw:<html>a proxy page</html>", "not valid OpenAI JSON"),
    ("logprob:1000", "not a log-probability"),
    ("text:Yesterday", "answered 'Yesterday'"),
])
def test_vlm_protocol_failures_are_one_line_naming_the_endpoint(w, tmp_path, reply, expected):
    from openai_server import OpenAIServer

    from livo_core.errors import LivoError

    kind, _, arg = reply.partition(":")
    with OpenAIServer() as server:
        if kind == "raw":
            server.raw(arg)
        elif kind == "logprob":
            server.reply("Yes", logprobs=[("Yes", float(arg)), ("No", -1.0)])
        else:
            server.reply(arg)
        with pytest.raises(LivoError) as e:
            _vlm_eval(w, server, tmp_path / "e", n=1).run(progress=False)
    assert expected in str(e.value) and server.base_url in str(e.value) and "\n" not in str(e.value)
