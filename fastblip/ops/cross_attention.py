"""Indexed cross-attention over per-image K/V shared by several text rows (DESIGN §4.3), with BERT's
attention-probability dropout.

Legend: N text rows, M images, H heads, Lq text tokens, Lk image tokens, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastblip.ops._backend import resolve_backend


def cross_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                              key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                              dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gather each row's image K/V, then the official explicit softmax(QK^T / sqrt(D) + mask) V, with the
    BERT extended-mask convention (masked keys get -10000 added: models/med.py get_extended_attention_mask)
    and BERT's ``dropout(attention_probs)``: F.dropout from torch's RNG, or, when ``dropout_mask`` (N, H, Lq,
    Lk) bool (True = kept) is given, that mask with the same 1/(1-p) scaling (tests pass the kernel's mask)."""
    # index_select, not k[kv_index]: advanced indexing's backward (index_put_ accumulate) adds with CPU
    # atomics across threads, so gradients differed from run to run; index_add_ sums in index order
    k_NHLD, v_NHLD = k.index_select(0, kv_index), v.index_select(0, kv_index)  # (N, H, Lk, D)
    scores = q @ k_NHLD.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, Lq, Lk)
    if key_padding_mask is not None:
        bias_NK = (1.0 - key_padding_mask[kv_index].to(scores.dtype)) * -10000.0
        scores = scores + bias_NK[:, None, None, :]
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
        probs = probs * dropout_mask.to(probs.dtype) * scale
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v_NHLD


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None, backend: str | None = None,
                    dropout_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """q (N,H,Lq,D) attends to k, v (M,H,Lk,D) of image ``kv_index[n]`` (kv_index (N,) int64);
    key_padding_mask (M, Lk) bool, True = attend; ``dropout_p``: dropout on the attention probabilities (pass
    0 in eval). Returns (N,H,Lq,D); grads accumulate into k, v per image. The kernel draws its dropout seed
    from ``generator`` (torch's default when None); the reference uses torch's global RNG, as the official code."""
    which = resolve_backend("cross_attention", backend, q, k, v)
    if which == "triton":
        from fastblip.kernels.cross_attention import cross_attention_triton

        return cross_attention_triton(q, k, v, kv_index, key_padding_mask, dropout_p, generator)
    return cross_attention_reference(q, k, v, kv_index, key_padding_mask, dropout_p)
