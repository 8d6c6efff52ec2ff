"""Fused ITC loss (kernels/itc_loss.py) against the official-formula reference (fastblip/ops/itc.py).

The kernel's products take bf16 operands with fp32 accumulation (its docstring says why). Two checks:
- the algorithm, exactly: ``exact_dots=True`` keeps fp32 operands (interpreter only) and must match the fp32
  reference to summation order, 1e-5 of each output's largest magnitude (bf16 inputs: the bf16 gradients
  are rounded once more at the end, 2^-9 relative, so 2^-8);
- the arithmetic the GPU runs (the default), by flash-attention's rule: its error against the fp32
  reference may be at most 2x the error of PyTorch computing the same loss with bf16 operands and fp32
  accumulation (``_formula`` with ``_bf16_mm``: queries, keys and, in the backward, dS rounded to bf16, as
  the kernel rounds them), plus a floor of 1e-5 of the largest magnitude for summation order (bf16
  gradients: their own resolution, one ulp at the largest, 2^-7 of it: two roundings of nearly equal
  values can land one ulp apart). Under the
  interpreter the kernel rounds the same operands (to nearest even, as the GPU) and widens them exactly
  (its bf16 tl.dot is wrong), so its loss, logits and d temp must also equal that PyTorch computation to
  summation order: the rounding path itself is tested on CPU. The feature gradients are held to the rule
  only: the kernel rounds dS before the upstream scale g / temp (|dS| <= 1, no fp16 underflow), autograd
  after it, so the two round different numbers (2e-3 of the largest gradient apart at these sizes).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastblip.kernels import INTERPRET
from fastblip.kernels.itc_loss import _check_exact, itc_forward, itc_loss_triton
from fastblip.ops import itc_loss, itc_loss_reference
from fastblip.ops._backend import BackendUnavailableError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
NAMES = ["loss", "sim_i2t", "sim_t2i", "d image_feat", "d text_feat", "d temp"]
SIZES = [(7, 33, 24), (9, 100, 32), (33, 70, 40), (1, 20, 16)]  # odd B (1, 33: 3 row blocks), Q, d


def _skip_cpu_without_interpreter(device):
    if device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")


def _err(a, b):
    """Largest absolute error of a against b, relative to b's largest magnitude."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


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


@contextlib.contextmanager
def _fp32_matmuls():
    """The references must not run on TF32 tensor cores (a global setting a training run may have made)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


# ------------------------------------------------------------------------- PyTorch with bf16 operands
def _rb(x):
    return x.to(torch.bfloat16).float()


class _Bf16Mm(torch.autograd.Function):
    """a @ b^T from bf16-rounded operands with fp32 accumulation (a bf16 GEMM with an fp32 output); the
    gradient d a = dC @ b takes bf16 operands too. b (the momentum keys) gets no gradient."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(b)
        return _rb(a) @ _rb(b).T

    @staticmethod
    def backward(ctx, grad):
        (b,) = ctx.saved_tensors
        return _rb(grad) @ _rb(b), None


def _fp32_mm(a, b):
    return a @ b.T


def _bf16_mm(a, b):
    return _Bf16Mm.apply(a, b)


def _formula(img, txt, img_m, txt_m, temp, alpha, idx=None, idx_all=None, mm=_fp32_mm):
    """The official ITC loss (the steps of fastblip/ops/itc.py's reference) with its products done by mm."""
    B = img.shape[0]
    img, txt, img_m, txt_m = img.float(), txt.float(), img_m.detach().float(), txt_m.detach().float()
    with torch.no_grad():
        t = temp.detach().float()
        if idx is None:
            pos = torch.eye(B, img_m.shape[0], device=img.device)
        else:
            pos = (idx.reshape(-1, 1) == idx_all.reshape(1, -1)).float()
            pos = pos / pos.sum(1, keepdim=True).clamp_min(1.0)
        tgt_i2t = alpha * F.softmax(mm(img_m[:B], txt_m) / t, 1) + (1 - alpha) * pos
        tgt_t2i = alpha * F.softmax(mm(txt_m[:B], img_m) / t, 1) + (1 - alpha) * pos
    sim_i2t = mm(img, txt_m) / temp.float()
    sim_t2i = mm(txt, img_m) / temp.float()
    loss_i2t = -(F.log_softmax(sim_i2t, 1) * tgt_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, 1) * tgt_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t[:, :B].detach(), sim_t2i[:, :B].detach()


