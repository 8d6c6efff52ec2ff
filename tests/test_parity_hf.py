"""Parity with HF transformers (an independent BLIP implementation): tiny random HF BLIP models saved with
``save_pretrained`` and loaded with ``fastblip.load`` give the same ITM logits, ITC similarities, caption logits
and greedy/beam generations within 1e-5 relative error in fp32, with attention backends reference and auto.

The configs use unusual values (LayerNorm eps 1e-3 / 1e-2, 2 heads of 32 and 24, dropout 0.25/0.15, label
smoothing 0.05, embed dim 40) so a loader that ignores any of them fails. Weights are re-drawn with larger
norms than HF's init (vision init std 1e-10 would make the ViT nearly constant and hide eps errors).
HF feeds the ids the official code builds ([ENC] first for ITM, [DEC] first for the decoder); fastblip is
fed plain tokenizer ids and substitutes them itself (first_token="official").
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastblip  # noqa: E402
from fastblip.models.generation import generate_ids  # noqa: E402

TOL = 1e-5  # fp32: both sides do the same ops in a different order; observed ~1e-7
SEP_BIAS = 1.7  # raises [SEP]'s LM bias so hypotheses end at different lengths (greedy 6/20, beam 10/20 tokens)


def _hf_config():
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(vocab_size=30524, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, layer_norm_eps=1e-3, hidden_dropout_prob=0.25,
                         attention_probs_dropout_prob=0.15, label_smoothing=0.05),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                           image_size=32, patch_size=8, layer_norm_eps=1e-2),
        image_text_hidden_size=40)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in n.lower():
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    cfg = _hf_config()
    itm = BlipForImageTextRetrieval(cfg).eval()
    _randomize(itm, 1)
    cap = BlipForConditionalGeneration(cfg).eval()
    _randomize(cap, 2)
    with torch.no_grad():
        cap.text_decoder.cls.predictions.bias[102] += SEP_BIAS
    d = tmp_path_factory.mktemp("hf")
    itm.save_pretrained(d / "itm")
    cap.save_pretrained(d / "cap")
    return itm, cap, fastblip.load(d / "itm"), fastblip.load(d / "cap")


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(4, 3, 32, 32, generator=g)
    from fastblip.data.tokenizer import load_tokenizer

    b = load_tokenizer()(["a dog runs on the beach", "two cats sleeping on a red couch today",
                          "a man", "people walking in the rain with umbrellas"])
    return pv, b["input_ids"], b["attention_mask"]


def test_unusual_config_values_are_read(hf_pair):
    _, _, itm, cap = hf_pair
    for m in (itm, cap):
        t, v = m.cfg.text, m.cfg.vision
        assert (t.num_heads, t.layer_norm_eps, t.hidden_dropout, t.attention_dropout, t.label_smoothing) == \
            (2, 1e-3, 0.25, 0.15, 0.05)
        assert (v.heads, v.layer_norm_eps, v.width, v.image_size, v.patch_size, v.mlp_ratio) == \
            (2, 1e-2, 48, 32, 8, 2.0)
        assert m.cfg.first_token == "official"
    assert itm.cfg.kind == "itm" and itm.cfg.embed_dim == 40 and cap.cfg.kind == "caption"


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_itm_itc_parity(hf_pair, inputs, backend):
    hf_itm, _, itm, _ = hf_pair
    pv, ids, mask = inputs
    itm.set_backends(backend)
    enc = ids.clone()
    enc[:, 0] = 30523  # [ENC], as the official ITM builds it
    with torch.no_grad():
        h = hf_itm(input_ids=enc, pixel_values=pv, attention_mask=mask, use_itm_head=True).itm_score
        f = itm.itm_logits(pv, ids, mask)
        assert rel(f, h) < TOL
        h = hf_itm(input_ids=ids, pixel_values=pv, attention_mask=mask, use_itm_head=False).itm_score
        f = itm.itc_similarity(pv, ids, mask)
    assert f.shape == h.shape == (4, 4)
    assert rel(f, h) < TOL
    # an ITM head that ignored the image would not separate rows; make sure the check is not vacuous
    assert h.std() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_caption_logits_parity(hf_pair, inputs, backend):
    _, hf_cap, _, cap = hf_pair
    pv, ids, mask = inputs
    cap.set_backends(backend)
    dec = ids.clone()
    dec[:, 0] = 30522  # [DEC]
    with torch.no_grad():
        h = hf_cap(input_ids=dec, pixel_values=pv, attention_mask=mask).logits
        f = cap.caption_logits(pv, ids, mask)
    keep = mask.bool()
    assert f.shape == h.shape
    assert rel(f[keep], h[keep]) < TOL


def _strip(row: list[int]) -> list[int]:
    return row[: row.index(102) + 1] if 102 in row else row


_HF_GEN: dict[str, torch.Tensor] = {}  # HF's generations, shared by both backends' tests


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generation_parity(hf_pair, inputs, backend, method):
    _, hf_cap, _, cap = hf_pair
    pv = inputs[0]
    cap.set_backends(backend)
    if method not in _HF_GEN:
        prompt = cap.tokenizer(["a picture of "])["input_ids"]  # HF drops the final [SEP] and sets [DEC] itself
        kw = dict(num_beams=1, do_sample=False) if method == "greedy" else dict(num_beams=3)
        _HF_GEN[method] = hf_cap.generate(pv, input_ids=prompt.repeat(4, 1), max_length=20, min_length=5, **kw)
    h = _HF_GEN[method]
    f = generate_ids(cap, pv, method=method, max_length=20, min_length=5, num_beams=3)
    hr, fr = [_strip(r) for r in h.tolist()], [_strip(r) for r in f.tolist()]
    assert fr == hr
    lengths = {len(r) for r in hr}
    assert len(lengths) >= 2, f"all hypotheses have one length {lengths}: the early-end case is not exercised"
