"""The per-worker sample stream: split, shuffle, decode, transform, tokenise, batch; with exact resume.

Each *logical* worker g = rank·W + w (W DataLoader workers, at least 1) owns a list of units (tar shards
and slices of JSON items) drawn from (seed, epoch): shards are permuted per epoch and dealt g, g+G, ...
(G = world·W, so ranks × workers are disjoint); JSON items are permuted and dealt the same way, padded to
a multiple of G in training so every rank sees the same count. Resampled mode draws units with
replacement, forever. Samples are shuffled in *blocks* of ``shuffle_buffer`` raw samples with an RNG
seeded by (seed, epoch, g, block), and each sample's augmentation RNG by (seed, epoch, g, block, i).

So a worker's position is (block number, the unit and offset where that block starts, samples of the
block already emitted): resuming re-reads at most one block's bytes from one shard, without decoding them,
and then yields exactly the samples and augmentations the uninterrupted run would. Each item the stream
yields is ``(batch or None, info)``; ``info`` carries the logical worker, its position and the counts
(ok / skipped by reason / converted modes) since the previous item, which the Loader merges.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    max_image_bytes,
    max_text_bytes,
    read_regular_file,
)
from .formats import CAPTIONS, SampleFormat
from .readers import iter_tar

log = logging.getLogger("fastblip.data")
MAX_LOGGED = 5  # per worker: the first few bad samples are logged with shard and key, the rest only counted


@dataclass
class StreamConfig:
    shards: list[str]
    json_items: list[dict]
    batch_size: int
    train: bool
    shuffle: bool
    drop_last: bool
    resampled: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 256
    json_unit: int = 256  # JSON items per unit: interleaves human-annotated and web units when mixed
    max_words: int = 30
    max_length: int = 35
    prompt: str = ""
    padding: str = "longest"
    max_pixels: int = DEFAULT_MAX_PIXELS
    # input size limits (decode.py): an image file / tar member, and a caption / .json member. A recipe's
    # come from data.max_image_bytes / data.max_text_bytes (open_loader); the defaults are the process's
    # (FASTBLIP_MAX_IMAGE_BYTES / FASTBLIP_MAX_TEXT_BYTES)
    max_image_bytes: int = field(default_factory=max_image_bytes)
    max_text_bytes: int = field(default_factory=max_text_bytes)
    extra: dict = field(default_factory=dict)

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def key_image_id(key: str) -> int:
    """img2dataset keys are digits ("000000123"): use them; otherwise a stable 62-bit hash of the key."""
    tail = key.rpartition("/")[2]
    if tail.isdigit() and len(tail) < 18:
        return int(tail)
    return (zlib.crc32(key.encode()) << 30) ^ zlib.adler32(key.encode())


def worker_units(cfg: StreamConfig, g: int, epoch: int, round_: int = 0) -> list[tuple]:
    """Units of logical worker g: ("tar", url) or ("json", item indices). Same on every rank and worker."""
    G = cfg.world_size * cfg.workers
    units: list[tuple] = []
    n_json, n_tar = len(cfg.json_items), len(cfg.shards)
    if cfg.resampled:
        r = _rng(cfg.seed, epoch, g, round_, 7)
        if n_tar:
            for i in r.integers(0, n_tar, size=max(1, math.ceil(n_tar / G))):
                units.append(("tar", cfg.shards[int(i)]))
        if n_json:
            idx = r.integers(0, n_json, size=max(1, math.ceil(n_json / G)))
            units += [("json", idx[i : i + cfg.json_unit]) for i in range(0, len(idx), cfg.json_unit)]
    else:
        if n_json:
            perm = _rng(cfg.seed, epoch, 1).permutation(n_json) if cfg.shuffle else np.arange(n_json)
            if cfg.train and cfg.world_size > 1 and n_json % G:
                # DistributedSampler's padding: equal counts per rank keep DDP ranks in step.
                perm = np.concatenate([perm, perm[: G - n_json % G]])
            mine = perm[g::G]
            units += [("json", mine[i : i + cfg.json_unit]) for i in range(0, len(mine), cfg.json_unit)]
        if n_tar:
            order = _rng(cfg.seed, epoch, 2).permutation(n_tar) if cfg.shuffle else np.arange(n_tar)
            units += [("tar", cfg.shards[int(i)]) for i in order[g::G]]
    if cfg.shuffle and len(units) > 1:
        units = [units[int(i)] for i in _rng(cfg.seed, epoch, g, round_, 3).permutation(len(units))]
    return units


class UnitCursor:
    """Raw samples of a worker from (unit, offset); ``pos`` is where the next sample comes from."""

    def __init__(self, cfg: StreamConfig, g: int, epoch: int, start: tuple[int, int], counts: dict):
        self.cfg, self.g, self.epoch, self.counts = cfg, g, epoch, counts
        self.units: list[tuple] = []
        self.rounds = 0
        self.pos = tuple(start)
        self._it = self._gen()

    def _unit(self, u: int) -> tuple | None:
        while u >= len(self.units):
            if self.rounds > 0 and not self.cfg.resampled:
                return None
            new = worker_units(self.cfg, self.g, self.epoch, self.rounds)
            self.rounds += 1
            if not new:
                return None
            self.units += new
        return self.units[u]

    def _gen(self) -> Iterator[dict]:
        u, skip = self.pos
        while (unit := self._unit(u)) is not None:
            kind, what = unit
            if kind == "json":
                samples = ({"__json__": self.cfg.json_items[int(i)]} for i in what)
            else:
                samples = iter_tar(what, self.counts, self.cfg.max_image_bytes, self.cfg.max_text_bytes)
            o = 0
            for s in samples:
                if o >= skip:
                    self.pos = (u, o + 1)
                    yield s
                o += 1
            u, skip = u + 1, 0
            self.pos = (u, 0)

    def take(self, n: int) -> list[dict]:
        out = []
        for s in self._it:
            out.append(s)
            if len(out) == n:
                break
        return out


class BlipStream(IterableDataset):
    def __init__(self, cfg: StreamConfig, transform, tokenizer, fmt: SampleFormat = CAPTIONS):
        super().__init__()
        self.cfg, self.transform, self.tokenizer, self.fmt = cfg, transform, tokenizer, fmt
        # A transform with ``encodes = True`` (dali.DaliPlan) gets the bytes instead of a decoded image:
        # ``encode(bytes, max_pixels, rng) -> (sample, converted)`` and ``collate(...) -> EncodedBatch``.
        self.encodes = bool(getattr(transform, "encodes", False))
        self.epoch = 0
        self.resume: dict[int, dict] = {}  # logical worker → position
        self.rotation = 0  # logical id of physical worker 0 (the worker due to yield the next batch)

    def __iter__(self):
        info = get_worker_info()
        p, W = (info.id, info.num_workers) if info is not None else (0, 1)
        if W != self.cfg.workers:
            raise RuntimeError(f"stream built for {self.cfg.workers} workers runs in {W}")
        w = (p + self.rotation) % W
        g = self.cfg.rank * W + w
        return self._worker(g, w)

    # -- one sample -------------------------------------------------------------------------------
    def _process(self, raw: dict, rng: np.random.Generator, counts: dict) -> tuple | None:
        """(pixels per image, text fields, image id, key, meta) of one raw sample, or None when skipped (the
        reason counted in ``counts``, the first few logged). The order of checks, and of draws from ``rng``
        (the format's fields, then each image's transform in order), is the same on both backends."""
        cfg, fmt = self.cfg, self.fmt
        payloads: list = []
        if "__json__" in raw:
            it = raw["__json__"]
            key, shard, image_id, meta_in = it["key"], it["image"], it["image_id"], it
            paths, text, problem = fmt.json_sample(it, cfg)
            for path in paths if problem is None else ():
                # a regular file only (not /dev/zero, not a FIFO), at most max_image_bytes
                data, problem = read_regular_file(path, cfg.max_image_bytes)
                if problem is not None:
                    shard = path
                    break
                payloads.append(data)
        else:
            key, shard = raw["__key__"], raw["__shard__"]
            if "__too_large__" in raw:  # a member over the input limits was never read (readers.iter_tar)
                payloads, text, meta_in, problem = [], None, {}, "too_large"
            else:
                payloads, text, meta_in, problem = fmt.tar_sample(raw, cfg)
            iid = meta_in.get("image_id")
            image_id = iid if isinstance(iid, int) and not isinstance(iid, bool) else key_image_id(key)
        fields = None
        if problem is None:
            fields, problem = fmt.fields(text, meta_in, cfg, rng)
        detail = problem
        if problem is None:
            try:
                if self.encodes:  # a GPU decoder downstream: validate and draw the transform, no pixels
                    done = [self.transform.encode(b, cfg.max_pixels, rng) for b in payloads]
                else:
                    done = [d for b in payloads for d in fmt.decode(b, cfg.max_pixels)]
            except DecodeError as e:
                problem, detail = e.reason, str(e)
            else:
                conv = counts["converted"]
                for _, converted in done:
                    if converted:
                        conv[converted] = conv.get(converted, 0) + 1
        if problem is not None:
            sk = counts["skipped"]
            sk[problem] = sk.get(problem, 0) + 1
            if self._logged < MAX_LOGGED:
                self._logged += 1
                log.warning("skipped sample %s in %s: %s", key, shard, detail)
            return None
        pixels = [d for d, _ in done] if self.encodes else [self.transform(img, rng) for img, _ in done]
        counts["ok"] += 1
        return pixels, fields, image_id, key, fmt.meta(meta_in, shard, image_id)

    def _batch(self, items: list[tuple]) -> object:
        pix, fields, ids, keys, metas = zip(*items)
        text = self.fmt.collate_text(list(fields), self.tokenizer, self.cfg)
        if self.encodes:
            return self.transform.collate(list(pix), text, list(ids), list(keys), list(metas), list(fields))
        flat = [t for p in pix for t in p]
        pixels = torch.stack(flat).view(len(pix), len(pix[0]), *flat[0].shape)
        return self.fmt.assemble(pixels, text, list(ids), list(keys), list(metas))

    # -- one worker -------------------------------------------------------------------------------
    def _worker(self, g: int, w: int) -> Iterator[tuple]:
        cfg, epoch = self.cfg, self.epoch
        self._logged = 0
        pos = self.resume.get(g, {"block": 0, "start": (0, 0), "next": 0})
        counts: dict = {"ok": 0, "skipped": {}, "converted": {}}

        def info(position: dict) -> dict:
            out = {
                "g": g,
                "w": w,
                "pos": position,
                "counts": {k: (dict(v) if isinstance(v, dict) else v) for k, v in counts.items()},
            }
            counts["ok"] = 0
            counts["skipped"].clear()
            counts["converted"].clear()
            return out

        if pos.get("done"):
            return
        block_size = cfg.shuffle_buffer if cfg.shuffle else 1
        block_no, skip = pos["block"], pos["next"]
        cursor = UnitCursor(cfg, g, epoch, tuple(pos["start"]), counts["skipped"])
        items: list[tuple] = []
        while True:
            start = cursor.pos
            block = cursor.take(block_size)
            if not block:
                break
            order = _rng(cfg.seed, epoch, g, block_no, 5).permutation(len(block)) if cfg.shuffle else None
            for i in range(skip, len(block)):
                raw = block[int(order[i])] if order is not None else block[i]
                item = self._process(raw, _rng(cfg.seed, epoch, g, block_no, i, 11), counts)
                if item is None:
                    continue
                items.append(item)
                if len(items) == cfg.batch_size:
                    yield self._batch(items), info({"block": block_no, "start": start, "next": i + 1})
                    items = []
            skip = 0
            block_no += 1
        done = {"block": block_no, "start": cursor.pos, "next": 0, "done": True}
        if items and not cfg.drop_last:
            yield self._batch(items), info(done)
        else:
            yield None, info(done)  # the tail's counts, and the "done" position


def merge_counts(total: dict, delta: dict) -> None:
    total["ok"] = total.get("ok", 0) + delta.get("ok", 0)
    for k in ("skipped", "converted"):
        d = total.setdefault(k, {})
        for r, n in delta.get(k, {}).items():
            d[r] = d.get(r, 0) + n
