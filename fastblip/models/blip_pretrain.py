"""The BLIP pretraining model: ViT + text encoder + shared-weight decoder + heads + momentum encoders + queues.

Module tree and parameter names follow the official ``BLIP_Pretrain`` so ``model_base.pth`` maps key for key.
Encoder and decoder share every parameter except self-attention (``tie_encoder_decoder``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase, CaptionMixin, ContrastiveMixin
from fastblip.models.blip import add_momentum_and_queues
from fastblip.models.med import BertLMHeadModel, BertModel, tie_encoder_decoder


class BlipPretrain(ContrastiveMixin, CaptionMixin, BlipBase):
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
