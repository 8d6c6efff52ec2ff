"""One attention function for both towers: self-, causal and cross-attention with key padding masks.

Shapes (legend): B batch, H heads, Lq query length, Lk key length, D head dim.

Backends (resolved once per run by ``fastblip.backends.resolve_attention``, which documents ``auto`` and the
environment override):
- ``reference``: the explicit ``softmax(QKᵀ/√D + mask) V`` of the official code, dropout on the probabilities.
- ``sdpa`` (what ``auto`` resolves to): ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own
  kernel choice; ``FASTBLIP_SDPA_PRIORITY=1`` pins the per-GPU priority list (cuDNN first on Hopper,
  memory-efficient first on Ampere) for re-measuring on other GPUs and torch versions.
- ``flash_attn`` / ``xformers``: only when installed, on CUDA, and asked for; ``flash_attn`` serves unmasked
  attention only (a key-padding mask raises instead of silently running SDPA).

Masks: ``key_padding_mask`` (B, Lk) bool/int with True/1 = attend; ``causal`` adds the decoder's lower-triangular
mask. Fully-masked query rows cannot occur in BLIP (every text has [CLS]/[DEC] first and every image 197+ tokens).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from fastblip.backends import BackendUnavailableError

_PIN_PRIORITY = os.environ.get("FASTBLIP_SDPA_PRIORITY", "0") == "1"


def _sdpa_priority():
    from torch.nn.attention import SDPBackend

    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    if major >= 9:  # Hopper: cuDNN attention measured fastest for short BLIP sequences
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.MATH]
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
            SDPBackend.MATH]


def _additive_mask(q: torch.Tensor, lk: int, key_padding_mask: torch.Tensor | None, causal: bool,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """(B|1, 1, Lq|1, Lk) additive mask with the official code's -10000 for masked positions."""
    mask = None
    lq = q.shape[-2]
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, Lk)
        mask = keep
    if causal:
        # the decoder's keys are its own queries (+ cached prefix): query i sees keys <= i + (lk - lq)
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)[None, None]
        mask = tri if mask is None else (mask & tri)
    if mask is None:
        return None
    # (1 - keep) * -10000 as the official get_extended_attention_mask builds it
    return (~mask).to(dtype) * -10000.0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """q (B,H,Lq,D), k/v (B,H,Lk,D) -> (B,H,Lq,D)."""
    if backend == "reference":
        scores_BHQK = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        mask = _additive_mask(q, k.shape[-2], key_padding_mask, causal, scores_BHQK.dtype)
        if mask is not None:
            scores_BHQK = scores_BHQK + mask
        probs = scores_BHQK.softmax(dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v
    if backend == "flash_attn":  # pragma: no cover - CUDA only
        if key_padding_mask is not None:
            raise BackendUnavailableError("attention backend 'flash_attn' cannot take a key-padding mask "
                                          "(flash_attn_func has none); use sdpa")
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              causal=causal)
        return out.transpose(1, 2)
    if backend == "xformers":  # pragma: no cover - CUDA only
        import xformers.ops as xops

        bias = _additive_mask(q, k.shape[-2], key_padding_mask, causal, q.dtype)
        if bias is not None:
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout_p)
        return out.transpose(1, 2)
    # sdpa / auto
    mask = None
    if key_padding_mask is not None or causal:
        # the official additive -10000 mask, so SDPA and reference agree on every row
        mask = _additive_mask(q, k.shape[-2], key_padding_mask, causal, q.dtype)
    if q.is_cuda and _PIN_PRIORITY:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_priority(), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
