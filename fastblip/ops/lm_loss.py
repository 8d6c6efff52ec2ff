"""LM head projection + label-smoothed cross-entropy (BLIP_SPEC §2 LM, §4 VQA ranking).

Legend: N tokens (B x L flattened, already shifted), d hidden width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastblip.ops._backend import resolve_backend


def lm_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = -100,
                               reduction: str = "mean") -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, labels) with the full (N, V) logits, loss in fp32."""
    b = bias.to(hidden.dtype) if bias is not None else None
    logits_NV = F.linear(hidden, weight.to(hidden.dtype), b).float()
    return F.cross_entropy(logits_NV, labels, label_smoothing=label_smoothing, ignore_index=ignore_index,
                           reduction=reduction)


def lm_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = -100,
                     reduction: str = "mean", backend: str | None = None) -> torch.Tensor:
    """hidden (N, d), weight (V, d), bias (V,), labels (N,). Semantics of
    ``F.cross_entropy(hidden @ weight.T + bias, labels, label_smoothing=..., ignore_index=..., reduction=...)``:
    "mean" averages over non-ignored tokens, "none" returns (N,) per-token losses (0 at ignored tokens)."""
    which = resolve_backend("lm_cross_entropy", backend, hidden, weight, bias)
    if which == "triton":
        from fastblip.kernels.lm_cross_entropy import lm_cross_entropy_triton

        return lm_cross_entropy_triton(hidden, weight, bias, labels, label_smoothing, ignore_index, reduction)
    return lm_cross_entropy_reference(hidden, weight, bias, labels, label_smoothing, ignore_index, reduction)
