"""Official BLIP .pth interop and the fastblip dir format: kind/config inference from keys and shapes, strict
errors, pos-embed interpolation, lossless round trips with ties preserved, released names offline."""

from __future__ import annotations

import dataclasses
import importlib.util
import urllib.error

import pytest
import torch

import fastblip
from fastblip.checkpoints import CheckpointDownloadError, CheckpointError, CheckpointNotFoundError
from fastblip.checkpoints.official import infer_kind
from fastblip.config import ModelConfig, TextConfig, VisionConfig, tiny_config
from fastblip.models import build_model
from fastblip.models.vit import interpolate_pos_embed


def cfg64(kind: str) -> ModelConfig:
    """Head dim 64 everywhere, as every released model, so a bare .pth's config is fully inferable."""
    return ModelConfig(kind=kind, vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=2, heads=2),
                       text=TextConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256),
                       embed_dim=32, queue_size=48)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = {k: build_model(tiny_config(k)).eval() for k in ("pretrain", "retrieval", "itm", "caption")}
    with torch.no_grad():  # queues/idx non-trivial so a missed transpose shows
        out["retrieval"].idx_queue.copy_(torch.arange(out["retrieval"].idx_queue.numel()))
        out["retrieval"].ptr_queue.fill_(8)
        out["pretrain"].queue_ptr.fill_(16)
    return out


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def assert_ties(m: torch.nn.Module) -> None:
    if hasattr(m, "text_decoder"):
        dec = m.text_decoder
        assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight
        assert dec.cls.predictions.decoder.bias is dec.cls.predictions.bias
    if m.cfg.kind == "pretrain":
        enc, dec = m.text_encoder, m.text_decoder.bert
        assert dec.embeddings is enc.embeddings
        for le, ld in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
            assert ld.crossattention is le.crossattention and ld.intermediate is le.intermediate
            assert ld.output is le.output and ld.attention is not le.attention


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "itm", "caption"])
@pytest.mark.parametrize("fmt", ["official", "fastblip"])
def test_round_trip_lossless_with_ties(models, tmp_path, kind, fmt):
    m = models[kind]
    dst = tmp_path / ("m.pth" if fmt == "official" else "m")
    fastblip.save(m, dst, format=fmt)
    m2 = fastblip.load(dst)
    assert type(m2) is type(m) and m2.cfg.kind == kind and not m2.training
    assert_same(m, m2)
    assert_ties(m2)


def test_official_file_layout(models, tmp_path):
    m = models["retrieval"]
    fastblip.save(m, tmp_path / "r.pth", format="official")
    obj = torch.load(tmp_path / "r.pth", weights_only=True)
    sd = obj["model"]
    Q, D = m.cfg.queue_size, m.cfg.embed_dim
    assert sd["image_queue"].shape == (D, Q) and torch.equal(sd["image_queue"], m.image_queue.t())
    assert sd["idx_queue"].shape == (1, Q)
    assert obj["fastblip_config"]["kind"] == "retrieval"
    p = models["pretrain"]
    fastblip.save(p, tmp_path / "p.pth", format="official")
    sd = torch.load(tmp_path / "p.pth", weights_only=True)["model"]
    # every tied alias written out, as the official files have them
    for k in ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight",
              "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight", "queue_ptr"):
        assert k in sd, k
    assert torch.equal(sd["text_decoder.bert.encoder.layer.1.output.dense.weight"],
                       sd["text_encoder.encoder.layer.1.output.dense.weight"])


