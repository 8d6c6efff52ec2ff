"""Fused LM head projection + label-smoothed cross-entropy (BLIP_SPEC §2 LM; §4 VQA answer ranking).

Legend: N tokens (B x L), d hidden width (768), V vocabulary (30,524); cdt = the compute dtype: the autocast
dtype when autocast is on (BLIP's hidden comes fp32 out of the head's LayerNorm and is cast, as F.linear's
autocast rule does), else hidden's. Logits and their gradient live in cdt, as the reference's logits do.

With gradients ("mean", "sum"):
  forward   one GEMM writes logits + bias into one (N, V) cdt buffer (addmm, bias in the epilogue); the Triton
            kernel, one program per row, writes the row's loss and rewrites the row in place as
            D = s_r * d loss_r / d logits (s_r = 1/n_valid for "mean", 1 for "sum", 0 for ignored rows).
            D and the weight's cdt copy are saved; no (N, V) fp32 tensor ever exists.
  backward  with the upstream scalar g: d hidden = g * (D @ W) and [d W | d b] = g * (D^T @ [h | 1 | 0]),
            an (N, d + 8) right operand: the bias gradient is one more output column of the weight-gradient
            GEMM instead of a 137 MB column sum of D. g scales the outputs in fp32, so for g = 1 (or a
            GradScaler's power of two) the numbers are torch's; otherwise bf16 outputs get a second rounding.
  "none"    the per-row upstream gradient is known only in backward: the forward computes losses alone
            (chunked, as without gradients) and the backward recomputes D with s_r = g_r (one more GEMM
            + kernel pass, and the same single rounding of D as torch).
Each GEMM writes its result once. The design before (Liger-style row chunks) re-read and rewrote an fp32
(V, d) d-weight accumulator per 256-row chunk: 9 x 2 x 94 MB = 1.7 GB, a 1.9 ms floor.

Floor at pretraining, N = 64 x 35 = 2,240, V = 30,524, d = 768, bf16 hidden, fp32 weight, forward + backward,
on an H100 (3.35 TB/s, 989 TFLOP/s bf16):
  FLOPs  2NVd x 3 GEMMs = 315 GFLOP (+0.3% for the 8 extra columns) = 316 GFLOP      -> 0.320 ms
  bytes  ``floor_bytes``: 1.13 GB = D's five passes (GEMM write, kernel read + rewrite, two
         GEMM reads: 5 x 137 MB) + the weight (fp32 read, bf16 write, 2 bf16 reads: 0.23 GB)
         + d W (bf16 GEMM write, read, fp32 write: 0.19 GB) + hidden-sized terms       -> 0.338 ms
  i.e. ~0.34 ms, memory- and compute-bound alike (torch.compile of the reference: 1.18 ms measured).
  Memory: D (137 MB) + bf16 weight (47 MB) held from forward to backward; backward adds the (V, d + 8) bf16
  GEMM output (47 MB) and d W in fp32 (94 MB): ~0.33 GB at the peak, vs 0.78 GB measured for the eager
  reference ((N, V) fp32 logits, log-softmax and gradient: 273 MB each).
Without gradients (eval) rows go through in chunks of ~_LOGITS_CHUNK_BYTES of logits, reusing one buffer.

Loss per row with smoothing e (PyTorch semantics): lse - (1 - e) x_y - e/V sum_j x_j; d/dx_j =
softmax_j - e/V - (1 - e)[j = y]. Ignored rows (label == ignore_index) have loss 0 and gradient exactly 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastblip.kernels import INTERPRET, next_pow2

_LOGITS_CHUNK_BYTES = 1 << 25  # no-grad path: 32 MB of logits per chunk (549 bf16 rows at V = 30,524)
_PAD = 8  # right operand of the d-weight GEMM is d + 8 wide: 1 column for d bias, 7 keep rows 16 B aligned


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest bf16 (ties to even), kept in fp32: Triton's interpreter truncates fp32 -> bf16 casts
    (530 of 1,024 randn values differ from torch's rounding; PLATFORM_NOTES), the GPU's cvt.rn rounds. Applied
    only when interpreting, so the CPU tests see the GPU's numbers."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _ce_kernel(
    logits_ptr,  # (R, V) contiguous, fp32 or bf16; becomes scale * d loss / d logits when COMPUTE_GRAD
    labels_ptr,  # (R,) int64
    scale_ptr,  # (R,) fp32 per-row gradient scale (read only when COMPUTE_GRAD)
    loss_ptr,  # (R,) fp32 out
    V, eps, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter + bf16 buffer: round to nearest before the (truncating) store
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
        g = tl.load(scale_ptr + row)
        # second read of the row: 61 KB in bf16, still in L2 (rows in flight x 61 KB << 50 MB)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) - eps / V - tl.where(cols == y, 1.0 - eps, 0.0)
            d = tl.where(ignored, 0.0, d * g)
            if ROUND_BF16:
                d = _round_bf16(d)
            tl.store(ptr + cols, d, mask=cols < V)  # cast to the buffer's dtype


def floor_bytes(N: int, V: int, d: int, cdt_bytes: int = 2, weight_bytes: int = 4) -> int:
    """HBM bytes of one forward + backward with gradients, each tensor moved once per op that touches it
    (the kernel's second read of a row is an L2 hit): the docstring's 1.13 GB at the pretraining shape."""
    c, w, dp = cdt_bytes, weight_bytes, d + _PAD
    cast_w = (w + c) * V * d if w != c else 0
    logits = c * (N * d + V * d + V + N * V)
    kernel = 2 * c * N * V + 16 * N
    h_aug = c * (N * d + N * dp)
    dh = c * (N * V + V * d + 3 * N * d)
    dwb = c * (N * V + N * dp + V * dp)
    cast_dw = c * V * dp + w * (V * d + V)
    return cast_w + logits + kernel + h_aug + dh + dwb + cast_dw


def _chunk_rows(N: int, V: int, elt: int) -> int:
    return max(1, min(N, max(16, _LOGITS_CHUNK_BYTES // (elt * V))))


def lm_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float, ignore_index: int, row_scale: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launcher. Returns per-row losses (N,) fp32, D = row_scale * d loss / d logits (N, V) in hidden's dtype
    (None when ``row_scale`` is None: no gradient wanted), and the weight in hidden's dtype."""
    N, _ = hidden.shape
    V = weight.shape[0]
    cdt = hidden.dtype
    w_c = weight.to(cdt)
    b_c = bias.to(cdt)
    losses = torch.empty(N, device=hidden.device, dtype=torch.float32)
    # 8 columns per thread (one 16 B bf16 load): 2048 x 8 warps at V = 30,524, 40 registers on sm_90
    # (4096 x 8 warps spilled 8 B there; 4096 x 4 warps took 168 registers)
    block_v = min(2048, max(16, next_pow2(V)))
    meta = dict(BLOCK_V=block_v, num_warps=max(1, block_v // 256),
                ROUND_BF16=INTERPRET and cdt == torch.bfloat16)
    eps, ign = float(label_smoothing), int(ignore_index)
    if row_scale is not None:
        D = torch.addmm(b_c, hidden, w_c.T)  # (N, V) logits, rewritten in place into D by the kernel
        _ce_kernel[(N,)](D, labels, row_scale, losses, V, eps, ign, COMPUTE_GRAD=True, **meta)
        return losses, D, w_c
    chunk = _chunk_rows(N, V, hidden.element_size())
    buf = torch.empty(chunk, V, device=hidden.device, dtype=cdt)
    for r0 in range(0, N, chunk):
        rows = min(chunk, N - r0)
        logits = torch.addmm(b_c, hidden[r0:r0 + rows], w_c.T, out=buf[:rows])
        _ce_kernel[(rows,)](logits, labels[r0:r0 + rows], losses, losses[r0:r0 + rows], V, eps, ign,
                            COMPUTE_GRAD=False, **meta)
    return losses, None, w_c


def lm_ce_backward(hidden: torch.Tensor, w_c: torch.Tensor, D: torch.Tensor, grad_loss: torch.Tensor | None,
                   weight_dtype: torch.dtype, bias_dtype: torch.dtype, need_hidden: bool = True,
                   need_weight: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                      torch.Tensor | None]:
    """d hidden, d weight, d bias from D and a scalar upstream gradient g (None: D already holds it): two
    GEMMs. g multiplies their outputs in fp32 (a (1,)-shaped fp32 factor promotes the product to fp32, so
    the d-weight multiply is the bf16 -> fp32 cast it replaces); for g != 1 an output kept in cdt (d hidden;
    d W, d b for bf16 parameters) is rounded twice."""
    N, d = hidden.shape
    g = None if grad_loss is None else grad_loss.float().reshape(1)
    gh = gw = gb = None
    if need_hidden:
        gh = torch.mm(D, w_c)
        gh = gh if g is None else (gh * g).to(hidden.dtype)
    if need_weight:
        ones = torch.ones(N, 1, device=hidden.device, dtype=D.dtype)
        rhs = torch.cat([hidden.to(D.dtype), ones, ones.new_zeros(N, _PAD - 1)], 1)  # (N, d + 8): [h | 1 | 0]
        gwb = torch.mm(D.T, rhs)  # (V, d + 8): [d W | d b | 0] / g
        gw, gb = gwb[:, :d], gwb[:, d]
        if g is not None:
            gw, gb = gw * g, gb * g
        gw = gw.to(weight_dtype).contiguous()  # a column slice: copied once, by the multiply or the cast
        gb = gb.to(bias_dtype)
    return gh, gw, gb


_REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("fastblip::lm_cross_entropy_fwd", mutates_args=())
def _lm_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                  label_smoothing: float, ignore_index: int, reduction: str, compute_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, D, weight in hidden's dtype). D is empty without compute_grad and for "none" (its
    backward recomputes D scaled by the per-row upstream gradient); the weight copy is empty without
    compute_grad or when the weight already has hidden's dtype (an output may not alias an input)."""
    valid = (labels != ignore_index).float()
    row_scale = None
    if compute_grad and reduction != "none":  # d(mean)/d loss_r = 1/n_valid (clamped: all ignored -> 0 grads)
        row_scale = valid / valid.sum().clamp_min(1.0) if reduction == "mean" else valid
    losses, D, w_c = lm_ce_forward(hidden, weight, bias, labels, label_smoothing, ignore_index, row_scale)
    if reduction == "mean":
        loss = losses.sum() / valid.sum()  # all tokens ignored -> NaN, as torch's cross_entropy
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses
    empty = hidden.new_empty(0)
    return (loss, D if D is not None else empty,
            w_c if compute_grad and weight.dtype != hidden.dtype else empty.clone())


@_lm_ce_fwd_op.register_fake
def _(hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, compute_grad):
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    keep_d = compute_grad and reduction != "none"
    D = hidden.new_empty((hidden.shape[0], weight.shape[0]) if keep_d else (0,))
    keep_w = compute_grad and weight.dtype != hidden.dtype
    return loss, D, weight.new_empty(weight.shape if keep_w else (0,), dtype=hidden.dtype)


@torch.library.custom_op("fastblip::lm_cross_entropy_dlogits", mutates_args=())
def _lm_ce_dlogits_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
                      row_scale: torch.Tensor, label_smoothing: float, ignore_index: int) -> torch.Tensor:
    """D = row_scale * d loss / d logits, (N, V) in hidden's dtype: the "none" backward's recompute (an op of
    its own so that torch.compile traces the backward around the kernel launch)."""
    return lm_ce_forward(hidden, weight, bias, labels, label_smoothing, ignore_index, row_scale)[1]


