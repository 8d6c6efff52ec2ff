"""`fastblip caption`, `score`, `convert` end to end on tiny checkpoints, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import fastblip
import fastblip.cli as cli
from fastblip.config import tiny_config
from fastblip.models import build_model

MY_VERBS = ("fastblip.checkpoints.cli",)  # only this module's verbs: other verb modules are not under test here


@pytest.fixture(autouse=True)
def _only_my_verbs(monkeypatch):
    monkeypatch.setattr(cli, "VERB_MODULES", MY_VERBS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cap = build_model(tiny_config("caption")).eval()
    fastblip.save(cap, d / "cap")
    fastblip.save(build_model(tiny_config("itm")).eval(), d / "itm.pth", format="official")
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (40, 30), color).save(d / f"img{i}.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d, cap


def run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_for_every_verb(capsys):
    for verb in ("caption", "score", "convert"):
        with pytest.raises(SystemExit) as e:
            cli.main([verb, "--help"])
        assert e.value.code == 0
        assert "--json" in capsys.readouterr().out


def test_caption_json_matches_api(assets, capsys):
    d, cap = assets
    imgs = [str(d / "img0.jpg"), str(d / "img1.jpg")]
    rc, out, _ = run(["caption", *imgs, "--checkpoint", str(d / "cap"), "--json", "method=greedy",
                      "max_length=8", "--device", "cpu"], capsys)
    assert rc == 0
    rows = json.loads(out)
    proc = fastblip.Processor.from_model(cap)
    want = cap.generate(proc(images=imgs)["pixel_values"], method="greedy", max_length=8)
    assert [r["image"] for r in rows] == imgs and [r["caption"] for r in rows] == want


def test_caption_unknown_option(assets, capsys):
    d, _ = assets
    rc, _, err = run(["caption", str(d / "img0.jpg"), "--checkpoint", str(d / "cap"), "beams=3"], capsys)
    assert rc == 1 and "unknown caption option 'beams'" in err and err.count("\n") == 1


def test_score_json(assets, capsys):
    d, _ = assets
    rc, out, _ = run(["score", str(d / "img0.jpg"), "a red square", "--checkpoint", str(d / "itm.pth"), "--json"],
                     capsys)
    assert rc == 0
    res = json.loads(out)
    m = fastblip.load(d / "itm.pth")
    b = fastblip.Processor.from_model(m)(images=str(d / "img0.jpg"), text="a red square")
    with torch.no_grad():
        p = m.itm_logits(b["pixel_values"], b["input_ids"], b["attention_mask"]).softmax(-1)[0, 1].item()
    assert set(res) == {"itm_match_prob", "itc_cosine"}
    assert res["itm_match_prob"] == pytest.approx(p, rel=1e-5) and -1 <= res["itc_cosine"] <= 1


def test_score_with_captioner_is_clear_error(assets, capsys):
    d, _ = assets
    rc, _, err = run(["score", str(d / "img0.jpg"), "x", "--checkpoint", str(d / "cap")], capsys)
    assert rc == 1 and "caption" in err and "score needs" in err and err.count("\n") == 1


def test_convert_verb(assets, tmp_path, capsys):
    d, cap = assets
    rc, out, _ = run(["convert", str(d / "cap"), str(tmp_path / "c.pth"), "--to", "official", "--json"], capsys)
    assert rc == 0 and json.loads(out)["kind"] == "caption"
    m = fastblip.load(tmp_path / "c.pth")
    for k, v in cap.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


@pytest.mark.parametrize("what", ["missing_image", "broken_image", "missing_ckpt", "junk_ckpt"])
def test_bad_input_one_line_no_traceback(assets, capsys, what):
    d, _ = assets
    img, ck = str(d / "img0.jpg"), str(d / "cap")
    if what == "missing_image":
        img = str(d / "nope.jpg")
    elif what == "broken_image":
        img = str(d / "broken.jpg")
    elif what == "missing_ckpt":
        ck = str(d / "nope.pth")
    else:
        ck = str(d / "broken.jpg")
    rc, _, err = run(["caption", img, "--checkpoint", ck], capsys)
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("fastblip caption: error:") and "Traceback" not in err
    assert ("nope" in err) if what.startswith("missing") else ("broken.jpg" in err)


def test_subprocess_exit_code(assets):
    d, _ = assets
    code = ("import sys, fastblip.cli as c; c.VERB_MODULES = ('fastblip.checkpoints.cli',); "
            f"sys.exit(c.main(['score', {str(d / 'nope.png')!r}, 'a cat', '--checkpoint', {str(d / 'cap')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "image not found" in p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.strip()]) == 1
