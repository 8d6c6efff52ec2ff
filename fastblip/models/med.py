"""The multimodal mixture of encoder-decoder (MED): BERT with optional cross-attention to image tokens.

Parameter names equal the official ``text_encoder.*`` / ``text_decoder.bert.*`` / ``text_decoder.cls.*`` keys.
Modes: ``text`` (unimodal encoder, no cross-attention), ``multimodal`` (image-grounded encoder) and the causal
decoder (``BertLMHeadModel``: causal self-attention + LM head). Post-norm residuals as BERT; no token-type
embedding (BLIP's text model has none).

Cross-attention K/V (DESIGN §4.3): ``ImageKV`` carries per-layer (k, v) of each *image* (M rows) plus
``kv_index`` (N,) mapping each text row to its image, so one projection serves the positive ITM pair, both
hard-negative pairs and the LM decoder, and each beam/sample of generation.

Legend: N text rows, L text length, M images, Lk image tokens, C hidden, H heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastblip.config import TextConfig
from fastblip.ops.attention import attention


@dataclass
class ImageKV:
    """Per-layer cross-attention keys/values of M images: ``kv[l] = (k, v)`` each (M, H, Lk, D)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    kv_index: torch.Tensor | None = None  # (N,) long; None = row n uses image n
    mask: torch.Tensor | None = None  # (M, Lk) True = attend; None = all image tokens valid

    def select(self, index: torch.Tensor) -> ImageKV:
        """Re-index rows (beam reordering / sample expansion) without touching the K/V themselves."""
        base = self.kv_index if self.kv_index is not None else torch.arange(
            self.kv[0][0].shape[0], device=index.device)
        return ImageKV(self.kv, base.index_select(0, index), self.mask)


def _act(name: str):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act '{name}'")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, past_len: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, past_len: past_len + L])
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int | None = None):
        super().__init__()
        C = cfg.hidden_size
        if C % cfg.num_heads:
            raise ValueError(f"hidden_size {C} is not a multiple of num_heads {cfg.num_heads}")
        self.heads, self.head_dim = cfg.num_heads, C // cfg.num_heads
        kv_width = kv_width or C
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(kv_width, C)
        self.value = nn.Linear(kv_width, C)
        self.dropout_p = cfg.attention_dropout
        self.backend = "auto"
        self.ops_backend: str | None = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, C) -> (N, H, L, D)
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.key(states)), self._split(self.value(states))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool = False,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Self-attention; returns (out (N, L, C), (k, v) for the KV cache)."""
        q = self._split(self.query(x))
        k, v = self.project_kv(x)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        p = self.dropout_p if self.training else 0.0
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=p, backend=self.backend)
        return out.transpose(1, 2).reshape(x.shape), (k, v)

    def cross(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention of N text rows to M images' precomputed K/V (row n -> image kv_index[n])."""
        q = self._split(self.query(x))
        p = self.dropout_p if self.training else 0.0
        if kv_index is not None and self.backend != "reference":
            from fastblip.ops import cross_attention  # indexed kernel (dropout inside): no (N, H, Lk, D) copy

            out = cross_attention(q, k, v, kv_index, key_padding_mask=mask, backend=self.ops_backend, dropout_p=p)
        else:
            if kv_index is not None:  # the official computation: gather per row, explicit softmax, dropout
                k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)
                mask = mask.index_select(0, kv_index) if mask is not None else None
            out = attention(q, k, v, key_padding_mask=mask, dropout_p=p, backend=self.backend)
        return out.transpose(1, 2).reshape(x.shape)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int | None = None):
        super().__init__()
        self.self = BertSelfAttention(cfg, kv_width)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _act(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, encoder_width: int | None):
        super().__init__()
        self.attention = BertAttention(cfg)
        if encoder_width is not None:
            self.crossattention = BertAttention(cfg, kv_width=encoder_width)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, mask, causal=False, image_kv=None, kv_index=None, image_mask=None, past=None):
        h, present = self.attention.self(x, mask, causal=causal, past=past)
        x = self.attention.output(h, x)
        if image_kv is not None:
            h = self.crossattention.self.cross(x, image_kv[0], image_kv[1], kv_index, image_mask)
            x = self.crossattention.output(h, x)
        return self.output(self.intermediate(x), x), present


class BertModel(nn.Module):
    """BERT encoder without pooler; ``encoder_width`` adds a cross-attention module to every layer."""

    def __init__(self, cfg: TextConfig, encoder_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg, encoder_width) for _ in range(cfg.num_layers))
        self.apply(lambda m: _init_bert(m, cfg.initializer_range))

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def set_backends(self, attention: str, ops: str | None) -> None:
        for m in self.modules():
            if isinstance(m, BertSelfAttention):
                m.backend, m.ops_backend = attention, ops

    def image_kv(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> ImageKV:
        """Project the image tokens (M, Lk, Cv) to every layer's cross-attention K/V once."""
        kv = [layer.crossattention.self.project_kv(image_embeds) for layer in self.encoder.layer]
        return ImageKV(kv, None, image_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                image: ImageKV | torch.Tensor | None = None, causal: bool = False,
                past: list | None = None, use_cache: bool = False):
        """Returns hidden states (N, L, C), or (hidden, new_cache) when ``use_cache``.

        ``image`` None = mode "text"; a tensor (N, Lk, Cv) or an ``ImageKV`` = mode "multimodal".
        ``attention_mask`` covers past + current tokens when a cache is used.
        """
        past_len = past[0][0].shape[2] if past else 0
        x = self.embeddings(input_ids, past_len)
        if isinstance(image, torch.Tensor):
            image = self.image_kv(image)
        cache = []
        for i, layer in enumerate(self.encoder.layer):
            ikv = image.kv[i] if image is not None else None
            x, present = layer(x, attention_mask, causal=causal, image_kv=ikv,
                               kv_index=image.kv_index if image is not None else None,
                               image_mask=image.mask if image is not None else None,
                               past=past[i] if past else None)
            cache.append(present)
        return (x, cache) if use_cache else x


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _act(cfg.hidden_act)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # as BERT: `decoder.bias` and `bias` are one tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BertLMHeadModel(nn.Module):
    """The causal decoder: ``bert`` (with cross-attention) + ``cls`` LM head tied to the word embeddings."""

    def __init__(self, cfg: TextConfig, encoder_width: int | None):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg, encoder_width)
        self.cls = BertOnlyMLMHead(cfg)
        _init_bert(self.cls.predictions.transform.dense, cfg.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def hidden(self, input_ids, attention_mask, image, past=None, use_cache=False):
        return self.bert(input_ids, attention_mask, image=image, causal=True, past=past, use_cache=use_cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions(hidden)

    def head_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states right before the vocabulary projection (for the fused LM cross-entropy)."""
        return self.cls.predictions.transform(hidden)

    def forward(self, input_ids, attention_mask, image, past=None, use_cache=False):
        out = self.hidden(input_ids, attention_mask, image, past=past, use_cache=use_cache)
        if use_cache:
            return self.logits(out[0]), out[1]
        return self.logits(out)


def tie_encoder_decoder(encoder: BertModel, decoder: BertModel) -> None:
    """BLIP pretraining: encoder and decoder share every parameter except self-attention (skip key
    '/attention' of the official ``tie_encoder_decoder_weights``): embeddings, cross-attention, FFN, norms."""
    decoder.embeddings = encoder.embeddings
    for le, ld in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        ld.crossattention = le.crossattention
        ld.intermediate = le.intermediate
        ld.output = le.output


def _init_bert(m: nn.Module, std: float) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
