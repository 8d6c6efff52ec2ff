"""Indexed cross-attention kernel against the gather + explicit-softmax reference, forward and every grad, with
and without the in-kernel attention dropout (the reference is fed the kernel's keep-mask for the same seed).

Tolerances (flash-attention's rule): fp32: 1e-5 of the largest magnitude (summation order only). bf16: the
kernel's error against the fp32 reference (computed from the same bf16 inputs) may be at most 2x PyTorch's
own bf16 error on the same inputs, plus 2e-3 of the largest magnitude: the kernel rounds P and dS to bf16 per
tile before its tensor-core dots, torch rounds the whole bf16 softmax once (on CPU the interpreter computes the
dots in fp32, so there the kernel is well inside the bound).
Dropout statistics: a count of n Bernoulli(q) draws lies within 5 standard deviations sqrt(n q (1-q)) of n q
with probability 1 - 6e-7 per assertion: a correct RNG fails about once in 10^6 runs, a biased one (a wrong
threshold, a reused Philox output, correlated rows) fails every time at these n.
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


def _keep_mask(device, seed: int | None, shape, p: float) -> torch.Tensor:
    """The kernel's keep-mask for the seed that ``generator=torch.Generator().manual_seed(seed)`` draws
    (seed None: the next draw from torch's default generator, as a call without a generator makes)."""
    from fastblip.kernels.cross_attention import dropout_keep_mask, dropout_seed

    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return dropout_keep_mask(dropout_seed(torch.device(device), g), *shape, p)


def _inputs(shape, dtype, device, use_mask, seed):
    N, M, H, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(seed)
    # q, k, v as the model passes them: transposed views of (X, L, H*D) linear outputs
    q, k, v = (torch.randn(X, L, H, D, generator=g).to(dtype).to(device).transpose(1, 2) for X, L in
               ((N, Lq), (M, Lk), (M, Lk)))
    kvi = torch.randint(0, M - 1 if M > 3 else M, (N,), generator=g).to(device)
    kvi[0] = 0
    mask = (torch.rand(M, Lk, generator=g) > 0.3).to(device) if use_mask else None
    go = torch.randn(N, H, Lq, D, generator=g).to(device)
    return q, k, v, kvi, mask, go


SHAPES = [  # N, M, H, Lq, Lk, D
    (7, 4, 2, 11, 37, 16),  # image 3 is never indexed: its dk, dv must be exactly 0; tiles of 32 positions
    (5, 3, 1, 70, 131, 32),  # a row spans two 64-position tiles; three 64-key tiles
    (9, 2, 3, 1, 19, 8),  # generation-like: one query per row, 16-position tiles; D < the 16-wide tile
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_attention_matches_reference(device, dtype, use_mask, p, shape):
    _skip_cpu_without_interpreter(device)
    N, M, H, Lq, Lk, D = shape
    q, k, v, kvi, mask, go = _inputs(shape, dtype, device, use_mask, sum(shape))
    drop = dict(dropout_p=p, dropout_mask=_keep_mask(device, 11, (N, H, Lq, Lk), p) if p else None)
    got = _grads(cross_attention, q, k, v, kvi, mask, go, backend="triton", dropout_p=p,
                 generator=torch.Generator().manual_seed(11))
    ref = _grads(cross_attention_reference, q.float(), k.float(), v.float(), kvi, mask, go, **drop)
    low = _grads(cross_attention_reference, q, k, v, kvi, mask, go, **drop) if dtype != torch.float32 else None
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
def test_output_is_stored_in_the_model_layout(device):
    """out (N, H, Lq, D) is stored as (N, Lq, H, D) and dk as (M, Lk, H, D): the model's transpose + reshape
    back to (N, Lq, H*D) and the projections' gradients are views, not copies."""
    _skip_cpu_without_interpreter(device)
    q, k, v, kvi, _, go = _inputs((4, 3, 2, 5, 9, 16), torch.float32, device, False, 0)
    views = _grads(cross_attention, q, k, v, kvi, None, go, backend="triton")
    out, dq, dk, dv = views
    assert all(t.transpose(1, 2).is_contiguous() for t in (out, dq, dk, dv))
    dense = _grads(cross_attention, *(t.contiguous() for t in (q, k, v)), kvi, None, go, backend="triton")
    for a, b in zip(dense, views):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # contiguous inputs: the same numbers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_shared_kv_equals_duplicated_kv(device, p):
    """Rows sharing an image give the same result as giving each row its own copy (the point of sharing; the
    dropout mask is keyed by row, not image), and the shared image's dk is the sum of the copies' dk."""
    _skip_cpu_without_interpreter(device)
    N, H, Lq, Lk, D = 3, 2, 9, 21, 16
    q = torch.randn(N, H, Lq, D, device=device)
    k, v = torch.randn(1, H, Lk, D, device=device), torch.randn(1, H, Lk, D, device=device)
    go = torch.randn(N, H, Lq, D, device=device)
    kw = dict(backend="triton", dropout_p=p)
    shared = _grads(cross_attention, q, k, v, torch.zeros(N, dtype=torch.long, device=device), None, go,
                    generator=torch.Generator().manual_seed(3), **kw)
    dup = _grads(cross_attention, q, k.expand(N, -1, -1, -1), v.expand(N, -1, -1, -1),
                 torch.arange(N, device=device), None, go, generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(shared[0], dup[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared[2], dup[2].sum(0, keepdim=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_deterministic(device):
    """No atomics: two backward passes with the same seed give bit-identical gradients."""
    _skip_cpu_without_interpreter(device)
    q, k, v, kvi, mask, go = _inputs((11, 4, 2, 13, 40, 16), torch.float32, device, True, 5)
    runs = [_grads(cross_attention, q, k, v, kvi, mask, go, backend="triton", dropout_p=0.1,
                   generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_sorts_rows_by_image(device):
    """The device-side plan equals its torch definition: stable order of rows by image, each image's row
    range, cumulative query tiles (cdiv(rows * Lq, tile))."""
    _skip_cpu_without_interpreter(device)
    from fastblip.kernels.cross_attention import xattn_plan

    g = torch.Generator().manual_seed(0)
    for N, M, Lq, tile in ((192, 64, 35, 64), (70, 130, 3, 16), (1, 1, 1, 16), (130, 5, 70, 32)):
        kvi = torch.randint(0, M, (N,), generator=g).to(device)
        plan = xattn_plan(kvi, M, Lq, tile).long()
        counts = torch.zeros(M, dtype=torch.long, device=device).scatter_add_(0, kvi, torch.ones_like(kvi))
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        assert torch.equal(plan[:N], torch.argsort(kvi, stable=True))
        assert torch.equal(plan[N:N + M + 1], bounds)
        assert torch.equal(plan[N + M + 1:], ((counts * Lq + tile - 1) // tile).cumsum(0))


def _binomial_ok(count: float, n: int, q: float) -> bool:
    return abs(count - n * q) <= 5 * (n * q * (1 - q)) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(device, p):
    _skip_cpu_without_interpreter(device)
    shape = (6, 3, 17, 131)  # N, H, Lq, Lk: n = 40,086 draws
    a, b = _keep_mask(device, 1, shape, p), _keep_mask(device, 1, shape, p)
    assert torch.equal(a, b), "a fixed seed must give the same mask"
    n = a.numel()
    assert _binomial_ok(a.sum().item(), n, 1 - p), f"kept {a.float().mean():.4f}, expected {1 - p}"
    c = _keep_mask(device, 2, shape, p)
    assert not torch.equal(a, c)
    # independent masks agree on a (keep, keep) or (drop, drop) entry with probability p^2 + (1-p)^2
    agree = p * p + (1 - p) ** 2
    assert _binomial_ok((a == c).sum().item(), n, agree), "two seeds give correlated masks"
    flat = a.reshape(-1, shape[-1])  # rows (n, h, i) and keys 4c..4c+3 (one Philox call) are independent
    assert _binomial_ok((flat[1:] == flat[:-1]).sum().item(), flat[1:].numel(), agree), "rows correlated"
    for j in (1, 2, 3):
        pair = a[..., 0:128:4] == a[..., j:128:4]
        assert _binomial_ok(pair.sum().item(), pair.numel(), agree), f"keys 4c and 4c+{j} correlated"


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_one_drops_everything(device):
    """p = 1 is F.dropout's all-zero output, with zero gradients (no inf * 0)."""
    _skip_cpu_without_interpreter(device)
    q, k, v, kvi, _, go = _inputs((3, 2, 1, 4, 9, 16), torch.float32, device, False, 1)
    for t in _grads(cross_attention, q, k, v, kvi, None, go, backend="triton", dropout_p=1.0):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_compiles_fullgraph(device):
    """Seed draw + kernel trace into one graph; the compiled call draws the same seed as eager (on CUDA inductor
    would replace torch.randint by its own Philox stream unless told to keep torch's: fallback_random)."""
    _skip_cpu_without_interpreter(device)
    torch._dynamo.reset()
    q, k, v, kvi, mask, go = _inputs((5, 3, 2, 7, 13, 16), torch.float32, device, True, 2)

    def fn(q, k, v, kvi, mask):
        return cross_attention(q, k, v, kvi, mask, backend="triton", dropout_p=0.3)

    runs = []
    with torch._inductor.config.patch(fallback_random=True):
        for f in (fn, torch.compile(fn, fullgraph=True)):
            torch.manual_seed(4)
            runs.append(_grads(f, q, k, v, kvi, mask, go))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_med_cross_attention_routes_dropout_to_the_kernel(device):
    """BLIP trains with attention dropout 0.1: ``BertSelfAttention.cross`` with kv_index sends it to the kernel
    (seed from torch's generator), whose result is the official computation under the kernel's mask; the
    "reference" attention backend keeps the official gather + softmax + F.dropout path."""
    _skip_cpu_without_interpreter(device)
    from fastblip.config import TextConfig
    from fastblip.models.med import BertSelfAttention

    torch.manual_seed(0)
    cfg = TextConfig(hidden_size=32, num_heads=2, attention_dropout=0.1)
    attn = BertSelfAttention(cfg, kv_width=24).to(device).train()
    attn.backend, attn.ops_backend = "auto", "triton"
    N, M, Lq, Lk = 5, 3, 7, 10
    x, img = torch.randn(N, Lq, 32, device=device), torch.randn(M, Lk, 24, device=device)
    kvi, mask = torch.tensor([0, 2, 2, 1, 0], device=device), torch.rand(M, Lk, device=device) > 0.2
    k, v = attn.project_kv(img)
    torch.manual_seed(7)
    out = attn.cross(x, k, v, kvi, mask)
    torch.manual_seed(7)
    keep = _keep_mask(device, None, (N, 2, Lq, Lk), 0.1)
    q = attn._split(attn.query(x))
    ref = cross_attention_reference(q, k, v, kvi, mask, 0.1, keep).transpose(1, 2).reshape(N, Lq, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # fp32: summation order only
    attn.backend = "reference"
    torch.manual_seed(7)
    official = attn.cross(x, k, v, kvi, mask)
    torch.manual_seed(7)  # the same F.dropout draws: equal up to rounding (another mask would differ by ~1)
    ref = cross_attention_reference(q, k, v, kvi, mask, 0.1).transpose(1, 2).reshape(N, Lq, 32)
    torch.testing.assert_close(official, ref, rtol=1e-6, atol=1e-6)


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
    with pytest.raises(ValueError, match="dropout_p"):
        cross_attention(q, k, k, torch.zeros(2, dtype=torch.long), backend="triton", dropout_p=1.5)
