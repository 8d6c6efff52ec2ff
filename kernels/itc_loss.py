"""Fused image-text contrastive (ITC) loss with momentum-distilled soft targets (BLIP_SPEC §2, §4).

Legend: B batch rows, N = B + Q columns (momentum batch first, then the queue), d feature width (256).
Per direction (i2t: student ``image_feat``, teacher ``image_feat_m_all[:B]``, keys ``text_feat_m_all``;
t2i swaps the modalities), with student s = q k^T / temp and teacher t = q_m k^T / temp:

    target_j = alpha * softmax(t)_j + (1 - alpha) * pos_j / cnt,  loss_row = -sum_j target_j log_softmax(s)_j
             = lse(s) (alpha + (1 - alpha) [cnt > 0]) - alpha sum_j softmax(t)_j s_j - (1 - alpha) P / cnt

so one pass over the N columns with an online softmax for s and t together gives the loss from six running
row statistics (max/sum for s, max/sum/softmax-weighted sum for t, positive sum and count). The N columns
are split across programs (split-K style) so 64 rows still fill an H100; the per-split statistics
(7 x B x splits floats) are merged in PyTorch. Backward recomputes s and t tile by tile from the saved
row log-sum-exps: nothing of size B x N is ever stored.

Precision: every tl.dot takes bf16 operands (fp16 when the keys are fp16) with fp32 accumulation; softmax,
statistics and outputs are fp32. Why, at BLIP base (B = 64, N = 57,664, d = 256, fp32 features):
- the keys dominate the traffic and are read once per pass, so with 16-bit operands the op is memory-bound:
  the forward does 2 products x 2 FLOP x 64 rows = 256 FLOP per key element and moves 6 B for it
  (43 FLOP/B), the backward 3 products = 384 FLOP per 2 B (192 FLOP/B), both under the H100's bf16 ridge of
  295 FLOP/B (989 TFLOP/s / 3.35 TB/s; at B = 128 the backward's 384 FLOP/B is compute-bound, 23 us).
  fp32 FMA dots (67 TFLOP/s, ridge 20) would be compute-bound and tf32x3 (~165 TFLOP/s, ridge 49) nearly,
  and their fp32 operand tiles overflowed shared memory and spilled (327 KB, 7 KB of stack per thread);
- tf32 keeps fp32 operands: the 64 x 256 student and teacher query tiles alone take 128 KB of shared memory
  (A100's per-block limit: 163 KB), and wgmma reads tf32 only K-major, which dS @ K is not;
- accuracy: bf16 rounds each operand (to nearest even) by at most 2^-9 relative; with fp32 accumulation
  the loss and gradients stay within 2x of PyTorch's own error with bf16 operands (tests/test_kernels_itc.py
  states the rule; it is checked on CPU with the operands rounded as here, on a GPU at BLIP shapes).

Memory traffic per step, both directions, at BLIP base: the forward reads the fp32 keys (2 x 59.0 MB) and
writes them rounded to bf16 (2 x 29.5 MB), the copy the backward reads instead (2 x 29.5 MB): 236 MB in all,
the same as reading the fp32 keys in both passes, so the floor is 70.5 us on an H100 (52.9 fwd + 17.6 bwd),
and 35 us if the momentum features and queue were kept in bf16 (then no copy is written). On top: the
backward's per-split dq partials (splits x B x d fp32 = 8.5 MB per direction at 129 splits, summed right
after, inside the 50 MB L2). ``python -m benchmarks.kstat`` prints the compiled launches against this floor.

Tiles (GPU): BLOCK_B = 64 query rows with 4 warps (one warpgroup: Hopper wgmma needs M = 64 per warpgroup;
8 warps would compute the 64-row products twice, once per warpgroup), BLOCK_N = 16 key columns, and the
feature width as four 64-wide chunks. On sm_80 every warp of mma.sync holds the whole B operand of its
products: 32 key columns, or d in one product, spill there (kstat); 16 columns and 4 chunks fit with 192
(forward) and 240 (backward) registers on both GPUs, in <= 106 KB of shared memory (3 and 5 stages).
The interpreter (CPU tests) truncates fp32 -> bf16, so there the kernels round on the bits (see _to_op).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastblip.kernels import INTERPRET, check_dtype, next_pow2


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (the interpreter) widens the tiles to fp32 first: its
    16-bit tl.dot is wrong (PLATFORM_NOTES), widening is exact, so the products are the same as the GPU's."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _to_op(x, OP: tl.constexpr, UPCAST: tl.constexpr):
    """x rounded to the operand dtype, to nearest even as the GPU's conversion does. The interpreter's own
    fp32 -> bf16 conversion truncates (measured, triton 3.8), so there the rounding is done on the bits."""
    if UPCAST:
        if OP == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)  # now exact in bf16: the conversion below is too
    return x.to(OP)


@triton.jit
def _chunk(ptr, rows, rmask, c: tl.constexpr, D, CH: tl.constexpr, EVEN_D: tl.constexpr, OP: tl.constexpr,
           UPCAST: tl.constexpr):
    """Feature columns [c * CH, (c + 1) * CH) of ``rows`` of a row-major (., D) matrix, as OP."""
    dc = c * CH + tl.arange(0, CH)
    m = rmask[:, None] if EVEN_D else rmask[:, None] & (dc < D)[None, :]
    return _to_op(tl.load(ptr + rows[:, None] * D + dc[None, :], mask=m, other=0.0), OP, UPCAST)


@triton.jit
def _rows(ptr, rows, rmask, D, CH: tl.constexpr, EVEN_D: tl.constexpr, OP: tl.constexpr,
          UPCAST: tl.constexpr):
    """``rows`` of a (., D) matrix as four column chunks, rounded to the dot operand dtype OP on load."""
    return (_chunk(ptr, rows, rmask, 0, D, CH, EVEN_D, OP, UPCAST),
            _chunk(ptr, rows, rmask, 1, D, CH, EVEN_D, OP, UPCAST),
            _chunk(ptr, rows, rmask, 2, D, CH, EVEN_D, OP, UPCAST),
            _chunk(ptr, rows, rmask, 3, D, CH, EVEN_D, OP, UPCAST))


@triton.jit
def _store_chunk(ptr, x, rows, rmask, c: tl.constexpr, D, CH: tl.constexpr, EVEN_D: tl.constexpr):
    dc = c * CH + tl.arange(0, CH)  # as in _chunk
    m = rmask[:, None] if EVEN_D else rmask[:, None] & (dc < D)[None, :]
    tl.store(ptr + rows[:, None] * D + dc[None, :], x, mask=m)


@triton.jit
def _store_rows(ptr, x0, x1, x2, x3, rows, rmask, D, CH: tl.constexpr, EVEN_D: tl.constexpr):
    """The inverse of _rows."""
    _store_chunk(ptr, x0, rows, rmask, 0, D, CH, EVEN_D)
    _store_chunk(ptr, x1, rows, rmask, 1, D, CH, EVEN_D)
    _store_chunk(ptr, x2, rows, rmask, 2, D, CH, EVEN_D)
    _store_chunk(ptr, x3, rows, rmask, 3, D, CH, EVEN_D)


@triton.jit
def _sim(q0, q1, q2, q3, k0, k1, k2, k3, zero, UPCAST: tl.constexpr):
    """(BLOCK_B, BLOCK_N) q @ k^T as four K = CH products (see the module docstring: sm_80 registers)."""
    acc = _dot(q0, tl.trans(k0), zero, UPCAST)
    acc = _dot(q1, tl.trans(k1), acc, UPCAST)
    acc = _dot(q2, tl.trans(k2), acc, UPCAST)
    return _dot(q3, tl.trans(k3), acc, UPCAST)


@triton.jit
def _itc_fwd_kernel(
    qs_ptr,  # (B, D) OP student queries of this direction
    qt_ptr,  # (B, D) OP teacher queries (first B rows of the momentum features of the same modality)
    k_ptr,  # (N, D) momentum features of the other modality, batch first then queue (fp32 or OP)
    temp_ptr,  # 0-dim temperature
    idx_ptr, idx_all_ptr,  # (B,), (N,) image ids (only read when HAS_IDX)
    sim_ptr,  # (B, B) fp32 out: student logits of the first B columns
    part_ptr,  # (7, B, S) fp32 out: per-split statistics
    kq_ptr,  # (N, D) OP out: the keys as rounded here, for the backward (written only when WRITE_KQ)
    B, N, D, cols_per_split, S,
    HAS_IDX: tl.constexpr, WRITE_KQ: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    CH: tl.constexpr,  # feature columns per chunk: tiles are 4 chunks wide (4 * CH >= D)
    EVEN_D: tl.constexpr,  # D == 4 * CH: no feature-column mask (d = 256 in BLIP)
    OP: tl.constexpr,  # dot operand dtype: bf16 (fp16 for fp16 keys); fp32 with exact_dots (interpreter)
    UPCAST: tl.constexpr,  # interpreter: widen operands to fp32 before tl.dot (see _dot)
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    qs0, qs1, qs2, qs3 = _rows(qs_ptr, rows, rmask, D, CH, EVEN_D, OP, UPCAST)
    qt0, qt1, qt2, qt3 = _rows(qt_ptr, rows, rmask, D, CH, EVEN_D, OP, UPCAST)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    if HAS_IDX:
        ridx = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    # -1e30 (not -inf) as the running max keeps exp(m_old - m_new) finite before the first real column.
    m_s = tl.full([BLOCK_B], -1e30, tl.float32)
    l_s = tl.zeros([BLOCK_B], tl.float32)
    m_t = tl.full([BLOCK_B], -1e30, tl.float32)
    l_t = tl.zeros([BLOCK_B], tl.float32)
    a_t = tl.zeros([BLOCK_B], tl.float32)
    p_s = tl.zeros([BLOCK_B], tl.float32)
    cnt = tl.zeros([BLOCK_B], tl.float32)
    zero = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k0, k1, k2, k3 = _rows(k_ptr, cols, cmask, D, CH, EVEN_D, OP, UPCAST)
        if WRITE_KQ:
            _store_rows(kq_ptr, k0, k1, k2, k3, cols, cmask, D, CH, EVEN_D)
        s = _sim(qs0, qs1, qs2, qs3, k0, k1, k2, k3, zero, UPCAST) * inv_t
        t = _sim(qt0, qt1, qt2, qt3, k0, k1, k2, k3, zero, UPCAST) * inv_t
        if n0 < B:
            smask = rmask[:, None] & (cols[None, :] < B)
            tl.store(sim_ptr + rows[:, None] * B + cols[None, :], s, mask=smask)
        s0 = tl.where(cmask[None, :], s, 0.0)
        s = tl.where(cmask[None, :], s, float("-inf"))
        t = tl.where(cmask[None, :], t, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(s, 1))
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_s = m_new
        mt_new = tl.maximum(m_t, tl.max(t, 1))
        scale = tl.exp(m_t - mt_new)
        pt = tl.exp(t - mt_new[:, None])
        l_t = l_t * scale + tl.sum(pt, 1)
        a_t = a_t * scale + tl.sum(pt * s0, 1)
        m_t = mt_new
        if HAS_IDX:
            cidx = tl.load(idx_all_ptr + cols, mask=cmask, other=-1)
            pos = (ridx[:, None] == cidx[None, :]) & cmask[None, :]
        else:
            pos = (rows[:, None] == cols[None, :]) & cmask[None, :]
        p_s += tl.sum(tl.where(pos, s0, 0.0), 1)
        cnt += tl.sum(pos.to(tl.float32), 1)
    out = part_ptr + rows * S + pid_s
    BS = B * S
    tl.store(out, m_s, mask=rmask)
    tl.store(out + BS, l_s, mask=rmask)
    tl.store(out + 2 * BS, m_t, mask=rmask)
    tl.store(out + 3 * BS, l_t, mask=rmask)
    tl.store(out + 4 * BS, a_t, mask=rmask)
    tl.store(out + 5 * BS, p_s, mask=rmask)
    tl.store(out + 6 * BS, cnt, mask=rmask)


@triton.jit
def _itc_bwd_kernel(
    qs_ptr, qt_ptr,  # (B, D) OP, as in the forward
    k_ptr,  # (N, D) OP: the forward's rounded copy of the keys (or the keys, when already OP)
    temp_ptr, alpha_ptr, idx_ptr, idx_all_ptr,  # as in the forward
    stat_ptr,  # (3, B) fp32: lse of student, lse of teacher, positive count
    g_ptr,  # 0-dim fp32: d loss / d row loss (grad_out * 0.5 / B)
    dq_ptr,  # (S, B, D) fp32 out: per-split partial d qs
    dt_ptr,  # (B, S) fp32 out: per-split partial d temp
    B, N, D, cols_per_split, S,
    HAS_IDX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr,
    EVEN_D: tl.constexpr, OP: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    qs0, qs1, qs2, qs3 = _rows(qs_ptr, rows, rmask, D, CH, EVEN_D, OP, UPCAST)
    qt0, qt1, qt2, qt3 = _rows(qt_ptr, rows, rmask, D, CH, EVEN_D, OP, UPCAST)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    lse_s = tl.load(stat_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(stat_ptr + B + rows, mask=rmask, other=0.0)
    cnt = tl.load(stat_ptr + 2 * B + rows, mask=rmask, other=0.0)
    has_pos = cnt > 0
    tsum = alpha + (1.0 - alpha) * has_pos.to(tl.float32)
    posw = tl.where(has_pos, (1.0 - alpha) / tl.maximum(cnt, 1.0), 0.0)
    if HAS_IDX:
        ridx = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    dq0 = tl.zeros([BLOCK_B, CH], tl.float32)
    dq1 = tl.zeros([BLOCK_B, CH], tl.float32)
    dq2 = tl.zeros([BLOCK_B, CH], tl.float32)
    dq3 = tl.zeros([BLOCK_B, CH], tl.float32)
    dt = tl.zeros([BLOCK_B], tl.float32)
    zero = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k0, k1, k2, k3 = _rows(k_ptr, cols, cmask, D, CH, EVEN_D, OP, UPCAST)
        s = _sim(qs0, qs1, qs2, qs3, k0, k1, k2, k3, zero, UPCAST) * inv_t
        t = _sim(qt0, qt1, qt2, qt3, k0, k1, k2, k3, zero, UPCAST) * inv_t
        if HAS_IDX:
            cidx = tl.load(idx_all_ptr + cols, mask=cmask, other=-1)
            pos = (ridx[:, None] == cidx[None, :]) & cmask[None, :]
        else:
            pos = (rows[:, None] == cols[None, :]) & cmask[None, :]
        # d row_loss / d s_j = softmax(s)_j * sum(target) - target_j. |ds| <= 1, so rounding it to OP for the
        # products below costs a relative 2^-9 (bf16); the upstream scale g is applied once, after the loop
        ds = tl.exp(s - lse_s[:, None]) * tsum[:, None] - alpha * tl.exp(t - lse_t[:, None])
        ds = ds - tl.where(pos, posw[:, None], 0.0)
        ds = tl.where(cmask[None, :] & rmask[:, None], ds, 0.0)
        dt += tl.sum(ds * s, 1)
        dsq = _to_op(ds, OP, UPCAST)
        dq0 = _dot(dsq, k0, dq0, UPCAST)
        dq1 = _dot(dsq, k1, dq1, UPCAST)
        dq2 = _dot(dsq, k2, dq2, UPCAST)
        dq3 = _dot(dsq, k3, dq3, UPCAST)
    scale = tl.load(g_ptr).to(tl.float32) * inv_t
    dq_ptr += pid_s * B * D
    _store_rows(dq_ptr, dq0 * scale, dq1 * scale, dq2 * scale, dq3 * scale, rows, rmask, D, CH, EVEN_D)
    # s = raw / temp, so d s / d temp = -s / temp
    tl.store(dt_ptr + rows * S + pid_s, -dt * scale, mask=rmask)


# ----------------------------------------------------------------------------------------------- launchers
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _operand_dtype(key_dtype: torch.dtype, exact_dots: bool) -> torch.dtype:
    """The dtype tiles are rounded to before tl.dot: the keys' own when 16-bit (exact), else bf16 (fp32's
    range: dS and tiny softmax weights stay normal numbers); fp32 only with ``exact_dots``."""
    if exact_dots:
        return torch.float32
    return key_dtype if key_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _config(B: int, N: int, D: int, device: torch.device, phase: str) -> dict:
    """Grid, column split and meta-parameters for ``phase`` ("fwd" or "bwd"); tiles: module docstring.

    B = 128 runs two 64-row blocks whose programs are launched side by side (row block is grid axis 0), so
    the second reads each key tile from L2, not HBM. The forward splits the columns over 2 programs per SM
    (2 x 106 KB of shared memory fit an H100 SM: more loads in flight), the backward over 1 per SM (5 stages
    in flight instead) because each split writes a B x d fp32 dq partial.
    """
    block_d = max(64, next_pow2(D))  # 4 chunks of >= 16 columns (tl.dot's smallest K)
    block_n, warps = 16, 4
    if device.type == "cuda":
        block_b = 64
        stages = 3 if phase == "fwd" else 5
        target = (2 if phase == "fwd" else 1) * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one by one: 16 rows make B = 33 three row blocks; 3 splits
        block_b, stages, target = 16, 1, 3
    n_tiles = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(B, block_b)
    splits = max(1, min(n_tiles, triton.cdiv(target, row_blocks)))
    cols_per_split = triton.cdiv(n_tiles, splits) * block_n
    splits = triton.cdiv(N, cols_per_split)
    return dict(grid=(row_blocks, splits), cols_per_split=cols_per_split, S=splits,
                meta=dict(BLOCK_B=block_b, BLOCK_N=block_n, CH=block_d // 4, EVEN_D=block_d == D,
                          UPCAST=INTERPRET, num_warps=warps, num_stages=stages))


def _check(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, idx, idx_all) -> None:
    if image_feat.dim() != 2 or image_feat.shape != text_feat.shape:
        raise ValueError(f"itc_loss: image_feat {tuple(image_feat.shape)} and text_feat "
                         f"{tuple(text_feat.shape)} must both be (B, d)")
    B, d = image_feat.shape
    for name, t in (("image_feat_m_all", image_feat_m_all), ("text_feat_m_all", text_feat_m_all)):
        if t.dim() != 2 or t.shape[1] != d or t.shape[0] < B:
            raise ValueError(f"itc_loss: {name} {tuple(t.shape)} must be (B+Q, {d}) with B+Q >= B={B}")
    if image_feat_m_all.shape != text_feat_m_all.shape:
        raise ValueError("itc_loss: image_feat_m_all and text_feat_m_all must have the same shape")
    if temp.numel() != 1:
        raise ValueError(f"itc_loss: temp must be a scalar tensor, got shape {tuple(temp.shape)}")
    if (idx is None) != (idx_all is None):
        raise ValueError("itc_loss: pass both idx and idx_all, or neither")
    if idx is not None and (idx.numel() != B or idx_all.numel() != image_feat_m_all.shape[0]):
        raise ValueError(f"itc_loss: idx must have B={B} entries and idx_all B+Q="
                         f"{image_feat_m_all.shape[0]}, got {idx.numel()} and {idx_all.numel()}")
    if d > 256:  # the 64-row query tiles (2 x 64 x d x 2 B) and key stages fill shared memory at d = 256
        raise ValueError(f"itc_loss: feature width {d} > 256 is not supported by the kernel")
    for name, t in (("image_feat", image_feat), ("text_feat", text_feat),
                    ("image_feat_m_all", image_feat_m_all), ("text_feat_m_all", text_feat_m_all)):
        check_dtype(name, t)


def _check_exact(exact_dots: bool, device: torch.device) -> None:
    if exact_dots and device.type == "cuda":
        raise ValueError("itc_loss: exact_dots (fp32 tl.dot operands) is for the interpreter; on a GPU fp32 "
                         "dots are compute-bound and spill, the kernel uses bf16 operands (module docstring)")


def _directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all):
    """(student queries, teacher queries, keys) for i2t, then t2i."""
    B = image_feat.shape[0]
    c = torch.Tensor.contiguous
    return ((c(image_feat), c(image_feat_m_all[:B]), c(text_feat_m_all)),
            (c(text_feat), c(text_feat_m_all[:B]), c(image_feat_m_all)))


def _key_copy_shape(keys: torch.Tensor, exact_dots: bool) -> tuple[int, int]:
    """The forward writes the rounded keys for the backward only when rounding changes them."""
    return tuple(keys.shape) if _operand_dtype(keys.dtype, exact_dots) != keys.dtype else (0, keys.shape[1])


def itc_forward(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: torch.Tensor,
                idx: torch.Tensor | None, idx_all: torch.Tensor | None, exact_dots: bool = False
                ) -> tuple[torch.Tensor, ...]:
    """Launch the forward. Returns loss (), sim_i2t (B,B), sim_t2i (B,B) fp32, stats (2, 3, B) fp32 and the
    rounded key copies for the backward, text keys (i2t) then image keys (t2i): (N, d) bf16, or (0, d) when
    the keys are already the operand dtype (see _key_copy_shape)."""
    B, D = image_feat.shape
    N = image_feat_m_all.shape[0]
    dev = image_feat.device
    _check_exact(exact_dots, dev)
    cfg = _config(B, N, D, dev, "fwd")
    S = cfg["S"]
    has_idx = idx is not None
    idx_c = idx.reshape(-1).contiguous() if has_idx else image_feat
    idx_all_c = idx_all.reshape(-1).contiguous() if has_idx else image_feat
    temp_c = temp.reshape(()).float().contiguous()
    alpha = alpha.float()
    sims, stats, row_losses, copies = [], [], [], []
    for qs, qt, k in _directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all):
        op = _operand_dtype(k.dtype, exact_dots)
        qs, qt = qs.to(op), qt.to(op)  # rounded once here: the kernels' q tiles are dot operands as loaded
        kq = torch.empty(_key_copy_shape(k, exact_dots), device=dev, dtype=op)
        sim = torch.empty(B, B, device=dev, dtype=torch.float32)
        part = torch.empty(7, B, S, device=dev, dtype=torch.float32)
        _itc_fwd_kernel[cfg["grid"]](
            qs, qt, k, temp_c, idx_c, idx_all_c, sim, part, kq, B, N, D, cfg["cols_per_split"], S,
            HAS_IDX=has_idx, WRITE_KQ=kq.numel() > 0, OP=_TL[op], **cfg["meta"])
        m_s, l_s, m_t, l_t, a_t, p_s, cnt = part.unbind(0)  # each (B, S)
        M = m_s.amax(1, keepdim=True)
        lse_s = M.squeeze(1) + torch.log((l_s * torch.exp(m_s - M)).sum(1))
        Mt = m_t.amax(1, keepdim=True)
        wt = torch.exp(m_t - Mt)
        L_t = (l_t * wt).sum(1)
        A = (a_t * wt).sum(1) / L_t
        lse_t = Mt.squeeze(1) + torch.log(L_t)
        P, C = p_s.sum(1), cnt.sum(1)
        has = (C > 0).float()
        row = lse_s * (alpha + (1 - alpha) * has) - alpha * A - (1 - alpha) * P / C.clamp_min(1.0)
        sims.append(sim)
        row_losses.append(row)
        stats.append(torch.stack([lse_s, lse_t, C]))
        copies.append(kq)
    loss = 0.5 * (row_losses[0].mean() + row_losses[1].mean())
    return loss, sims[0], sims[1], torch.stack(stats), copies[0], copies[1]


def itc_backward(grad_loss: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                 image_feat_m_all: torch.Tensor, text_feat_m_all: torch.Tensor, temp: torch.Tensor,
                 alpha: torch.Tensor, idx: torch.Tensor | None, idx_all: torch.Tensor | None,
                 stats: torch.Tensor, kq_i2t: torch.Tensor, kq_t2i: torch.Tensor, exact_dots: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns d image_feat, d text_feat, d temp."""
    B, D = image_feat.shape
    N = image_feat_m_all.shape[0]
    dev = image_feat.device
    _check_exact(exact_dots, dev)
    cfg = _config(B, N, D, dev, "bwd")
    S = cfg["S"]
    has_idx = idx is not None
    idx_c = idx.reshape(-1).contiguous() if has_idx else image_feat
    idx_all_c = idx_all.reshape(-1).contiguous() if has_idx else image_feat
    temp_c = temp.reshape(()).float().contiguous()
    alpha_c = alpha.reshape(()).float().contiguous()
    g = (grad_loss.float() * (0.5 / B)).reshape(()).contiguous()
    grads, dtemp = [], torch.zeros((), device=dev, dtype=torch.float32)
    directions = _directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all)
    for d_i, ((qs, qt, k), kq) in enumerate(zip(directions, (kq_i2t, kq_t2i))):
        op = _operand_dtype(k.dtype, exact_dots)
        qs, qt = qs.to(op), qt.to(op)  # rounded once here: the kernels' q tiles are dot operands as loaded
        keys = kq.contiguous() if kq.numel() else k  # the forward's rounded copy (same values as its tiles)
        dq = torch.empty(S, B, D, device=dev, dtype=torch.float32)
        dt = torch.empty(B, S, device=dev, dtype=torch.float32)
        _itc_bwd_kernel[cfg["grid"]](
            qs, qt, keys, temp_c, alpha_c, idx_c, idx_all_c, stats[d_i].contiguous(), g, dq, dt, B, N, D,
            cfg["cols_per_split"], S, HAS_IDX=has_idx, OP=_TL[op], **cfg["meta"])
        grads.append(dq.sum(0).to((image_feat.dtype, text_feat.dtype)[d_i]))
        dtemp = dtemp + dt.sum()
    return grads[0], grads[1], dtemp.to(temp.dtype).reshape(temp.shape)


