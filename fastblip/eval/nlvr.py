"""NLVR2 accuracy (official ``train_nlvr.evaluate``: argmax of the 2-way logits against the labels)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastblip.errors import InputError


@torch.no_grad()
def evaluate_nlvr(model, loader, *, dtype: torch.dtype | None = None) -> dict[str, float]:
    """{"nlvr_acc": percent, "num": n}; under torchrun the counts of every rank are summed."""
    dev = model.device
    ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.autocast(dev.type, enabled=False)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    total = torch.zeros((), dtype=torch.long, device=dev)
    with ctx:
        for b in loader:
            logits = model.nlvr_logits(b.pixel_values.to(dev), b.pixel_values_1.to(dev), b.input_ids.to(dev),
                                       b.attention_mask.to(dev))
            correct += (logits.argmax(dim=1) == b.labels.to(dev)).sum()
            total += b.labels.numel()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(total)
    n = int(total)  # sync: once, at the end
    if n == 0:
        raise InputError("NLVR2 evaluation: the loader yielded no samples")
    return {"nlvr_acc": 100.0 * int(correct) / n, "num": n}
