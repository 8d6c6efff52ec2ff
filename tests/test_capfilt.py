"""CapFilt pipeline: outputs, determinism, corrupt input, 2-rank resume, and noisy-caption removal by a
trained tiny filter (tiny pretrain -> finetuned filter and captioner -> capfilt on the noisy web split)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import fastblip
from fastblip.capfilt.pipeline import run_capfilt
from fastblip.capfilt.recipe import CapfiltRecipe
from fastblip.config import tiny_config
from fastblip.data.synth import make_synthetic
from fastblip.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("capfilt_synth")
    return make_synthetic(out, num=48, noise=0.3, seed=3, image_size=32, human=8, eval_num=8, shard_size=12)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    torch.manual_seed(0)
    cap = build_model(tiny_config("caption")).eval()
    flt = build_model(tiny_config("itm")).eval()
    d = tmp_path_factory.mktemp("capfilt_models")
    return cap, flt, fastblip.save(cap, d / "captioner"), fastblip.save(flt, d / "filter")


def _recipe(synth, out, **kw) -> CapfiltRecipe:
    base = dict(input=synth["web"], output=str(out), num_captions=2, image_size=32, batch_size=8, max_length=10,
                num_workers=2, dtype="fp32", device="cpu", progress=False, captioner="c", filter="f")
    return CapfiltRecipe(**{**base, **kw})


def _scores(out: Path) -> dict:
    lines = {}
    for p in sorted(out.glob("*.scores.jsonl")):
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            assert rec["key"] not in lines, f"duplicated key {rec['key']}"
            lines[rec["key"]] = rec
    return lines


def _tar_members(out: Path) -> dict:
    got = {}
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                assert m.name not in got, f"duplicated member {m.name}"
                got[m.name] = tf.extractfile(m).read()
    return got


def test_capfilt_outputs_and_batch_independence(synth, random_models, tmp_path):
    from fastblip.capfilt.pipeline import collect, expand_input
    from fastblip.data.loader import build_loader

    cap, flt, _, _ = random_models
    r = _recipe(synth, tmp_path / "a", threshold=0.5)
    stats = run_capfilt(r, captioner=cap, filter_model=flt)
    assert stats["images"] == 48 and stats["shards"] == 4
    totals = collect(tmp_path / "a", expand_input(r.input))
    sc = _scores(tmp_path / "a")
    assert len(sc) == 48 == totals["images"]
    for rec in sc.values():  # the web text and K=2 non-empty synthetic captions per image, all scored
        assert [t["source"] for t in rec["texts"]] == ["web", "syn0", "syn1"]
        assert all(t["text"] and 0.0 <= t["itm_score"] <= 1.0 for t in rec["texts"])
        assert all(t["kept"] == (t["itm_score"] >= 0.5) for t in rec["texts"])
    kept = sum(t["kept"] for rec in sc.values() for t in rec["texts"])
    assert totals["pairs"] == kept == totals["web"]["kept"] + totals["synthetic"]["kept"]
    assert totals["web"]["kept"] + totals["web"]["dropped"] == 48
    lines = (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["shard"] for x in lines] == [f"web-{i:05d}" for i in range(4)]
    # readable straight by the pretraining loader: one sample per kept pair
    if kept:
        loader = build_loader(str(tmp_path / "a" / "web-{00000..00003}.tar"), image_size=32, batch_size=7,
                              train=False, num_workers=0)
        assert sum(len(b) for b in loader) == kept
    # another batch size: same captions (counter-based seeds per image and sample) and scores
    run_capfilt(_recipe(synth, tmp_path / "b", batch_size=5), captioner=cap, filter_model=flt)
    sb = _scores(tmp_path / "b")
    assert sb.keys() == sc.keys()
    for k in sc:
        assert [t["text"] for t in sb[k]["texts"]] == [t["text"] for t in sc[k]["texts"]]
        assert [t["itm_score"] for t in sb[k]["texts"]] == pytest.approx([t["itm_score"] for t in sc[k]["texts"]],
                                                                         abs=1e-5)
    # a rerun skips every finished shard
    again = run_capfilt(_recipe(synth, tmp_path / "a"), captioner=cap, filter_model=flt)
    assert again["shards"] == 0 and again["skipped_done"] == 4


def test_capfilt_corrupt_input_skipped_and_counted(synth, random_models, tmp_path):
    cap, flt, _, _ = random_models
    src = Path(synth["web"].split("{")[0] + "00000.tar")
    bad = tmp_path / "in" / "bad-00000.tar"
    bad.parent.mkdir()
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and m.name.startswith(("000000001.", "000000004.")):
                data = data[:20] if m.name.startswith("000000001.") else b"not an image at all"
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    stats = run_capfilt(_recipe(synth, tmp_path / "out", input=str(bad), num_captions=1), captioner=cap,
                        filter_model=flt)
    man = json.loads((tmp_path / "out" / "bad-00000.manifest.json").read_text())
    assert stats["images"] == 10 and man["images"] == 10
    assert sum(man["skipped"].values()) == 2 and set(man["skipped"]) <= {"corrupt_image", "truncated_image",
                                                                         "unsupported_format"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "fastblip.cli", "capfilt",
           "--recipe", str(ROOT / "recipes" / "capfilt_tiny_cpu.yaml"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_capfilt_resume_two_rank_gloo(synth, random_models, tmp_path):
    _, _, cap_dir, flt_dir = random_models
    out = tmp_path / "resumed"
    args = [f"captioner={cap_dir}", f"filter={flt_dir}", f"input={synth['web']}", f"output={out}",
            "batch_size=8", "max_length=10", "image_size=32", "--json"]
    # rank 1 dies after its first shard, half-way through writing its second
    crashed = _torchrun(args, {"FASTBLIP_CAPFILT_CRASH_AFTER": "1:1"})
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    assert not (out / "web-00003.manifest.json").exists() and list(out.glob("web-00003.tar.tmp*"))
    assert (out / "web-00001.manifest.json").exists()
    done = _torchrun(args, {})
    assert done.returncode == 0, done.stderr[-3000:]
    totals = json.loads(done.stdout.strip().splitlines()[-1])
    assert totals["shards"] == 4 and totals["images"] == 48 and totals["missing_shards"] == []
    assert totals["rank0"]["skipped_done"] >= 1  # rank 0's finished shards were not redone

    # uninterrupted reference: one process, same checkpoints and seeds
    torch.set_num_threads(1)
    try:
        cap, flt = fastblip.load(cap_dir), fastblip.load(flt_dir)
        run_capfilt(_recipe(synth, tmp_path / "straight", batch_size=8, max_length=10, top_k=50),
                    captioner=cap, filter_model=flt)
    finally:
        torch.set_num_threads(2)
    a, b = _scores(out), _scores(tmp_path / "straight")
    assert a.keys() == b.keys() and len(a) == 48
    for k in a:
        assert [t["text"] for t in a[k]["texts"]] == [t["text"] for t in b[k]["texts"]]
        assert [t["itm_score"] for t in a[k]["texts"]] == pytest.approx([t["itm_score"] for t in b[k]["texts"]],
                                                                        abs=1e-5)
    ma, mb = _tar_members(out), _tar_members(tmp_path / "straight")
    assert ma.keys() == mb.keys()
    assert all(ma[n] == mb[n] for n in ma if not n.endswith(".json"))


def test_trained_tiny_filter_removes_noisy_web_captions(tiny_demo, tmp_path):
    """Issue 6: tiny pretrain -> finetuned filter and captioner (the session's tiny demo run, which exports each
    model as a fastblip dir) -> ``fastblip capfilt`` from the CLI on the noisy web split. Precision and recall of
    the dropped web texts against the ``noisy`` labels, and the ranking quality of the ITM scores, are above
    bounds a random filter fails (measured 2026-11-23 on 2 cores: precision 0.52, recall 0.92, AUC 0.83; a
    random filter: precision 0.40, AUC 0.5). Every image gets its synthetic caption."""
    demo_dir, report = tiny_demo
    data = json.loads((demo_dir / "data" / "synth.json").read_text())
    out = tmp_path / "boot"
    cmd = [sys.executable, "-m", "fastblip.cli", "capfilt", "--recipe", str(ROOT / "recipes/capfilt_tiny_cpu.yaml"),
           f"captioner={demo_dir / 'captioner' / 'model'}", f"filter={demo_dir / 'filter' / 'model'}",
           f"input={data['web']}", f"output={out}", "num_captions=1", "num_workers=1",
           "progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = _scores(out)
    assert len(recs) == report["data"]["web"]
    web, noisy = [], []
    for rec in recs.values():
        by_source = {t["source"]: t for t in rec["texts"]}
        assert set(by_source) == {"web", "syn0"} and by_source["syn0"]["text"].strip()  # a caption per image
        web.append(by_source["web"])
        noisy.append(bool(rec["noisy"]))
    dropped = [not t["kept"] for t in web]
    tp = sum(d and n for d, n in zip(dropped, noisy))
    precision, recall = tp / max(1, sum(dropped)), tp / sum(noisy)
    noise_rate = sum(noisy) / len(noisy)
    assert precision >= noise_rate + 0.05 and recall >= 0.5, (precision, recall, noise_rate)
    clean_s = torch.tensor([t["itm_score"] for t, n in zip(web, noisy) if not n])
    noisy_s = torch.tensor([t["itm_score"] for t, n in zip(web, noisy) if n])
    auc = (clean_s[:, None] > noisy_s[None, :]).float().mean().item()
    assert auc >= 0.7, auc
    # the same models and seed as the demo's in-process run: the CLI reproduces its decisions
    assert sum(not d for d in dropped) == report["filter"]["web_kept"]
