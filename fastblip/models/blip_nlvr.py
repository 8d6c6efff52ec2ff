"""NLVR2 model (official ``BLIP_NLVR`` + ``nlvr_encoder.py`` layout, BLIP_SPEC §4).

The text encoder's cross-attention holds one attention per image (``crossattention.self0`` / ``self1``) and one
output projection per image (``crossattention.output.dense0`` / ``dense1``). The two projected outputs are
averaged in the first half of the layers and concatenated through ``crossattention.output.merge_layer``
(2C -> C, no activation in the official forward) in the second half. Official rule: ``layer_num >= 6`` of 12;
here ``i >= num_layers // 2`` (the same for 12 layers, layer 1 of 2 for the tiny configs). Then dropout, residual
and LayerNorm as every BERT output. ``cls_head`` = Linear(C, C), ReLU, Linear(C, 2) on the ``[ENC]`` output.

Legend: B statements (= image pairs), L text length, N image tokens, C text width, Cv vision width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import ModelConfig, TextConfig
from fastblip.models.base import BlipBase
from fastblip.models.med import (
    BertAttention,
    BertEmbeddings,
    BertIntermediate,
    BertOutput,
    BertSelfAttention,
    _init_bert,
)


def merge_from(layer: int, num_layers: int) -> bool:
    """Whether layer ``layer`` merges the two images' outputs by concatenation (official: 6..11 of 12)."""
    return layer >= num_layers // 2


class TwinSelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        C = cfg.hidden_size
        self.dense0 = nn.Linear(C, C)
        self.dense1 = nn.Linear(C, C)
        self.LayerNorm = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.merge = merge
        if merge:
            self.merge_layer = nn.Linear(2 * C, C)

    def forward(self, h0: torch.Tensor, h1: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.dense0(h0), self.dense1(h1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinCrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, merge: bool):
        super().__init__()
        self.self0 = BertSelfAttention(cfg, kv_width=encoder_width)
        self.self1 = BertSelfAttention(cfg, kv_width=encoder_width)
        self.output = TwinSelfOutput(cfg, merge)


class NlvrBertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int, layer: int):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.crossattention = TwinCrossAttention(cfg, encoder_width, merge_from(layer, cfg.num_layers))
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, mask, kv0, kv1):
        h, _ = self.attention.self(x, mask)
        x = self.attention.output(h, x)
        ca = self.crossattention
        h0 = ca.self0.cross(x, kv0[0], kv0[1], None, None)
        h1 = ca.self1.cross(x, kv1[0], kv1[1], None, None)
        x = ca.output(h0, h1, x)
        return self.output(self.intermediate(x), x)


class NlvrBertModel(nn.Module):
    """The official NLVR text encoder (``models/nlvr_encoder.py``): same keys as ``BertModel`` except the twin
    cross-attention."""

    def __init__(self, cfg: TextConfig, encoder_width: int):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(NlvrBertLayer(cfg, encoder_width, i) for i in range(cfg.num_layers))
        self.apply(lambda m: _init_bert(m, cfg.initializer_range))

    def set_backends(self, attention: str, ops: str | None) -> None:
        for m in self.modules():
            if isinstance(m, BertSelfAttention):
                m.backend, m.ops_backend = attention, ops

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image0: torch.Tensor,
                image1: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, image tokens (B, N, Cv) x 2 -> (B, L, C)."""
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            ca = layer.crossattention
            x = layer(x, attention_mask, ca.self0.project_kv(image0), ca.self1.project_kv(image1))
        return x


class BlipNLVR(BlipBase):
    """NLVR2: ``nlvr_logits(pixel_values_0, pixel_values_1, input_ids, attention_mask) -> (B, 2)``
    (index 1 = the statement is true)."""

    kind = "nlvr"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        C = cfg.text.hidden_size
        self.text_encoder = NlvrBertModel(cfg.text, cfg.vision.width)
        self.cls_head = nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 2))
        self.set_backends()

    def nlvr_logits(self, pixel_values_0: torch.Tensor, pixel_values_1: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
        if pixel_values_0.shape != pixel_values_1.shape or pixel_values_0.shape[0] != input_ids.shape[0]:
            raise ValueError(f"image pairs {tuple(pixel_values_0.shape)}/{tuple(pixel_values_1.shape)} do not match "
                             f"{input_ids.shape[0]} statements")
        B = pixel_values_0.shape[0]
        # one ViT pass over both images, as the official forward (torch.cat([image0, image1]))
        emb = self.encode_image(torch.cat([pixel_values_0, pixel_values_1]))
        ids = self._with_first(input_ids, self.cfg.text.enc_token_id)
        h = self.text_encoder(ids, attention_mask, emb[:B], emb[B:])
        return self.cls_head(h[:, 0])

    def training_step(self, batch, *, alpha: float | torch.Tensor = 0.0, update_momentum: bool = True) -> dict:
        """The task contract; ``batch`` is a ``fastblip.tasks.nlvr.NLVRBatch``: cross-entropy on the 2-way
        logits (no momentum encoders: the flags are ignored)."""
        logits = self.nlvr_logits(batch.pixel_values, batch.pixel_values_1, batch.input_ids, batch.attention_mask)
        loss = F.cross_entropy(logits.float(), batch.labels)
        return {"nlvr_loss": loss, "loss": loss}


def nlvr_init_from_pretrained(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a pretrained (single cross-attention) state dict onto the NLVR layout, as the official
    ``blip_nlvr.load_checkpoint``: ``crossattention.self.*`` -> ``self0`` and ``self1``, ``crossattention.output.dense.*``
    -> ``dense0`` and ``dense1``. The source keys are dropped here (the official loader keeps them and they are then
    ignored as unexpected); ``merge_layer`` and ``cls_head`` stay missing (random init)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if "crossattention.self." in key:
            out[key.replace("crossattention.self.", "crossattention.self0.")] = t
            out[key.replace("crossattention.self.", "crossattention.self1.")] = t.clone()
        elif "crossattention.output.dense." in key:
            out[key.replace("crossattention.output.dense.", "crossattention.output.dense0.")] = t
            out[key.replace("crossattention.output.dense.", "crossattention.output.dense1.")] = t.clone()
        else:
            out[key] = t
    return out
