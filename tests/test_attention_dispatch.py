"""Attention dispatch: one resolution per model, env override over auto, clear errors for what cannot be served."""

import pytest
import torch

from fastblip.backends import HAS_FLASH_ATTN, HAS_XFORMERS, BackendUnavailableError, resolve_attention
from fastblip.config import tiny_config
from fastblip.models import build_model
from fastblip.ops.attention import attention


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_attention("nope")


@pytest.mark.skipif(HAS_FLASH_ATTN and torch.cuda.is_available(), reason="flash-attn is usable here")
def test_missing_flash_attn_names_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="flash_attn"):
        resolve_attention("flash_attn")


@pytest.mark.skipif(HAS_XFORMERS and torch.cuda.is_available(), reason="xformers is usable here")
def test_missing_xformers_names_what_is_missing():
    with pytest.raises(BackendUnavailableError, match="xformers"):
        resolve_attention("xformers")


@pytest.mark.parametrize("requested", [None, "auto"])
def test_env_override_over_auto_reaches_every_module(monkeypatch, requested):
    monkeypatch.setenv("FASTBLIP_ATTENTION", "reference")
    cfg = tiny_config("caption")
    cfg.attention_backend = requested  # the default config says "auto": the environment decides
    model = build_model(cfg)
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"reference"}


def test_env_does_not_override_an_explicit_request(monkeypatch):
    monkeypatch.setenv("FASTBLIP_ATTENTION", "reference")
    assert resolve_attention("sdpa") == "sdpa"


def test_flash_attn_with_a_padding_mask_is_refused_not_substituted():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(BackendUnavailableError, match="key-padding mask"):
        attention(q, q, q, key_padding_mask=torch.ones(1, 3, dtype=torch.bool), backend="flash_attn")


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
