"""ITM hard-negative sampling (BLIP_SPEC §2 ITM, §4 retrieval) as one Gumbel-max kernel.

Per row r of a (B, C) similarity matrix: w = softmax(row) + eps, zero on positives (the diagonal, or every
column whose id equals the row's id), then one draw with probability proportional to w. Gumbel-max:
argmax_j (log w_j + G_j) with G_j = -log(-log U_j) is such a draw; U comes from Philox (``tl.rand``) keyed
by (seed, direction, row, column), so a draw is reproducible for a given seed and needs no host sync
(the official code calls ``multinomial(...).item()`` once per row: 2B host syncs per step).
Each program takes one row of one direction and streams its columns twice (max/sum, then sample); until
2026-11 a program took 64 rows, which spilled 4.4 KB of registers at C = 512 and left a grid of 2 programs.

A row with no valid negative (every column a positive, or B = 1 without ids) returns the column of its
largest similarity (argmax of the raw row): always in range, never NaN. The reference does the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastblip.kernels import next_pow2


@triton.jit
def _sample_kernel(
    sim_ptr,  # (2, B, C) similarities: [0] = sim_t2i (-> image per text), [1] = sim_i2t (-> text per image)
    idx_ptr, idx_all_ptr,  # (B,), (C,) ids; read only when HAS_IDX (else positives = diagonal)
    seed_ptr,  # (1,) int64 Philox seed
    out_ptr,  # (2, B) int64 sampled column per row
    B, C, eps,
    HAS_IDX: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # one row per program: a (BLOCK_C,) tile is 8 fp32 per thread at C = 1024
    pid_d = tl.program_id(1)
    base = sim_ptr + (pid_d * B + row).to(tl.int64) * C
    # pass 1: online max / sum of exp over the row (-1e30 start keeps exp() finite)
    m = tl.full((), -1e30, tl.float32)
    den = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(base + cols, mask=cols < C, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        den = den * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    den = tl.where(den > 0, den, 1.0)  # a row of -inf: every w = eps, no 0/0
    seed = tl.load(seed_ptr)
    if HAS_IDX:
        ridx = tl.load(idx_ptr + row)
    best = tl.full((), float("-inf"), tl.float32)
    arg = tl.zeros((), tl.int32)
    raw_best = tl.full((), float("-inf"), tl.float32)
    raw_arg = tl.zeros((), tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        x = tl.load(base + cols, mask=cmask, other=float("-inf")).to(tl.float32)
        w = tl.exp(x - m) / den + eps
        if HAS_IDX:
            pos = tl.load(idx_all_ptr + cols, mask=cmask, other=0) == ridx
        else:
            pos = cols == row
        valid = cmask & (~pos) & (w > 0)
        # Philox counter = flat (direction, row, column) index, as when BLOCK_R rows shared a program:
        # the uniforms for a given seed are unchanged
        u = tl.rand(seed, (pid_d * B + row) * C + cols)
        u = tl.minimum(tl.maximum(u, 1e-12), 1.0 - 1e-7)  # keep -log(-log u) finite
        score = tl.where(valid, tl.log(tl.maximum(w, 1e-30)) - tl.log(-tl.log(u)), float("-inf"))
        # strict > across tiles and tl.argmax's lowest index within one: the first column of the maximum
        t_best = tl.max(score, 0)
        t_arg = tl.argmax(score, 0).to(tl.int32) + c0
        take = t_best > best
        best = tl.where(take, t_best, best)
        arg = tl.where(take, t_arg, arg)
        xr = tl.where(cmask, x, float("-inf"))
        r_best = tl.max(xr, 0)
        r_arg = tl.argmax(xr, 0).to(tl.int32) + c0
        r_take = r_best > raw_best
        raw_best = tl.where(r_take, r_best, raw_best)
        raw_arg = tl.where(r_take, r_arg, raw_arg)
    res = tl.where(best > float("-inf"), arg, raw_arg)
    tl.store(out_ptr + pid_d * B + row, res.to(tl.int64))


def sample_forward(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor | None,
                   idx_all: torch.Tensor | None, eps: float, seed: torch.Tensor) -> torch.Tensor:
    """Launch: returns (2, B) int64, row 0 = negative image for each text, row 1 = negative text per image.
    Grid (B, 2): one program per row and direction (128 programs at B = 64, 256 at B = 128)."""
    B, C = sim_i2t.shape
    sims = torch.stack([sim_t2i, sim_i2t]).contiguous()  # (2, B, C): B x C is small (<= 128 x 2048)
    out = torch.empty(2, B, dtype=torch.int64, device=sim_i2t.device)
    # <= 1024 columns per tile: 8 fp32 per thread with 4 warps (C = 1024: 4 warps; C = 512: 2; C <= 256: 1)
    block_c = min(1024, max(16, next_pow2(C)))
    num_warps = min(4, max(1, block_c // 256))
    has_idx = idx is not None
    idx_c = idx.reshape(-1).contiguous() if has_idx else out
    idx_all_c = idx_all.reshape(-1).contiguous() if has_idx else out
    _sample_kernel[(B, 2)](
        sims, idx_c, idx_all_c, seed.reshape(-1).contiguous(), out, B, C, float(eps),
        HAS_IDX=has_idx, BLOCK_C=block_c, num_warps=num_warps)
    return out


@torch.library.custom_op("fastblip::sample_hard_negatives", mutates_args=())
def _sample_op(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor | None,
               idx_all: torch.Tensor | None, eps: float, seed: torch.Tensor) -> torch.Tensor:
    return sample_forward(sim_i2t, sim_t2i, idx, idx_all, eps, seed)


@_sample_op.register_fake
def _(sim_i2t, sim_t2i, idx, idx_all, eps, seed):
    return sim_i2t.new_empty((2, sim_i2t.shape[0]), dtype=torch.int64)


def _check(sim_i2t, sim_t2i, idx, idx_all) -> None:
    if sim_i2t.dim() != 2 or sim_i2t.shape != sim_t2i.shape:
        raise ValueError(f"sample_hard_negatives: sim_i2t {tuple(sim_i2t.shape)} and sim_t2i "
                         f"{tuple(sim_t2i.shape)} must both be (B, C)")
    B, C = sim_i2t.shape
    if (idx is None) != (idx_all is None):
        raise ValueError("sample_hard_negatives: pass both idx and idx_all, or neither")
    if idx is None and B != C:
        raise ValueError(f"sample_hard_negatives: without ids the positives are the diagonal, so C must "
                         f"equal B; got B={B}, C={C}")
    if idx is not None and (idx.numel() != B or idx_all.numel() != C):
        raise ValueError(f"sample_hard_negatives: idx must have B={B} and idx_all C={C} entries, got "
                         f"{idx.numel()} and {idx_all.numel()}")


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1,) int64 Philox seed on ``device``, drawn from ``generator`` (or the default generator) with no
    host sync: ``torch.randint`` on the device. A CPU generator with CUDA tensors draws on the CPU and copies
    the 8 bytes over (an async H2D copy, not a sync)."""
    gen_dev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**31 - 1, (1,), device=gen_dev, generator=generator, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def sample_hard_negatives_triton(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor | None = None,
                                 idx_all: torch.Tensor | None = None, eps: float = 1e-4,
                                 generator: torch.Generator | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(sim_i2t, sim_t2i, idx, idx_all)
    seed = draw_seed(sim_i2t.device, generator)
    out = _sample_op(sim_i2t.detach(), sim_t2i.detach(), idx, idx_all, float(eps), seed)
    return out[0], out[1]
