"""Shared pieces of the BLIP task models: the public methods of DESIGN.md §3 as mixins.

Token ids in every method are plain tokenizer output (``[CLS] ... [SEP]``, padded); the models substitute
``[ENC]`` (image-grounded encoder) and ``[DEC]`` (decoder) where the official code does, unless the config says
``first_token="cls"`` (HF's and the official demo's behaviour).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.backends import OPS, resolve_attention
from fastblip.config import ModelConfig
from fastblip.models.vit import VisionTransformer

log = logging.getLogger("fastblip")

# which task models have which public method (for the "method not available" error)
METHOD_OWNERS = {
    "image_features": ("pretrain", "retrieval"),
    "text_features": ("pretrain", "retrieval"),
    "itc_similarity": ("pretrain", "retrieval"),
    "itm_logits": ("pretrain", "retrieval"),
    "caption_logits": ("pretrain", "caption"),
    "generate": ("pretrain", "caption"),
    "answer": ("vqa",),
    "nlvr_logits": ("nlvr",),
}


class BlipBase(nn.Module):
    """Holds the config, the ViT and the backend choices; every task model derives from it and implements
    the task contract's ``training_step`` (fastblip/tasks/contract.py)."""

    kind = "base"
    has_momentum = False  # models with momentum encoders (pretrain, retrieval) add momentum_update()

    def training_step(self, batch, *, alpha: torch.Tensor | float, update_momentum: bool) -> dict:
        """Named ``*_loss`` terms and their sum ``loss`` for one batch (the task contract)."""
        raise NotImplementedError(f"{type(self).__name__} ({self.kind}) is not trainable")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(cfg.vision)
        self._tokenizer = None
        self.op_backends: dict[str, str | None] = dict.fromkeys(OPS)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in METHOD_OWNERS:
                raise AttributeError(
                    f"{type(self).__name__} ({self.kind}) has no method '{name}'; models that have it: "
                    f"{', '.join(METHOD_OWNERS[name])}") from None
            raise

    # ------------------------------------------------------------------ backends
    def set_backends(self, attention: str | None = None, ops: str | Mapping[str, str | None] | None = None
                     ) -> None:
        """Push concrete backend choices into every module (a run's ``fastblip.backends.Backends`` record
        passes its ``attention`` and ``dict(ops)``). ``attention`` None keeps the config's (resolved here);
        ``ops``: one backend for every fused op, a per-op mapping, or None (each call resolves by its tensors'
        device: library use)."""
        attention = resolve_attention(attention or self.cfg.attention_backend)
        self.cfg.attention_backend = attention
        if ops is None:
            ops = self.cfg.ops_backend
        if isinstance(ops, Mapping):
            self.op_backends.update(ops)
        else:
            self.op_backends = dict.fromkeys(OPS, ops)
            self.cfg.ops_backend = ops
        for m in self.modules():
            if hasattr(m, "set_attention_backend"):
                m.set_attention_backend(attention)
            if hasattr(m, "set_backends") and m is not self:
                m.set_backends(attention, self.op_backends["cross_attention"])

    def op_backend(self, op: str) -> str | None:
        """The backend this model passes to fused op ``op`` (None = resolve per call)."""
        return self.op_backends[op]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from fastblip.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _with_first(self, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        if self.cfg.first_token == "cls":
            return input_ids
        ids = input_ids.clone()
        ids[:, 0] = token_id
        return ids

    # ------------------------------------------------------------------ public methods
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, C) all ViT tokens, cls first."""
        return self.visual_encoder(pixel_values)


class ContrastiveMixin:
    """ITC features and ITM logits: needs ``visual_encoder``, ``text_encoder``, ``vision_proj``, ``text_proj``,
    ``itm_head``."""

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.encode_image(pixel_values)
        return F.normalize(self.vision_proj(emb[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.text_encoder(input_ids, attention_mask)  # mode "text": [CLS] kept
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def itc_similarity(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """(B_img, B_txt) cosine similarity, no temperature."""
        return self.image_features(pixel_values) @ self.text_features(input_ids, attention_mask).t()

    def itm_hidden(self, image_embeds, input_ids, attention_mask, kv_index=None) -> torch.Tensor:
        """[ENC]-first multimodal encoding; returns the first token's hidden (N, C)."""
        ids = self._with_first(input_ids, self.cfg.text.enc_token_id)
        image = self.text_encoder.image_kv(image_embeds)
        if kv_index is not None:
            image = image.select(kv_index)
        return self.text_encoder(ids, attention_mask, image=image)[:, 0]

    def itm_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """(B, 2) logits, index 1 = match; row i pairs image i with text i."""
        return self.itm_head(self.itm_hidden(self.encode_image(pixel_values), input_ids, attention_mask))


class CaptionMixin:
    """Decoder logits and generation: needs ``visual_encoder`` and ``text_decoder``."""

    def caption_logits(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """(B, L, V) unshifted: ``logits[:, t]`` predicts token t+1. Input ids get ``[DEC]`` first."""
        ids = self._with_first(input_ids, self.cfg.text.bos_token_id)
        image = self.text_decoder.bert.image_kv(self.encode_image(pixel_values))
        return self.text_decoder(ids, attention_mask, image)

    def generate(self, pixel_values: torch.Tensor, method: str = "beam", num_return_sequences: int = 1,
                 prompt: str | None = None, **kw):
        """Captions as strings (prompt removed); list[list[str]] when ``num_return_sequences`` > 1."""
        from fastblip.models.generation import generate_captions

        return generate_captions(self, pixel_values, method=method, num_return_sequences=num_return_sequences,
                                 prompt=self.cfg.prompt if prompt is None else prompt, **kw)
