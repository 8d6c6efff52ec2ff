"""Unit tests of the model code: ViT (grad checkpointing, pos-embed interpolation, drop path), attention
backends, KV-cache decoding, pretraining ties, the missing-method error, counter-based sampling uniforms."""

from __future__ import annotations

import pytest
import torch

from fastblip.config import VisionConfig, tiny_config
from fastblip.models import build_model
from fastblip.models.generation import counter_uniform
from fastblip.models.vit import VisionTransformer, interpolate_pos_embed
from fastblip.ops.attention import attention


def _vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, depth=3, heads=2, **kw))


def test_vit_grad_ckpt_equals_plain():
    a = _vit()
    b = _vit(grad_ckpt=True, ckpt_layer=2)
    b.load_state_dict(a.state_dict())
    a.train()
    b.train()
    x = torch.randn(2, 3, 32, 32)
    ya, yb = a(x), b(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), n


def test_pos_embed_interpolation():
    pe = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pe, 16) is pe  # same grid: untouched
    out = interpolate_pos_embed(pe, 64)
    assert out.shape == (1, 65, 8)
    assert torch.equal(out[:, 0], pe[:, 0])  # cls kept
    const = torch.ones(1, 17, 8)
    assert torch.allclose(interpolate_pos_embed(const, 36), torch.ones(1, 37, 8), atol=1e-6)  # bicubic of constant
    with pytest.raises(ValueError, match="cannot be interpolated"):
        interpolate_pos_embed(pe, 20)


def test_drop_path_only_in_training():
    a = _vit(drop_path_rate=0.5)
    b = _vit(drop_path_rate=0.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32)
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    a.train()
    torch.manual_seed(1)
    y1 = a(x)
    assert not torch.allclose(y1, b(x))  # with p=0.5 over 3 blocks some sample path is dropped


@pytest.mark.parametrize("case", ["self", "causal", "cross_pad"])
def test_attention_reference_vs_auto(case):
    g = torch.Generator().manual_seed(0)
    B, H, Lq, D = 3, 2, 7, 16
    Lk = Lq if case != "cross_pad" else 11
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    mask = None
    if case == "cross_pad":
        mask = torch.ones(B, Lk, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    causal = case == "causal"
    ref = attention(q, k, v, key_padding_mask=mask, causal=causal, backend="reference")
    fast = attention(q, k, v, key_padding_mask=mask, causal=causal, backend="auto")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    if causal:  # query 0 sees only key 0
        torch.testing.assert_close(ref[:, :, 0], v[:, :, 0])
    if mask is not None:  # padded keys have (numerically) no weight: changing their values changes nothing
        v2 = v.clone()
        v2[2, :, 3:] += 100.0
        torch.testing.assert_close(attention(q, k, v2, key_padding_mask=mask, backend="reference")[2], ref[2],
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pretrain():
    torch.manual_seed(0)
    return build_model(tiny_config("pretrain")).eval()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_kv_cache_equals_full_recompute(pretrain, backend):
    m = pretrain
    m.set_backends(backend)
    dec = m.text_decoder
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 9), generator=g)
    ids[:, 0] = 30522
    image = dec.bert.image_kv(m.encode_image(torch.randn(2, 3, 32, 32, generator=g)))
    with torch.no_grad():
        full = dec(ids, None, image)
        past, steps = None, []
        logits, past = dec(ids[:, :4], None, image, past=past, use_cache=True)  # prompt in one go
        steps.append(logits)
        for t in range(4, 9):
            logits, past = dec(ids[:, t:t + 1], None, image, past=past, use_cache=True)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_pretrain_encoder_decoder_ties(pretrain):
    enc, dec = pretrain.text_encoder, pretrain.text_decoder.bert
    assert dec.embeddings is enc.embeddings
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer, strict=True):
        assert ld.crossattention is le.crossattention
        assert ld.intermediate is le.intermediate and ld.output is le.output
        assert ld.attention is not le.attention  # self-attention is the only unshared part
        assert ld.attention.self.query.weight is not le.attention.self.query.weight
    assert pretrain.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    # momentum copies are separate tensors with equal values at init and take no gradient
    assert pretrain.text_encoder_m.embeddings.word_embeddings.weight is not enc.embeddings.word_embeddings.weight
    assert not any(p.requires_grad for p in pretrain.visual_encoder_m.parameters())


def test_missing_method_error_names_owners():
    m = build_model(tiny_config("caption"))
    with pytest.raises(AttributeError, match=r"has no method 'itm_logits'; models that have it: pretrain, "
                                             r"retrieval"):
        m.itm_logits(None, None, None)
    r = build_model(tiny_config("itm"))
    with pytest.raises(AttributeError, match=r"no method 'generate'.*pretrain, caption"):
        r.generate(None)
    with pytest.raises(AttributeError):
        r.no_such_thing  # noqa: B018 - an ordinary missing attribute stays an ordinary error


def test_counter_uniform_deterministic():
    seeds = torch.tensor([0, 1, 2**40 + 7, 123456789012345], dtype=torch.long)
    a = counter_uniform(seeds, 5)
    assert torch.equal(a, counter_uniform(seeds, 5))
    assert torch.equal(a[2:], counter_uniform(seeds[2:], 5))  # independent of batch composition
    assert not torch.equal(a, counter_uniform(seeds, 6))
    assert ((a >= 0) & (a < 1)).all()
    many = counter_uniform(torch.arange(20000), 3)
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.005  # ~U(0,1)


def test_nucleus_generation_reproducible_per_row(pretrain):
    from fastblip.models.generation import generate_ids

    pv = torch.randn(2, 3, 32, 32)
    seeds = torch.tensor([11, 22])
    a = generate_ids(pretrain, pv, method="nucleus", seeds=seeds, max_length=10)
    b = generate_ids(pretrain, pv[1:], method="nucleus", seeds=seeds[1:], max_length=10)
    n = min(a.shape[1], b.shape[1])
    assert torch.equal(a[1, :n], b[0, :n])

