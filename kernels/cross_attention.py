"""Indexed cross-attention: text rows attend to a shared per-image K/V (DESIGN §4.3).

Legend: N text rows, M images (M <= N), H heads, Lq text length, Lk image tokens, D head dim.
q (N, H, Lq, D); k, v (M, H, Lk, D); kv_index (N,) int64: row n attends to image kv_index[n];
key_padding_mask (M, Lk) bool, True = attend. Each image's K/V is projected once and read by the positive
ITM pair, both hard negatives and the LM decoder instead of being gathered into an (N, H, Lk, D) copy
(at N = 3B = 384, Lk = 577, bf16: 2 x 1.3 GB of gathered K/V avoided).

Forward: one program per (n, h, q-block) streams the image's K/V in BLOCK_K tiles with an online softmax
and saves the row log-sum-exp. Backward recomputes P per tile; dQ stays in registers, dK/dV contributions
are added with fp32 atomics into the image's buffers (an image is shared by ~4 rows, so contention is low).
The mask follows the official BERT convention: masked keys get -10000 added to the score (not -inf), so a
fully masked row is a plain softmax over all keys, never NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastblip.kernels import check_dtype, dot_fp32, dot_precision, next_pow2


@triton.jit
def _xattn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (N, H, Lq, D), (M, H, Lk, D), (M, H, Lk, D), contiguous
    kvi_ptr,  # (N,) int64 image of each row
    mask_ptr,  # (M, Lk) uint8, 1 = attend (read only when HAS_MASK)
    o_ptr,  # (N, H, Lq, D) out
    lse_ptr,  # (N, H, Lq) fp32 out
    H, Lq, Lk, D, scale,
    HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    img = tl.load(kvi_ptr + n).to(tl.int64)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dd = tl.arange(0, BLOCK_D)
    qmask = (rq[:, None] < Lq) & (dd[None, :] < D)
    q_off = (pid_nh.to(tl.int64) * Lq + rq[:, None]) * D + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kv_base = (img * H + h) * Lk
    m_i = tl.full([BLOCK_Q], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k0 in range(0, Lk, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        cmask = ck < Lk
        kv_off = (kv_base + ck[:, None]) * D + dd[None, :]
        kvm = cmask[:, None] & (dd[None, :] < D)
        kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)
        vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        if HAS_MASK:
            att = tl.load(mask_ptr + img * Lk + ck, mask=cmask, other=1)
            s = s + tl.where(att != 0, 0.0, -10000.0)[None, :]
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        corr = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + q_off, acc.to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(lse_ptr + pid_nh.to(tl.int64) * Lq + rq, m_i + tl.log(l_i), mask=rq < Lq)


@triton.jit
def _xattn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, kvi_ptr, mask_ptr,
    do_ptr,  # (N, H, Lq, D) upstream gradient
    lse_ptr, delta_ptr,  # (N, H, Lq) fp32: saved lse, rowsum(dO * O)
    dq_ptr,  # (N, H, Lq, D) out, q dtype
    dk_ptr, dv_ptr,  # (M, H, Lk, D) fp32 accumulators (zeroed), atomically added
    H, Lq, Lk, D, scale,
    HAS_MASK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_nh = tl.program_id(0)
    pid_q = tl.program_id(1)
    n = pid_nh // H
    h = pid_nh % H
    img = tl.load(kvi_ptr + n).to(tl.int64)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rq < Lq
    dd = tl.arange(0, BLOCK_D)
    qmask = rmask[:, None] & (dd[None, :] < D)
    q_off = (pid_nh.to(tl.int64) * Lq + rq[:, None]) * D + dd[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + pid_nh.to(tl.int64) * Lq + rq, mask=rmask, other=0.0)
    delta = tl.load(delta_ptr + pid_nh.to(tl.int64) * Lq + rq, mask=rmask, other=0.0)
    kv_base = (img * H + h) * Lk
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k0 in range(0, Lk, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        cmask = ck < Lk
        kv_off = (kv_base + ck[:, None]) * D + dd[None, :]
        kvm = cmask[:, None] & (dd[None, :] < D)
        kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)
        vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
        if HAS_MASK:
            att = tl.load(mask_ptr + img * Lk + ck, mask=cmask, other=1)
            s = s + tl.where(att != 0, 0.0, -10000.0)[None, :]
        p = tl.exp(s - lse[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # (BLOCK_K, BLOCK_D)
        tl.atomic_add(dv_ptr + kv_off, dv, mask=kvm)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
        tl.atomic_add(dk_ptr + kv_off, dk, mask=kvm)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)


def _check(q, k, v, kv_index, key_padding_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"cross_attention: q must be (N,H,Lq,D) and k, v (M,H,Lk,D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    N, H, Lq, D = q.shape
    M, Hk, Lk, Dk = k.shape
    if Hk != H or Dk != D:
        raise ValueError(f"cross_attention: heads/head dim of q {(H, D)} and k {(Hk, Dk)} differ")
    if D > 256 or D < 1:
        raise ValueError(f"cross_attention: head dim {D} not supported (1..256)")
    if kv_index.shape != (N,) or kv_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"cross_attention: kv_index must be ({N},) int64, got {tuple(kv_index.shape)} "
                         f"{kv_index.dtype}")
    if key_padding_mask is not None and key_padding_mask.shape != (M, Lk):
        raise ValueError(f"cross_attention: key_padding_mask must be ({M}, {Lk}), got "
                         f"{tuple(key_padding_mask.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"cross_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    check_dtype("q", q)


def _blocks(Lq: int, Lk: int, D: int) -> tuple[int, int, int]:
    return min(64, max(16, next_pow2(Lq))), min(64, max(16, next_pow2(Lk))), max(16, next_pow2(D))


def xattn_forward(q, k, v, kv_index, key_padding_mask):
    N, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kvi = kv_index.to(torch.int64).contiguous()
    mask = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else kvi
    out = torch.empty_like(q)
    lse = torch.empty(N, H, Lq, device=q.device, dtype=torch.float32)
    bq, bk, bd = _blocks(Lq, Lk, D)
    _xattn_fwd_kernel[(N * H, triton.cdiv(Lq, bq))](
        q, k, v, kvi, mask, out, lse, H, Lq, Lk, D, 1.0 / math.sqrt(D),
        HAS_MASK=key_padding_mask is not None, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd,
        DOT_F32=dot_fp32(q.dtype), PREC=dot_precision(q.dtype))
    return out, lse


def xattn_backward(grad_out, q, k, v, kv_index, key_padding_mask, out, lse):
    N, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous()
    kvi = kv_index.to(torch.int64).contiguous()
    mask = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else kvi
    delta = (do.float() * out.float()).sum(-1)  # (N, H, Lq)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    bq, bk, bd = _blocks(Lq, Lk, D)
    _xattn_bwd_kernel[(N * H, triton.cdiv(Lq, bq))](
        q, k, v, kvi, mask, do, lse, delta, dq, dk, dv, H, Lq, Lk, D, 1.0 / math.sqrt(D),
        HAS_MASK=key_padding_mask is not None, BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd,
        DOT_F32=dot_fp32(q.dtype), PREC=dot_precision(q.dtype))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@torch.library.custom_op("fastblip::cross_attention_fwd", mutates_args=())
def _xattn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                  key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return xattn_forward(q, k, v, kv_index, key_padding_mask)


@_xattn_fwd_op.register_fake
def _(q, k, v, kv_index, key_padding_mask):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastblip::cross_attention_bwd", mutates_args=())
def _xattn_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_index: torch.Tensor, key_padding_mask: torch.Tensor | None, out: torch.Tensor,
                  lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return xattn_backward(grad_out, q, k, v, kv_index, key_padding_mask, out, lse)


@_xattn_bwd_op.register_fake
def _(grad_out, q, k, v, kv_index, key_padding_mask, out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class CrossAttentionFunction:
    """Autograd layer as ``register_autograd`` hooks: grads to q, k, v; none to kv_index and the mask."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kv_index, key_padding_mask = inputs
        ctx.save_for_backward(q, k, v, kv_index, key_padding_mask, output[0], output[1])

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, kv_index, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = _xattn_bwd_op(grad_out, q, k, v, kv_index, key_padding_mask, out, lse)
        return dq, dk, dv, None, None


_xattn_fwd_op.register_autograd(CrossAttentionFunction.backward, setup_context=CrossAttentionFunction.setup_context)


def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    _check(q, k, v, kv_index, key_padding_mask)
    if q.is_cuda:  # range check on device, no host sync (an out-of-range image id would read garbage)
        torch._assert_async(((kv_index >= 0) & (kv_index < k.shape[0])).all(),
                            "cross_attention: kv_index out of range")
    return _xattn_fwd_op(q, k, v, kv_index, key_padding_mask)[0]
