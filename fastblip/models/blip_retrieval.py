"""Image-text retrieval / ITM filter model (official ``BLIP_Retrieval`` and ``BLIP_ITM`` layouts)."""

from __future__ import annotations

import torch
import torch.nn as nn

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase, ContrastiveMixin
from fastblip.models.blip import add_momentum_and_queues
from fastblip.models.med import BertModel


class BlipRetrieval(ContrastiveMixin, BlipBase):
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
