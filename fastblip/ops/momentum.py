"""Momentum-encoder update and feature-queue write (BLIP_SPEC §2; DESIGN §4.8).

The official code updates the momentum encoders with a Python loop of per-parameter ops (hundreds of small
kernel launches) and advances the queue pointer with ``int(self.queue_ptr)`` (a host sync each step).
Here: two multi-tensor ``_foreach`` calls, and an enqueue whose row indices are computed on device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def momentum_update_(params_m: list[torch.Tensor], params: list[torch.Tensor], m: float) -> None:
    """In place: p_m = p_m * m + p * (1 - m) for every pair, as the official ``_momentum_update``."""
    if len(params_m) != len(params):
        raise ValueError(f"momentum_update_: {len(params_m)} momentum params vs {len(params)} params")
    if not params_m:
        return
    pm = [p.detach() for p in params_m]
    torch._foreach_mul_(pm, m)
    torch._foreach_add_(pm, [p.detach() for p in params], alpha=1.0 - m)


@torch.no_grad()
def enqueue_(queue_QD: torch.Tensor | Sequence[torch.Tensor], feats_BD: torch.Tensor | Sequence[torch.Tensor],
             ptr_tensor: torch.Tensor) -> None:
    """Write ``feats_BD`` into rows ptr, ptr+1, ... (mod Q) of ``queue_QD`` and advance ``ptr_tensor`` by B
    (mod Q), all on device (no host sync). Queues are row-major (Q, ...), e.g. (57,600, 256); several queues
    sharing one pointer (image, text, idx) are passed as sequences and the pointer advances once.
    With Q a multiple of B (the official assert) this equals the official slice write."""
    queues = [queue_QD] if isinstance(queue_QD, torch.Tensor) else list(queue_QD)
    feats = [feats_BD] if isinstance(feats_BD, torch.Tensor) else list(feats_BD)
    if len(queues) != len(feats) or not queues:
        raise ValueError(f"enqueue_: {len(queues)} queues vs {len(feats)} feature tensors")
    Q = queues[0].shape[0]
    B = feats[0].shape[0]
    if B > Q:
        raise ValueError(f"enqueue_: batch {B} larger than queue {Q}")
    if ptr_tensor.numel() != 1 or ptr_tensor.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"enqueue_: ptr_tensor must hold one integer, got shape {tuple(ptr_tensor.shape)} "
                         f"{ptr_tensor.dtype}")
    for q, f in zip(queues, feats):
        if q.shape[0] != Q or f.shape[0] != B or q.shape[1:] != f.shape[1:]:
            raise ValueError(f"enqueue_: queue {tuple(q.shape)} and features {tuple(f.shape)} do not match")
    ptr = ptr_tensor.reshape(()).to(torch.int64)
    rows = (ptr + torch.arange(B, device=ptr_tensor.device)) % Q
    for q, f in zip(queues, feats):
        q.index_copy_(0, rows.to(q.device), f.detach().to(q.dtype))
    ptr_tensor.copy_(((ptr + B) % Q).reshape(ptr_tensor.shape))
