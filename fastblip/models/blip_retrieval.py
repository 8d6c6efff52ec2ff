"""Image-text retrieval / ITM filter model (official ``BLIP_Retrieval`` and ``BLIP_ITM`` layouts).

Legend: B local batch, W world size, G = W·B gathered rows, Q queue length, d embed dim (256),
N image tokens, C vision width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import ModelConfig
from fastblip.errors import ConfigError
from fastblip.models.base import BlipBase, ContrastiveMixin
from fastblip.models.contrastive import MomentumContrast, add_momentum_and_queues
from fastblip.models.med import BertModel, ImageKV
from fastblip.ops import sample_hard_negatives
from fastblip.ops.gather import gather_nograd, gather_with_grad, world_size


def _pad_to_world_len(ids: torch.Tensor, mask: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks pad their texts to their own longest caption; gathering needs one length. Under torchrun every
    rank pads to ``max_len`` (the recipe's max_length): a static shape, no all-reduce of the lengths and no
    host sync to read it (the negatives' ITM rows cost a few more tokens)."""
    if world_size() == 1 or ids.shape[1] >= max_len:
        return ids, mask
    pad = max_len - ids.shape[1]
    return F.pad(ids, (0, pad)), F.pad(mask, (0, pad))


class BlipRetrieval(MomentumContrast, ContrastiveMixin, BlipBase):
    """Image-text retrieval / ITM filter: ViT + text encoder (with cross-attention) + projections + ITM head.

    With ``momentum=True`` (the COCO/Flickr finetuning layout) it also carries the momentum encoders and the
    feature queues (row-major (Q, D) here; the official files store (D, Q) and are transposed on import).
    """

    kind = "retrieval"

    def __init__(self, cfg: ModelConfig, momentum: bool = True):
        super().__init__(cfg)
        vw, tw = cfg.vision.width, cfg.text.hidden_size
        self.text_encoder = BertModel(cfg.text, encoder_width=vw)
        self.vision_proj = nn.Linear(vw, cfg.embed_dim)
        self.text_proj = nn.Linear(tw, cfg.embed_dim)
        self.itm_head = nn.Linear(tw, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.has_momentum = momentum
        if momentum:
            add_momentum_and_queues(self, cfg, idx_queue=True)
        self.set_backends()

    def training_step(self, batch, *, alpha: float | torch.Tensor, update_momentum: bool) -> dict:
        """Retrieval finetune step (official ``train_retrieval``): ITC with image-id positives against the
        momentum features + queues, then ITM on [pos; neg image per text; neg text per image] with negatives
        drawn from every rank (``negative_all_rank``), softmax weights with same-id entries zeroed (eps 0).
        ``update_momentum``: the momentum encoders move once per optimiser step (the task contract)."""
        if not self.has_momentum:
            raise ConfigError("training a retrieval model needs its momentum encoders and queues (model kind "
                              "'retrieval', not 'itm')")
        pix, ids, mask, idx = batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_ids.view(-1)
        B = ids.shape[0]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        img_BNC = self.encode_image(pix)
        image_feat = F.normalize(self.vision_proj(img_BNC[:, 0]).float(), dim=-1)  # (B, d) fp32
        text_feat = F.normalize(self.text_proj(self.text_encoder(ids, mask)[:, 0]).float(), dim=-1)

        # ---- ITC with image-id positives and momentum distillation (enqueues the gathered ids too)
        loss_itc, _, _ = self.contrastive_loss(image_feat, text_feat, pix, ids, mask, alpha, idx=idx,
                                               update_momentum=update_momentum)
        idx_world = gather_nograd(idx)  # (G,)

        # ---- ITM with hard negatives from all ranks
        enc_ids = self._with_first(ids, self.cfg.text.enc_token_id)
        with torch.no_grad():
            t = self.temp.detach()
            sim_i2t = image_feat.detach() @ gather_nograd(text_feat.detach()).t() / t  # (B, G)
            sim_t2i = text_feat.detach() @ gather_nograd(image_feat.detach()).t() / t
        neg_img, neg_txt = sample_hard_negatives(sim_i2t, sim_t2i, idx, idx_world, eps=0.0,
                                                  backend=self.op_backend("sample_hard_negatives"))
        ids_w, mask_w = _pad_to_world_len(enc_ids, mask, self.cfg.max_text_len)
        ids_w, mask_w = gather_nograd(ids_w), gather_nograd(mask_w)
        # the three text blocks padded to one length (a gathered text may be longer than ours)
        L = ids_w.shape[1]
        enc_ids, mask_l = F.pad(enc_ids, (0, L - enc_ids.shape[1])), F.pad(mask, (0, L - mask.shape[1]))
        text_ids = torch.cat([enc_ids, enc_ids, ids_w.index_select(0, neg_txt)])  # (3B, L)
        text_mask = torch.cat([mask_l, mask_l, mask_w.index_select(0, neg_txt)])
        image = self.text_encoder.image_kv(img_BNC)  # each local image's K/V once: pos pair + neg-text pair
        ar = torch.arange(B, device=ids.device)
        if world_size() == 1:  # negative images are local: share their K/V too
            image = ImageKV(image.kv, torch.cat([ar, neg_img, ar]), image.mask)
        else:
            neg_BNC = gather_with_grad(img_BNC).index_select(0, neg_img)  # gradient reaches the owning rank
            neg = self.text_encoder.image_kv(neg_BNC)
            image = ImageKV([(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(image.kv, neg.kv)],
                            torch.cat([ar, B + ar, ar]), None)
        h = self.text_encoder(text_ids, text_mask, image=image)[:, 0]
        logits = self.itm_head(h).float()
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=ids.device),
                            torch.zeros(2 * B, dtype=torch.long, device=ids.device)])
        loss_itm = F.cross_entropy(logits, labels)
        return {"itc_loss": loss_itc, "itm_loss": loss_itm, "loss": loss_itc + loss_itm}
