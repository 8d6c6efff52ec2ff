"""The BLIP captioner, the momentum/queue helpers, and the factory that builds any model from its config.

Module trees and parameter names follow the official code so official ``.pth`` files map key for key.
The pretraining model lives in ``blip_pretrain.py``, retrieval/ITM in ``blip_retrieval.py``, VQA and NLVR2 in
their own files. Every trainable model has ``training_forward(batch, alpha) -> dict`` of ``*_loss`` terms
plus ``loss`` (their sum), which the trainer calls.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import ModelConfig
from fastblip.models.base import BlipBase, CaptionMixin
from fastblip.models.med import BertLMHeadModel


class BlipCaption(CaptionMixin, BlipBase):
    """Captioner: ViT + causal decoder with cross-attention and the LM head (official ``BLIP_Decoder``)."""

    kind = "caption"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.text_decoder = BertLMHeadModel(cfg.text, encoder_width=cfg.vision.width)
        self._prompt_len: tuple[str, int] | None = None
        self.set_backends()

    def forward(self, pixel_values, input_ids, attention_mask, prompt_len: int = 0) -> dict:
        """Captioning LM loss: [DEC] first, pads and the prompt masked (-100), label smoothing of the config."""
        from fastblip.ops import lm_cross_entropy

        ids = self._with_first(input_ids, self.cfg.text.bos_token_id)
        image = self.text_decoder.bert.image_kv(self.encode_image(pixel_values))
        hidden = self.text_decoder.hidden(ids, attention_mask, image)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        if prompt_len:
            labels[:, :prompt_len] = -100
        h = self.text_decoder.head_hidden(hidden[:, :-1])
        head = self.text_decoder.cls.predictions
        loss = lm_cross_entropy(h.reshape(-1, h.shape[-1]), head.decoder.weight, head.bias,
                                labels[:, 1:].reshape(-1), label_smoothing=self.cfg.text.label_smoothing,
                                backend=self.op_backend("lm_cross_entropy"))
        return {"lm_loss": loss, "loss": loss}

    def training_forward(self, batch, alpha: float = 0.0) -> dict:
        """Captioning finetune step: the batch's texts already start with the prompt ("a picture of ")."""
        return self(batch.pixel_values, batch.input_ids, batch.attention_mask, prompt_len=self.prompt_len())

    def prompt_len(self) -> int:
        """Number of prompt tokens masked from the loss ([DEC] + prompt words, as the official code); computed
        once (tokenising inside a compiled training step would break its graph)."""
        if self._prompt_len is None or self._prompt_len[0] != self.cfg.prompt:
            n = len(self.tokenizer.encode(self.cfg.prompt)) - 1 if self.cfg.prompt else 0
            self._prompt_len = (self.cfg.prompt, n)
        return self._prompt_len[1]


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


def build_model(cfg: ModelConfig) -> BlipBase:
    """Build the task model named by ``cfg.kind`` (random init)."""
    kind = cfg.kind
    if kind == "pretrain":
        from fastblip.models.blip_pretrain import BlipPretrain

        return BlipPretrain(cfg)
    if kind in ("retrieval", "itm"):
        from fastblip.models.blip_retrieval import BlipRetrieval

        m = BlipRetrieval(cfg, momentum=kind == "retrieval")
        m.kind = kind
        return m
    if kind == "caption":
        return BlipCaption(cfg)
    if kind == "vqa":
        from fastblip.models.blip_vqa import BlipVQA

        return BlipVQA(cfg)
    if kind == "nlvr":
        from fastblip.models.blip_nlvr import BlipNLVR

        return BlipNLVR(cfg)
    raise ValueError(f"unknown model kind '{kind}' (valid: pretrain, retrieval, itm, caption, vqa, nlvr)")
