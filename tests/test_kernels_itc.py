"""Fused ITC loss (kernels/itc_loss.py) against the official-formula reference (fastblip/ops/itc.py).

Tolerances: the reference computes in fp32 from the same inputs (bf16 inputs are upcast first). fp32: the
kernel differs only by summation order, so 1e-5 of the largest magnitude. bf16: inputs are exact in both
paths, the kernel's bf16 gradients are rounded once (2^-9 relative) and on GPU the backward casts dS to
bf16 before its dot: 2e-2 of the largest magnitude.
"""

import pytest
import torch
import torch.nn.functional as F

from fastblip.kernels import INTERPRET
from fastblip.ops import itc_loss, itc_loss_reference
from fastblip.ops._backend import BackendUnavailableError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def _close(a, b, tol, what):
    a, b = a.float(), b.float()
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max err {err:.3e} > {tol} x {scale:.3e}"


def _inputs(B, Q, d, dtype, device, use_idx, seed):
    g = torch.Generator().manual_seed(seed)

    def feats(n):
        return F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).to(device)

    img, txt = feats(B).requires_grad_(), feats(B).requires_grad_()
    img_m, txt_m = feats(B + Q), feats(B + Q)
    temp = torch.tensor(0.07, device=device, requires_grad=True)
    idx = idx_all = None
    if use_idx:  # few ids so rows have several positives; queue entries -100 like the official idx_queue
        idx = torch.randint(0, 4, (B,), generator=g).to(device)
        q_ids = torch.randint(0, 6, (Q,), generator=g)
        q_ids[::3] = -100
        idx_all = torch.cat([idx, q_ids.to(device)])
    return img, txt, img_m, txt_m, temp, idx, idx_all


def _run(fn, img, txt, img_m, txt_m, temp, alpha, idx, idx_all, **kw):
    for t in (img, txt, temp):
        t.grad = None
    loss, s_i2t, s_t2i = fn(img, txt, img_m, txt_m, temp, alpha, idx, idx_all, **kw)
    (loss * 1.7).backward()  # a non-unit upstream gradient
    return loss, s_i2t, s_t2i, img.grad.clone(), txt.grad.clone(), temp.grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_idx", [False, True])
@pytest.mark.parametrize("B,Q,d", [(7, 33, 24), (9, 100, 32)])
def test_itc_matches_reference(device, dtype, use_idx, B, Q, d):
    _skip_cpu_without_interpreter(device)
    args = _inputs(B, Q, d, dtype, device, use_idx, seed=B * 1000 + Q)
    got = _run(itc_loss, *args[:5], 0.4, *args[5:], backend="triton")
    ref = _run(itc_loss_reference, *args[:5], 0.4, *args[5:])
    names = ["loss", "sim_i2t", "sim_t2i", "d image_feat", "d text_feat", "d temp"]
    for a, b, name in zip(got, ref, names):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        _close(a, b, TOL[dtype], name)
    assert got[1].shape == (B, B) and got[1].dtype == torch.float32 and not got[1].requires_grad
    assert got[3].dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_itc_alpha_tensor_and_zero(device):
    """alpha as a 0-dim tensor (on-device ramp) and alpha = 0 (pure hard targets: plain InfoNCE)."""
    _skip_cpu_without_interpreter(device)
    img, txt, img_m, txt_m, temp, _, _ = _inputs(5, 27, 16, torch.float32, device, False, seed=3)
    for alpha in (torch.tensor(0.25, device=device), 0.0):
        got = _run(itc_loss, img, txt, img_m, txt_m, temp, alpha, None, None, backend="triton")
        ref = _run(itc_loss_reference, img, txt, img_m, txt_m, temp, alpha, None, None)
        for a, b in zip(got, ref):
            _close(a, b, 1e-5, f"alpha={alpha}")
    # alpha = 0 is cross-entropy against the diagonal: an independent oracle for the reference itself
    s_i2t = img.detach() @ txt_m.T / temp.detach()
    s_t2i = txt.detach() @ img_m.T / temp.detach()
    tgt = torch.arange(5, device=device)
    want = (F.cross_entropy(s_i2t, tgt) + F.cross_entropy(s_t2i, tgt)) / 2
    _close(itc_loss(img, txt, img_m, txt_m, temp, 0.0, backend="triton")[0], want, 1e-5, "InfoNCE")


def test_itc_bad_inputs():
    img, txt, img_m, txt_m, temp, idx, idx_all = _inputs(5, 11, 16, torch.float32, "cpu", True, seed=1)
    with pytest.raises(ValueError, match="idx"):
        itc_loss(img, txt, img_m, txt_m, temp, 0.4, idx, None, backend="triton")
    with pytest.raises(ValueError, match="B\\+Q"):
        itc_loss(img, txt, img_m[:, :8], txt_m, temp, 0.4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        itc_loss(img, txt, img_m, txt_m, temp, 0.4, backend="cuda")


def test_itc_default_backend_on_cpu_is_reference():
    img, txt, img_m, txt_m, temp, _, _ = _inputs(5, 11, 16, torch.float32, "cpu", False, seed=2)
    loss, _, _ = itc_loss(img, txt, img_m, txt_m, temp, 0.4)
    assert "fastblip" not in type(loss.grad_fn).__name__  # plain autograd nodes: the reference ran
