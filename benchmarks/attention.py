"""Attention backends at BLIP's shapes (DESIGN §4.2: measure, don't assume, which SDPA kernel to pin).

Forward + backward of one attention call, bf16 on CUDA (fp32 on CPU), head dim 64, 12 heads:
self-attention over 197 / 577 image tokens, text self-attention (35, causal and padded) and
text->image cross-attention (35 x 197, 35 x 577). Rows compare the reference (explicit softmax),
SDPA with PyTorch's own choice, and each SDPA kernel forced (those that refuse the shape record why).
"""

from __future__ import annotations

import torch

from benchmarks.common import time_fn
from fastblip.ops.attention import attention


def _cases(size: str):
    if size == "tiny":
        return [("self-17", 4, 4, 17, 17, 16, False, False), ("cross-9x17", 4, 4, 9, 17, 16, False, True)]
    B = 64 if size == "base" else 32
    return [
        ("vit-self-197", B, 12, 197, 197, 64, False, False),
        ("vit-self-577", B // 2, 12, 577, 577, 64, False, False),
        ("text-causal-35", 3 * B, 12, 35, 35, 64, True, True),
        ("cross-35x197", 3 * B, 12, 35, 197, 64, False, False),
        ("cross-35x577", B, 12, 35, 577, 64, False, False),
    ]


def run(device: str = "cpu", size: str = "tiny", on_row=None) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    impls = ["reference", "sdpa", "auto"]
    forced = []
    if device == "cuda":
        from torch.nn.attention import SDPBackend

        forced = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    for name, B, H, Lq, Lk, D, causal, padded in _cases(size):
        q = torch.randn(B, H, Lq, D, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, H, Lk, D, device=device, dtype=dtype, requires_grad=True)
        mask = None
        if padded:
            lens = torch.randint(Lk // 3, Lk + 1, (B,), device=device)
            mask = torch.arange(Lk, device=device)[None] < lens[:, None]
        g = torch.randn(B, H, Lq, D, device=device, dtype=dtype)

        def step(backend, ctx=None, q=q, k=k, v=v, mask=mask, causal=causal, g=g):
            def fn():
                q.grad = k.grad = v.grad = None
                if ctx is None:
                    out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend=backend)
                else:
                    from torch.nn.attention import sdpa_kernel

                    with sdpa_kernel([ctx]):
                        out = attention(q, k, v, key_padding_mask=mask, causal=causal, backend="sdpa")
                out.backward(g)
            return fn

        base = None
        for impl in impls + [f"sdpa-{b.name.lower()}" for b in forced]:
            ctx = next((b for b in forced if impl == f"sdpa-{b.name.lower()}"), None)
            row = {"suite": "attention", "case": name, "impl": impl, "shape": f"{B}x{H}x{Lq}x{Lk}x{D}",
                   "dtype": str(dtype).replace("torch.", "")}
            try:
                t = time_fn(step(impl if ctx is None else "sdpa", ctx), device, warmup=3, iters=10)
                row.update(t)
                if impl == "reference":
                    base = t["ms_median"]
                row["speedup_vs_reference"] = base / t["ms_median"] if base else None
            except RuntimeError as e:  # a forced kernel that refuses this shape/mask
                row["error"] = str(e).splitlines()[0][:120]
            rows.append(row)
    return rows
