"""Momentum update and queue write (fastblip/ops/momentum.py) against the official per-parameter loop and
slice write, transcribed here from BLIP_SPEC §2."""

import pytest
import torch

from fastblip.ops import enqueue_, momentum_update_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_momentum_update_matches_loop(device):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 2, 4), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    params_m = [torch.randn(s, generator=g).to(device) for s in shapes]
    params_m.append(torch.randn(6, generator=g).to(torch.bfloat16).to(device))  # mixed dtypes in one call
    params.append(torch.nn.Parameter(torch.randn(6, generator=g).to(torch.bfloat16).to(device)))
    want = [pm.clone() for pm in params_m]
    for pm, p in zip(want, params):  # the official loop
        pm.data = pm.data * 0.995 + p.data * (1.0 - 0.995)
    momentum_update_(params_m, params, 0.995)
    for a, b in zip(params_m, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if a.dtype == torch.float32 else 1e-2)
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="momentum"):
        momentum_update_(params_m[:2], params, 0.9)


def _official_enqueue(queue_QD, feats_BD, ptr):
    B = feats_BD.shape[0]
    queue_QD[ptr:ptr + B] = feats_BD
    return (ptr + B) % queue_QD.shape[0]


@pytest.mark.parametrize("device", DEVICES)
def test_enqueue_matches_official_and_wraps(device):
    Q, D, B = 12, 5, 4
    queue = torch.randn(Q, D, device=device)
    idx_queue = torch.full((Q,), -100, dtype=torch.long, device=device)
    want_q, want_i = queue.clone(), idx_queue.clone()
    ptr = torch.zeros(1, dtype=torch.long, device=device)
    want_ptr = 0
    for step in range(5):  # 5 x 4 = 20 rows through a 12-row queue: wraps once
        feats = torch.randn(B, D, device=device)
        ids = torch.arange(B, device=device) + 10 * step
        enqueue_([queue, idx_queue], [feats, ids], ptr)
        _official_enqueue(want_i, ids, want_ptr)
        want_ptr = _official_enqueue(want_q, feats, want_ptr)
        assert int(ptr) == want_ptr  # sync: test only
        torch.testing.assert_close(queue, want_q, rtol=0, atol=0)
        assert torch.equal(idx_queue, want_i)


def test_enqueue_wraps_when_batch_does_not_divide_queue():
    queue, ptr = torch.zeros(7, 2), torch.tensor(5)
    enqueue_(queue, torch.arange(8.0).reshape(4, 2), ptr)
    assert queue[:, 0].tolist() == [4.0, 6.0, 0, 0, 0, 0.0, 2.0] and int(ptr) == 2


def test_enqueue_bad_inputs():
    with pytest.raises(ValueError, match="larger than queue"):
        enqueue_(torch.zeros(3, 2), torch.zeros(4, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        enqueue_(torch.zeros(8, 2), torch.zeros(4, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="ptr_tensor"):
        enqueue_(torch.zeros(8, 2), torch.zeros(4, 2), torch.zeros(1))