@_lm_ce_dlogits_op.register_fake
def _(hidden, weight, bias, labels, row_scale, label_smoothing, ignore_index):
    return hidden.new_empty((hidden.shape[0], weight.shape[0]))


class LMCrossEntropyFunction:
    """Autograd layer as ``register_autograd`` hooks: grads to hidden, weight, bias."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, label_smoothing, ignore_index, reduction, compute_grad = inputs
        if not compute_grad:  # lm_cross_entropy_triton asks for gradients whenever an input requires them
            raise RuntimeError("lm_cross_entropy_fwd: compute_grad=False on inputs that require grad")
        _, D, w_c = output
        ctx.set_materialize_grads(False)  # else autograd hands backward a zero (N, V) gradient for D
        ctx.args = (label_smoothing, ignore_index, reduction, weight.dtype, bias.dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, D, w_c)

    @staticmethod
    def backward(ctx, grad_loss, _g_d, _g_w):
        hidden, weight, bias, labels, D, w_c = ctx.saved_tensors
        smoothing, ignore_index, reduction, w_dtype, b_dtype = ctx.args
        w = w_c if w_c.numel() else weight
        need = ctx.needs_input_grad
        if reduction == "none":  # recompute D with each row's own upstream gradient: one rounding, as torch
            row_scale = grad_loss.float() * (labels != ignore_index)
            D = _lm_ce_dlogits_op(hidden, w, bias, labels, row_scale, smoothing, ignore_index)
            grad_loss = None
        gh, gw, gb = lm_ce_backward(hidden, w, D, grad_loss, w_dtype, b_dtype, need_hidden=need[0],
                                    need_weight=need[1] or need[2])
        return gh, gw, gb, None, None, None, None, None


_lm_ce_fwd_op.register_autograd(LMCrossEntropyFunction.backward,
                                setup_context=LMCrossEntropyFunction.setup_context)


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
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):  # F.linear's autocast rule: the projection runs in the autocast dtype
        hidden = hidden.to(torch.get_autocast_dtype(dev))  # (BLIP's LM head LayerNorm gives fp32 here)
    return _lm_ce_fwd_op(hidden.contiguous(), weight.contiguous(), bias, labels.to(torch.int64).contiguous(),
                         float(label_smoothing), int(ignore_index), reduction, compute_grad)[0]
