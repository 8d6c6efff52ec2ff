"""Attention dispatch: one resolution per model, env override, clear errors for missing backends."""

import pytest
import torch

from fastblip.config import tiny_config
from fastblip.models.blip import build_model
from fastblip.ops.attention import (
    HAS_FLASH_ATTN,
    HAS_XFORMERS,
    BackendUnavailable,
    attention,
    resolve_attention_backend,
)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_attention_backend("nope")


@pytest.mark.skipif(HAS_FLASH_ATTN and torch.cuda.is_available(), reason="flash-attn is usable here")
def test_missing_flash_attn_names_what_is_missing():
    with pytest.raises(BackendUnavailable, match="flash_attn"):
        resolve_attention_backend("flash_attn")


@pytest.mark.skipif(HAS_XFORMERS and torch.cuda.is_available(), reason="xformers is usable here")
def test_missing_xformers_names_what_is_missing():
    with pytest.raises(BackendUnavailable, match="xformers"):
        resolve_attention_backend("xformers")


def test_env_override_reaches_every_module(monkeypatch):
    monkeypatch.setenv("FASTBLIP_ATTENTION", "reference")
    cfg = tiny_config("caption")
    cfg.attention_backend = None  # let the environment decide
    model = build_model(cfg)
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"reference"}


@pytest.mark.parametrize("causal,padded", [(False, False), (True, True), (False, True)])
def test_sdpa_equals_reference_odd_sizes(causal, padded):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 5, n, 24) for n in (7, 7 if causal else 13, 7 if causal else 13))
    mask = None
    if padded:
        mask = torch.ones(3, k.shape[2], dtype=torch.bool)
        mask[1, -3:] = False
    ref = attention(q, k, v, key_padding_mask=mask, causal=causal, backend="reference")
    for be in ("sdpa", "auto"):
        out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend=be)
        assert (out - ref).abs().max() < 1e-5
