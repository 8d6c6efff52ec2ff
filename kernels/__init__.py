"""fastblip.kernels: Triton kernels, one file per op, each in Liger-Kernel's four layers:
``@triton.jit`` kernel(s) -> launcher (shape checks, block sizes) -> autograd (a ``torch.library.custom_op``
with ``register_fake`` + ``register_autograd``, which is what lets ``torch.compile(fullgraph=True)`` trace
through it) -> thin function. ``fastblip.ops`` decides when to call them; models never import this package.

Modules: ``itc_loss``, ``hard_negatives``, ``cross_attention``, ``lm_cross_entropy``.
"""

from __future__ import annotations

import os

import torch

# Triton's interpreter (CPU) computes tl.dot on bf16 operands wrongly (rel. error ~6e9 on a 32x32 product,
# PLATFORM_NOTES); when interpreting, every tile is upcast to fp32 before tl.dot. On GPU bf16 dots stay bf16.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles of ``dtype`` are upcast to fp32 before tl.dot."""
    return INTERPRET or dtype == torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs on GPU use "tf32x3" (three TF32 tensor-core products, ~fp32 accuracy: the kernels match
    the fp32 reference to ~1e-6 instead of TF32's ~1e-3); "ieee" fp32 dots run on FMA units and with
    256-wide ITC tiles spilled registers (40 ms vs 1.3 ms for the reference on an H100). The interpreter
    computes in numpy fp32 whatever is asked."""
    if INTERPRET:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: dtype {t.dtype} not supported (float32, bfloat16 or float16)")
