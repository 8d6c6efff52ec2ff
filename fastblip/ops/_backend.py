"""Per-call backend choice of the fused ops (ITC loss, hard-negative sampling, cross-attention, LM CE).

A thin entry to the one resolver, ``fastblip.backends.resolve_op``: ``backend=None``/``"auto"`` picks the
measured CUDA default (``fastblip.backends.CUDA_DEFAULT``) on CUDA tensors and the reference elsewhere;
``FASTBLIP_OPS_BACKEND`` overrides ``auto``; an explicit ``"triton"`` on CPU tensors works only under Triton's
interpreter (``TRITON_INTERPRET=1``), otherwise it raises. A run resolves every op once (``Backends``) and
passes the concrete choice, so this per-call path is for library calls.
"""

from __future__ import annotations

import torch

from fastblip.backends import CUDA_DEFAULT, HAS_TRITON, TRITON_INTERPRET, BackendUnavailableError, resolve_op

__all__ = ["CUDA_DEFAULT", "HAS_TRITON", "TRITON_INTERPRET", "BackendUnavailableError", "resolve_backend"]


def resolve_backend(op: str, backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``op`` on ``tensors`` (None entries ignored)."""
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    return resolve_op(op, backend, "cuda" if on_cuda else "cpu")
