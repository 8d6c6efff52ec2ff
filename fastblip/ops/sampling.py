"""ITM hard-negative sampling (BLIP_SPEC §2 ITM; §4 retrieval: ids across ranks, eps = 0).

Legend: B rows (texts for sim_t2i, images for sim_i2t), C candidate columns (B in pretraining, world*B in
retrieval against all-gathered features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastblip.ops._backend import resolve_backend


def negative_weights(sim_BC: torch.Tensor, idx: torch.Tensor | None, idx_all: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """softmax(row) + eps with positives zeroed; a row with no valid column becomes one-hot at its argmax
    (the documented fallback, shared with the kernel) so a draw never sees an all-zero row. Built with
    ``scatter``, not ``F.one_hot`` (which checks its input's range on the host: a sync per call)."""
    w = F.softmax(sim_BC.float(), dim=1) + eps
    if idx is None:
        pos = torch.eye(sim_BC.shape[0], sim_BC.shape[1], dtype=torch.bool, device=sim_BC.device)
    else:
        pos = idx.reshape(-1, 1) == idx_all.reshape(1, -1)
    w = w.masked_fill(pos, 0.0)
    empty = (w.sum(1, keepdim=True) == 0)
    fallback = torch.zeros_like(w).scatter_(1, sim_BC.argmax(1, keepdim=True), 1.0)
    return torch.where(empty, fallback, w)


def draw_one(w_BC: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column per row with probability proportional to ``w_BC`` (B,) int64: exactly what
    ``torch.multinomial(w, 1)`` computes for one sample (ATen's fast path: argmax of w / q, q ~ Exp(1), from the
    same generator, so the same draws), without its two input checks that read the tensor on the host
    (``(max < inf & min >= 0).item()`` and the zero-row count): two syncs per call on CUDA."""
    q = torch.empty_like(w_BC).exponential_(1, generator=generator)
    return (w_BC / q).argmax(1)


def sample_hard_negatives_reference(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                                    idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None,
                                    eps: float = 1e-4, generator: torch.Generator | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official weights with one vectorised draw per matrix (the official code calls ``multinomial`` and
    ``.item()`` once per row: 2B host syncs per step; ``draw_one`` makes the same draws with none)."""
    w_t2i = negative_weights(sim_t2i.detach(), idx, idx_all, eps)
    w_i2t = negative_weights(sim_i2t.detach(), idx, idx_all, eps)
    neg_image_for_text = draw_one(w_t2i, generator)
    neg_text_for_image = draw_one(w_i2t, generator)
    return neg_image_for_text, neg_text_for_image


def sample_hard_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, idx: torch.Tensor | None = None,
                          idx_all: torch.Tensor | None = None, eps: float = 1e-4,
                          generator: torch.Generator | None = None, backend: str | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (neg_image_for_text (B,), neg_text_for_image (B,)) int64 column indices: a negative image for
    each text drawn from row j of ``sim_t2i``, a negative text for each image from row i of ``sim_i2t``,
    with probability proportional to softmax(row) + eps, positives excluded (diagonal when ``idx`` is None,
    else columns with ``idx_all == idx[row]``). A row without any valid negative returns its argmax column.
    """
    which = resolve_backend("sample_hard_negatives", backend, sim_i2t, sim_t2i)
    if which == "triton":
        from fastblip.kernels.hard_negatives import sample_hard_negatives_triton

        return sample_hard_negatives_triton(sim_i2t, sim_t2i, idx, idx_all, eps, generator)
    return sample_hard_negatives_reference(sim_i2t, sim_t2i, idx, idx_all, eps, generator)
