"""Retrieval recall and caption metrics against hand-computed values; ITM re-ranking against the public
``itm_logits`` / ``itc_similarity`` of the same model."""

from __future__ import annotations

import math

import pytest
import torch

from fastblip.config import tiny_config
from fastblip.eval.retrieval import FILL, recall_at_k, score_matrices
from fastblip.models import build_model


def test_recall_hand_computed():
    # 3 images, 5 texts: image 0 -> texts {0, 1}, image 1 -> {2}, image 2 -> {3, 4}
    img2txt = [[0, 1], [2], [3, 4]]
    txt2img = [0, 0, 1, 2, 2]
    s_i2t = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2],    # best gt text 1 at rank 0 -> hit@1
                          [0.8, 0.7, 0.6, 0.5, 0.4],    # gt text 2 at rank 2 -> hit@5 only
                          [0.9, 0.8, 0.7, 0.6, 0.1]])   # best gt 3 (0.6) at rank 3 -> hit@5
    s_t2i = torch.tensor([[0.2, 0.5, 0.1],   # gt 0 at rank 1
                          [0.9, 0.1, 0.2],   # gt 0 at rank 0
                          [0.3, 0.2, 0.1],   # gt 1 at rank 1
                          [0.1, 0.2, 0.3],   # gt 2 at rank 0
                          [0.5, 0.4, 0.3]])  # gt 2 at rank 2
    r = recall_at_k(s_i2t, s_t2i, txt2img, img2txt)
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r5"] == pytest.approx(100.0) and r["txt_r10"] == pytest.approx(100.0)
    assert r["img_r1"] == pytest.approx(40.0) and r["img_r5"] == pytest.approx(100.0)
    assert r["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert r["img_r_mean"] == pytest.approx(240 / 3)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)


def test_recall_matches_official_argsort_loop():
    # the official itm_eval (argsort, first index of each gt), transcribed, on random tie-free scores
    g = torch.Generator().manual_seed(0)
    I, T = 7, 23  # noqa: E741
    txt2img = torch.randint(0, I, (T,), generator=g).tolist()
    img2txt = [[t for t in range(T) if txt2img[t] == i] or [] for i in range(I)]
    keep = [i for i in range(I) if img2txt[i]]
    s_i2t, s_t2i = torch.rand(I, T, generator=g)[keep], torch.rand(T, I, generator=g)[:, keep]
    remap = {old: new for new, old in enumerate(keep)}
    txt2img = [remap[i] for i in txt2img]
    img2txt = [img2txt[i] for i in keep]
    ranks_i = []
    for i, row in enumerate(s_i2t):
        order = torch.argsort(row, descending=True).tolist()
        ranks_i.append(min(order.index(t) for t in img2txt[i]))
    ranks_t = [torch.argsort(row, descending=True).tolist().index(txt2img[t]) for t, row in enumerate(s_t2i)]
    r = recall_at_k(s_i2t, s_t2i, txt2img, img2txt)
    for k in (1, 5, 10):
        assert r[f"txt_r{k}"] == pytest.approx(100 * sum(x < k for x in ranks_i) / len(ranks_i))
        assert r[f"img_r{k}"] == pytest.approx(100 * sum(x < k for x in ranks_t) / len(ranks_t))


def test_rerank_scores_equal_public_itm_plus_itc():
    torch.manual_seed(0)
    model = build_model(tiny_config("itm")).eval()
    I, T, k = 5, 9, 3  # noqa: E741
    pix = torch.randn(I, 3, 32, 32)
    ids = torch.randint(1000, 3000, (T, 8))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0
    with torch.no_grad():
        emb = model.encode_image(pix)
        sim = model.itc_similarity(pix, ids, mask)
        s_i2t, s_t2i = score_matrices(model, emb, ids, mask, sim, k_test=k, chunk=2)
        # every (image, text) pair through the public per-pair method
        full = torch.stack([model.itm_logits(pix[i:i + 1].expand(T, -1, -1, -1), ids, mask)[:, 1]
                            for i in range(I)])  # (I, T)
    want = full + sim
    top_i = sim.topk(k, dim=1).indices
    for i in range(I):
        assert torch.allclose(s_i2t[i, top_i[i]], want[i, top_i[i]], atol=1e-5)
        others = torch.ones(T, dtype=torch.bool)
        others[top_i[i]] = False
        assert (s_i2t[i, others] == FILL).all()
    top_t = sim.t().topk(k, dim=1).indices
    for t in range(T):
        assert torch.allclose(s_t2i[t, top_t[t]], want[top_t[t], t], atol=1e-5)
        assert (s_t2i[t] == FILL).sum() == I - k


def test_caption_metrics_hand_computed():
    pytest.importorskip("pycocoevalcap")
    from fastblip.eval.caption_metrics import caption_scores

    cands = {1: "a red circle on the left side", 2: "green square top right corner now"}
    refs = {1: ["a red circle on the left side"], 2: ["blue star in the middle there"]}
    s = caption_scores(cands, refs, tokenize=False)
    # CIDEr-D: image 1 matches its only reference (cosine 1 for n = 1..4, no length penalty) -> 10;
    # image 2 shares no n-gram -> 0; corpus mean 5
    assert s["cider"] == pytest.approx(5.0, abs=1e-9)
    # BLEU-4 (corpus): matched / candidate n-grams 7/13, 6/11, 5/9, 4/7; lengths 13 == 13, brevity penalty 1
    want = math.exp(sum(math.log(x) for x in (7 / 13, 6 / 11, 5 / 9, 4 / 7)) / 4)
    assert s["bleu4"] == pytest.approx(want, rel=1e-6)
    # the PTB tokenizer (Java) on already clean text changes nothing
    assert caption_scores(cands, refs, tokenize=True) == pytest.approx(s)


def test_cider_partial_overlap_hand_computed():
    pytest.importorskip("pycocoevalcap")
    from fastblip.eval.caption_metrics import caption_scores

    # two images, disjoint vocabularies, so each n-gram's document frequency is 1 and idf = log 2 for all:
    # tf-idf vectors are proportional to raw counts. Candidate 1 = "a b c d" vs reference "a b c e":
    # n=1: cos = 3/4, n=2: 2/3, n=3: 1/2, n=4: 0; equal lengths -> no penalty. CIDEr-D = 10 * mean(...)
    cands = {1: "a b c d", 2: "w x y z"}
    refs = {1: ["a b c e"], 2: ["w x y z"]}
    s = caption_scores(cands, refs, tokenize=False)
    c1 = 10 * (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4
    assert s["cider"] == pytest.approx((c1 + 10.0) / 2, rel=1e-9)


def test_caption_metrics_bad_input():
    pytest.importorskip("pycocoevalcap")
    from fastblip.eval.caption_metrics import caption_scores

    with pytest.raises(ValueError, match="different images"):
        caption_scores({1: "a"}, {2: ["a"]})
