"""The BLIP pretraining model: ViT + text encoder + shared-weight decoder + heads + momentum encoders + queues.

Module tree and parameter names follow the official ``BLIP_Pretrain`` so ``model_base.pth`` maps key for key.
Encoder and decoder share every parameter except self-attention (``tie_encoder_decoder``).

One training step (BLIP_SPEC §2) = ITC (momentum distillation against batch + queue) + ITM (hard negatives
sampled from the ITC similarities within the local batch) + LM (decoder, label smoothing 0.1), equal weights.
Two paths compute it:

- reference (``cfg.shared_cross_kv=False``): the official computation step by step: a positive ITM pass over
  B rows, a negative pass over 2B rows whose image embeddings are gathered copies, and a decoder pass, each
  projecting the image tokens to cross-attention K/V again (4 projections of the same images per layer).
- fast (``cfg.shared_cross_kv=True``, default): ``text_encoder.image_kv`` projects each image's K/V once per
  layer; the 3B ITM rows select theirs by ``kv_index`` and the decoder reuses the same K/V (its
  cross-attention *is* the encoder's: tied weights). −16.4% step FLOPs for ViT-B at L=30 (PERFORMANCE.md).

Neither path syncs with the host: sampling is ``fastblip.ops.sample_hard_negatives`` on device, the queue
pointer advances on device. Legend: B batch, Q queue, D embed dim (256), N image tokens, C width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase, CaptionMixin, ContrastiveMixin
from fastblip.models.contrastive import MomentumContrast, add_momentum_and_queues
from fastblip.models.med import BertLMHeadModel, BertModel, ImageKV, tie_encoder_decoder
from fastblip.ops import lm_cross_entropy, sample_hard_negatives


class BlipPretrain(MomentumContrast, ContrastiveMixin, CaptionMixin, BlipBase):
    kind = "pretrain"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        vw, tw = cfg.vision.width, cfg.text.hidden_size
        self.text_encoder = BertModel(cfg.text, encoder_width=vw)
        self.text_decoder = BertLMHeadModel(cfg.text, encoder_width=vw)
        tie_encoder_decoder(self.text_encoder, self.text_decoder.bert)
        self.text_decoder.tie_weights()  # LM head = (shared) word embeddings
        self.vision_proj = nn.Linear(vw, cfg.embed_dim)
        self.text_proj = nn.Linear(tw, cfg.embed_dim)
        self.itm_head = nn.Linear(tw, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        add_momentum_and_queues(self, cfg, idx_queue=False)
        self.set_backends()

    # ------------------------------------------------------------------ losses
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float | torch.Tensor = 0.4, negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
                update_momentum: bool = True, update_queue: bool = True) -> dict:
        """Pretraining losses: dict(itc_loss, itm_loss, lm_loss, loss = their sum).

        ``negatives = (neg_image_for_text, neg_text_for_image)`` (B,) each replaces the sampling.
        ``update_momentum`` / ``update_queue``: the trainer's gradient accumulation updates the momentum encoders
        once per optimiser step but enqueues every micro-batch (issue 4).
        """
        B = pixel_values.shape[0]
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        image_embeds = self.visual_encoder(pixel_values)  # (B, N, Cv)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]).float(), dim=-1)  # (B, D) fp32
        text_hidden = self.text_encoder(input_ids, attention_mask)  # mode "text": [CLS] kept
        text_feat = F.normalize(self.text_proj(text_hidden[:, 0]).float(), dim=-1)

        loss_itc, sim_i2t, sim_t2i = self.contrastive_loss(image_feat, text_feat, pixel_values, input_ids,
                                                           attention_mask, alpha, update_momentum=update_momentum,
                                                           update_queue=update_queue)
        if negatives is None:
            negatives = sample_hard_negatives(sim_i2t, sim_t2i, eps=1e-4,
                                              backend=self.op_backend("sample_hard_negatives"))
        neg_image_for_text, neg_text_for_image = negatives

        enc_ids = self._with_first(input_ids, self.cfg.text.enc_token_id)
        dec_ids = self._with_first(input_ids, self.cfg.text.bos_token_id)
        if self.cfg.shared_cross_kv:
            vl, dec_hidden = self._itm_lm_shared(image_embeds, enc_ids, dec_ids, attention_mask,
                                                 neg_image_for_text, neg_text_for_image)
        else:
            vl, dec_hidden = self._itm_lm_reference(image_embeds, enc_ids, dec_ids, attention_mask,
                                                    neg_image_for_text, neg_text_for_image)
        itm_logits = self.itm_head(vl).float()  # (3B, 2): [pos; neg image per text; neg text per image]
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=itm_logits.device),
                                torch.zeros(2 * B, dtype=torch.long, device=itm_logits.device)])
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        labels = input_ids.masked_fill(attention_mask == 0, -100)
        h = self.text_decoder.head_hidden(dec_hidden[:, :-1])  # (B, L-1, C): position t predicts token t+1
        head = self.text_decoder.cls.predictions
        loss_lm = lm_cross_entropy(h.reshape(-1, h.shape[-1]), head.decoder.weight, head.bias,
                                   labels[:, 1:].reshape(-1), label_smoothing=self.cfg.text.label_smoothing,
                                   backend=self.op_backend("lm_cross_entropy"))
        loss_lm = loss_lm.float()
        return {"itc_loss": loss_itc, "itm_loss": loss_itm, "lm_loss": loss_lm, "loss": loss_itc + loss_itm + loss_lm}

    def _itm_lm_reference(self, image_embeds, enc_ids, dec_ids, mask, neg_img, neg_txt):
        """Official layout: pos pass (B rows), neg pass (2B rows, gathered image embeds), decoder pass; each
        re-projects its image tokens to cross-attention K/V."""
        out_pos = self.text_encoder(enc_ids, mask, image=image_embeds)[:, 0]  # (B, C)
        # (B, N, Cv) a negative image for each text, with grad; index_select: its backward sums in index order
        # (advanced indexing's index_put_ accumulates with CPU atomics: run-to-run different gradients)
        image_embeds_neg = image_embeds.index_select(0, neg_img)
        text_ids_all = torch.cat([enc_ids, enc_ids[neg_txt]], dim=0)  # (2B, L)
        text_atts_all = torch.cat([mask, mask[neg_txt]], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)  # (2B, N, Cv)
        out_neg = self.text_encoder(text_ids_all, text_atts_all, image=image_embeds_all)[:, 0]
        dec_hidden = self.text_decoder.hidden(dec_ids, mask, image_embeds)
        return torch.cat([out_pos, out_neg], dim=0), dec_hidden

    def _itm_lm_shared(self, image_embeds, enc_ids, dec_ids, mask, neg_img, neg_txt):
        """Each image's K/V once per layer: 3B ITM rows index it, the (tied) decoder reuses it."""
        B = image_embeds.shape[0]
        image = self.text_encoder.image_kv(image_embeds)  # B images, every layer's (k, v)
        ar = torch.arange(B, device=enc_ids.device)
        ids = torch.cat([enc_ids, enc_ids, enc_ids[neg_txt]], dim=0)  # (3B, L)
        atts = torch.cat([mask, mask, mask[neg_txt]], dim=0)
        kv_index = torch.cat([ar, neg_img, ar])  # row -> image
        vl = self.text_encoder(ids, atts, image=ImageKV(image.kv, kv_index, image.mask))[:, 0]
        dec_hidden = self.text_decoder.hidden(dec_ids, mask, ImageKV(image.kv, None, image.mask))
        return vl, dec_hidden

    def training_step(self, batch, *, alpha: float | torch.Tensor, update_momentum: bool) -> dict:
        """The task contract (fastblip/tasks/contract.py): this model's forward on a ``Batch``."""
        return self(batch.pixel_values, batch.input_ids, batch.attention_mask, alpha=alpha,
                    update_momentum=update_momentum)
