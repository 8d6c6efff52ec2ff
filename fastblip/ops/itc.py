"""Image-text contrastive loss with momentum distillation (BLIP_SPEC §2 ITC, §4 retrieval with image ids).

Legend: B batch, Q queue length, N = B + Q, d feature width (256). ``*_m_all`` are (N, d): the momentum
features of the current batch first, then the queue (row-major; the official buffers are (d, Q)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastblip.ops._backend import resolve_backend


def itc_loss_reference(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
                       text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: float | torch.Tensor,
                       idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official computation step by step, in fp32 (DESIGN §4.1: ITC logits and losses stay fp32)."""
    B = image_feat.shape[0]
    img, txt = image_feat.float(), text_feat.float()
    img_m_ND, txt_m_ND = image_feat_m_all.detach().float(), text_feat_m_all.detach().float()
    N = img_m_ND.shape[0]
    with torch.no_grad():
        t = temp.detach().float()
        sim_i2t_m = img_m_ND[:B] @ txt_m_ND.T / t  # (B, N) teacher
        sim_t2i_m = txt_m_ND[:B] @ img_m_ND.T / t
        if idx is None:
            pos_BN = torch.eye(B, N, device=img.device)  # identity on the first B columns (fill_diagonal_)
        else:
            pos_BN = (idx.reshape(-1, 1) == idx_all.reshape(1, -1)).float()
            # the official code divides by the count (NaN for a row without positives); we keep such a row's
            # target as alpha * softmax(teacher), as the kernel does
            pos_BN = pos_BN / pos_BN.sum(1, keepdim=True).clamp_min(1.0)
        tgt_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * pos_BN
        tgt_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * pos_BN
    t = temp.float()
    sim_i2t = img @ txt_m_ND.T / t  # (B, N) student
    sim_t2i = txt @ img_m_ND.T / t
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * tgt_i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * tgt_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2, sim_i2t[:, :B].detach(), sim_t2i[:, :B].detach()


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m_all: torch.Tensor,
             text_feat_m_all: torch.Tensor, temp: torch.Tensor, alpha: float | torch.Tensor,
             idx: torch.Tensor | None = None, idx_all: torch.Tensor | None = None, backend: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC loss averaged over i2t and t2i. Returns (loss, sim_i2t (B,B), sim_t2i (B,B)): the sims are the
    detached fp32 student logits (already divided by temp) of the current-batch columns, for ITM sampling.

    image_feat, text_feat: (B, d) normalised, with grad. image_feat_m_all, text_feat_m_all: (B+Q, d), no
    grad. temp: 0-dim tensor (gets a gradient). alpha: float or 0-dim tensor. idx (B,), idx_all (B+Q,):
    image ids (retrieval); positives are the entries with the same id, else the diagonal.
    """
    which = resolve_backend("itc_loss", backend, image_feat, text_feat, image_feat_m_all, text_feat_m_all)
    if which == "triton":
        from fastblip.kernels.itc_loss import itc_loss_triton

        return itc_loss_triton(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx,
                               idx_all)
    return itc_loss_reference(image_feat, text_feat, image_feat_m_all, text_feat_m_all, temp, alpha, idx,
                              idx_all)
