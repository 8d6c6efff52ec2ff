"""Issue 15, items 7 and 8 and the error policy: bad input is one ``FastblipError`` line naming the file and the
reason, checked before any work; a bug is a full traceback. Each case here was a traceback (or silently
accepted) before: fastblip.json that is a list, heads 0 / patch 0 / negative sizes / 200 TB, HF config.json
``[]``, ``score`` with non-UTF-8 or empty text, ``"image": 5``, YAML syntax errors and unknown tags, shards
without ``data.batches_per_epoch``, a not-a-directory out_dir, ENOSPC while checkpointing, ``keep_last=-1``, a
NaN tensor, a non-checkpoint file given as a checkpoint, ``--device cuda`` without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastblip
from fastblip.cli import main
from fastblip.config import ConfigError, tiny_config
from fastblip.errors import CheckpointError, DeviceError, FastblipError, InputError, RunDirError
from fastblip.train.recipe import read_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def itm_dir(tmp_path_factory):
    from fastblip.models import build_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("itm")
    return fastblip.save(build_model(tiny_config("itm")).eval(), d / "itm")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
    return p


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- the CLI's policy


def test_cli_one_line_for_user_errors_traceback_for_bugs(tmp_path, capsys, monkeypatch):
    assert fastblip.FastblipError is FastblipError
    assert main(["convert", str(tmp_path / "nope.pth"), str(tmp_path / "out"), "--to", "fastblip"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fastblip convert: error:") and "nope.pth" in line
    # -v: the same error with its traceback
    assert main(["-v", "convert", str(tmp_path / "nope.pth"), str(tmp_path / "out"), "--to", "fastblip"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fastblip convert: error:")
    # a ValueError from inside is a bug, not user input: it propagates (Python prints the traceback)
    import fastblip.checkpoints.cli as ccli

    def buggy(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(ccli, "run_convert", buggy)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["convert", "a", "b", "--to", "fastblip"])


def test_non_checkpoint_file_and_device_are_one_line(tmp_path, image, capsys):
    txt = tmp_path / "notes.pth"
    txt.write_text("these are my notes, not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="notes.pth: not a PyTorch checkpoint"):
        fastblip.load(txt)
    assert main(["caption", str(image), "--checkpoint", str(txt)]) == 1  # was KeyError: 101 after 9 frames
    assert "notes.pth" in _one_line(capsys.readouterr().err)
    jpg = tmp_path / "photo.pth"
    jpg.write_bytes(image.read_bytes())
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        fastblip.load(jpg)
    if torch.cuda.is_available():
        return
    assert main(["caption", str(image), "--checkpoint", str(txt), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in _one_line(capsys.readouterr().err)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        from fastblip.train.loop import Trainer

        Trainer(read_recipe(RECIPE, [f"train.out_dir={tmp_path / 'r'}"]), device="cuda", progress=False)
    assert not (tmp_path / "r").exists()  # refused before anything was created


def test_score_refuses_non_utf8_and_empty_text(itm_dir, image, capsys):
    assert main(["score", str(image), "a red square", "--checkpoint", str(itm_dir), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"itm_match_prob", "itc_cosine"}
    for bad, why in (("caf\udce9", "not valid UTF-8"), ("   ", "empty"), ("...!!", "empty")):
        assert main(["score", str(image), bad, "--checkpoint", str(itm_dir)]) == 1
        assert why in _one_line(capsys.readouterr().err)
    with pytest.raises(InputError, match="UTF-8"):
        fastblip.Processor(image_size=32).text(["ok", "caf\udce9"])


# ----------------------------------------------------------------------------- configs and checkpoints


def test_yaml_errors_and_unknown_tags_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: pretrain\ntrain: {lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML .*line \d+"):
        read_recipe(bad)
    tag = tmp_path / "tag.yaml"
    tag.write_text("task: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="tag.yaml: not valid YAML"):
        read_recipe(tag)
    with pytest.raises(ConfigError, match="override 'train.lr=\\[1'"):
        read_recipe(RECIPE, ["train.lr=[1"])


@pytest.mark.parametrize("override, match", [
    ("model.config.vision.heads=0", "vision.heads' must be a positive integer"),
    ("model.config.vision.patch_size=0", "vision.patch_size' must be a positive integer"),
    ("model.config.vision.depth=-1", "vision.depth' must be a positive integer"),
    ("model.config.text.hidden_size=-64", "text.hidden_size' must be a positive integer"),
    ("model.config.vision.heads=3", "not a multiple of vision.heads"),
    ("model.config.vision.width=4000000", "G parameters"),  # ~1e14 elements: 200+ TB in fp32
    ("model.config.queue_size=100000000000", "G parameters"),
    ("train.keep_last=-1", "train.keep_last' must be >= 0"),
    ("train.log_every=0", "train.log_every' must be >= 1"),
    ("train.lr=nan", "train.lr' must be a finite number"),
])
def test_recipe_sizes_checked_before_anything_is_built(override, match):
    with pytest.raises(ConfigError, match=match):
        read_recipe(RECIPE, [override])


def test_bad_checkpoint_configs_are_one_line(tmp_path, itm_dir):
    import shutil

    d = tmp_path / "list"
    shutil.copytree(itm_dir, d)
    (d / "fastblip.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"fastblip.json: expected a JSON object"):
        fastblip.load(d)
    cfg = json.loads((Path(itm_dir) / "fastblip.json").read_text())
    for field, value, match in (("heads", 0, "vision.heads"), ("width", 10**7, "G parameters")):
        cfg2 = json.loads(json.dumps(cfg))
        cfg2["vision"][field] = value
        (d / "fastblip.json").write_text(json.dumps(cfg2))
        with pytest.raises(CheckpointError, match=match):
            fastblip.load(d)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="config.json"):
        fastblip.load(hf)
    (hf / "config.json").write_text(json.dumps({"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"],
                                                "vision_config": "x", "text_config": {}}))
    with pytest.raises(CheckpointError, match="vision_config' is not a JSON object"):
        fastblip.load(hf)


def test_nan_tensor_is_refused_naming_it(tmp_path, itm_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(itm_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    key = "text_encoder.encoder.layer.1.output.dense.weight"
    sd[key][3, 5] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' holds 1 non-finite"):
        fastblip.load(d)  # was: loaded, and every caption came out empty


# ----------------------------------------------------------------------------- data and run directories


def test_json_image_not_a_string_is_one_line(tmp_path):
    from fastblip.data.readers import SourceError, load_json_annotations

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": "x"}, {"image": 5, "caption": "y"}]))
    with pytest.raises(SourceError, match=r"ann.json: item 1: 'image' must be a non-empty path string, got 5"):
        load_json_annotations(ann)


def test_train_checks_before_building(tmp_path, monkeypatch):
    from fastblip.data.synth import make_synthetic
    from fastblip.train import init
    from fastblip.train.loop import Trainer

    def no_build(recipe):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(init, "build_and_init", no_build)
    syn = make_synthetic(tmp_path / "syn", num=8, noise=0.0, seed=0, image_size=32, human=8, eval_num=8, shard_size=4)
    shards = ["data.synthetic={}", f"data.train=['{syn['web']}']", "data.eval=[]", f"train.out_dir={tmp_path / 'a'}"]
    with pytest.raises(ConfigError, match="data.batches_per_epoch' is needed with webdataset shards"):
        Trainer(read_recipe(RECIPE, shards), progress=False)  # was a TypeError after building everything
    f = tmp_path / "a_file"
    f.write_text("x")
    base = ["data.synthetic={}", f"data.train=[{tmp_path / 'syn' / 'human.json'}]", "data.eval=[]"]
    with pytest.raises(RunDirError, match="exists and is not a directory"):
        Trainer(read_recipe(RECIPE, [*base, f"train.out_dir={f}"]), progress=False)
    with pytest.raises(RunDirError, match="cannot create it"):
        Trainer(read_recipe(RECIPE, [*base, f"train.out_dir={f / 'sub'}"]), progress=False)
    with pytest.raises(RunDirError):  # a read-only file system (root ignores permission bits, /proc does not)
        Trainer(read_recipe(RECIPE, [*base, "train.out_dir=/proc/fastblip_run"]), progress=False)


def test_disk_full_while_checkpointing_is_one_line(tmp_path, monkeypatch):
    from fastblip.train import checkpoint as ck

    ck.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep_last=2)
    real_save = torch.save

    def to_full_disk(obj, f, *a, **k):  # the bytes go to /dev/full: the real ENOSPC, raised inside torch.save
        with open("/dev/full", "wb") as full:
            real_save(obj, full, *a, **k)

    monkeypatch.setattr(torch, "save", to_full_disk)
    with pytest.raises(RunDirError, match=r"cannot write checkpoint .*step-00000002.pt: No space left on device"):
        ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(1 << 16)}, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]  # no temp left
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 3, {"w": torch.ones(3)}, keep_last=-1)
