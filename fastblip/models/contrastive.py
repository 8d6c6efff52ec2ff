"""Momentum encoders, feature queues and the ITC step they serve: one implementation for pretraining and
retrieval finetuning (BLIP_SPEC §2 ITC; §4 retrieval with image ids).

Legend: B batch, Q queue length, D embed dim (256), G = world·B gathered rows.

The step (``MomentumContrast.contrastive_loss``), as the official ``BLIP_Pretrain`` / ``BLIP_Retrieval``:
update the momentum encoders (once per optimiser step: ``update_momentum``) *before* their forward; momentum
features of this batch, then ITC of the online features against [momentum batch; queue] with soft targets
(``fastblip.ops.itc_loss``: positives are the diagonal, or every column with the same image id when ``idx`` is
given); then write the all-gathered momentum features (and ids) into the queue. Features are fp32 and
L2-normalised on both sides (DESIGN §4.1: ITC logits and losses stay fp32, whatever the autocast dtype).

Buffer names are the official ones: pretraining has ``queue_ptr``; retrieval ``idx_queue`` and ``ptr_queue``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import ModelConfig
from fastblip.ops import enqueue_, itc_loss, momentum_update_
from fastblip.ops.gather import gather_nograd

MOMENTUM_PAIRS = (("visual_encoder", "visual_encoder_m"), ("vision_proj", "vision_proj_m"),
                  ("text_encoder", "text_encoder_m"), ("text_proj", "text_proj_m"))


def add_momentum_and_queues(model: nn.Module, cfg: ModelConfig, idx_queue: bool = False) -> None:
    """Momentum copies (no grad) + normalised random feature queues, as the official __init__ builds them."""
    for src, dst in MOMENTUM_PAIRS:
        m = copy.deepcopy(getattr(model, src))
        for p in m.parameters():
            p.requires_grad_(False)
        setattr(model, dst, m)
    Q, D = cfg.queue_size, cfg.embed_dim
    model.register_buffer("image_queue", F.normalize(torch.randn(Q, D), dim=1))
    model.register_buffer("text_queue", F.normalize(torch.randn(Q, D), dim=1))
    if idx_queue:
        model.register_buffer("idx_queue", torch.full((Q,), -100, dtype=torch.long))
        model.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
    else:
        model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


def momentum_pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(momentum params, online params) in matching order, for the fused foreach update."""
    pm, po = [], []
    for src, dst in MOMENTUM_PAIRS:
        for (n1, p), (n2, q) in zip(getattr(model, src).named_parameters(), getattr(model, dst).named_parameters(),
                                    strict=True):
            assert n1 == n2
            po.append(p)
            pm.append(q)
    return pm, po


class MomentumContrast:
    """Mixin for a model built with ``add_momentum_and_queues``: needs ``visual_encoder(_m)``, ``vision_proj(_m)``,
    ``text_encoder(_m)``, ``text_proj(_m)``, ``temp`` and ``op_backend`` (BlipBase)."""

    has_momentum = True

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m = m·p_m + (1−m)·p over the four momentum pairs: two fused foreach ops (DESIGN §4.8)."""
        momentum_update_(*momentum_pairs(self), self.cfg.momentum)

    @torch.no_grad()
    def momentum_features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) fp32 L2-normalised momentum image and text features."""
        img_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]).float(), dim=-1)
        txt_m = F.normalize(self.text_proj_m(self.text_encoder_m(input_ids, attention_mask)[:, 0]).float(), dim=-1)
        return img_m, txt_m

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor | None = None
                ) -> None:
        """Write every rank's momentum features (and image ids) at the queue pointer and advance it, on device."""
        queues, feats = [self.image_queue, self.text_queue], [gather_nograd(image_feat_m), gather_nograd(text_feat_m)]
        if idx is not None:
            queues.append(self.idx_queue)
            feats.append(gather_nograd(idx))
        enqueue_(queues, feats, self.ptr_queue if idx is not None else self.queue_ptr)

    def contrastive_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, pixel_values: torch.Tensor,
                         input_ids: torch.Tensor, attention_mask: torch.Tensor, alpha: float | torch.Tensor, *,
                         idx: torch.Tensor | None = None, update_momentum: bool = True, update_queue: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC loss of the online features ``image_feat`` / ``text_feat`` (B, D), fp32 and normalised, with
        momentum distillation against [momentum batch; queue]. Returns (loss, sim_i2t (B, B), sim_t2i (B, B)):
        the detached fp32 student logits of the batch columns (for hard-negative sampling)."""
        if update_momentum:  # before the momentum forward, as the official step
            self.momentum_update()
        img_m, txt_m = self.momentum_features(pixel_values, input_ids, attention_mask)
        with torch.no_grad():
            # batch first, then the queue; cat copies, so the in-place enqueue below cannot touch saved tensors
            img_m_all = torch.cat([img_m, self.image_queue.float()], dim=0)  # (B+Q, D)
            txt_m_all = torch.cat([txt_m, self.text_queue.float()], dim=0)
            idx_all = torch.cat([idx, self.idx_queue]) if idx is not None else None  # (B+Q,)
        loss, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, img_m_all, txt_m_all, self.temp, alpha, idx=idx,
                                          idx_all=idx_all, backend=self.op_backend("itc_loss"))
        if update_queue:
            self.enqueue(img_m, txt_m, idx)
        return loss.float(), sim_i2t, sim_t2i
