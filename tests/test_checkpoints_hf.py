"""HF transformers BLIP dirs both ways, and pretraining init from a timm ViT."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastblip  # noqa: E402
from fastblip.checkpoints import CheckpointError  # noqa: E402
from fastblip.config import VisionConfig, tiny_config  # noqa: E402
from fastblip.models import build_model  # noqa: E402


def _hf_cfg(width_v: int = 48):
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, layer_norm_eps=1e-4, hidden_dropout_prob=0.2,
                         attention_probs_dropout_prob=0.3, label_smoothing=0.07),
        vision_config=dict(hidden_size=width_v, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=2 * width_v, image_size=32, patch_size=8, layer_norm_eps=1e-3),
        image_text_hidden_size=24)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import (
        BlipForConditionalGeneration,
        BlipForImageTextRetrieval,
        BlipForQuestionAnswering,
        BlipModel,
    )

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hfdirs")
    BlipForConditionalGeneration(_hf_cfg()).save_pretrained(d / "cap")
    BlipForImageTextRetrieval(_hf_cfg()).save_pretrained(d / "itm")
    # older transformers wrote pytorch_model.bin (5.x writes safetensors only): the same dict, torch.save'd
    (d / "itm_bin").mkdir()
    (d / "itm_bin" / "config.json").write_text((d / "itm" / "config.json").read_text())
    torch.save(_hf_sd(d / "itm"), d / "itm_bin" / "pytorch_model.bin")
    BlipForQuestionAnswering(_hf_cfg(64)).save_pretrained(d / "vqa")  # HF VQA: vision width == text width
    BlipModel(_hf_cfg()).save_pretrained(d / "clip")
    return d


def _hf_sd(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("name,kind", [("cap", "caption"), ("itm", "itm"), ("vqa", "vqa")])
def test_load_hf_dirs(hf_dirs, name, kind):
    from fastblip.checkpoints.hf import hf_to_ours

    if kind == "vqa":
        pytest.importorskip("fastblip.models.blip_vqa", reason="VQA model not written yet")
    m = fastblip.load(hf_dirs / name)
    assert m.cfg.kind == kind and m.cfg.first_token == "official"
    t, v = m.cfg.text, m.cfg.vision
    assert (t.num_heads, t.layer_norm_eps, t.hidden_dropout, t.attention_dropout, t.label_smoothing) == \
        (2, 1e-4, 0.2, 0.3, 0.07)
    assert (v.heads, v.layer_norm_eps) == (4, 1e-3)
    ours = m.state_dict()
    for k, val in _hf_sd(hf_dirs / name).items():
        assert torch.equal(ours[hf_to_ours(k)], val), k
    if kind == "caption":
        assert m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight
        assert m.text_decoder.bert.encoder.layer[0].attention.output.LayerNorm.eps == 1e-4
        assert m.visual_encoder.blocks[1].norm2.eps == 1e-3


def test_blip_model_refused(hf_dirs):
    with pytest.raises(CheckpointError, match="BlipModel"):
        fastblip.load(hf_dirs / "clip")


def test_pytorch_model_bin(hf_dirs):
    a, b = fastblip.load(hf_dirs / "itm_bin"), fastblip.load(hf_dirs / "itm")
    assert a.cfg.kind == "itm"
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k


def test_export_hf_loads_in_transformers(hf_dirs, tmp_path):
    """fastblip -> hf: HF's own from_pretrained reads every differing value and gives the same logits."""
    from transformers import BlipForConditionalGeneration

    cfg = tiny_config("caption")
    cfg.vision.layer_norm_eps, cfg.text.layer_norm_eps, cfg.text.label_smoothing = 1e-6, 1e-12, 0.1
    torch.manual_seed(3)
    m = build_model(cfg).eval()
    with torch.no_grad():
        m.visual_encoder.norm.weight.mul_(3.0)
    fastblip.save(m, tmp_path / "h", format="hf")
    conf = json.loads((tmp_path / "h" / "config.json").read_text())
    assert conf["vision_config"]["layer_norm_eps"] == 1e-6 and conf["text_config"]["num_attention_heads"] == 4
    assert conf["text_config"]["hidden_dropout_prob"] == 0.1 and conf["text_config"]["label_smoothing"] == 0.1
    h = BlipForConditionalGeneration.from_pretrained(tmp_path / "h").eval()
    assert h.config.text_config.num_attention_heads == 4 and h.config.vision_config.layer_norm_eps == 1e-6
    pv = torch.randn(2, 3, 32, 32)
    ids = m.tokenizer(["a red bus", "two dogs playing in snow"])
    dec = ids["input_ids"].clone()
    dec[:, 0] = 30522
    with torch.no_grad():
        a = h(input_ids=dec, pixel_values=pv, attention_mask=ids["attention_mask"]).logits
        b = m.caption_logits(pv, ids["input_ids"], ids["attention_mask"])
    keep = ids["attention_mask"].bool()
    assert ((a[keep] - b[keep]).norm() / a[keep].norm()).item() < 1e-5
    # and back: hf -> fastblip is lossless
    m2 = fastblip.load(tmp_path / "h")
    assert m2.cfg.vision.layer_norm_eps == 1e-6 and m2.cfg.text.label_smoothing == 0.1
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k


