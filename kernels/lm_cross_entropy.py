"""Fused LM head projection + label-smoothed cross-entropy (BLIP_SPEC §2 LM; §4 VQA answer ranking).

Legend: N tokens (B x L), d hidden width (768), V vocabulary (30,524).
The (N, V) logits are never kept: rows are processed in chunks of ``chunk`` rows (logits chunk of about
_LOGITS_CHUNK_BYTES in fp32) -> a Triton kernel turns each chunk's logits into the per-row loss and,
in place, into d loss / d logits -> the chunk's contribution to d hidden, d weight, d bias is taken with
two matmuls right away (Liger-Kernel's fused linear cross-entropy scheme). At N = 128 x 35 = 4,480 tokens,
fp32 logits + their gradient are 2 x 547 MB; the chunked path keeps ~32 MB of logits.

Loss per row with smoothing e (PyTorch semantics): lse - (1 - e) x_y - e/V sum_j x_j; d/dx_j =
softmax_j - e/V - (1 - e)[j = y]. Ignored rows (label == ignore_index) contribute 0 loss and 0 gradient.
"mean" and "sum" compute the gradients in the forward (scaled later by the incoming scalar gradient);
"none" needs the per-row upstream gradient, so its backward recomputes the chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastblip.kernels import next_pow2

_LOGITS_CHUNK_BYTES = 1 << 25  # 32 MB of fp32 logits per chunk: 256 rows at V = 30,524


@triton.jit
def _ce_kernel(
    logits_ptr,  # (R, V) fp32, contiguous; overwritten with d loss / d logits when COMPUTE_GRAD
    labels_ptr,  # (R,) int64
    scale_ptr,  # (R,) fp32 per-row gradient scale (read only when COMPUTE_GRAD)
    loss_ptr,  # (R,) fp32 out
    V, eps, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * V
    y = tl.load(labels_ptr + row)
    ignored = y == ignore_index
    # lane-wise online softmax (-1e30 start keeps exp finite in lanes that never see a column)
    m = tl.full([BLOCK_V], -1e30, tl.float32)
    den = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        den = den * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        sx += tl.where(cols < V, x, 0.0)
    M = tl.max(m, 0)
    lse = M + tl.log(tl.sum(den * tl.exp(m - M), 0))
    y_safe = tl.where(ignored, 0, y)
    x_y = tl.load(ptr + y_safe).to(tl.float32)
    loss = lse - (1.0 - eps) * x_y - eps * tl.sum(sx, 0) / V
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    if COMPUTE_GRAD:
        g = tl.where(ignored, 0.0, tl.load(scale_ptr + row))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) - eps / V - tl.where(cols == y, 1.0 - eps, 0.0)
            tl.store(ptr + cols, d * g, mask=cols < V)


def _chunk_rows(N: int, V: int) -> int:
    rows = max(16, _LOGITS_CHUNK_BYTES // (4 * V))
    return min(N, 1 << (rows.bit_length() - 1))


def lm_ce_chunks(hidden, weight, bias, labels, label_smoothing: float, ignore_index: int,
                 row_scale: torch.Tensor | None, compute_grad: bool):
    """Loop over row chunks. Returns per-row losses (N,) fp32 and, when compute_grad, the gradients of
    sum_r row_scale[r] * loss[r] with respect to hidden, weight, bias (in their dtypes)."""
    N, d = hidden.shape
    V = weight.shape[0]
    cdt = hidden.dtype
    w = weight.to(cdt)
    b = bias.float()
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)
    gh = gw = gb = None
    if compute_grad:
        gh = torch.empty_like(hidden)
        gw = torch.zeros(V, d, device=hidden.device, dtype=torch.float32)
        gb = torch.zeros(V, device=hidden.device, dtype=torch.float32)
    chunk = _chunk_rows(N, V)
    block_v = min(4096, max(16, next_pow2(V)))
    for r0 in range(0, N, chunk):
        h = hidden[r0:r0 + chunk]
        logits = torch.mm(h, w.T).float() + b  # (rows, V) fp32
        rows = logits.shape[0]
        scale = row_scale[r0:r0 + rows].float().contiguous() if compute_grad else losses
        _ce_kernel[(rows,)](logits, labels[r0:r0 + rows], scale, losses[r0:r0 + rows], V,
                            float(label_smoothing), int(ignore_index), COMPUTE_GRAD=compute_grad,
                            BLOCK_V=block_v)
        if compute_grad:
            dl = logits.to(cdt)  # now d loss / d logits
            gh[r0:r0 + rows] = torch.mm(dl, w)
            if cdt == torch.float32:
                gw.addmm_(dl.T, h)
            else:
                gw.add_(torch.mm(dl.T, h))  # bf16 tensor-core matmul, fp32 accumulation across chunks
            gb.add_(logits.sum(0))
    if compute_grad:
        return losses, gh, gw.to(weight.dtype), gb.to(bias.dtype)
    return losses, None, None, None


_REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("fastblip::lm_cross_entropy_fwd", mutates_args=())
def _lm_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float, ignore_index: int, reduction: str, compute_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = (labels != ignore_index).float()
    grads_now = compute_grad and reduction != "none"
    if grads_now:  # d(mean)/d loss_r = 1 / n_valid (clamped so all-ignored gives 0 grads, not NaN)
        row_scale = valid / valid.sum().clamp_min(1.0) if reduction == "mean" else valid
    else:
        row_scale = None
    losses, gh, gw, gb = lm_ce_chunks(hidden, weight, bias, labels, label_smoothing, ignore_index, row_scale,
                                      grads_now)
    if reduction == "mean":
        loss = losses.sum() / valid.sum()  # all tokens ignored -> NaN, as torch's cross_entropy
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    if not grads_now:
        e = hidden.new_empty(0)
        return loss, e, e.clone(), e.clone()
    return loss, gh, gw, gb


@_lm_ce_fwd_op.register_fake
def _(hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, compute_grad):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    if compute_grad and reduction != "none":
        return loss, torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)
    return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)


@torch.library.custom_op("fastblip::lm_cross_entropy_bwd", mutates_args=())
def _lm_ce_bwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  grad_rows: torch.Tensor, label_smoothing: float, ignore_index: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, gh, gw, gb = lm_ce_chunks(hidden, weight, bias, labels, label_smoothing, ignore_index, grad_rows, True)
    return gh, gw, gb


@_lm_ce_bwd_op.register_fake
def _(hidden, weight, bias, labels, grad_rows, label_smoothing, ignore_index):
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


class LMCrossEntropyFunction:
    """Autograd layer as ``register_autograd`` hooks: grads to hidden, weight, bias."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, compute_grad = inputs
        ctx.reduction, ctx.smoothing, ctx.ignore_index = reduction, label_smoothing, ignore_index
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            ctx.save_for_backward(*output[1:])

    @staticmethod
    def backward(ctx, grad_loss, _g1, _g2, _g3):
        if ctx.reduction == "none":
            hidden, weight, bias, labels = ctx.saved_tensors
            gh, gw, gb = _lm_ce_bwd_op(hidden, weight, bias, labels, grad_loss, ctx.smoothing,
                                       ctx.ignore_index)
        else:
            gh, gw, gb = ctx.saved_tensors
            gh, gw, gb = gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype), gb * grad_loss.to(gb.dtype)
        return gh, gw, gb, None, None, None, None, None


_lm_ce_fwd_op.register_autograd(LMCrossEntropyFunction.backward, setup_context=LMCrossEntropyFunction.setup_context)


def lm_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = -100,
                            reduction: str = "mean") -> torch.Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"lm_cross_entropy: reduction {reduction!r} not in {_REDUCTIONS}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"lm_cross_entropy: hidden (N, d) and weight (V, d) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    if bias.shape != (weight.shape[0],) or labels.shape != (hidden.shape[0],):
        raise ValueError(f"lm_cross_entropy: bias must be ({weight.shape[0]},) and labels ({hidden.shape[0]},), "
                         f"got {tuple(bias.shape)} and {tuple(labels.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"lm_cross_entropy: label_smoothing {label_smoothing} outside [0, 1]")
    compute_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                                or bias.requires_grad)
    return _lm_ce_fwd_op(hidden.contiguous(), weight.contiguous(), bias, labels.to(torch.int64).contiguous(),
                         float(label_smoothing), int(ignore_index), reduction, compute_grad)[0]