def test_fastblip_dir_stores_ties_once(models, tmp_path):
    from safetensors import safe_open

    fastblip.save(models["pretrain"], tmp_path / "d")
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "text_encoder.embeddings.word_embeddings.weight" in keys
    assert not keys & {"text_decoder.bert.embeddings.word_embeddings.weight",
                       "text_decoder.cls.predictions.decoder.weight",
                       "text_decoder.bert.encoder.layer.0.intermediate.dense.weight"}
    assert "text_decoder.bert.encoder.layer.0.attention.self.query.weight" in keys  # not shared
    assert (tmp_path / "d" / "tokenizer.json").is_file() and (tmp_path / "d" / "fastblip.json").is_file()


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "itm", "caption"])
def test_bare_official_config_inferred_from_shapes(tmp_path, kind):
    torch.manual_seed(1)
    m = build_model(cfg64(kind)).eval()
    sd = {k: v for k, v in fastblip.checkpoints.official.to_official(m)["model"].items()}
    sd["text_decoder.bert.embeddings.position_ids" if kind == "caption" else
       "text_encoder.embeddings.position_ids"] = torch.arange(512)[None]  # present in old files: ignored
    torch.save(sd if kind == "itm" else {"model": sd}, tmp_path / "x.pth")  # bare dict and {"model": ...}
    m2 = fastblip.load(tmp_path / "x.pth")
    want = dataclasses.asdict(m.cfg)
    got = dataclasses.asdict(m2.cfg)
    assert got["kind"] == kind
    if kind != "caption":  # a captioner has no projections and no queues: nothing to infer them from
        assert got["embed_dim"] == want["embed_dim"]
    if kind in ("pretrain", "retrieval"):
        assert got["queue_size"] == want["queue_size"]
    for k in ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio"):
        assert got["vision"][k] == want["vision"][k], k
    for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        assert got["text"][k] == want["text"][k], k
    assert_same(m, m2)


def test_infer_kind_from_keys():
    v = ["visual_encoder.cls_token"]
    enc, dec = ["text_encoder.embeddings.word_embeddings.weight"], ["text_decoder.bert.x"]
    assert infer_kind(v + enc + dec + ["itm_head.weight", "image_queue"]) == "pretrain"
    assert infer_kind(v + enc + ["itm_head.weight", "image_queue", "idx_queue"]) == "retrieval"
    assert infer_kind(v + enc + ["itm_head.weight"]) == "itm"
    assert infer_kind(v + dec) == "caption"
    assert infer_kind(v + enc + dec) == "vqa"
    assert infer_kind(v + enc + ["text_encoder.encoder.layer.0.crossattention.self0.query.weight"]) == "nlvr"
    with pytest.raises(CheckpointError, match="kind"):
        infer_kind(["foo.weight"])


def test_image_size_override_interpolates(models, tmp_path):
    m = models["retrieval"]
    fastblip.save(m, tmp_path / "r.pth", format="official")
    m2 = fastblip.load(tmp_path / "r.pth", image_size=64)
    n = (64 // 8) ** 2
    assert m2.cfg.vision.image_size == 64
    for name in ("visual_encoder", "visual_encoder_m"):
        got = getattr(m2, name).pos_embed
        assert got.shape == (1, n + 1, 64)
        assert torch.equal(got, interpolate_pos_embed(getattr(m, name).pos_embed.detach(), n))
    assert m2.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, n + 1, 64)


