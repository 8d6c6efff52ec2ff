"""Retrieval finetuning step (the CapFilt filter): ITC with image-id positives + idx queue, ITM with hard
negatives (same-id entries never drawn), shared K/V equal to per-pair encoding, negatives across ranks with
gradient through the gathered image embeddings (2-rank gloo)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from fastblip.config import tiny_config
from fastblip.data.batch import Batch
from fastblip.models import build_model
from fastblip.models.contrastive import momentum_pairs
from fastblip.ops import itc_loss_reference, momentum_update_, sample_hard_negatives_reference


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config("retrieval", queue_size=16, negative_all_rank=True, ops_backend="reference",
                      text={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    return build_model(cfg).train()


def _batch(B: int, ids_img: list[int], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (B, 9), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    mask[1::2, 6:] = 0
    ids[:, -1] = 102
    return Batch(torch.randn(B, 3, 32, 32, generator=g), ids, mask, torch.tensor(ids_img))


def test_retrieval_step_equals_transcribed_official():
    model = _model()
    before = copy.deepcopy(model)
    B, idx = 6, [3, 3, 5, 7, 7, 9]
    batch = _batch(B, idx)
    torch.manual_seed(123)
    out = model.training_step(batch, alpha=0.3, update_momentum=True)

    # the official computation, step by step, on the copy (per-pair ITM, no shared K/V)
    ref = before
    with torch.no_grad():
        ref.temp.clamp_(0.001, 0.5)
        momentum_update_(*momentum_pairs(ref), ref.cfg.momentum)
        img_m = F.normalize(ref.vision_proj_m(ref.visual_encoder_m(batch.pixel_values)[:, 0]), dim=-1)
        txt_m = F.normalize(ref.text_proj_m(ref.text_encoder_m(batch.input_ids, batch.attention_mask)[:, 0]), dim=-1)
    image_feat = ref.image_features(batch.pixel_values)
    text_feat = ref.text_features(batch.input_ids, batch.attention_mask)
    idx_t = torch.tensor(idx)
    idx_all = torch.cat([idx_t, ref.idx_queue])
    itc, _, _ = itc_loss_reference(image_feat, text_feat, torch.cat([img_m, ref.image_queue]),
                                   torch.cat([txt_m, ref.text_queue]), ref.temp, 0.3, idx_t, idx_all)
    assert out["itc_loss"].item() == pytest.approx(itc.item(), rel=1e-5)
    torch.manual_seed(123)  # nothing random ran before the draw in the model (dropout 0)
    sim_i2t = image_feat.detach() @ text_feat.detach().t() / ref.temp.detach()
    sim_t2i = text_feat.detach() @ image_feat.detach().t() / ref.temp.detach()
    neg_img, neg_txt = sample_hard_negatives_reference(sim_i2t, sim_t2i, idx_t, idx_t, eps=0.0)
    assert not (idx_t[neg_img] == idx_t).any() and not (idx_t[neg_txt] == idx_t).any()  # same id never drawn
    pix, ids, mask = batch.pixel_values, batch.input_ids, batch.attention_mask
    logits = torch.cat([ref.itm_logits(pix, ids, mask), ref.itm_logits(pix[neg_img], ids, mask),
                        ref.itm_logits(pix, ids[neg_txt], mask[neg_txt])])
    labels = torch.tensor([1] * B + [0] * (2 * B))
    assert out["itm_loss"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    # queues: momentum features and ids written at the pointer, pointer advanced by B
    assert int(model.ptr_queue) == B
    assert model.idx_queue[:B].tolist() == idx and (model.idx_queue[B:] == -100).all()
    assert torch.allclose(model.image_queue[:B], img_m, atol=1e-6)
    out["loss"].backward()
    assert model.temp.grad is not None and model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    # rank 0: every local pair has the same image id, so all its negatives must come from rank 1
    batch = _batch(4, [0, 0, 0, 0] if rank == 0 else [1, 2, 3, 4], seed=rank)
    out = model.training_step(batch, alpha=0.4, update_momentum=True)
    # only rank 0's ITM loss counts: any ViT gradient on rank 1 flowed back through the gather
    (out["itm_loss"] * (1.0 if rank == 0 else 0.0)).backward()
    g = model.visual_encoder.patch_embed.proj.weight.grad
    q.put((rank, float(g.abs().sum()) if g is not None else 0.0, int(model.ptr_queue),
           model.idx_queue[:8].tolist()))
    torch.distributed.destroy_process_group()


def test_negatives_across_ranks_carry_gradient():
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (_, g0, p0, q0), (_, g1, p1, q1) = res
    assert g1 > 0, "rank 1's images got no gradient from rank 0's negatives"
    assert p0 == p1 == 8  # the global batch (2 x 4) enqueued on both ranks
    assert q0 == q1 == [0, 0, 0, 0, 1, 2, 3, 4]
