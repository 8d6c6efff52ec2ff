"""``build_loader``: the one entry point of training, eval and capfilt to their data.

Backends: ``pil`` (default): DataLoader workers decode with PIL, transform, tokenise and collate, and
batches come back pinned; ``dali``: the same workers read, validate, tokenise and draw each sample's
transform, and DALI decodes (nvJPEG on the GPU) and transforms (see dali.py). Both yield ``Batch``, and
share sources, sharding, shuffling, bad-input handling and resume states.

Epochs: iterate once per epoch; a pass that runs to its end advances ``epoch`` by one (``set_epoch``
overrides). ``state_dict()`` after any batch is the data position (epoch, batches consumed, each
worker's stream position and which worker is due next); a loader given it with ``load_state_dict`` yields
exactly the batches, augmentations included, that the uninterrupted run would have yielded next, with the
same seed, rank, world size and worker count (tests/test_data_loader.py).

Multi-GPU with web shards: ranks get whole shards, so their sample counts differ; use
``resampled=True`` with ``batches_per_epoch`` (as open_clip does) to keep DDP ranks in step. JSON sources
are padded to equal counts per rank.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils.data import DataLoader

from .dataset import BlipStream, StreamConfig, merge_counts, worker_units
from .readers import Sources, parse_sources, preflight
from .tokenizer import load_tokenizer
from .transforms import eval_transform, train_transform

STATE_VERSION = 1


class Loader:
    """Iterable of Batch with set_epoch / state_dict / load_state_dict / stats / len."""

    def __init__(self, stream: BlipStream, sources: Sources, *, pin_memory: bool, device=None,
                 batches_per_epoch: int | None = None, prefetch_factor: int = 4):  # fmt: skip
        self.stream, self.sources = stream, sources
        self.cfg = stream.cfg
        self.device = torch.device(device) if device is not None else None
        self.pin_memory = pin_memory
        self.batches_per_epoch = batches_per_epoch
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.batches = 0
        self._positions: dict[int, dict] = {}
        self._rotation = 0
        self.stats: dict = {"ok": 0, "skipped": {}, "converted": {}}

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches, self._positions, self._rotation = int(epoch), 0, {}, 0

    def state_dict(self) -> dict:
        c = self.cfg
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches,
            "positions": copy.deepcopy(self._positions), "rotation": self._rotation,
            "seed": c.seed, "rank": c.rank, "world_size": c.world_size, "num_workers": c.workers,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        c = self.cfg
        for k, have in (("seed", c.seed), ("world_size", c.world_size), ("num_workers", c.workers)):
            if state.get(k) != have:
                raise ValueError(f"data position saved with {k}={state.get(k)}, this loader has {k}={have}")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        self._positions = {int(g): p for g, p in state["positions"].items()}
        self._rotation = int(state["rotation"])

    def __len__(self) -> int:
        c = self.cfg
        if c.resampled or self.sources.shards:
            if self.batches_per_epoch:
                return self.batches_per_epoch
            raise TypeError("length of a webdataset/resampled loader is unknown; pass batches_per_epoch")
        n = 0
        for w in range(c.workers):
            g = c.rank * c.workers + w
            k = sum(len(u[1]) for u in worker_units(c, g, self.epoch))
            n += k // c.batch_size if c.drop_last else math.ceil(k / c.batch_size)
        return min(n, self.batches_per_epoch) if self.batches_per_epoch else n

    def _dataloader(self) -> DataLoader:
        self.stream.epoch = self.epoch
        self.stream.resume = copy.deepcopy(self._positions)
        self.stream.rotation = self._rotation
        kw = {}
        if self.cfg.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        return DataLoader(self.stream, batch_size=None, num_workers=self.cfg.num_workers,
                          pin_memory=self.pin_memory, **kw)  # fmt: skip

    def __iter__(self):
        W = self.cfg.workers
        if self.batches_per_epoch and self.batches >= self.batches_per_epoch:
            self.set_epoch(self.epoch + 1)
        for batch, info in self._dataloader():
            merge_counts(self.stats, info["counts"])
            self._positions[info["g"]] = info["pos"]
            self._rotation = (info["w"] + 1) % W
            if batch is None:
                continue
            self.batches += 1
            yield batch.to(self.device, non_blocking=True) if self.device is not None else batch
            if self.batches_per_epoch and self.batches >= self.batches_per_epoch:
                break
        self.set_epoch(self.epoch + 1)


def build_loader(
    sources,
    *,
    image_size: int,
    batch_size: int,
    train: bool,
    tokenizer=None,
    max_words: int = 30,
    max_length: int = 35,
    prompt: str = "",
    min_scale: float = 0.2,
    randaugment: bool = True,
    hflip: bool = True,
    backend: str = "pil",
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    resampled: bool = False,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    padding: str = "longest",
    device=None,
    batches_per_epoch: int | None = None,
    shuffle_buffer: int = 256,
    pin_memory: bool | None = None,
):
    """A Loader over shard specs and/or BLIP JSON files (see readers.py for the spec syntax).

    ``train`` picks the transform (train: RandomResizedCrop(scale=(min_scale, 1)) + flip (unless ``hflip=False``) + RandomAugment;
    eval: resize) and the defaults shuffle=drop_last=train. JSON sources in train mode give one sample per
    (image, caption); in eval mode one per image (``meta["captions"]`` holds them all). ``padding``:
    "longest", "max_length" or "buckets:8,16,24,32". Raises before any work when nothing is readable.
    """
    if backend not in ("pil", "dali"):
        raise ValueError(f"backend must be 'pil' or 'dali', got {backend!r}")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size}, {image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    src = parse_sources(sources, flatten_json=train)
    preflight(src)
    cfg = StreamConfig(
        shards=src.shards, json_items=src.json_items, batch_size=batch_size, train=train,
        shuffle=shuffle, drop_last=drop_last, resampled=resampled, seed=seed, rank=rank,
        world_size=world_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
        max_words=max_words, max_length=max_length, prompt=prompt, padding=padding,
    )  # fmt: skip
    if backend == "dali":
        from .dali import DaliLoader, DaliPlan

        plan = DaliPlan(image_size, train, (min_scale, 1.0), randaugment, hflip)
        inner = Loader(BlipStream(cfg, plan, tok), src, pin_memory=False, batches_per_epoch=batches_per_epoch)
        return DaliLoader(inner, device=device, num_threads=max(2, num_workers))
    tf = train_transform(image_size, (min_scale, 1.0), randaugment, hflip) if train else eval_transform(image_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    stream = BlipStream(cfg, tf, tok)
    return Loader(stream, src, pin_memory=pin_memory, device=device, batches_per_epoch=batches_per_epoch)
