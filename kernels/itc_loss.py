"""Fused image-text contrastive (ITC) loss with momentum-distilled soft targets (BLIP_SPEC §2, §4).

Legend: B batch rows, N = B + Q columns (momentum batch first, then the queue), d feature width (256).
Per direction (i2t: student ``image_feat``, teacher ``image_feat_m_all[:B]``, keys ``text_feat_m_all``;
t2i swaps the modalities), with student s = q k^T / temp and teacher t = q_m k^T / temp:

    target_j = alpha * softmax(t)_j + (1 - alpha) * pos_j / cnt,   loss_row = -sum_j target_j log_softmax(s)_j
             = lse(s) * (alpha + (1 - alpha) [cnt > 0]) - alpha * sum_j softmax(t)_j s_j - (1 - alpha) * P / cnt

so one pass over the N columns with an online softmax for s and t together gives the loss from six running
row statistics (max/sum for s, max/sum/softmax-weighted sum for t, positive sum and count). The N columns
are split across programs (split-K style) so B=128 rows still fill an H100; the per-split statistics
(7 x B x splits floats) are merged in PyTorch. Backward recomputes s and t tile by tile from the saved
row log-sum-exps: nothing of size B x N is ever stored. Memory traffic: each direction streams N x d key
features once forward and once backward (57,600 x 256 x 4 B = 59 MB in fp32), i.e. bandwidth-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastblip.kernels import check_dtype, dot_fp32, dot_precision, next_pow2


@triton.jit
def _itc_fwd_kernel(
    qs_ptr,  # (B, D) student queries of this direction
    qt_ptr,  # (B, D) teacher queries (first B rows of the momentum features of the same modality)
    k_ptr,  # (N, D) momentum features of the other modality, batch first then queue
    temp_ptr,  # 0-dim temperature
    idx_ptr, idx_all_ptr,  # (B,), (N,) image ids (only read when HAS_IDX)
    sim_ptr,  # (B, B) fp32 out: student logits of the first B columns
    part_ptr,  # (7, B, S) fp32 out: per-split statistics
    B, N, D, cols_per_split, S,
    HAS_IDX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dcol = tl.arange(0, BLOCK_D)
    qmask = rmask[:, None] & (dcol[None, :] < D)
    qs = tl.load(qs_ptr + rows[:, None] * D + dcol[None, :], mask=qmask, other=0.0)
    qt = tl.load(qt_ptr + rows[:, None] * D + dcol[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        qs = qs.to(tl.float32)
        qt = qt.to(tl.float32)
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
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k = tl.load(k_ptr + cols[:, None] * D + dcol[None, :], mask=cmask[:, None] & (dcol[None, :] < D),
                    other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(qs, tl.trans(k), input_precision=PREC) * inv_t
        t = tl.dot(qt, tl.trans(k), input_precision=PREC) * inv_t
        if n0 < B:
            tl.store(sim_ptr + rows[:, None] * B + cols[None, :], s, mask=rmask[:, None] & (cols[None, :] < B))
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
    qs_ptr, qt_ptr, k_ptr, temp_ptr, alpha_ptr, idx_ptr, idx_all_ptr,
    stat_ptr,  # (3, B) fp32: lse of student, lse of teacher, positive count
    g_ptr,  # 0-dim fp32: d loss / d row loss (grad_out * 0.5 / B)
    dq_ptr,  # (S, B, D) fp32 out: per-split partial d qs
    dt_ptr,  # (B, S) fp32 out: per-split partial d temp
    B, N, D, cols_per_split, S,
    HAS_IDX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    dcol = tl.arange(0, BLOCK_D)
    qmask = rmask[:, None] & (dcol[None, :] < D)
    qs = tl.load(qs_ptr + rows[:, None] * D + dcol[None, :], mask=qmask, other=0.0)
    qt = tl.load(qt_ptr + rows[:, None] * D + dcol[None, :], mask=qmask, other=0.0)
    if DOT_F32:
        qs = qs.to(tl.float32)
        qt = qt.to(tl.float32)
    inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    g = tl.load(g_ptr).to(tl.float32)
    lse_s = tl.load(stat_ptr + rows, mask=rmask, other=0.0)
    lse_t = tl.load(stat_ptr + B + rows, mask=rmask, other=0.0)
    cnt = tl.load(stat_ptr + 2 * B + rows, mask=rmask, other=0.0)
    has_pos = cnt > 0
    tsum = alpha + (1.0 - alpha) * has_pos.to(tl.float32)
    posw = tl.where(has_pos, (1.0 - alpha) / tl.maximum(cnt, 1.0), 0.0)
    if HAS_IDX:
        ridx = tl.load(idx_ptr + rows, mask=rmask, other=-1)
    dq = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_B], tl.float32)
    start = pid_s * cols_per_split
    end = tl.minimum(start + cols_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < end
        k = tl.load(k_ptr + cols[:, None] * D + dcol[None, :], mask=cmask[:, None] & (dcol[None, :] < D),
                    other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(qs, tl.trans(k), input_precision=PREC) * inv_t
        t = tl.dot(qt, tl.trans(k), input_precision=PREC) * inv_t
        if HAS_IDX:
            cidx = tl.load(idx_all_ptr + cols, mask=cmask, other=-1)
            pos = (ridx[:, None] == cidx[None, :]) & cmask[None, :]
        else:
            pos = (rows[:, None] == cols[None, :]) & cmask[None, :]
        # d row_loss / d s_j = softmax(s)_j * sum(target) - target_j
        ds = tl.exp(s - lse_s[:, None]) * tsum[:, None] - alpha * tl.exp(t - lse_t[:, None])
        ds = ds - tl.where(pos, posw[:, None], 0.0)
        ds = tl.where(cmask[None, :] & rmask[:, None], ds * g, 0.0)
        dt += tl.sum(ds * s, 1)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * inv_t
    tl.store(dq_ptr + (pid_s * B + rows[:, None]) * D + dcol[None, :], dq, mask=qmask)
    # s = raw / temp, so d s / d temp = -s / temp
    tl.store(dt_ptr + rows * S + pid_s, -dt * inv_t, mask=rmask)


# ----------------------------------------------------------------------------------------------- launchers
def _blocks(B: int, N: int, D: int, device: torch.device) -> tuple[int, int, int, int, int]:
    block_b = min(32, max(16, next_pow2(B)))
    block_n = 64 if device.type == "cuda" else 32
    block_d = max(16, next_pow2(D))
    n_tiles = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(B, block_b)
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 3  # the interpreter runs programs one by one; 3 splits still exercise the merge
    splits = max(1, min(n_tiles, triton.cdiv(target, row_blocks)))
    cols_per_split = triton.cdiv(n_tiles, splits) * block_n
    splits = triton.cdiv(N, cols_per_split)
    return block_b, block_n, block_d, cols_per_split, splits


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
    if d > 512:
        raise ValueError(f"itc_loss: feature width {d} > 512 is not supported by the kernel")
    for name, t in (("image_feat", image_feat), ("text_feat", text_feat)):
        check_dtype(name, t)


def _directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all):
    B = image_feat.shape[0]
    c = torch.Tensor.contiguous
    return ((c(image_feat), c(image_feat_m_all[:B]), c(text_feat_m_all)),
            (c(text_feat), c(text_feat_m_all[:B]), c(image_feat_m_all)))


def itc_forward(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all):
    """Launch the forward. Returns loss (), sim_i2t (B,B), sim_t2i (B,B), stats (2, 3, B) fp32."""
    B, D = image_feat.shape
    N = image_feat_m_all.shape[0]
    dev = image_feat.device
    bb, bn, bd, cps, S = _blocks(B, N, D, dev)
    has_idx = idx is not None
    idx_c = idx.reshape(-1).contiguous() if has_idx else image_feat
    idx_all_c = idx_all.reshape(-1).contiguous() if has_idx else image_feat
    temp_c = temp.reshape(()).float().contiguous()
    alpha = alpha.float()
    sims, stats, row_losses = [], [], []
    for qs, qt, k in _directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all):
        sim = torch.empty(B, B, device=dev, dtype=torch.float32)
        part = torch.empty(7, B, S, device=dev, dtype=torch.float32)
        _itc_fwd_kernel[(triton.cdiv(B, bb), S)](
            qs, qt, k, temp_c, idx_c, idx_all_c, sim, part, B, N, D, cps, S,
            HAS_IDX=has_idx, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, DOT_F32=dot_fp32(qs.dtype),
            PREC=dot_precision(qs.dtype), num_warps=8)
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
    loss = 0.5 * (row_losses[0].mean() + row_losses[1].mean())
    return loss, sims[0], sims[1], torch.stack(stats)


def itc_backward(grad_loss, image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx,
                 idx_all, stats):
    """Launch the backward. Returns d image_feat, d text_feat, d temp."""
    B, D = image_feat.shape
    N = image_feat_m_all.shape[0]
    dev = image_feat.device
    bb, bn, bd, cps, S = _blocks(B, N, D, dev)
    has_idx = idx is not None
    idx_c = idx.reshape(-1).contiguous() if has_idx else image_feat
    idx_all_c = idx_all.reshape(-1).contiguous() if has_idx else image_feat
    temp_c = temp.reshape(()).float().contiguous()
    alpha_c = alpha.reshape(()).float().contiguous()
    g = (grad_loss.float() * (0.5 / B)).reshape(()).contiguous()
    grads, dtemp = [], torch.zeros((), device=dev, dtype=torch.float32)
    for d_i, (qs, qt, k) in enumerate(_directions(image_feat, text_feat, image_feat_m_all, text_feat_m_all)):
        dq = torch.empty(S, B, D, device=dev, dtype=torch.float32)
        dt = torch.empty(B, S, device=dev, dtype=torch.float32)
        _itc_bwd_kernel[(triton.cdiv(B, bb), S)](
            qs, qt, k, temp_c, alpha_c, idx_c, idx_all_c, stats[d_i].contiguous(), g, dq, dt, B, N, D, cps, S,
            HAS_IDX=has_idx, BLOCK_B=bb, BLOCK_N=bn, BLOCK_D=bd, DOT_F32=dot_fp32(qs.dtype),
            PREC=dot_precision(qs.dtype), num_warps=8)
        grads.append(dq.sum(0).to(qs.dtype))
        dtemp = dtemp + dt.sum()
    return grads[0], grads[1], dtemp.to(temp.dtype).reshape(temp.shape)


# ------------------------------------------------------------------------------------- custom op + autograd
@torch.library.custom_op("fastblip::itc_loss_fwd", mutates_args=())
def _itc_fwd_op(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: torch.Tensor,
                idx: torch.Tensor | None, idx_all: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return itc_forward(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all)


@_itc_fwd_op.register_fake
def _(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all):
    B = image_feat.shape[0]
    f = dict(dtype=torch.float32, device=image_feat.device)
    return (image_feat.new_empty((), **f), image_feat.new_empty((B, B), **f),
            image_feat.new_empty((B, B), **f), image_feat.new_empty((2, 3, B), **f))


@torch.library.custom_op("fastblip::itc_loss_bwd", mutates_args=())
def _itc_bwd_op(grad_loss: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                image_feat_m_all: torch.Tensor, text_feat_m_all: torch.Tensor, temp: torch.Tensor,
                alpha: torch.Tensor, idx: torch.Tensor | None, idx_all: torch.Tensor | None,
                stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return itc_backward(grad_loss, image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha,
                        idx, idx_all, stats)


@_itc_bwd_op.register_fake
def _(grad_loss, image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all, stats):
    return torch.empty_like(image_feat), torch.empty_like(text_feat), torch.empty_like(temp)


class ITCLossFunction:
    """The autograd layer (Liger's ``torch.autograd.Function``), written as ``register_autograd`` hooks so
    the op stays opaque to ``torch.compile``. Gradients reach image_feat, text_feat and temp; the returned
    sims, the momentum features and the targets get none (the official code builds targets under no_grad)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all = inputs
        ctx.save_for_backward(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx,
                              idx_all, output[3])

    @staticmethod
    def backward(ctx, grad_loss, _g_sim_i2t, _g_sim_t2i, _g_stats):
        image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx, idx_all, stats = \
            ctx.saved_tensors
        d_img, d_txt, d_temp = _itc_bwd_op(grad_loss, image_feat, text_feat, image_feat_m_all,
                                           text_feat_m_all, temp, alpha, idx, idx_all, stats)
        return d_img, d_txt, None, None, d_temp, None, None, None


_itc_fwd_op.register_autograd(ITCLossFunction.backward, setup_context=ITCLossFunction.setup_context)


def itc_loss_triton(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                    text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: float | torch.Tensor,
                    idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ITC loss. Returns (loss, sim_i2t[:, :B], sim_t2i[:, :B]); the sims are detached fp32."""
    _check(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, idx, idx_all)
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.full((), float(alpha), dtype=torch.float32, device=image_feat.device)
    loss, sim_i2t, sim_t2i, _ = _itc_fwd_op(image_feat, text_feat, image_feat_m_all.detach(),
                                            text_feat_m_all.detach(), temp, alpha.detach(), idx, idx_all)
    return loss, sim_i2t.detach(), sim_t2i.detach()
