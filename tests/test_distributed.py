"""2-process gloo run on CPU == a single-process simulation of the same two ranks: per-rank losses (fixed
negatives), DDP-averaged gradients, and the queue holding both ranks' momentum features (the only cross-rank
exchange of BLIP pretraining). Also with the step traced whole by ``torch.compile(fullgraph=True)`` (the
``aot_eager`` backend: dynamo + AOTAutograd without inductor's codegen, which tests/test_compile_step.py
covers): the cross-rank gather (fastblip.ops.gather, functional collectives) must trace into the graph."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import tiny_config

B, L, WORLD = 4, 10, 2
NEG = [(torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])), (torch.tensor([2, 3, 0, 1]), torch.tensor([1, 0, 3, 2]))]


def _model():
    from fastblip.models import build_model

    cfg = tiny_config(queue_size=16)
    cfg.text.hidden_dropout = cfg.text.attention_dropout = 0.0
    torch.manual_seed(0)
    return build_model(cfg).train()


def _data(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    px = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(1000, 3000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    return px, ids, torch.ones_like(ids)


class _Step(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, px, ids, mask, neg):
        return self.model(px, ids, mask, alpha=0.3, negatives=neg)


def _worker(rank: int, init_file: str, out_dir: str, compiled: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from fastblip.train.distributed import DistInfo, wrap_model

    model = _model()
    inner = _Step(model)
    if compiled:  # a graph break (e.g. an untraceable collective) raises under fullgraph
        inner.compile(fullgraph=True, dynamic=False, backend="aot_eager")
    step = wrap_model(inner, DistInfo(rank, WORLD), "ddp")
    out = step(*_data(rank), NEG[rank])
    out["loss"].backward()
    torch.save({"losses": {k: v.detach() for k, v in out.items()},
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                "image_queue": model.image_queue, "text_queue": model.text_queue, "ptr": model.queue_ptr},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_rank_gloo_equals_simulation(tmp_path, compiled):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), compiled), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    base = _model()
    sims, grads, feats = [], [], []
    for r in range(WORLD):
        m = copy.deepcopy(base)
        px, ids, mask = _data(r)
        out = m(px, ids, mask, alpha=0.3, negatives=NEG[r], update_queue=False)  # ITC sees the local batch
        out["loss"].backward()
        sims.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        with torch.no_grad():  # momentum already updated inside forward, before the momentum encoders ran
            feats.append((F.normalize(m.vision_proj_m(m.visual_encoder_m(px)[:, 0]), dim=-1),
                          F.normalize(m.text_proj_m(m.text_encoder_m(ids, mask)[:, 0]), dim=-1)))
    for r in range(WORLD):
        for k, v in sims[r].items():
            torch.testing.assert_close(res[r]["losses"][k], v.detach(), rtol=1e-5, atol=1e-6)
    assert len(grads[0]) > 50
    for n in grads[0]:
        avg = (grads[0][n] + grads[1][n]) / WORLD  # DDP all-reduce mean
        for r in range(WORLD):
            torch.testing.assert_close(res[r]["grads"][n], avg, rtol=1e-4, atol=1e-6, msg=n)
    img_q, txt_q = base.image_queue.clone(), base.text_queue.clone()
    img_q[: WORLD * B] = torch.cat([f[0] for f in feats])  # rank order, written at pointer 0
    txt_q[: WORLD * B] = torch.cat([f[1] for f in feats])
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["image_queue"], img_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res[r]["text_queue"], txt_q, rtol=1e-5, atol=1e-6)
        assert int(res[r]["ptr"]) == WORLD * B
