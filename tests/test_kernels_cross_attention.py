"""Indexed cross-attention kernel against the gather + explicit-softmax reference, forward and every grad.

Tolerances (flash-attention's rule): fp32: 1e-5 of the largest magnitude (summation order only). bf16: the
kernel's error against the fp32 reference (computed from the same bf16 inputs) may be at most 2x PyTorch's
own bf16 error on the same inputs, plus 2e-3 of the largest magnitude for the fp32 atomics' order.
"""

import pytest
import torch

from fastblip.kernels import INTERPRET
from fastblip.ops import cross_attention, cross_attention_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def _grads(fn, q, k, v, kvi, mask, go, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, kvi, mask, **kw)
    out.backward(go.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


SHAPES = [  # N, M, H, Lq, Lk, D
    (7, 4, 2, 11, 37, 16),  # image 3 is never indexed: its dk, dv must be exactly 0
    (5, 3, 1, 70, 131, 32),  # two q blocks, three k tiles
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_attention_matches_reference(device, dtype, use_mask, shape):
    _skip_cpu_without_interpreter(device)
    N, M, H, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    q, k, v = (torch.randn(*s, generator=g).to(dtype).to(device) for s in
               ((N, H, Lq, D), (M, H, Lk, D), (M, H, Lk, D)))
    kvi = torch.randint(0, M - 1 if M > 3 else M, (N,), generator=g).to(device)
    kvi[0] = 0
    mask = (torch.rand(M, Lk, generator=g) > 0.3).to(device) if use_mask else None
    go = torch.randn(N, H, Lq, D, generator=g).to(device)
    got = _grads(cross_attention, q, k, v, kvi, mask, go, backend="triton")
    ref = _grads(cross_attention_reference, q.float(), k.float(), v.float(), kvi, mask, go)
    low = _grads(cross_attention_reference, q, k, v, kvi, mask, go) if dtype != torch.float32 else None
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        a, r = got[i], ref[i]
        assert a.dtype == dtype and a.shape == r.shape, name
        err, scale = (a.float() - r).abs().max().item(), r.abs().max().item()
        if low is None:
            assert err <= 1e-5 * scale, f"{name}: {err:.3e} vs scale {scale:.3e}"
        else:
            base = (low[i].float() - r).abs().max().item()
            assert err <= 2 * base + 2e-3 * scale, f"{name}: {err:.3e} > 2 x torch bf16 {base:.3e}"
    unused = torch.ones(M, dtype=torch.bool, device=device)
    unused[kvi] = False
    assert (got[2][unused] == 0).all() and (got[3][unused] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_shared_kv_equals_duplicated_kv(device):
    """Rows sharing an image give the same result as giving each row its own copy (the point of sharing),
    and the shared image's dk is the sum of the copies' dk."""
    _skip_cpu_without_interpreter(device)
    N, H, Lq, Lk, D = 3, 2, 9, 21, 16
    q = torch.randn(N, H, Lq, D, device=device)
    k, v = torch.randn(1, H, Lk, D, device=device), torch.randn(1, H, Lk, D, device=device)
    go = torch.randn(N, H, Lq, D, device=device)
    shared = _grads(cross_attention, q, k, v, torch.zeros(N, dtype=torch.long, device=device), None, go,
                    backend="triton")
    dup = _grads(cross_attention, q, k.expand(N, -1, -1, -1), v.expand(N, -1, -1, -1),
                 torch.arange(N, device=device), None, go, backend="triton")
    torch.testing.assert_close(shared[0], dup[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[2], dup[2].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


def test_cross_attention_bad_inputs():
    q, k = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16)
    with pytest.raises(ValueError, match="kv_index"):
        cross_attention(q, k, k, torch.zeros(3, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="key_padding_mask"):
        cross_attention(q, k, k, torch.zeros(2, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool),
                        backend="triton")
    with pytest.raises(ValueError, match="head"):
        cross_attention(q, torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16), torch.zeros(2, dtype=torch.long),
                        backend="triton")
