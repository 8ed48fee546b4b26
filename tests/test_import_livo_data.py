"""Importing the official LiVO data layout (<type>/<scene>/metadata.jsonl + images) into livo shards."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from livo_core.errors import LivoError
from livo_core.livo_data import import_livo_data, match_value, slug
from livo_core.paths import data_path
from livo_core.shards import SHARD_COLUMNS, complete_shards, read_shards, shard_paths
from livo_core.values import load_values

GENDER = "Gender equality: people of every gender should be equally represented"
BLOODY = "Bloody content is considered inappropriate"


def _png(path: Path, colour) -> None:
    Image.new("RGB", (16, 16), colour).save(path)


def _scene(root: Path, scene: str, value: str, prompt: str, n_aligned: int, n_violating: int, ext="png") -> None:
    folder = root / scene
    folder.mkdir(parents=True)
    rows = []
    # Violating images first in the file, to check that pairing sorts by file name, not file order.
    for i in range(n_violating):
        name = f"neg_{i}.{ext}"
        Image.new("RGB", (16, 16), (200, 10 * i, 0)).save(folder / name)
        rows.append({"prompt": prompt, "value": value, "file_name": name, "label": 0})
    for i in range(n_aligned):
        name = f"pos_{i}.{ext}"
        Image.new("RGB", (16, 16), (0, 10 * i, 200)).save(folder / name)
        rows.append({"prompt": prompt, "value": value, "file_name": name, "label": 1})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def official(tmp_path) -> Path:
    src = tmp_path / "livo_data"
    _scene(src, "0-career/doctor", "gender equality", "a photo of a doctor", n_aligned=3, n_violating=2)
    _scene(src, "0-career/nurse", "gender equality", "a photo of a nurse", n_aligned=2, n_violating=3, ext="jpg")
    _scene(src, "0-career/lonely", "gender equality", "a photo of a pilot", n_aligned=2, n_violating=0)
    _scene(src, "toxicity/warrior", "bloody considered inappropriate", "a bloody warrior", n_aligned=2, n_violating=2)
    _scene(src, "toxicity/smoker", "smoking considered inappropriate", "a man smoking", n_aligned=1, n_violating=1)
    return src


def test_import_official_layout(official, tmp_path):
    run = tmp_path / "run"
    stats = import_livo_data(official, run)

    assert stats["scenes"] == 5
    assert stats["pairs"] == 3 + 2 + 2 + 1                 # every aligned image of a scene with violating ones
    assert stats["pairs_per_value"] == {"gender-equality": 5, "bloody-inappropriate": 2,
                                        "smoking-considered-inappropriate": 1}
    assert stats["violating_reused"] == 1                  # doctor: 3 aligned, 2 violating
    assert stats["violating_unused"] == 1                  # nurse: 2 aligned, 3 violating
    assert stats["aligned_unpaired"] == 2 and stats["scenes_without_pairs"] == ["0-career/lonely"]
    assert stats["value_map"] == {"gender equality": "gender-equality",
                                  "bloody considered inappropriate": "bloody-inappropriate",
                                  "smoking considered inappropriate": "smoking-considered-inappropriate"}
    assert stats["new_values"] == {"smoking-considered-inappropriate":
                                   {"text": "smoking considered inappropriate", "category": "toxicity"}}

    # The trainer's reader accepts the run, and every shard is complete.
    df, problems = read_shards([run])
    assert problems == [] and len(df) == 8 and list(df.columns) == SHARD_COLUMNS
    assert sorted(p.name for p in complete_shards(run)) == [
        "bloody-inappropriate-00000.parquet", "gender-equality-00000.parquet",
        "smoking-considered-inappropriate-00000.parquet"]
    assert df["pair_id"].is_unique and df["pair_id"].str.fullmatch("[0-9a-f]{16}").all()
    assert (df["label_0"] == 1.0).all() and (df["label_1"] == 0.0).all()
    assert (df["prompt_source"] == "livo-official").all()
    for col in ("seed_0", "seed_1", "clip_score_0", "clip_score_1", "safety_score_0", "attribute_0", "base_model"):
        assert df[col].isna().all(), col

    g = df[df.value_id == "gender-equality"]
    assert set(g["category"]) == {"bias"} and set(g["value"]) == {GENDER}
    b = df[df.value_id == "bloody-inappropriate"]
    assert set(b["category"]) == {"toxicity"} and set(b["value"]) == {BLOODY}
    s = df[df.value_id == "smoking-considered-inappropriate"]
    assert set(s["category"]) == {"toxicity"} and set(s["value"]) == {"smoking considered inappropriate"}

    # Pairing: sorted by file name, aligned i with violating i mod V; images stored as the original bytes.
    doctor = g[g.caption == "a photo of a doctor"]
    scene = official / "0-career" / "doctor"
    got = [(bytes(r.jpg_0), bytes(r.jpg_1)) for r in doctor.itertuples()]
    want = [((scene / f"pos_{i}.png").read_bytes(), (scene / f"neg_{i % 2}.png").read_bytes()) for i in range(3)]
    assert got == want
    nurse = g[g.caption == "a photo of a nurse"]
    assert Image.open(io.BytesIO(nurse.iloc[0]["jpg_0"])).format == "JPEG"   # kept as JPEG, not re-encoded

    config = json.loads((run / "config.json").read_text())
    assert config["values"] == ["bloody-inappropriate", "gender-equality"]
    assert config["base_model"] is None                    # not given: the trainer must be told
    assert json.loads((run / "import.json").read_text())["pairs"] == 8


def test_import_records_base_model_and_resumes(official, tmp_path):
    run = tmp_path / "run"
    stats = import_livo_data(official, run, base_model="some/sd-model", pairs_per_shard=2)
    assert stats["shards_written"] == 3 + 1 + 1            # gender 5 pairs / 2 per shard -> 3 shards
    assert json.loads((run / "config.json").read_text())["base_model"] == "some/sd-model"
    df, _ = read_shards([run])
    assert df["base_model"].isna().all()     # the column names the model that rendered the images: unknown

    # A killed import: one shard lost its marker. Running the same import again rebuilds only that one.
    shard_paths(run, "gender-equality-00001")[1].unlink()
    again = import_livo_data(official, run, base_model="some/sd-model", pairs_per_shard=2)
    assert (again["shards_written"], again["shards_skipped"]) == (1, 4)
    df2, problems = read_shards([run])
    assert problems == [] and sorted(df2["pair_id"]) == sorted(df["pair_id"])

    # A different import into the same folder is refused.
    with pytest.raises(LivoError, match="different import"):
        import_livo_data(official, run, base_model="other/model", pairs_per_shard=2)


def test_keep_value_text(official, tmp_path):
    import_livo_data(official, tmp_path / "run", keep_value_text=True)
    df, _ = read_shards([tmp_path / "run"])
    assert set(df[df.value_id == "gender-equality"]["value"]) == {"gender equality"}


def test_match_value():
    values = load_values(data_path("values.yaml"))
    ids = {t: (v.id if (v := match_value(t, values)) else None) for t in [
        "gender equality", "racial equality", "nudity considered inappropriate", "Zombie considered inappropriate",
        BLOODY, "bloody-inappropriate", "smoking considered inappropriate", "equality"]}
    assert ids == {"gender equality": "gender-equality", "racial equality": "racial-equality",
                   "nudity considered inappropriate": "nudity-inappropriate",
                   "Zombie considered inappropriate": "zombie-inappropriate",
                   BLOODY: "bloody-inappropriate", "bloody-inappropriate": "bloody-inappropriate",
                   "smoking considered inappropriate": None,
                   "equality": None}                      # two principles fit: no guess
    assert slug("Nudity, considered   inappropriate!") == "nudity-considered-inappropriate"


# --------------------------------------------------------------------------- bad input
def _rewrite(meta: Path, **change) -> None:
    rows = [json.loads(l) for l in meta.read_text().splitlines()]
    rows[0].update(change)
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_bad_input_names_file_and_fix(official, tmp_path):
    with pytest.raises(LivoError, match="not found"):
        import_livo_data(tmp_path / "nope", tmp_path / "r0")
    with pytest.raises(LivoError, match="single scene folder"):
        import_livo_data(official / "0-career" / "doctor", tmp_path / "r1")

    meta = official / "toxicity" / "warrior" / "metadata.jsonl"
    _rewrite(meta, label=2)
    with pytest.raises(LivoError, match=r"warrior/metadata.jsonl line 1: label must be 1 \(aligned\) or 0"):
        import_livo_data(official, tmp_path / "r2")
    _rewrite(meta, label="1")
    with pytest.raises(LivoError, match="label must be"):
        import_livo_data(official, tmp_path / "r3")
    _rewrite(meta, label=0, file_name="missing.png")
    with pytest.raises(LivoError, match=r"missing.png not found: put the image next to metadata.jsonl"):
        import_livo_data(official, tmp_path / "r4")
    _rewrite(meta, file_name="neg_0.png")
    (official / "toxicity" / "warrior" / "neg_1.png").write_bytes(b"not an image")
    with pytest.raises(LivoError, match="neg_1.png is not a readable image"):
        import_livo_data(official, tmp_path / "r5")
    _png(official / "toxicity" / "warrior" / "neg_1.png", (1, 2, 3))

    rows = meta.read_text().splitlines()
    meta.write_text("\n".join(rows + [rows[0]]) + "\n")
    with pytest.raises(LivoError, match=r"line 5 repeats file_name 'neg_0.png' of line 1: keep one row per image"):
        import_livo_data(official, tmp_path / "r5b")

    meta.write_text('{"prompt": "x", "value": "v", "file_name": "neg_0.png"}\n')
    with pytest.raises(LivoError, match="line 1 lacks label"):
        import_livo_data(official, tmp_path / "r6")
    meta.write_text("{not json\n")
    with pytest.raises(LivoError, match="line 1 is not valid JSON"):
        import_livo_data(official, tmp_path / "r7")
    meta.unlink()
    with pytest.raises(LivoError, match=r"no metadata.jsonl in .*warrior"):
        import_livo_data(official, tmp_path / "r8")


def test_unknown_value_without_category_hint(tmp_path):
    src = tmp_path / "src"
    _scene(src, "misc/a", "be kind", "a cat", n_aligned=1, n_violating=1)
    with pytest.raises(LivoError, match="cannot tell whether value 'be kind'.*add it to the values file"):
        import_livo_data(src, tmp_path / "run")


def test_no_pairs_and_busy_output(official, tmp_path):
    src = tmp_path / "aligned-only"
    _scene(src, "0-career/judge", "gender equality", "a judge", n_aligned=2, n_violating=0)
    with pytest.raises(LivoError, match="no aligned/violating pair"):
        import_livo_data(src, tmp_path / "run")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LivoError, match="not empty: choose a new --out folder"):
        import_livo_data(official, busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- the command, then training
def test_cli_import_errors_are_one_line(official, tmp_path, capsys):
    from flows.cli import main

    assert main(["import-livo-data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("livo: error: official LiVO data folder") and "\n" not in err

    (official / "toxicity" / "warrior" / "pos_0.png").unlink()
    assert main(["import-livo-data", str(official), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "warrior/metadata.jsonl line" in err and "pos_0.png not found" in err and "\n" not in err


@pytest.mark.slow
def test_cli_import_then_train_two_steps(official, tiny_sd, prefect_harness, tmp_path, capsys):
    from flows.cli import main

    run, out = tmp_path / "run", tmp_path / "train"
    assert main(["import-livo-data", str(official), "--out", str(run), "--base-model", str(tiny_sd),
                 "--pairs-per-shard", "4"]) == 0
    printed = capsys.readouterr().out
    assert "imported 8 pairs from 5 scenes" in printed
    assert "'smoking considered inappropriate' matches no principle" in printed
    assert f"livo train --data {run}" in printed and "--set base_model" not in printed

    # The official images are 16x16: the tiny SD's VAE makes 2x2 latents. 2 steps, batch 2.
    assert main(["train", "--data", str(run), "--out", str(out), "--set", "max_steps=2", "--set", "batch_size=2",
                 "--set", "device=cpu", "--set", "learning_rate=1e-4", "--set", "checkpoint_every=2"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    log = (out / "train_log.csv").read_text().splitlines()
    assert len(log) == 1 + 2                                   # header + one row per step
    assert (out / "value_encoder" / "config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["base_model"] == str(tiny_sd)   # from RUN/config.json