# ------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("fastblip::itc_loss_fwd", mutates_args=())
def _itc_fwd_op(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: torch.Tensor,
                idx: torch.Tensor | None, idx_all: torch.Tensor | None, exact_dots: bool = False
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return itc_forward(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all,
                       exact_dots)


@_itc_fwd_op.register_fake
def _(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all, exact_dots=False):
    B = image_feat.shape[0]
    f = dict(dtype=torch.float32, device=image_feat.device)
    copies = [image_feat.new_empty(_key_copy_shape(k, exact_dots), dtype=_operand_dtype(k.dtype, exact_dots))
              for k in (text_feat_m_all, image_feat_m_all)]
    return (image_feat.new_empty((), **f), image_feat.new_empty((B, B), **f),
            image_feat.new_empty((B, B), **f), image_feat.new_empty((2, 3, B), **f), *copies)


@torch.library.custom_op("fastblip::itc_loss_bwd", mutates_args=())
def _itc_bwd_op(grad_loss: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                image_feat_m_all: torch.Tensor, text_feat_m_all: torch.Tensor, temp: torch.Tensor,
                alpha: torch.Tensor, idx: torch.Tensor | None, idx_all: torch.Tensor | None,
                stats: torch.Tensor, kq_i2t: torch.Tensor, kq_t2i: torch.Tensor, exact_dots: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return itc_backward(grad_loss, image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha,
                        idx, idx_all, stats, kq_i2t, kq_t2i, exact_dots)


@_itc_bwd_op.register_fake
def _(grad_loss, image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all, stats,
      kq_i2t, kq_t2i, exact_dots=False):
    return torch.empty_like(image_feat), torch.empty_like(text_feat), torch.empty_like(temp)


class ITCLossFunction:
    """The autograd layer (Liger's ``torch.autograd.Function``) as ``register_autograd`` hooks, so the op
    stays opaque to ``torch.compile``. Gradients reach image_feat, text_feat and temp only (the official code
    builds the targets under no_grad). Saved: the inputs, the row statistics and the forward's bf16 key
    copies (2 x N x d x 2 B = 59 MB at BLIP's N = 57,664; none when the keys are already 16-bit)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:8], *output[3:])  # the tensor inputs, stats, key copies
        ctx.exact_dots = inputs[8]

    @staticmethod
    def backward(ctx, grad_loss, _g_sim_i2t, _g_sim_t2i, _g_stats, _g_kq_i2t, _g_kq_t2i):
        d_img, d_txt, d_temp = _itc_bwd_op(grad_loss, *ctx.saved_tensors, ctx.exact_dots)
        return d_img, d_txt, None, None, d_temp, None, None, None, None


_itc_fwd_op.register_autograd(ITCLossFunction.backward, setup_context=ITCLossFunction.setup_context)


def itc_loss_triton(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                    text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: float | torch.Tensor,
                    idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None,
                    exact_dots: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ITC loss. Returns (loss, sim_i2t[:, :B], sim_t2i[:, :B]); the sims are detached fp32.

    The products take bf16 operands (fp16 for fp16 keys), fp32 accumulation, on the GPU and the interpreter
    alike. ``exact_dots=True`` (interpreter only, a GPU launch raises) keeps fp32 operands: the algorithm's
    check against the fp32 reference to summation order."""
    _check(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, idx, idx_all)
    _check_exact(exact_dots, image_feat.device)
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.full((), float(alpha), dtype=torch.float32, device=image_feat.device)
    loss, sim_i2t, sim_t2i, *_ = _itc_fwd_op(image_feat, text_feat, image_feat_m_all.detach(),
                                            text_feat_m_all.detach(), temp, alpha.detach(), idx, idx_all,
                                            exact_dots)
    return loss, sim_i2t.detach(), sim_t2i.detach()
