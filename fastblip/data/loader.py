"""``open_loader`` (a recipe's ``data`` section, whole) and ``build_loader`` (the same with keywords): the one
entry point of every task's training and evaluation to its data. A task differs only by its sample format
(formats.py: captions, VQA, NLVR2, video); the stream, the backends and everything below are shared.

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
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fastblip.errors import ConfigError

from .dataset import BlipStream, StreamConfig, merge_counts, worker_units
from .decode import max_image_bytes, max_text_bytes
from .formats import CAPTIONS, SampleFormat
from .readers import SourceError, Sources, parse_sources, preflight
from .section import DataSection
from .tokenizer import load_tokenizer
from .transforms import eval_transform, train_transform

STATE_VERSION = 1
_KEY_OF = {"seed": "train.seed", "world_size": "number of ranks", "num_workers": "data.num_workers"}


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
                raise ConfigError(f"data position saved with {k}={state.get(k)}, this loader has {k}={have}: resume "
                                  f"with the run's {_KEY_OF[k]}")
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


def open_loader(
    data: DataSection,
    *,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    device=None,
    fmt: SampleFormat = CAPTIONS,
    batch_size: int | None = None,
    prompt: str | None = None,
    tokenizer=None,
    shuffle: bool | None = None,
    drop_last: bool | None = None,
    shuffle_buffer: int = 256,
    pin_memory: bool | None = None,
):
    """The loader of a recipe's ``data`` section (``data.train`` when ``train``, else ``data.eval``) for a task
    whose samples are ``fmt`` (captions, VQA, NLVR2, video: formats.py), positioned at ``epoch``.

    Every task reads through here, so sources, sharding (ranks × workers), shuffling, bad-input
    skip-and-count, input limits, padding, the PIL/DALI backend and exact resume are the same for all.
    ``train`` picks the transform (RandomResizedCrop(scale=(min_scale, 1)) + flip unless ``hflip=False`` +
    RandomAugment; eval: resize) and the defaults shuffle = drop_last = train. Caption JSON sources in train
    mode give one sample per (image, caption), in eval mode one per image (``meta["captions"]`` holds them
    all). ``batch_size`` / ``prompt`` override the section's (eval batch sizes; the captioner's prompt is
    training-only). Raises before any work when nothing is readable.
    """
    d = data
    if d.backend not in ("pil", "dali"):
        raise ConfigError(f"data.backend must be 'pil' or 'dali', got {d.backend!r}")
    bs = d.batch_size if batch_size is None else batch_size
    if bs < 1 or d.image_size < 1:
        raise ConfigError(f"data.batch_size and data.image_size must be positive, got {bs}, {d.image_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    shuffle = train if shuffle is None else shuffle
    drop_last = train if drop_last is None else drop_last
    src = parse_sources(d.sources(train), flatten_json=train, fmt=fmt)
    preflight(src, fmt)
    cfg = StreamConfig(
        shards=src.shards, json_items=src.json_items, batch_size=bs, train=train,
        shuffle=shuffle, drop_last=drop_last, resampled=d.resampled and train, seed=seed, rank=rank,
        world_size=world_size, num_workers=d.num_workers, shuffle_buffer=shuffle_buffer,
        max_words=d.max_words, max_length=d.max_length, prompt=(d.prompt if prompt is None else prompt),
        padding=d.padding, max_image_bytes=d.max_image_bytes, max_text_bytes=d.max_text_bytes,
    )  # fmt: skip
    per_epoch = d.batches_per_epoch if train else None
    if d.backend == "dali":
        from .dali import DaliLoader, DaliPlan, require_dali

        require_dali()
        plan = DaliPlan(d.image_size, train, (d.min_scale, 1.0), d.randaugment, d.hflip)
        inner = Loader(BlipStream(cfg, plan, tok, fmt), src, pin_memory=False, batches_per_epoch=per_epoch)
        loader = DaliLoader(inner, device=device, num_threads=max(2, d.num_workers))
    else:
        tf = train_transform(d.image_size, (d.min_scale, 1.0), d.randaugment, d.hflip) if train else \
            eval_transform(d.image_size)  # fmt: skip
        if pin_memory is None:
            pin_memory = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        loader = Loader(BlipStream(cfg, tf, tok, fmt), src, pin_memory=pin_memory, device=device,
                        batches_per_epoch=per_epoch)  # fmt: skip
    loader.set_epoch(epoch)
    return loader


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
    fmt: SampleFormat = CAPTIONS,
):
    """``open_loader`` for library use without a recipe: the same loader over shard specs and/or BLIP JSON
    files (see readers.py for the spec syntax), its settings as keywords. ``padding``: "longest",
    "max_length" or "buckets:8,16,24,32". Input limits: the process's (decode.py)."""
    srcs = [sources] if isinstance(sources, (str, dict, Path)) else list(sources or [])
    if not srcs:
        raise SourceError("no data source given")
    section = DataSection(
        train=srcs if train else [], eval=[] if train else srcs, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, backend=backend, max_words=max_words,
        max_length=max_length, min_scale=min_scale, randaugment=randaugment, hflip=hflip, padding=padding,
        prompt=prompt, resampled=resampled, batches_per_epoch=batches_per_epoch,
        max_image_bytes=max_image_bytes(), max_text_bytes=max_text_bytes(),
    )  # fmt: skip
    return open_loader(section, train=train, seed=seed, rank=rank, world_size=world_size, device=device, fmt=fmt,
                       tokenizer=tokenizer, shuffle=shuffle, drop_last=drop_last, shuffle_buffer=shuffle_buffer,
                       pin_memory=pin_memory)  # fmt: skip
