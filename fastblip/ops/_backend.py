"""Backend resolution for the fused ops (ITC loss, hard-negative sampling, cross-attention, LM CE).

``backend=None`` picks the fastest *measured* path on CUDA (``CUDA_DEFAULT`` below) and ``"reference"``
(plain PyTorch, the official BLIP computation) elsewhere. ``FASTBLIP_OPS_BACKEND=triton|reference`` overrides
the default for every op. ``"triton"`` asked for
explicitly on CPU tensors works only under Triton's interpreter (``TRITON_INTERPRET=1``, which must be set
before ``triton`` is imported); otherwise it raises one clear error. Each (op, backend) choice is logged
once, outside ``torch.compile`` tracing, so a silent slow path shows up in the log.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fastblip.ops")

try:  # optional dependency, checked once; the error is kept for the message
    import triton  # noqa: F401

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = repr(e)

# Read once: the interpreter is chosen when triton is imported, so a later change would not take effect.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BACKENDS = ("reference", "triton")

# The default on CUDA per op, from the only H100 measurement we have (torch 2.11, triton 3.6, 2026-11-23,
# benchmarks/results/kernels_base_NVIDIA-H100-80GB-HBM3_2026-11-23.*, forward + backward, BLIP shapes).
# That run used an earlier version of the ITC and sampling kernels (ITC 40 ms vs 1.3 ms for the reference
# from fp32 dots spilling registers; sampling failed to compile on a 1e-38 constant); both were fixed after
# it and pass on CPU under the interpreter, but are not yet re-measured on a GPU, so the default stays on the
# reference until a benchmark shows the kernel ahead. cross_attention measured 1.14x/1.22x the eager
# reference at Lk 197/577 with 40-48% less memory; lm_cross_entropy was 0.9x the reference but 35% less memory.
CUDA_DEFAULT = {"itc_loss": "reference", "sample_hard_negatives": "reference", "cross_attention": "triton",
                "lm_cross_entropy": "reference"}
_LOGGED: set[tuple[str, str]] = set()


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run on these tensors/this machine."""


def resolve_backend(op: str, backend: str | None, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``op`` on ``tensors`` (None entries ignored)."""
    if backend is not None and backend not in BACKENDS:
        raise BackendUnavailableError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS} or None")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend is None:
        backend = os.environ.get("FASTBLIP_OPS_BACKEND") or None
    if backend is None:
        chosen = CUDA_DEFAULT.get(op, "triton") if (on_cuda and HAS_TRITON) else "reference"
    elif backend == "triton":
        if not HAS_TRITON:
            raise BackendUnavailableError(f"{op}: backend='triton' requested but triton failed to import: "
                                          f"{TRITON_IMPORT_ERROR}")
        if not on_cuda and not TRITON_INTERPRET:
            raise BackendUnavailableError(f"{op}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set "
                                          "before triton is imported (or move the tensors to CUDA)")
        chosen = "triton"
    else:
        chosen = "reference"
    if not torch.compiler.is_compiling() and (op, chosen) not in _LOGGED:
        _LOGGED.add((op, chosen))
        how = "interpreter" if chosen == "triton" and not on_cuda else ("cuda" if on_cuda else "cpu")
        log.info("fastblip.ops.%s: backend=%s (%s, requested %s)", op, chosen, how, backend)
    return chosen
