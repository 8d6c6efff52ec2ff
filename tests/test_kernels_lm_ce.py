"""Fused LM-head + label-smoothed CE (kernels/lm_cross_entropy.py) against F.cross_entropy on full logits.

The chunk size is forced down to 16 rows so N = 37 runs three chunks (one partial). Tolerances: fp32: 1e-5
of the largest magnitude. bf16: error against the fp32 reference (same bf16 inputs) at most 2x PyTorch's
own bf16 error (reference run in bf16) plus 1e-3 of the largest magnitude.
"""

import pytest
import torch
import torch.nn.functional as F

import fastblip.kernels.lm_cross_entropy as lmce
from fastblip.kernels import INTERPRET
from fastblip.ops import lm_cross_entropy, lm_cross_entropy_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lmce, "_LOGITS_CHUNK_BYTES", 16 * 4 * 131)


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def _run(fn, h, w, b, y, go, **kw):
    h, w, b = (t.detach().clone().requires_grad_() for t in (h, w, b))
    loss = fn(h, w, b, y, **kw)
    loss.backward(go.to(loss.dtype) if loss.dim() else go.reshape(()).to(loss.dtype))
    return [loss.detach(), h.grad, w.grad, b.grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.1, 0.0])
def test_lm_ce_matches_reference(device, dtype, reduction, smoothing):
    _skip_cpu_without_interpreter(device)
    N, d, V = 37, 24, 131
    g = torch.Generator().manual_seed(N + V)
    h = torch.randn(N, d, generator=g).to(dtype).to(device)
    w = (torch.randn(V, d, generator=g) * 0.3).to(dtype).to(device)
    b = torch.randn(V, generator=g).to(dtype).to(device)
    y = torch.randint(0, V, (N,), generator=g).to(device)
    y[::5] = -100
    go = (torch.randn(N if reduction == "none" else 1, generator=g) + 2).to(device)
    kw = dict(label_smoothing=smoothing, reduction=reduction)
    got = _run(lm_cross_entropy, h, w, b, y, go, backend="triton", **kw)
    ref = _run(lm_cross_entropy_reference, h.float(), w.float(), b.float(), y, go, **kw)
    low = _run(lm_cross_entropy_reference, h, w, b, y, go, **kw) if dtype != torch.float32 else None
    for i, name in enumerate(["loss", "d hidden", "d weight", "d bias"]):
        a, r = got[i], ref[i]
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        err, scale = (a.float() - r.float()).abs().max().item(), r.float().abs().max().item()
        if low is None:
            assert err <= 1e-5 * scale, f"{name}: {err:.3e} vs scale {scale:.3e}"
        else:
            base = (low[i].float() - r.float()).abs().max().item()
            assert err <= 2 * base + 1e-3 * scale, f"{name}: {err:.3e} > 2 x torch bf16 {base:.3e}"
    if reduction == "none":
        assert (got[0][::5] == 0).all()  # ignored tokens: loss exactly 0
    assert got[1][::5].abs().max() == 0  # ... and no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_lm_ce_no_grad_and_tied_weight(device):
    """Under no_grad only the loss is computed; a weight tied to an embedding gets the LM head's gradient."""
    _skip_cpu_without_interpreter(device)
    N, d, V = 19, 16, 97
    emb = torch.nn.Embedding(V, d).to(device)
    h = torch.randn(N, d, device=device)
    y = torch.randint(0, V, (N,), device=device)
    b = torch.zeros(V, device=device)
    with torch.no_grad():
        got = lm_cross_entropy(h, emb.weight, b, y, backend="triton")
    torch.testing.assert_close(got, F.cross_entropy(h @ emb.weight.T, y, label_smoothing=0.1), rtol=1e-5,
                               atol=1e-6)
    lm_cross_entropy(h, emb.weight, None, y, backend="triton").backward()
    gw = emb.weight.grad.clone()
    emb.weight.grad = None
    F.cross_entropy(h @ emb.weight.T, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(gw, emb.weight.grad, rtol=1e-5, atol=1e-6)


def test_lm_ce_bad_inputs():
    h, w, b, y = torch.randn(5, 8), torch.randn(11, 8), torch.randn(11), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        lm_cross_entropy(h, w, b, y, reduction="avg", backend="triton")
    with pytest.raises(ValueError, match="weight"):
        lm_cross_entropy(h, torch.randn(11, 9), b, y, backend="triton")
    with pytest.raises(ValueError, match="labels"):
        lm_cross_entropy(h, w, b, y[:4], backend="triton")
