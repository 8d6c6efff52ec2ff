"""The whole training step compiled (fastblip.train.step, ``train.compile``): pretrain, retrieval and caption each
run the same optimiser steps eagerly and compiled (``torch.compile(fullgraph=True)``: a graph break is an error)
and must agree; the pretraining run covers 20 steps over captions of varied length and may compile at most one
graph per length bucket. And no training step syncs with the host (a dispatch-mode counter,
fastblip.train.syncs), on the reference ops and on the Triton ops under the interpreter.

Sized for 2 CPU cores: one-layer towers, max_text_len 16 (two buckets: 8 and 16 tokens); inductor compiles each
graph once per session (~20-40 s each). Dropout is 0 and inductor falls back to eager's RNG
(``fallback_random``) so both runs draw the same hard negatives.

Tolerance: the compiled graph reorders fp32 sums (fused kernels, other reduction trees): per-step losses agree to
2e-4 relative over the run (AdamW at lr 1e-3 lets a 1e-6 difference grow slowly), the first step's gradients
to 1e-4 of each tensor's largest magnitude plus 1e-6 of the model's largest gradient (the self-attention key
biases get a gradient that is exactly 0 in real arithmetic and ~1e-11 of rounding noise in both runs).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastblip.config import tiny_config
from fastblip.data.batch import Batch
from fastblip.models import build_model
from fastblip.train.step import TrainStep, compile_step, compiled_graphs
from fastblip.train.syncs import HostSyncCounter

B, LMAX, STEPS = 8, 16, {"pretrain": 20, "retrieval": 3, "caption": 3}
BUCKETS = (8, 16)


def _cfg(kind: str):
    cfg = tiny_config(kind, queue_size=2 * B, max_text_len=LMAX)
    cfg.vision.depth = cfg.text.num_layers = 1
    cfg.text.hidden_dropout = cfg.text.attention_dropout = 0.0
    return cfg


def _batches(kind: str, n: int, seed: int = 0) -> list[Batch]:
    """Captions of 3..16 tokens padded to their bucket (8 or 16), as data.padding=auto gives a compiled run."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lens = torch.randint(3, 9 if i % 3 else LMAX + 1, (B,), generator=g)  # both buckets, in no fixed order
        L = next(b for b in BUCKETS if b >= int(lens.max()))
        ar = torch.arange(L)
        ids = torch.randint(1000, 3000, (B, L), generator=g)
        ids[:, 0] = 101
        ids[ar[None] == (lens[:, None] - 1)] = 102
        mask = (ar[None] < lens[:, None]).long()
        img_ids = torch.randint(0, B // 2, (B,), generator=g) if kind == "retrieval" else torch.arange(B)
        out.append(Batch(torch.randn(B, 3, 32, 32, generator=g), ids * mask, mask, img_ids))
    return out


def _train(step: TrainStep, batches: list[Batch]) -> tuple[list[torch.Tensor], dict]:
    """One optimiser step per batch; returns the per-step losses and the first step's gradients."""
    opt = torch.optim.AdamW([p for p in step.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    alpha = torch.zeros(())
    losses, grads = [], {}
    torch.manual_seed(123)  # the negatives' sampling draws from the default generator
    for i, batch in enumerate(batches):
        alpha.fill_(0.4 * min(1.0, i / 10))
        out = step(batch, alpha, update_momentum=True)
        out["loss"].backward()
        losses.append(torch.stack([out[k].detach() for k in sorted(out)]))
        if i == 0:
            grads = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.fixture(scope="module", params=["pretrain", "retrieval", "caption"])
def runs(request):
    import torch._inductor.config as icfg

    kind = request.param
    torch.manual_seed(0)
    model = build_model(_cfg(kind)).train()
    model.set_backends(attention="sdpa", ops="reference")
    batches = _batches(kind, STEPS[kind])
    eager = _train(TrainStep(copy.deepcopy(model)), batches)
    torch._dynamo.reset()
    before = compiled_graphs()
    step = TrainStep(copy.deepcopy(model))
    compile_step(step, "step")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(icfg, "fallback_random", True)
        compiled = _train(step, batches)
    return kind, eager, compiled, compiled_graphs() - before


def test_compiled_step_equals_eager(runs):
    kind, (loss_e, grad_e), (loss_c, grad_c), _ = runs
    for i, (a, b) in enumerate(zip(loss_c, loss_e, strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6, msg=f"{kind} step {i} losses")
    assert grad_c.keys() == grad_e.keys() and len(grad_e) > 10
    floor = 1e-6 * max(g.abs().max() for g in grad_e.values())
    for n, g in grad_e.items():
        err = (grad_c[n] - g).abs().max()
        assert err <= 1e-4 * g.abs().max() + floor, f"{kind} grad {n}: {err:.3e}"


def test_graphs_are_bounded_by_the_buckets(runs):
    kind, *_, graphs = runs
    # fullgraph=True already made any graph break an error; a recompile per step would show here
    assert 1 <= graphs <= len(BUCKETS), f"{kind}: {graphs} graphs"


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "caption"])
@pytest.mark.parametrize("ops", ["reference", "triton"])
def test_training_step_has_no_host_sync(kind, ops):
    from fastblip.kernels import INTERPRET

    if ops == "triton" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = build_model(_cfg(kind)).train()
    model.set_backends(attention="sdpa", ops=ops)
    step = TrainStep(model)
    batch = _batches(kind, 1, seed=5)[0]
    with HostSyncCounter() as syncs:
        for first in (True, False):  # with and without the momentum update
            out = step(batch, torch.tensor(0.4), update_momentum=first)
            out["loss"].backward()
    assert syncs.total == 0, dict(syncs.counts)


def test_sync_counter_sees_syncs():
    """The counter is not blind: the ops that made the official step wait for the GPU are counted."""
    import torch.nn.functional as F

    w = torch.rand(4, 5)
    with HostSyncCounter() as c:
        w.sum().item()
        torch.multinomial(w, 1)  # its CUDA kernel reads (max, min) and the zero-row count on the host
        F.one_hot(torch.tensor([1, 2]), 5)
        w[w > 0.5]
    assert c.counts["_local_scalar_dense"] >= 2 and c.counts["multinomial"] == 1
    assert c.counts["index[bool mask]"] == 1
