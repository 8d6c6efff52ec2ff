"""The batch every loader backend yields, and its collate (tokenisation happens here, in the workers).

Legend: B batch, L text length (the batch's longest caption, or its length bucket), H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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


def collate(
    pixel_values: list[torch.Tensor],
    texts: list[str],
    image_ids: list[int],
    keys: list[str],
    meta: list[dict],
    tokenizer,
    max_length: int = 35,
    padding: str = "longest",
) -> Batch:
    """Stack images, tokenise texts. ``padding``: "longest", "max_length" or "buckets:8,16,24,32"."""
    enc = tokenize(texts, tokenizer, max_length, padding)
    return Batch(
        pixel_values=torch.stack(pixel_values),
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        image_ids=torch.tensor(image_ids, dtype=torch.long),
        keys=list(keys),
        texts=list(texts),
        meta=list(meta),
    )


@dataclass
class EncodedBatch:
    """What the loader workers hand a GPU decoder (data/dali.py): still-encoded images, each sample's drawn
    transform, and the tokenised texts. ``data`` holds the payloads back to back (one shared-memory tensor
    crosses the worker boundary instead of B pickled byte strings); sample i is
    ``data[offsets[i]:offsets[i + 1]]``.
    """

    data: torch.Tensor  # (total,) uint8
    offsets: list[int]  # B + 1
    params: list  # per sample: TrainParams (train) or None (eval)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_ids: torch.Tensor
    keys: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def payload(self, i: int) -> bytes:
        return self.data[self.offsets[i] : self.offsets[i + 1]].numpy().tobytes()