def test_hf_convert_round_trip(hf_dirs, tmp_path):
    fastblip.convert(hf_dirs / "itm", tmp_path / "fb", to="fastblip")
    fastblip.convert(tmp_path / "fb", tmp_path / "hf2", to="hf")
    a, b = _hf_sd(hf_dirs / "itm"), _hf_sd(tmp_path / "hf2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((hf_dirs / "itm" / "config.json").read_text())
    cb = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for sub, keys in (("text_config", ("num_attention_heads", "layer_norm_eps", "hidden_dropout_prob",
                                       "attention_probs_dropout_prob", "label_smoothing", "hidden_size")),
                      ("vision_config", ("num_attention_heads", "layer_norm_eps", "image_size", "patch_size"))):
        for k in keys:
            assert ca[sub][k] == cb[sub][k], (sub, k)


def test_pretrain_to_hf_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="'pretrain' model has no HF transformers class"):
        fastblip.save(build_model(tiny_config("pretrain")), tmp_path / "x", format="hf")


# ----------------------------------------------------------------------------- timm ViT init


@pytest.fixture(scope="module")
def timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # vit_tiny has vit_base_patch16_224's key layout at 1/16 of the size (width 192, 3 heads of 64)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def test_init_vision_from_timm_matches_timm(timm_vit):
    from fastblip.checkpoints.init import init_vision_from_timm
    from fastblip.models.vit import VisionTransformer

    vit = VisionTransformer(VisionConfig(image_size=224, patch_size=16, width=192, depth=12, heads=3)).eval()
    report = init_vision_from_timm(vit, timm_vit.state_dict())
    assert set(report["dropped"]) == {"head.weight", "head.bias"} and not report["interpolated"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a, b = vit(x), timm_vit.forward_features(x)
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_init_vision_from_timm_file_interpolates(timm_vit, tmp_path):
    from fastblip.checkpoints.init import init_vision_from_timm
    from fastblip.models.vit import VisionTransformer, interpolate_pos_embed

    torch.save(timm_vit.state_dict(), tmp_path / "vit.pth")
    vit = VisionTransformer(VisionConfig(image_size=384, patch_size=16, width=192, depth=12, heads=3))
    report = init_vision_from_timm(vit, str(tmp_path / "vit.pth"))
    assert report["interpolated"]
    assert torch.equal(vit.pos_embed.detach(), interpolate_pos_embed(timm_vit.pos_embed.detach(), 24 * 24))
    small = VisionTransformer(VisionConfig(image_size=224, patch_size=16, width=64, depth=12, heads=1))
    with pytest.raises(CheckpointError, match="shape"):
        init_vision_from_timm(small, timm_vit.state_dict())


def test_init_vision_unknown_timm_name_offline():
    from fastblip.checkpoints.init import init_vision_from_timm
    from fastblip.models.vit import VisionTransformer

    vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=4))
    with pytest.raises(CheckpointError, match="no_such_vit"):
        init_vision_from_timm(vit, "no_such_vit_model")

