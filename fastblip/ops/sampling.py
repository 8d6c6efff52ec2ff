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
    (the documented fallback, shared with the kernel) so multinomial never sees an all-zero row."""
    w = F.softmax(sim_BC.float(), dim=1) + eps
    if idx is None:
        pos = torch.eye(sim_BC.shape[0], sim_BC.shape[1], dtype=torch.bool, device=sim_BC.device)
    else:
        pos = idx.reshape(-1, 1) == idx_all.reshape(1, -1)
    w = w.masked_fill(pos, 0.0)
    empty = (w.sum(1, keepdim=True) == 0)
    fallback = F.one_hot(sim_BC.argmax(1), sim_BC.shape[1]).to(w.dtype)
    return torch.where(empty, fallback, w)


def sample_hard_negatives_reference(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                                    idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None,
                                    eps: float = 1e-4, generator: torch.Generator | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official weights with one vectorised ``multinomial`` per matrix (no per-row ``.item()``)."""
    w_t2i = negative_weights(sim_t2i.detach(), idx, idx_all, eps)
    w_i2t = negative_weights(sim_i2t.detach(), idx, idx_all, eps)
    neg_image_for_text = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text_for_image = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
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