def _check_bf16_rule(args, alpha, exact_to_baseline: bool):
    """The default (bf16-operand) kernel against the fp32 reference, by the rule in the module docstring."""
    with _fp32_matmuls():
        ref = _run(itc_loss_reference, *args[:5], alpha, *args[5:])
        base = _run(_formula, *args[:5], alpha, *args[5:], mm=_bf16_mm)
    got = _run(itc_loss, *args[:5], alpha, *args[5:], backend="triton")
    for a, r, b, name in zip(got, ref, base, NAMES):
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        floor = max(1e-5, torch.finfo(a.dtype).eps)  # bf16 gradients: one ulp at the largest, <= 2^-7 of it
        e_kernel, e_torch = _err(a, r), _err(b, r)
        assert e_kernel <= 2 * e_torch + floor, f"{name}: kernel {e_kernel:.2e} > 2 x torch's {e_torch:.2e}"
        if exact_to_baseline and name in ("loss", "sim_i2t", "sim_t2i", "d temp"):  # the same roundings
            assert _err(a, b) <= 1e-5, f"{name}: kernel vs bf16-operand torch {_err(a, b):.2e}"
    return got


# ----------------------------------------------------------------------------------------------- tests
def test_formula_is_the_reference():
    """_formula (the baseline's skeleton) with fp32 products is the op's reference."""
    args = _inputs(6, 40, 16, torch.float32, "cpu", True, seed=11)
    for a, b, name in zip(_run(_formula, *args[:5], 0.4, *args[5:]),
                          _run(itc_loss_reference, *args[:5], 0.4, *args[5:]), NAMES):
        assert _err(a, b) <= 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_idx", [False, True])
@pytest.mark.parametrize("B,Q,d", SIZES)
def test_itc_exact_dots_match_reference(dtype, use_idx, B, Q, d):
    """The algorithm (online softmax, splits, masks, merges, every gradient) with fp32 products."""
    _skip_cpu_without_interpreter("cpu")
    args = _inputs(B, Q, d, dtype, "cpu", use_idx, seed=B * 1000 + Q)
    got = _run(itc_loss_triton, *args[:5], 0.4, *args[5:], exact_dots=True)
    ref = _run(itc_loss_reference, *args[:5], 0.4, *args[5:])
    for a, b, name in zip(got, ref, NAMES):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        tol = 2.0**-8 if (dtype == torch.bfloat16 and name.startswith("d ") and name != "d temp") else 1e-5
        assert _err(a, b) <= tol, f"{name}: {_err(a, b):.2e} > {tol}"
    assert got[1].shape == (B, B) and got[1].dtype == torch.float32 and not got[1].requires_grad
    assert got[3].dtype == dtype and got[5].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_idx", [False, True])
@pytest.mark.parametrize("B,Q,d", SIZES[:3])
def test_itc_bf16_operands_match_reference(device, dtype, use_idx, B, Q, d):
    """The default path (what the GPU runs), through fastblip.ops: the bf16 rule; on CPU also equal to
    PyTorch with the same bf16 operands."""
    _skip_cpu_without_interpreter(device)
    args = _inputs(B, Q, d, dtype, device, use_idx, seed=B * 1000 + Q + 1)
    got = _check_bf16_rule(args, 0.4, exact_to_baseline=device == "cpu")
    assert got[3].dtype == dtype and got[1].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("B", [64, 128])
