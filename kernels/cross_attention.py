"""Indexed cross-attention: text rows attend to a shared per-image K/V (DESIGN §4.3), with BERT's attention
dropout inside the kernel.

Legend: N text rows, M images, H heads, Lq text length, Lk image tokens, D head dim. q (N, H, Lq, D);
k, v (M, H, Lk, D), any strides with a contiguous last dim (the model passes transposed views of its
projections; outputs are stored as (X, L, H, D) so its reshape back is a view); kv_index (N,): row n attends
to image kv_index[n]; key_padding_mask (M, Lk) bool, True = attend (BERT: a masked key gets -10000 added to
its score, so a fully masked row is a plain softmax, never NaN). Dropout as BERT's
``dropout(softmax(scores))``: after the softmax, kept probabilities scaled by 1/(1-p).

Design. In ITM each image is used by ~3 rows (its text, its negative text, and on average one text that drew
it as negative image); a program per (row, head) reads every image's K/V three times.
- ``_plan_kernel`` (1 launch, no host sync) ranks the rows by (image, row): a stable sort by image, the row
  range of each image (``bounds``) and how many query tiles each image's rows fill (``tile_end``).
- forward and dQ: one program per (query tile, head). A tile packs BLOCK_Q consecutive query positions of
  the rows of ONE image (position j*Lq + i: query i of the image's j-th row): the 105 positions of an image
  with 3 rows fill 2 tiles of 64 (82%) instead of 3 per-row tiles of 64 (55%); with ITM's 2 + ~Poisson(1)
  rows per image ~72% on average. The tiles of one (image, head) are grid neighbours streaming the same K/V
  at the same time, so HBM serves it once and L2 the rest.
- dK/dV: one program per (k-block, image, head) loops over its image's packed positions: each K/V block is
  read once and its gradient written once, in the K/V dtype: no atomics (the old kernel's acq_rel
  atomic_add put a GPU-wide MEMBAR after each), no fp32 buffers to zero and convert, deterministic.
  The dQ kernel runs first and also writes delta = rowsum(dO * O) for it.
The tiled grids are static: cdiv(N*Lq, BLOCK_Q) + min(M, N) bounds the packed tile count for any kv_index;
the surplus programs return at once.

Dropout: keep(n, h, i, k) from Philox-4x32-10 keyed by a per-call 63-bit seed (drawn on the device from torch's
generator) with counter (k // 4, (n*H + h)*Lq + i, 0, 0); its 4 outputs serve keys 4c..4c+3, a quarter of
the Philox work of one call per element (~25 instead of ~60 integer SASS instructions per element on sm_90).
Keep iff the top 31 bits >= round(p * 2^31): P(keep) = 1 - p to 2^-31. Forward and both backward kernels
regenerate the same mask whatever their tile sizes; ``dropout_keep_mask`` materialises it for tests.
With Z the keep-mask: O = (P*Z/(1-p)) V, so dV = (P*Z/(1-p))^T dO, dP = (dO V^T)*Z/(1-p), dS = P*(dP - delta)
with delta = rowsum(dO*O) as without dropout (O being the dropped output), dQ = dS K/sqrt(D), dK = dS^T Q/sqrt(D).

Memory traffic at BLIP base pretraining (N = 192, M = 64, H = 12, Lq = 35, D = 64, bf16; Lk = 197 | 577):
q = o = do = dq = N*H*Lq*D*2 = 10.3 MB each, k = v = dk = dv = M*H*Lk*D*2 = 19.4 | 56.7 MB each.
Floor (benchmarks/kstat.py): forward reads q, k, v, writes o: 59 | 134 MB = 17.7 | 40.0 us at 3.35 TB/s;
backward reads q, o, do, k, v, writes dq, dk, dv: 119 | 268 MB = 35.5 | 80.1 us. This design: forward at
the floor (+0.3 MB lse); backward reads k, v and q, do twice (dQ kernel, dK/dV kernel): 178 | 402 MB =
53 | 120 us, the price of the atomic-free split (a fused pass needs dQ atomics or an L2 scratch). The plain
path gathers an (N, H, Lk, D) K/V copy (3 x 39 | 113 MB written, read, then index_add-ed back) and the old
kernel read K/V once per row and added dK/dV with fp32 atomics. Matmuls: 4.1 | 11.9 GFLOP forward,
14 | 42 backward (7 products on padded tiles): 4 | 12 and 14 | 42 us of bf16 tensor core, below the memory
time. The dropout mask is integer work not in the floor: ~25 instructions per (q, k) element of the padded
tiles (25 | 68 M elements a pass), estimated 20-40 | 60-115 us a pass on an H100 (2-4 integer warp
instructions a clock per SM), once forward and twice backward: with dropout on, likely the bound (unmeasured).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastblip.kernels import check_dtype, dot_fp32, dot_precision, next_pow2

LOG2E = 1.4426950408889634  # softmax in base 2 (exp2 is the hardware exp); lse is saved in base-2 units
MASK_BIAS2 = tl.constexpr(-10000.0 * LOG2E)  # BERT's -10000 for a masked key, in base-2 score units


@triton.jit
def _keep(seed, rows, k0, thresh, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_R, BLOCK_K) dropout keep-mask of stream rows ``rows`` ((n*H + h)*Lq + i) and keys k0 + [0,
    BLOCK_K) (k0 % 4 == 0): one Philox call per 4 keys, output j of counter c serves key 4c + (j%2)*2 + j//2."""
    c0 = (k0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    c0 = tl.broadcast_to(c0[None, :], (BLOCK_R, BLOCK_K // 4))
    c1 = tl.broadcast_to(rows.to(tl.uint32)[:, None], (BLOCK_R, BLOCK_K // 4))
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_R, BLOCK_K))
    return (r >> 1).to(tl.int32, bitcast=True) >= thresh  # P(keep) = 1 - thresh / 2^31


@triton.jit
def _plan_kernel(
    kvi_ptr,  # (N,) int32/int64 image of each row
    plan_ptr,  # (N + 2M + 1,) int32 out: [order (N) | bounds (M+1) | tile_end (M)]
    N, M, Lq, TILE_Q,
    BLOCK: tl.constexpr,
):
    """order: the rows sorted by image (stable); rows of image i are order[bounds[i]:bounds[i+1]];
    tile_end[i]: query tiles of images 0..i (image i has cdiv(rows * Lq, TILE_Q)). Programs 0..cdiv(N, BLOCK)-1
    place BLOCK rows each at the rank of their key image*N + row; the last program builds bounds, tile_end."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    if pid < tl.cdiv(N, BLOCK):
        rn = pid * BLOCK + r
        key_n = tl.load(kvi_ptr + rn, mask=rn < N, other=0).to(tl.int64) * N + rn
        pos = tl.zeros([BLOCK], tl.int32)
        for m0 in range(0, N, BLOCK):
            rm = m0 + r
            key_m = tl.load(kvi_ptr + rm, mask=rm < N, other=0).to(tl.int64) * N + rm
            before = (key_m[None, :] < key_n[:, None]) & (rm < N)[None, :]
            pos += tl.sum(before.to(tl.int32), 1)
        tl.store(plan_ptr + pos, rn, mask=rn < N)
    else:
        carry = pid * 0
        for i0 in range(0, M + 1, BLOCK):
            ri = i0 + r
            lo = tl.zeros([BLOCK], tl.int32)  # rows with image < i  (= bounds[i])
            hi = tl.zeros([BLOCK], tl.int32)  # rows with image <= i (= bounds[i + 1])
            for m0 in range(0, N, BLOCK):
                rm = m0 + r
                img = tl.load(kvi_ptr + rm, mask=rm < N, other=M)  # M: counted by neither for i < M
                lo += tl.sum((img[None, :] < ri[:, None]).to(tl.int32), 1)
                hi += tl.sum((img[None, :] <= ri[:, None]).to(tl.int32), 1)
            tl.store(plan_ptr + N + ri, lo, mask=ri <= M)
            nt = tl.where(ri < M, ((hi - lo) * Lq + TILE_Q - 1) // TILE_Q, 0)
            tl.store(plan_ptr + N + M + 1 + ri, tl.cumsum(nt, 0) + carry, mask=ri < M)
            carry += tl.sum(nt, 0)


@triton.jit
def _tile(plan_ptr, t, N, M, Lq, BLOCK_Q: tl.constexpr, CHUNK_M: tl.constexpr):
    """Query tile t -> (image, row n and query i of each of its BLOCK_Q positions, valid); the image is M for
    the tiles past the last image's."""
    te_ptr = plan_ptr + N + M + 1
    img = t * 0
    for m0 in range(0, M, CHUNK_M):  # image = number of images whose tiles end at or before t
        cm = m0 + tl.arange(0, CHUNK_M)
        te = tl.load(te_ptr + cm, mask=cm < M, other=2147483647)
        img += tl.sum((te <= t).to(tl.int32), 0)
    first = tl.load(te_ptr + img - 1, mask=img > 0, other=0)
    rs = tl.load(plan_ptr + N + img)
    npos = (tl.load(plan_ptr + N + img + 1, mask=img < M, other=0) - rs) * Lq
    p = (t - first) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    valid = (p < npos) & (img < M)
    j = p // Lq
    n = tl.load(plan_ptr + rs + j, mask=valid, other=0)
    return img, n, p - j * Lq, valid


@triton.jit
def _xattn_fwd_kernel(
    q_ptr, sqn, sqh, sql,  # (N, H, Lq, D) any strides, last dim contiguous
    k_ptr, v_ptr, skm, skh, skl,  # (M, H, Lk, D), k and v with the same strides
    plan_ptr,  # (N + 2M + 1,) int32 from _plan_kernel
    mask_ptr,  # (M, Lk) uint8, 1 = attend (read only when HAS_MASK)
    seed_ptr,  # (1,) int64 Philox seed (read only when DROPOUT)
    o_ptr, son, soh, sol,  # (N, H, Lq, D) out
    lse_ptr,  # (N, H, Lq) fp32 out, contiguous: log2-sum-exp2 of the base-2 scores
    N, M, H, Lq, Lk, D,
    qk_scale,  # log2(e) / sqrt(D)
    thresh,  # round(p * 2^31): keep iff 31 Philox bits >= thresh
    inv_keep,  # 1 / (1 - p); 1 without dropout
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK_M: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0)  # the tiles of one image are neighbours: they stream the same K/V (L2 hits)
    h = tl.program_id(1)
    img, n, i, valid = _tile(plan_ptr, t, N, M, Lq, BLOCK_Q, CHUNK_M)
    if img >= M:
        return
    rows = (n * H + h) * Lq + i
    n64 = n.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    qmask = valid[:, None] & (dd[None, :] < D)
    q = tl.load(q_ptr + (n64 * sqn + h * sqh + i * sql)[:, None] + dd[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    kv_base = img.to(tl.int64) * skm + h * skh
    m_i = tl.full([BLOCK_Q], -1e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k0 in range(0, Lk, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        cmask = ck < Lk
        kv_off = kv_base + ck[:, None] * skl + dd[None, :]
        kvm = cmask[:, None] & (dd[None, :] < D)
        kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)
        vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        if HAS_MASK:
            att = tl.load(mask_ptr + img * Lk + ck, mask=cmask, other=1)
            s = s + tl.where(att != 0, 0.0, MASK_BIAS2)[None, :]
        s = tl.where(cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        corr = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * corr + tl.sum(p, 1)  # the softmax normaliser counts every key: dropout comes after it
        if DROPOUT:
            p = tl.where(_keep(seed, rows, k0, thresh, BLOCK_Q, BLOCK_K), p, 0.0)
        acc = acc * corr[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    acc = acc * (inv_keep / l_i)[:, None]
    o_off = (n64 * son + h * soh + i * sol)[:, None] + dd[None, :]
    tl.store(o_ptr + o_off, acc.to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(lse_ptr + rows, m_i + tl.log2(l_i), mask=valid)


@triton.jit
def _xattn_bwd_dq_kernel(
    q_ptr, sqn, sqh, sql, k_ptr, v_ptr, skm, skh, skl, plan_ptr, mask_ptr, seed_ptr,
    o_ptr, son, soh, sol,  # (N, H, Lq, D) forward output; dq_ptr has the same strides
    do_ptr, sdn, sdh, sdl,  # (N, H, Lq, D) gradient of the output
    lse_ptr,  # (N, H, Lq) fp32 saved by the forward
    delta_ptr,  # (N, H, Lq) fp32 out: rowsum(dO * O), read by the dK/dV kernel
    dq_ptr,  # (N, H, Lq, D) out, q dtype
    N, M, H, Lq, Lk, D, qk_scale, sm_scale, thresh, inv_keep,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK_M: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    img, n, i, valid = _tile(plan_ptr, t, N, M, Lq, BLOCK_Q, CHUNK_M)
    if img >= M:
        return
    rows = (n * H + h) * Lq + i
    n64 = n.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    qmask = valid[:, None] & (dd[None, :] < D)
    o_off = (n64 * son + h * soh + i * sol)[:, None] + dd[None, :]
    q = tl.load(q_ptr + (n64 * sqn + h * sqh + i * sql)[:, None] + dd[None, :], mask=qmask, other=0.0)
    do = tl.load(do_ptr + (n64 * sdn + h * sdh + i * sdl)[:, None] + dd[None, :], mask=qmask, other=0.0)
    o = tl.load(o_ptr + o_off, mask=qmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + rows, delta, mask=valid)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    kv_base = img.to(tl.int64) * skm + h * skh
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k0 in range(0, Lk, BLOCK_K):
        ck = k0 + tl.arange(0, BLOCK_K)
        cmask = ck < Lk
        kv_off = kv_base + ck[:, None] * skl + dd[None, :]
        kvm = cmask[:, None] & (dd[None, :] < D)
        kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)
        vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
        if DOT_F32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        if HAS_MASK:
            att = tl.load(mask_ptr + img * Lk + ck, mask=cmask, other=1)
            s = s + tl.where(att != 0, 0.0, MASK_BIAS2)[None, :]
        p = tl.where(valid[:, None] & cmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)  # gradient of the dropped probabilities
        if DROPOUT:
            dp = tl.where(_keep(seed, rows, k0, thresh, BLOCK_Q, BLOCK_K), dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(dq_ptr + o_off, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _xattn_bwd_dkdv_kernel(
    q_ptr, sqn, sqh, sql, k_ptr, v_ptr, skm, skh, skl, plan_ptr, mask_ptr, seed_ptr,
    do_ptr, sdn, sdh, sdl, lse_ptr, delta_ptr,
    dk_ptr, dv_ptr, sgm, sgh, sgl,  # (M, H, Lk, D) out, k dtype, same strides; every element written
    N, M, H, Lq, Lk, D, qk_scale, sm_scale, thresh, inv_keep,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    kb = tl.program_id(0)  # the k-blocks of one (image, head) are neighbours: they share its q, do in L2
    img = tl.program_id(1)
    h = tl.program_id(2)
    rs = tl.load(plan_ptr + N + img)
    npos = (tl.load(plan_ptr + N + img + 1) - rs) * Lq  # 0 for an image no row uses: dk = dv = 0
    dd = tl.arange(0, BLOCK_D)
    ck = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = ck < Lk
    kvm = cmask[:, None] & (dd[None, :] < D)
    kv_off = img.to(tl.int64) * skm + h * skh + ck[:, None] * skl + dd[None, :]
    kt = tl.load(k_ptr + kv_off, mask=kvm, other=0.0)
    vt = tl.load(v_ptr + kv_off, mask=kvm, other=0.0)
    if DOT_F32:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    if HAS_MASK:
        att = tl.load(mask_ptr + img * Lk + ck, mask=cmask, other=1)
        bias = tl.where(att != 0, 0.0, MASK_BIAS2)
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for p0 in range(0, npos, BLOCK_Q):  # the image's rows, their Lq positions packed back to back
        p = p0 + tl.arange(0, BLOCK_Q)
        valid = p < npos
        j = p // Lq
        n = tl.load(plan_ptr + rs + j, mask=valid, other=0)
        i = p - j * Lq
        rows = (n * H + h) * Lq + i
        n64 = n.to(tl.int64)
        qmask = valid[:, None] & (dd[None, :] < D)
        q = tl.load(q_ptr + (n64 * sqn + h * sqh + i * sql)[:, None] + dd[None, :], mask=qmask, other=0.0)
        do = tl.load(do_ptr + (n64 * sdn + h * sdh + i * sdl)[:, None] + dd[None, :], mask=qmask, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=valid, other=0.0)
        st = tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale  # (BLOCK_K, BLOCK_Q) = S^T
        if HAS_MASK:
            st = st + bias[:, None]
        pt = tl.where(cmask[:, None] & valid[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PREC)
        if DROPOUT:
            keep = tl.trans(_keep(seed, rows, kb * BLOCK_K, thresh, BLOCK_Q, BLOCK_K))
            dv += tl.dot(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do, input_precision=PREC)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    g_off = img.to(tl.int64) * sgm + h * sgh + ck[:, None] * sgl + dd[None, :]
    tl.store(dk_ptr + g_off, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kvm)
    tl.store(dv_ptr + g_off, dv.to(dv_ptr.dtype.element_ty), mask=kvm)


@triton.jit
def _keep_mask_kernel(seed_ptr, out_ptr, R, Lk, thresh, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k0 = tl.program_id(1) * BLOCK_K
    ck = k0 + tl.arange(0, BLOCK_K)
    keep = _keep(tl.load(seed_ptr), rr, k0, thresh, BLOCK_R, BLOCK_K)
    tl.store(out_ptr + rr.to(tl.int64)[:, None] * Lk + ck[None, :], keep.to(tl.int8),
             mask=(rr < R)[:, None] & (ck < Lk)[None, :])


# ----------------------------------------------------------------------------------------------- launchers
PLAN_BLOCK = 64  # rows compared per step in _plan_kernel (a 64 x 64 int64 compare: 32 per thread)
CHUNK_M = 128  # images scanned per step when a tile looks up its image


def _check(q, k, v, kv_index, key_padding_mask, dropout_p) -> None:
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
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"cross_attention: dropout_p must be in [0, 1], got {dropout_p}")
    check_dtype("q", q)


DKDV_WARPS = 8


def _blocks(N: int, M: int, Lq: int, Lk: int, D: int, dropout: bool) -> dict:
    """Tile sizes. tile_q: packed query positions per forward/dQ tile; an image's rows hold N*Lq/M of them on
    average (105 in ITM: 2 tiles of 64, one Hopper wgmma M each; 3 beams x Lq = 1 in generation: 16).
    The dropout mask and its Philox state cost ~70-110 registers a thread on sm_80 at a 64 x 64 tile, so the
    tiles that carry it are 64 x 32 (forward with dropout, dQ) or 32 x 64 (dK/dV): 255, 204 and 255 registers on
    sm_80, no spill (benchmarks/kstat.py); the 64 x 64 dK/dV tile spilled 512 B there, the forward 8 B. The
    dK/dV kernel runs 8 warps (DKDV_WARPS): its two 64 x 64 fp32 accumulators cost 64 registers a thread at 4
    warps, and at 4 warps triton 3.6 (the GPU machine's) spilled 16 B on sm_80; 8 warps: 255 regs, no spill,
    on 3.6 and 3.8; sm_90: 178-199 registers, 20 wgmma."""
    tile_q = min(64, max(16, next_pow2(-(-N * Lq // max(M, 1)))))
    bk = min(64, max(16, next_pow2(Lk)))
    return dict(tile_q=tile_q, fwd_k=min(bk, 32) if dropout else bk, dq_k=min(bk, 32), dkdv_q=min(tile_q, 32),
                dkdv_k=bk, d=max(16, next_pow2(D)))


def _dropout_args(p: float) -> tuple[int, float]:
    """(thresh, 1/(1-p)): keep iff 31 uniform bits >= thresh, so P(keep) = 1 - p to 2^-31."""
    if p >= 1.0:
        return 2**31 - 1, 0.0  # F.dropout(p=1) is all zeros: nothing kept survives the 0 scale
    return int(round(p * 2**31)), 1.0 / (1.0 - p)


def _bhld(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An (X, H, L, D) tensor stored as (X, L, H, D): BERT's layout, so ``out.transpose(1, 2).reshape(X, L,
    H*D)`` in the model and the projections' gradients are views, not copies (a contiguous (X, H, L, D) out
    and K/V grads cost a 2 x 57 MB copy per layer at Lk = 577)."""
    X, H, L, D = shape
    return torch.empty(X, L, H, D, device=like.device, dtype=like.dtype).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def xattn_plan(kv_index: torch.Tensor, M: int, Lq: int, tile_q: int) -> torch.Tensor:
    """(N + 2M + 1,) int32 [order | bounds | tile_end] on the device, one launch, no host sync."""
    N = kv_index.shape[0]
    plan = torch.empty(N + 2 * M + 1, device=kv_index.device, dtype=torch.int32)
    _plan_kernel[(triton.cdiv(N, PLAN_BLOCK) + 1,)](kv_index.contiguous(), plan, N, M, Lq, tile_q,
                                                     BLOCK=PLAN_BLOCK, num_warps=4)
    return plan


def _prepare(q, k, v, key_padding_mask, dropout_p, seed):
    """Inputs with a contiguous last dim (k and v with the same strides) and the launch arguments all three
    kernels share."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    N, H, Lq, D = q.shape
    M, Lk = k.shape[0], k.shape[2]
    mask = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else k
    thresh, inv_keep = _dropout_args(dropout_p)
    meta = dict(HAS_MASK=key_padding_mask is not None, DROPOUT=dropout_p > 0.0, DOT_F32=dot_fp32(q.dtype),
                PREC=dot_precision(q.dtype))
    blocks = _blocks(N, M, Lq, Lk, D, dropout_p > 0.0)
    return q, k, v, mask, seed if seed is not None else k, (thresh, inv_keep), meta, (N, M, H, Lq, Lk, D), blocks


def xattn_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch: returns out (N, H, Lq, D) stored as (N, Lq, H, D), lse (N, H, Lq) fp32 (base 2)."""
    q, k, v, mask, seed, drop, meta, args, b = _prepare(q, k, v, key_padding_mask, dropout_p, seed)
    N, M, H, Lq, Lk, D = args
    out = _bhld(q.shape, q)
    lse = torch.empty(N, H, Lq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(N * Lq, b["tile_q"]) + min(M, N), H)  # >= the packed tiles, whatever kv_index holds
    _xattn_fwd_kernel[grid](
        q, *_strides(q), k, v, *_strides(k), plan, mask, seed, out, *_strides(out), lse, *args,
        LOG2E / math.sqrt(D), *drop, BLOCK_Q=b["tile_q"], BLOCK_K=b["fwd_k"], BLOCK_D=b["d"], CHUNK_M=CHUNK_M,
        **meta, num_warps=4)
    return out, lse


def xattn_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor,
                   key_padding_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, dropout_p: float,
                   seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the dQ kernel (which also writes delta) then the dK/dV kernel; grads in the input dtypes,
    dq stored as (N, Lq, H, D), dk and dv as (M, Lk, H, D)."""
    q, k, v, mask, seed, drop, meta, args, b = _prepare(q, k, v, key_padding_mask, dropout_p, seed)
    N, M, H, Lq, Lk, D = args
    do = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    dq, dk, dv = _bhld(q.shape, q), _bhld(k.shape, k), _bhld(v.shape, v)
    if out.stride() != dq.stride():  # the dQ kernel reads out with dq's strides
        out = _bhld(q.shape, out).copy_(out)
    delta = torch.empty(N, H, Lq, device=q.device, dtype=torch.float32)
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D), *drop)
    _xattn_bwd_dq_kernel[(triton.cdiv(N * Lq, b["tile_q"]) + min(M, N), H)](
        q, *_strides(q), k, v, *_strides(k), plan, mask, seed, out, *_strides(out), do, *_strides(do), lse,
        delta, dq, *args, *scales, BLOCK_Q=b["tile_q"], BLOCK_K=b["dq_k"], BLOCK_D=b["d"], CHUNK_M=CHUNK_M,
        **meta, num_warps=4)
    _xattn_bwd_dkdv_kernel[(triton.cdiv(Lk, b["dkdv_k"]), M, H)](
        q, *_strides(q), k, v, *_strides(k), plan, mask, seed, do, *_strides(do), lse, delta, dk, dv,
        *_strides(dk), *args, *scales, BLOCK_Q=b["dkdv_q"], BLOCK_K=b["dkdv_k"], BLOCK_D=b["d"], **meta,
        num_warps=DKDV_WARPS)
    return dq, dk, dv


def dropout_keep_mask(seed: torch.Tensor, N: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """The kernels' dropout keep-mask for ``seed`` as an (N, H, Lq, Lk) bool tensor (True = kept), from the
    same ``_keep`` the forward and backward call: what tests feed to ``cross_attention_reference``."""
    thresh, _ = _dropout_args(dropout_p)
    out = torch.empty(N, H, Lq, Lk, device=seed.device, dtype=torch.int8)
    R = N * H * Lq
    _keep_mask_kernel[(triton.cdiv(R, 64), triton.cdiv(Lk, 64))](seed, out, R, Lk, thresh, BLOCK_R=64,
                                                                   BLOCK_K=64)
    return out.bool()


def dropout_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1,) int64 Philox seed on ``device`` drawn from ``generator`` (default: torch's) with no host sync.
    63 bits, not hard_negatives.draw_seed's 31: ~24 draws a step would repeat a 31-bit seed (birthday
    bound 2^15.5 draws) within ~2,000 steps."""
    gen_dev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**63 - 1, (1,), device=gen_dev, generator=generator, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------- autograd
@torch.library.custom_op("fastblip::cross_attention_fwd", mutates_args=())
def _xattn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, dropout_p: float, seed: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, H, Lq, D = q.shape
    M, Lk = k.shape[0], k.shape[2]
    plan = xattn_plan(kv_index, M, Lq, _blocks(N, M, Lq, Lk, D, dropout_p > 0.0)["tile_q"])
    out, lse = xattn_forward(q, k, v, plan, key_padding_mask, dropout_p, seed)
    return out, lse, plan


@_xattn_fwd_op.register_fake
def _(q, k, v, kv_index, key_padding_mask, dropout_p, seed):
    plan = q.new_empty(kv_index.shape[0] + 2 * k.shape[0] + 1, dtype=torch.int32)
    return _bhld(q.shape, q), q.new_empty(q.shape[:3], dtype=torch.float32), plan


@torch.library.custom_op("fastblip::cross_attention_bwd", mutates_args=())
def _xattn_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: torch.Tensor,
                  key_padding_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, dropout_p: float,
                  seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return xattn_backward(grad_out, q, k, v, plan, key_padding_mask, out, lse, dropout_p, seed)


@_xattn_bwd_op.register_fake
def _(grad_out, q, k, v, plan, key_padding_mask, out, lse, dropout_p, seed):
    return _bhld(q.shape, q), _bhld(k.shape, k), _bhld(v.shape, v)


class CrossAttentionFunction:
    """Autograd layer as ``register_autograd`` hooks: grads to q, k, v; none to the index, mask, p, seed."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, kv_index, key_padding_mask, dropout_p, seed = inputs
        ctx.dropout_p = dropout_p
        ctx.save_for_backward(q, k, v, output[2], key_padding_mask, output[0], output[1], seed)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse, _grad_plan):
        q, k, v, plan, key_padding_mask, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = _xattn_bwd_op(grad_out, q, k, v, plan, key_padding_mask, out, lse, ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None


_xattn_fwd_op.register_autograd(CrossAttentionFunction.backward, setup_context=CrossAttentionFunction.setup_context)


def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                           key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Row n of q attends to image kv_index[n] of k, v; attention dropout ``dropout_p`` on the probabilities
    with a seed drawn from ``generator`` (torch's default when None). Returns (N, H, Lq, D)."""
    _check(q, k, v, kv_index, key_padding_mask, dropout_p)
    if q.is_cuda:  # range check on device, no host sync (an out-of-range image id would read garbage)
        torch._assert_async(((kv_index >= 0) & (kv_index < k.shape[0])).all(),
                            "cross_attention: kv_index out of range")
    seed = dropout_seed(q.device, generator) if dropout_p > 0.0 else None
    return _xattn_fwd_op(q, k, v, kv_index, key_padding_mask, float(dropout_p), seed)[0]
