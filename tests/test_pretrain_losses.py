"""Pretraining objectives: reference path == the published formulas transcribed here (fixed negatives), fast
path (shared cross-attention K/V, fused-op dispatch) == reference forward and backward, padding-invariance,
and no host sync in the step. Dropout is 0 so both sides see the same function."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fastblip.config import tiny_config
from fastblip.models import build_model

B, L = 6, 12


def _cfg(**kw):
    cfg = tiny_config(queue_size=24, **kw)  # queue multiple of B (official assert)
    cfg.text.hidden_dropout = cfg.text.attention_dropout = 0.0
    return cfg


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    m = build_model(_cfg(shared_cross_kv=False, ops_backend="reference", attention_backend="reference"))
    with torch.no_grad():  # momentum encoders differ from the online ones, as after some training
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m.train()


def _batch(seed=1, pad_to=None):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(B, 3, 32, 32, generator=g)
    lens = torch.tensor([12, 7, 9, 4, 12, 6])
    ids = torch.randint(1000, 3000, (B, L), generator=g)
    ids[:, 0] = 101
    ar = torch.arange(L)
    ids[ar[None] == (lens[:, None] - 1)] = 102
    mask = (ar[None] < lens[:, None]).long()
    ids = ids * mask
    if pad_to:
        ids, mask = F.pad(ids, (0, pad_to - L)), F.pad(mask, (0, pad_to - L))
    return px, ids, mask


NEG = (torch.tensor([3, 0, 5, 1, 2, 4]), torch.tensor([1, 4, 0, 5, 3, 2]))


def _transcription(m, px, ids, mask, alpha, neg):
    """BLIP_SPEC §2 written out: python-loop momentum update, explicit ITC soft targets, ITM 3B pairs, LM."""
    with torch.no_grad():
        m.temp.clamp_(0.001, 0.5)
    emb = m.visual_encoder(px)
    img = F.normalize(m.vision_proj(emb[:, 0]), dim=-1)
    txt = F.normalize(m.text_proj(m.text_encoder(ids, mask)[:, 0]), dim=-1)
    with torch.no_grad():
        for a, b in (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                     ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m")):
            for p, pm in zip(getattr(m, a).parameters(), getattr(m, b).parameters()):
                pm.data = pm.data * m.cfg.momentum + p.data * (1 - m.cfg.momentum)
        img_m = F.normalize(m.vision_proj_m(m.visual_encoder_m(px)[:, 0]), dim=-1)
        txt_m = F.normalize(m.text_proj_m(m.text_encoder_m(ids, mask)[:, 0]), dim=-1)
        img_all = torch.cat([img_m.t(), m.image_queue.t()], dim=1)  # official (D, B+Q)
        txt_all = torch.cat([txt_m.t(), m.text_queue.t()], dim=1)
        tgt = torch.zeros(B, B + m.cfg.queue_size)
        tgt.fill_diagonal_(1)
        t_i2t = alpha * F.softmax(img_m @ txt_all / m.temp, dim=1) + (1 - alpha) * tgt
        t_t2i = alpha * F.softmax(txt_m @ img_all / m.temp, dim=1) + (1 - alpha) * tgt
    loss_i2t = -torch.sum(F.log_softmax(img @ txt_all / m.temp, dim=1) * t_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(txt @ img_all / m.temp, dim=1) * t_t2i, dim=1).mean()
    itc = (loss_i2t + loss_t2i) / 2
    enc = ids.clone()
    enc[:, 0] = m.cfg.text.enc_token_id
    pos = m.text_encoder(enc, mask, image=emb)[:, 0]
    neg_img, neg_txt = neg
    out_neg = m.text_encoder(torch.cat([enc, enc[neg_txt]]), torch.cat([mask, mask[neg_txt]]),
                             image=torch.cat([emb[neg_img], emb]))[:, 0]
    logits = m.itm_head(torch.cat([pos, out_neg]))
    itm = F.cross_entropy(logits, torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
    dec = ids.clone()
    dec[:, 0] = m.cfg.text.bos_token_id
    lm_logits = m.text_decoder(dec, mask, emb)
    labels = ids.masked_fill(mask == 0, -100)
    lm = F.cross_entropy(lm_logits[:, :-1].reshape(-1, lm_logits.shape[-1]), labels[:, 1:].reshape(-1),
                         label_smoothing=0.1)
    return {"itc_loss": itc, "itm_loss": itm, "lm_loss": lm, "loss": itc + itm + lm}, (img_m, txt_m)


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _run(m, px, ids, mask, alpha=0.3, neg=NEG):
    m.zero_grad(set_to_none=True)
    out = m(px, ids, mask, alpha=alpha, negatives=neg)
    out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(m)


def test_reference_equals_transcription(base_model):
    m1, m2 = copy.deepcopy(base_model), copy.deepcopy(base_model)
    px, ids, mask = _batch()
    out1, g1 = _run(m1, px, ids, mask)
    m2.zero_grad(set_to_none=True)
    out2, (img_m, txt_m) = _transcription(m2, px, ids, mask, 0.3, NEG)
    out2["loss"].backward()
    g2 = _grads(m2)
    for k in out2:  # fp32, same operations in another order: 1e-5 relative (DESIGN §5)
        torch.testing.assert_close(out1[k], out2[k].detach(), rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 50
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
    # momentum updated before the momentum forward; the queue got those features at the old pointer
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        if n.split(".")[0].endswith("_m"):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)  # foreach fma vs mul+add: 1 ulp
    torch.testing.assert_close(m1.image_queue[:B], img_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1.text_queue[:B], txt_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1.image_queue[B:], base_model.image_queue[B:])
    assert int(m1.queue_ptr) == B


@pytest.mark.parametrize("ops", ["reference", None])
def test_fast_path_equals_reference(base_model, ops):
    ref = copy.deepcopy(base_model)
    fast = copy.deepcopy(base_model)
    fast.cfg = copy.deepcopy(fast.cfg)
    fast.cfg.shared_cross_kv = True
    fast.set_backends(attention="auto", ops=ops)
    px, ids, mask = _batch()
    o1, g1 = _run(ref, px, ids, mask)
    o2, g2 = _run(fast, px, ids, mask)
    # fp32 on both sides; SDPA vs explicit softmax differ by rounding only: 1e-4 relative
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], rtol=1e-4, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-3, atol=1e-5, msg=n)
    torch.testing.assert_close(fast.image_queue, ref.image_queue)


@pytest.mark.parametrize("shared", [False, True])
def test_gradients_are_bit_identical_run_to_run(shared):
    """Same weights, batch and seed: bit-identical gradients on CPU with 2 threads (the tiny recipe's model,
    dropout on). Gathering image tokens or K/V with ``x[idx]`` made this fail: its backward (index_put_
    accumulate) adds with CPU atomics once a gather is large enough, so the same seed trained a different
    model in every process (tests/test_downstream_learns.py was flaky)."""
    from pathlib import Path

    from fastblip.data.batch import Batch
    from fastblip.train.init import build_and_init
    from fastblip.train.recipe import read_recipe

    torch.manual_seed(0)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tiny_cpu.yaml"
    m = build_and_init(read_recipe(recipe, [f"model.config.shared_cross_kv={str(shared).lower()}"])).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (16, 12), generator=g)
    ids[:, 0] = 101
    batch = Batch(torch.randn(16, 3, 64, 64, generator=g), ids, torch.ones_like(ids), torch.arange(16))
    state = copy.deepcopy(m.state_dict())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(3):
            m.load_state_dict(state)
            m.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            m.training_step(batch, alpha=0.4, update_momentum=True)["loss"].backward()
            runs.append(_grads(m))
    finally:
        torch.set_num_threads(threads)
    for grads in runs[1:]:
        assert [n for n in grads if not torch.equal(grads[n], runs[0][n])] == []


def test_padding_longest_equals_max_length(base_model):
    fast = copy.deepcopy(base_model)
    fast.cfg.shared_cross_kv = True
    fast.set_backends(attention="auto", ops=None)
    o_long, _ = _run(copy.deepcopy(fast), *_batch())
    o_max, _ = _run(copy.deepcopy(fast), *_batch(pad_to=30))  # BLIP's max_length padding
    for k in o_long:
        torch.testing.assert_close(o_long[k], o_max[k], rtol=1e-5, atol=1e-5)


def test_sampling_has_no_host_sync(base_model, monkeypatch):
    m = copy.deepcopy(base_model)
    m.cfg.shared_cross_kv = True
    m.set_backends(attention="auto", ops=None)
    px, ids, mask = _batch()

    def boom(*a, **k):
        raise AssertionError("host sync in the training step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = m(px, ids, mask, alpha=0.4)  # negatives sampled on device
    out["loss"].backward()
    monkeypatch.undo()
    assert torch.isfinite(out["loss"]).all()
    assert out["itm_loss"] > 0


def test_negatives_argument_is_used(base_model):
    """negatives = the positives themselves: the 2B negative rows are the B positive pairs labelled 0, so the
    ITM loss is (Σ CE(l, 1) + 2 Σ CE(l, 0)) / 3B over the pairs' own logits; ITC and LM do not change."""
    px, ids, mask = _batch()
    m = copy.deepcopy(base_model)
    with torch.no_grad():
        logits = m.itm_logits(px, ids, mask).float()
    ar = torch.arange(B)
    o_self, _ = _run(copy.deepcopy(m), px, ids, mask, neg=(ar, ar))
    o_neg, _ = _run(copy.deepcopy(m), px, ids, mask, neg=NEG)
    ce = lambda y: F.cross_entropy(logits, torch.full((B,), y), reduction="sum")  # noqa: E731
    torch.testing.assert_close(o_self["itm_loss"], (ce(1) + 2 * ce(0)) / (3 * B), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_self["itc_loss"], o_neg["itc_loss"])
    torch.testing.assert_close(o_self["lm_loss"], o_neg["lm_loss"])