@pytest.mark.parametrize("use_idx", [False, True])
def test_itc_bf16_operands_at_blip_shapes(B, use_idx):
    """BLIP pretraining (B = 64, large 128) and retrieval (image ids) at Q = 57,600, d = 256, fp32 features:
    bf16 operands over 57,664 keys stay within 2x PyTorch's own bf16-operand error of the fp32 reference."""
    args = _inputs(B, 57_600, 256, torch.float32, "cuda", use_idx, seed=B)
    _check_bf16_rule(args, 0.4, exact_to_baseline=False)


@pytest.mark.parametrize("device", DEVICES)
def test_itc_alpha_tensor_and_zero(device):
    """alpha as a 0-dim tensor (on-device ramp) and alpha = 0 (pure hard targets: plain InfoNCE)."""
    _skip_cpu_without_interpreter(device)
    args = _inputs(5, 27, 16, torch.float32, device, False, seed=3)
    for alpha in (torch.tensor(0.25, device=device), 0.0):
        _check_bf16_rule(args, alpha, exact_to_baseline=device == "cpu")
    img, txt, img_m, txt_m, temp = (t.detach() for t in args[:5])
    # alpha = 0 is cross-entropy against the diagonal: an independent oracle for the reference itself
    with _fp32_matmuls():
        tgt = torch.arange(5, device=device)
        want = (F.cross_entropy(img @ txt_m.T / temp, tgt) + F.cross_entropy(txt @ img_m.T / temp, tgt)) / 2
        assert _err(itc_loss_reference(img, txt, img_m, txt_m, temp, 0.0)[0], want) <= 1e-6
    if device == "cpu":
        assert _err(itc_loss_triton(img, txt, img_m, txt_m, temp, 0.0, exact_dots=True)[0], want) <= 1e-5


def test_itc_key_copy_is_the_rounded_keys():
    """The forward hands the backward its keys rounded to bf16 (so both passes use the same operands); none
    when the keys are already bf16 or the dots are exact."""
    _skip_cpu_without_interpreter("cpu")
    img, txt, img_m, txt_m, temp, idx, idx_all = _inputs(7, 45, 24, torch.float32, "cpu", True, seed=5)
    alpha = torch.tensor(0.4)
    out = itc_forward(img, txt, img_m, txt_m, temp, alpha, idx, idx_all)
    assert out[4].dtype == torch.bfloat16 and torch.equal(out[4], txt_m.to(torch.bfloat16))
    assert torch.equal(out[5], img_m.to(torch.bfloat16))
    bf16_keys = (img, txt, img_m.bfloat16(), txt_m.bfloat16())
    for exact, feats in ((True, (img, txt, img_m, txt_m)), (False, bf16_keys)):
        out = itc_forward(*feats, temp, alpha, idx, idx_all, exact_dots=exact)
        assert out[4].shape == (0, 24) and out[5].shape == (0, 24)


def test_itc_bad_inputs():
    img, txt, img_m, txt_m, temp, idx, idx_all = _inputs(5, 11, 16, torch.float32, "cpu", True, seed=1)
    with pytest.raises(ValueError, match="idx"):
        itc_loss(img, txt, img_m, txt_m, temp, 0.4, idx, None, backend="triton")
    with pytest.raises(ValueError, match="B\\+Q"):
        itc_loss(img, txt, img_m[:, :8], txt_m, temp, 0.4, backend="triton")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        itc_loss(img, txt, img_m, txt_m, temp, 0.4, backend="cuda")
    wide = [torch.zeros(n, 320) for n in (5, 5, 16, 16)]
    with pytest.raises(ValueError, match="320 > 256"):
        itc_loss(*wide, temp, 0.4, backend="triton")
    with pytest.raises(ValueError, match="exact_dots"):  # fp32 dots are not compiled for GPUs
        _check_exact(True, torch.device("cuda"))


def test_itc_default_backend_on_cpu_is_reference():
    img, txt, img_m, txt_m, temp, _, _ = _inputs(5, 11, 16, torch.float32, "cpu", False, seed=2)
    loss, _, _ = itc_loss(img, txt, img_m, txt_m, temp, 0.4)
    assert "fastblip" not in type(loss.grad_fn).__name__  # plain autograd nodes: the reference ran
