"""fastblip.ops: the dispatch layer. Each op has a plain-PyTorch reference (the official BLIP computation)
and picks the fastest available backend; models call these, never ``fastblip.kernels`` directly."""

from fastblip.backends import BackendUnavailableError
from fastblip.ops._backend import resolve_backend
from fastblip.ops.attention import attention
from fastblip.ops.cross_attention import cross_attention, cross_attention_reference
from fastblip.ops.itc import itc_loss, itc_loss_reference
from fastblip.ops.lm_loss import lm_cross_entropy, lm_cross_entropy_reference
from fastblip.ops.momentum import enqueue_, momentum_update_
from fastblip.ops.sampling import sample_hard_negatives, sample_hard_negatives_reference

__all__ = [
    "BackendUnavailableError",
    "attention",
    "cross_attention",
    "cross_attention_reference",
    "enqueue_",
    "itc_loss",
    "itc_loss_reference",
    "lm_cross_entropy",
    "lm_cross_entropy_reference",
    "momentum_update_",
    "resolve_backend",
    "sample_hard_negatives",
    "sample_hard_negatives_reference",
]
