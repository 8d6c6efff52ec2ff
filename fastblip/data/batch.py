"""The caption batch every loader backend yields, its tokenisation (run in the workers by the sample formats'
``collate_text``, formats.py), and what the workers hand the DALI backend.

Legend: B batch, L text length (the batch's longest caption, or its length bucket), H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


class TensorFields:
    """``len``, ``to`` and ``pin_memory`` for a batch dataclass: every tensor field moves, the rest is kept."""

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def _map(self, fn):
        return replace(self, **{f.name: fn(v) for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def to(self, device, non_blocking: bool = True):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return self._map(lambda t: t.pin_memory())


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (B, 3, H, W) float, normalised
    input_ids: torch.Tensor  # (B, L) long, [CLS] ... [SEP] then pad 0
    attention_mask: torch.Tensor  # (B, L) long
    image_ids: torch.Tensor  # (B,) long: equal ids = same image (retrieval positives)
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)  # per sample: {"noisy": bool | None, "shard": str, ...}

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device, non_blocking: bool = True) -> Batch:
        return Batch(
            self.pixel_values.to(device, non_blocking=non_blocking),
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
            self.image_ids.to(device, non_blocking=non_blocking),
            self.keys,
            self.texts,
            self.meta,
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.pixel_values.pin_memory(),
            self.input_ids.pin_memory(),
            self.attention_mask.pin_memory(),
            self.image_ids.pin_memory(),
            self.keys,
            self.texts,
            self.meta,
        )


def bucket_length(n: int, buckets: tuple[int, ...], max_length: int) -> int:
    """Smallest bucket ≥ n (static shapes for torch.compile: a handful of lengths instead of ~30)."""
    for b in buckets:
        if b >= n:
            return min(b, max_length)
    return max_length


def tokenize(texts: list[str], tokenizer, max_length: int = 35, padding: str = "longest") -> dict:
    """``input_ids`` / ``attention_mask`` (B, L). ``padding``: "longest", "max_length" or "buckets:8,16,24,32";
    "auto" is "longest" here (a compiled training run resolves it to buckets first: fastblip.backends)."""
    if padding == "auto":
        padding = "longest"
    if padding.startswith("buckets"):
        enc = tokenizer(texts, max_length=max_length, padding="longest")
        spec = padding.partition(":")[2] or "8,16,24,32,40"
        buckets = tuple(sorted(int(x) for x in spec.split(",")))
        target = bucket_length(enc["input_ids"].shape[1], buckets, max_length)
        pad = target - enc["input_ids"].shape[1]
        if pad > 0:
            enc = {k: torch.nn.functional.pad(v, (0, pad)) for k, v in enc.items()}
        return enc
    return tokenizer(texts, max_length=max_length, padding=padding)


@dataclass
class EncodedBatch:
    """What the loader workers hand a GPU decoder (data/dali.py): still-encoded images, each image's drawn
    transform, and the collated text part of the task's batch. ``data`` holds the payloads back to back (one
    shared-memory tensor crosses the worker boundary instead of B·K pickled byte strings); payload j is
    ``data[offsets[j]:offsets[j + 1]]``, and sample i owns payloads ``i·K .. i·K + K − 1`` (K images per
    sample: 1, or 2 for NLVR2). ``fields`` keeps each sample's uncollated text fields so a batch can be
    re-collated without some of its samples (the PIL fallback)."""

    data: torch.Tensor  # (total,) uint8
    offsets: list[int]  # B·K + 1
    params: list  # per payload: TrainParams (train) or None (eval)
    text: dict = field(default_factory=dict)  # SampleFormat.collate_text of the samples
    image_ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)
    per_sample: int = 1  # K

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.per_sample

    def payload(self, j: int) -> bytes:
        return self.data[self.offsets[j] : self.offsets[j + 1]].numpy().tobytes()