def test_strict_errors(models, tmp_path):
    m = models["caption"]
    sd = fastblip.checkpoints.official.to_official(m)["model"]
    bad = dict(sd, **{"text_decoder.bert.foo.weight": torch.zeros(1)})
    torch.save({"model": bad, "fastblip_config": m.cfg.to_dict()}, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match=r"unknown key 'text_decoder\.bert\.foo\.weight'"):
        fastblip.load(tmp_path / "u.pth")
    bad = dict(sd)
    bad["text_decoder.cls.predictions.transform.dense.weight"] = torch.zeros(3, 3)
    torch.save({"model": bad, "fastblip_config": m.cfg.to_dict()}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"'text_decoder\.cls\.predictions\.transform\.dense\.weight' has "
                                              r"shape \(3, 3\), the model expects \(64, 64\)"):
        fastblip.load(tmp_path / "s.pth")
    bad = {k: v for k, v in sd.items() if "blocks.1.mlp" not in k}
    torch.save({"model": bad, "fastblip_config": m.cfg.to_dict()}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing 4 tensor\(s\).*visual_encoder\.blocks\.1\.mlp\.fc1\.weight"):
        fastblip.load(tmp_path / "m.pth")
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        fastblip.load(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        fastblip.load(tmp_path / "junk.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_only_refuses_pickled_code(tmp_path, capsys):
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1)}, "x": _Evil()}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        fastblip.load(tmp_path / "e.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_fastblip_dir_version_and_dtype(models, tmp_path):
    import json

    m = build_model(tiny_config("caption")).to(torch.bfloat16).eval()
    fastblip.save(m, tmp_path / "bf")
    m2 = fastblip.load(tmp_path / "bf")
    assert m2.text_decoder.cls.predictions.bias.dtype == torch.bfloat16
    assert_same(m, m2)
    m3 = fastblip.load(tmp_path / "bf", dtype=torch.float64, device="cpu")
    assert m3.visual_encoder.pos_embed.dtype == torch.float64 and m3.device.type == "cpu"
    cfg = json.loads((tmp_path / "bf" / "fastblip.json").read_text())
    assert cfg["format_version"] == 1
    cfg["format_version"] = 99
    (tmp_path / "bf" / "fastblip.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        fastblip.load(tmp_path / "bf")


def test_released_name_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: the download must be attempted

    def blocked(url, dst, *a, **kw):
        raise urllib.error.URLError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", blocked)
    with pytest.raises(CheckpointDownloadError, match=r"cannot download 'model_base_capfilt_large' from https://"
                                                      r".*model_base_capfilt_large\.pth \(offline"):
        fastblip.load("model_base_capfilt_large")
    with pytest.raises(CheckpointDownloadError, match="offline"):
        fastblip.load("https://example.invalid/x/model.pth")


def test_released_name_uses_hub_cache(models, tmp_path, monkeypatch):
    """Online path without network: the file already in torch.hub's cache is loaded like a local one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    fastblip.save(models["caption"], tmp_path / "hub" / "checkpoints" / "model_large_caption.pth", format="official")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("no download expected"))
    assert_same(models["caption"], fastblip.load("model_large_caption"))


def test_convert_chain(models, tmp_path):
    m = models["pretrain"]
    fastblip.save(m, tmp_path / "a.pth", format="official")
    fastblip.convert(tmp_path / "a.pth", tmp_path / "b", to="fastblip")
    fastblip.convert(tmp_path / "b", tmp_path / "c.pth", to="official")
    m2 = fastblip.load(tmp_path / "c.pth")
    assert_same(m, m2)
    assert_ties(m2)
    with pytest.raises(CheckpointError, match="no HF transformers class"):
        fastblip.convert(tmp_path / "b", tmp_path / "h", to="hf")


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.mark.skipif(not _have("fastblip.models.blip_vqa"), reason="fastblip.models.blip_vqa not written yet")
def test_vqa_official_round_trip(tmp_path):
    m = build_model(cfg64("vqa")).eval()
    fastblip.save(m, tmp_path / "v.pth", format="official")
    sd = torch.load(tmp_path / "v.pth", weights_only=True)["model"]
    torch.save({"model": sd}, tmp_path / "bare.pth")  # no fastblip config: kind and widths from shapes
    m2 = fastblip.load(tmp_path / "bare.pth")
    assert m2.cfg.kind == "vqa"
    assert_same(m, m2)


@pytest.mark.skipif(not _have("fastblip.models.blip_nlvr"), reason="fastblip.models.blip_nlvr not written yet")
def test_nlvr_official_round_trip(tmp_path):
    m = build_model(dataclasses.replace(cfg64("nlvr"), text=dataclasses.replace(cfg64("nlvr").text,
                                                                                num_cross_images=2))).eval()
    fastblip.save(m, tmp_path / "n.pth", format="official")
    torch.save({"model": torch.load(tmp_path / "n.pth", weights_only=True)["model"]}, tmp_path / "bare.pth")
    m2 = fastblip.load(tmp_path / "bare.pth")
    assert m2.cfg.kind == "nlvr"
    assert_same(m, m2)


def test_official_itm_state_dict_without_temp_loads(tmp_path):
    """The official ``BLIP_ITM`` class has no ``temp``: its state dict loads with the official init 0.07 (it
    failed with "missing 1 tensor(s) for a 'itm' model: temp"), every other tensor as saved."""
    torch.manual_seed(2)
    m = build_model(cfg64("itm")).eval()
    sd = dict(fastblip.checkpoints.official.to_official(m)["model"])
    del sd["temp"]
    torch.save({"model": sd}, tmp_path / "itm.pth")
    m2 = fastblip.load(tmp_path / "itm.pth")
    assert m2.kind == "itm" and float(m2.temp) == pytest.approx(0.07)
    for k, v in m.state_dict().items():
        if k != "temp":
            assert torch.equal(v, m2.state_dict()[k]), k
