"""The kernels as PyTorch custom ops: ``torch.library.opcheck`` on each (schema, fake tensor, autograd
registration, AOT dispatch) and one block using all four compiled with ``torch.compile(fullgraph=True)``
(a graph break raises) whose loss and gradients equal eager. On CPU the kernels run in Triton's interpreter
and inductor compiles the rest (~20 s for the block, once per session)."""

import pytest
import torch
import torch.nn.functional as F

from fastblip.kernels import INTERPRET
from fastblip.kernels.cross_attention import _xattn_fwd_op
from fastblip.kernels.hard_negatives import _sample_op
from fastblip.kernels.itc_loss import _itc_fwd_op
from fastblip.kernels.lm_cross_entropy import _lm_ce_dlogits_op, _lm_ce_fwd_op
from fastblip.ops import cross_attention, itc_loss, lm_cross_entropy, sample_hard_negatives

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    return request.param


def _opcheck(op, args):
    # test_aot_dispatch_dynamic re-traces with symbolic shapes: the fake impls must not specialise
    torch.library.opcheck(op, args)


def test_opcheck_itc(device):
    B, Q, d = 5, 19, 16
    f = lambda n: F.normalize(torch.randn(n, d, device=device), dim=1)  # noqa: E731
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    alpha = torch.tensor(0.4, device=device)
    _opcheck(_itc_fwd_op, (f(B).requires_grad_(), f(B).requires_grad_(), f(B + Q), f(B + Q), temp, alpha,
                           None, None))
    idx = torch.randint(0, 3, (B,), device=device)
    _opcheck(_itc_fwd_op, (f(B).requires_grad_(), f(B), f(B + Q), f(B + Q), temp, alpha, idx,
                           torch.cat([idx, torch.randint(0, 3, (Q,), device=device)])))


def test_opcheck_sampling(device):
    s = torch.randn(6, 6, device=device)
    _opcheck(_sample_op, (s, s.clone(), None, None, 1e-4, torch.tensor([3], device=device)))


def test_opcheck_cross_attention(device):
    q = torch.randn(4, 2, 7, 16, device=device, requires_grad=True)
    k = torch.randn(3, 2, 19, 16, device=device, requires_grad=True)
    v = torch.randn(3, 2, 19, 16, device=device, requires_grad=True)
    kvi = torch.tensor([0, 2, 2, 1], device=device)
    mask = torch.rand(3, 19, device=device) > 0.2
    _opcheck(_xattn_fwd_op, (q, k, v, kvi, mask, 0.0, None))
    # attention dropout: the seed is an input, so every opcheck replay regenerates the same mask
    _opcheck(_xattn_fwd_op, (q, k, v, kvi, mask, 0.1, torch.tensor([1234], device=device)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])  # bf16: fp32 weight, as autocast
def test_opcheck_lm_ce(device, reduction, hidden_dtype):
    h = torch.randn(9, 16, device=device, dtype=hidden_dtype, requires_grad=True)
    w = torch.randn(37, 16, device=device, requires_grad=True)
    b = torch.randn(37, device=device, requires_grad=True)
    y = torch.randint(0, 37, (9,), device=device)
    y[2] = -100
    _opcheck(_lm_ce_fwd_op, (h, w, b, y, 0.1, -100, reduction, True))
    if reduction == "none":  # the op its backward recomputes d loss / d logits with
        _opcheck(_lm_ce_dlogits_op, (h.detach(), w.detach().to(hidden_dtype), b.detach(), y,
                                     torch.rand(9, device=device), 0.1, -100))


def _block(img, txt, img_m, txt_m, temp, q, k, v, kvi, hidden, weight, bias, labels):
    """A miniature BLIP step: ITC -> hard negatives -> cross-attention over shared K/V -> LM loss."""
    itc, sim_i2t, sim_t2i = itc_loss(img, txt, img_m, txt_m, temp, 0.4, backend="triton")
    neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, backend="triton")
    rows = torch.cat([kvi, neg_img])  # positives + one negative image per text
    out = cross_attention(q, k, v, rows, backend="triton")
    lm = lm_cross_entropy(hidden, weight, bias, labels, backend="triton")
    return itc + lm + out.float().mean(), rows


def test_compile_fullgraph_block(device):
    torch._dynamo.reset()
    B, Q, d, H, Lq, Lk, D, V = 5, 11, 16, 2, 7, 13, 16, 41
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device)

    leaves = dict(img=F.normalize(r(B, d), dim=1), txt=F.normalize(r(B, d), dim=1),
                  temp=torch.tensor(0.07, device=device), q=r(2 * B, H, Lq, D), k=r(B, H, Lk, D),
                  v=r(B, H, Lk, D), hidden=r(9, d), weight=r(V, d), bias=r(V))
    const = dict(img_m=F.normalize(r(B + Q, d), dim=1), txt_m=F.normalize(r(B + Q, d), dim=1),
                 kvi=torch.arange(B, device=device), labels=torch.randint(0, V, (9,), generator=g).to(device))

    def run(fn):
        ls = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
        torch.manual_seed(1)  # the sampling seed comes from the default generator
        loss, rows = fn(**ls, **const)
        loss.backward()
        return loss.detach(), rows, {n: t.grad for n, t in ls.items()}

    eager = run(_block)
    # inductor replaces torch.randint (the sampler's seed draw) by its own Philox stream unless fallback_random:
    # with it, the compiled block draws the eager seed, so the negatives can be compared (CUDA; CPU agreed anyway)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = run(torch.compile(_block, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled[1], eager[1])  # same seed -> same negatives
    for n in leaves:
        torch.testing.assert_close(compiled[2][n], eager[2][n], rtol=1e-4, atol=1e-5, msg=n)
