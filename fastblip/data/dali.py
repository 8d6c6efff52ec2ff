"""NVIDIA DALI backend: the same loader workers as the PIL path read, validate, shuffle, shard and tokenise,
and draw every sample's transform; DALI decodes (nvJPEG, ``device="mixed"``, on the GPU; ``"cpu"`` when
no GPU is given), crops, resizes, flips, augments and normalises, prefetched. Yields the same ``Batch``.

Why not ``fn.readers.webdataset``: DALI's reader cannot skip a corrupt sample (its decoders raise and
the pipeline is dead, NVIDIA/DALI#211, #306), cannot record a data position to resume from, and reads
neither BLIP's JSON files nor our per-sample RNG. Here the Python side (``dataset.BlipStream`` with a
``DaliPlan``) hands over encoded bytes, so DALI's GPU work is the same while everything the issue asks of
a loader holds for both backends:

- bad input: the workers parse each image's header (``decode.probe_image``: format, size, decompression
  bombs, visible truncation) without decoding pixels; CMYK/palette/alpha/16-bit images are converted
  there exactly as the PIL path does and passed on as lossless BMP. Corruption that only decoding shows
  (a broken Huffman table, say) makes DALI raise: the loader then rebuilds the pipeline, redoes that one
  batch with PIL (skipping, counting and logging what PIL cannot decode either) and replays the batches
  DALI had prefetched. ``stats["dali_fallback_batches"]`` counts these; such a batch comes out shorter
  by the samples PIL rejected (the PIL path would have filled it from the next samples). Three failed
  batches in a row in which PIL finds no bad image are not bad data, and re-raise.
- sources, sharding, shuffling and resume are the PIL loader's: ``state_dict()`` is the position after
  the last batch *yielded* (not the prefetched ones), and the two backends' states are interchangeable.
- transforms: each sample's crop box, flip and RandomAugment ops come from ``TrainTransform.params`` with
  the PIL path's per-sample RNG, so both backends draw the *same* augmentations. Differences in pixels:
  - eval/train resize: DALI's cubic with antialias vs PIL's bicubic: at most 1–2 levels of 255 (mean
    0.1–0.2) on a 500×400 JPEG (tests/test_data_dali.py); nvJPEG on the GPU may differ by a few more.
  - crop: ``decoders.image_slice`` decodes only the crop box (ROI decode), same box as PIL.
  - affine ops (shear, translate, rotate): ``fn.warp_affine`` with PIL's inverse map, bilinear, fill 128:
    identical inside the image; pixels on the fill boundary differ (PIL has no partial-coverage blend).
  - AutoContrast: same per-channel min/max stretch (±1 level from float32 vs float64).
  - Equalize: DALI's ``fn.equalize`` is OpenCV's histogram equalisation, the PIL/official code's is
    PIL's (different rounding of the cumulative histogram): the same operation, a few levels apart.
  - Brightness and Sharpness at BLIP's magnitude 5 have factor 1.0 and are no-ops on both paths.
"""

from __future__ import annotations

import logging
import re
from collections import deque

import numpy as np
import torch

from fastblip.errors import ConfigError, MissingDependencyError

from .batch import EncodedBatch
from .dataset import MAX_LOGGED
from .decode import DecodeError, decode_image, probe_image
from .transforms import MEAN, STD, EvalTransform, TrainParams, TrainTransform, affine_data

log = logging.getLogger("fastblip.data")

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    HAS_DALI, DALI_IMPORT_ERROR = True, None
except ImportError as e:  # optional dependency: nvidia-dali-cuda130
    HAS_DALI, DALI_IMPORT_ERROR = False, e

# RandomAugment slot kinds as DALI sees them; Identity and the enhance ops at factor 1.0 are KIND_NONE.
KIND_NONE, KIND_AUTOCONTRAST, KIND_EQUALIZE, KIND_AFFINE = 0, 1, 2, 3
MAX_FAILED_IN_A_ROW = 3  # DALI failures that PIL finds no bad image in: a bug, not data


def require_dali() -> None:
    if not HAS_DALI:
        raise MissingDependencyError(
            f"data.backend=dali needs NVIDIA DALI (pip install nvidia-dali-cuda130): {DALI_IMPORT_ERROR}"
        )


class DaliPlan:
    """The loader workers' half of the DALI backend (a ``BlipStream`` transform with ``encodes = True``):
    validate each image without decoding it, draw its transform, and collate an ``EncodedBatch``."""

    encodes = True

    def __init__(self, image_size: int, train: bool, scale=(0.2, 1.0), randaugment: bool = True,
                 hflip: bool = True):  # fmt: skip
        self.image_size, self.train = int(image_size), bool(train)
        self.transform = (
            TrainTransform(image_size, scale, randaugment, hflip) if train else EvalTransform(image_size)
        )
        self.slots = self.transform.randaugment.n if train and self.transform.randaugment is not None else 0

    def encode(
        self, data: bytes | None, max_pixels: int, rng: np.random.Generator
    ) -> tuple[tuple, str | None]:
        payload, w, h, converted = probe_image(data, max_pixels)
        params = self.transform.params(w, h, rng) if self.train else None
        return (payload, params), converted

    def collate(self, samples: list[list[tuple]], text: dict, ids: list[int], keys: list[str], metas: list[dict],
                fields: list[dict]) -> EncodedBatch:  # fmt: skip
        """``samples``: per sample, its K images' (payload, params) from ``encode``; ``text``: the format's
        collated text part."""
        flat = [x for s in samples for x in s]
        offsets = np.zeros(len(flat) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p, _ in flat])
        data = torch.from_numpy(np.frombuffer(b"".join(p for p, _ in flat), dtype=np.uint8).copy())
        return EncodedBatch(data, offsets.tolist(), [q for _, q in flat], text, ids, keys, metas, fields,
                            per_sample=len(samples[0]))  # fmt: skip

    def feed(self, b: EncodedBatch) -> tuple:
        """The external-source inputs of one batch (see ``build_pipeline``): the B·K payloads, then (train)
        crop anchors and shapes (B·K, 2), flips (B·K,) and per RandomAugment slot its kinds (B·K,) and maps
        (B·K, 2, 3)."""
        buf = b.data.numpy()
        images = [buf[b.offsets[j] : b.offsets[j + 1]] for j in range(len(b.offsets) - 1)]
        if not self.train:
            return (images,)
        crops = np.array([p.crop for p in b.params], dtype=np.float32).reshape(-1, 4)
        flip = np.array([p.flip for p in b.params], dtype=np.int32)
        out = [images, np.ascontiguousarray(crops[:, :2]), np.ascontiguousarray(crops[:, 2:]), flip]
        for k in range(self.slots):
            kinds, mats = zip(*(slot(p, k, self.image_size) for p in b.params))
            out += [np.array(kinds, dtype=np.int32), np.stack(mats)]
        return tuple(out)


_IDENTITY = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


def slot(p: TrainParams, k: int, size: int) -> tuple[int, np.ndarray]:
    """(kind, 2×3 inverse affine map) of the k-th RandomAugment op that fired, KIND_NONE past the last."""
    if k >= len(p.ops):
        return KIND_NONE, _IDENTITY
    name, args = p.ops[k]
    if name == "AutoContrast":
        return KIND_AUTOCONTRAST, _IDENTITY
    if name == "Equalize":
        return KIND_EQUALIZE, _IDENTITY
    if name in ("Brightness", "Sharpness"):
        if args[0] != 1.0:
            raise NotImplementedError(f"the DALI backend applies {name} only at factor 1.0 (magnitude 5)")
        return KIND_NONE, _IDENTITY
    data = affine_data(name, args[0], (size, size)) if args else None
    if data is None:  # Identity
        return KIND_NONE, _IDENTITY
    return KIND_AFFINE, np.array(data, dtype=np.float32).reshape(2, 3)


def _autocontrast(img):
    """PIL's ImageOps.autocontrast (cutoff 0) per channel: x → floor((x − lo)·255/(hi − lo)); hi == lo kept."""
    lo = fn.cast(fn.reductions.min(img, axes=[0, 1]), dtype=types.FLOAT)
    hi = fn.cast(fn.reductions.max(img, axes=[0, 1]), dtype=types.FLOAT)
    span = hi - lo
    keep = fn.cast(span <= 0, dtype=types.FLOAT)
    x = fn.cast(img, dtype=types.FLOAT)
    stretched = dmath.floor((x - lo) * (255.0 / dmath.max(span, 1.0)))
    return fn.cast(dmath.clamp(stretched * (1.0 - keep) + x * keep, 0.0, 255.0), dtype=types.UINT8)


def build_pipeline(plan: DaliPlan, source, *, batch_size: int, device_id: int | None, num_threads: int = 2,
                   seed: int = 0, prefetch: int = 2):  # fmt: skip
    """The DALI pipeline over ``source`` (a callable returning ``plan.feed`` tuples): outputs normalised
    float (B, 3, S, S)."""
    require_dali()
    decode_dev = "mixed" if device_id is not None else "cpu"
    s = plan.image_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch, enable_conditionals=plan.slots > 0)  # fmt: skip
    def pipe():
        if not plan.train:
            enc = fn.external_source(source=source, num_outputs=1, batch=True)[0]
            img = fn.decoders.image(enc, device=decode_dev, output_type=types.RGB)
            img = fn.resize(img, resize_x=s, resize_y=s, interp_type=types.INTERP_CUBIC, antialias=True)
        else:
            ins = fn.external_source(source=source, num_outputs=4 + 2 * plan.slots, batch=True)
            enc, anchor, shape, flip = ins[:4]
            img = fn.decoders.image_slice(enc, anchor, shape, axis_names="HW", normalized_anchor=False,
                                          normalized_shape=False, device=decode_dev, output_type=types.RGB)  # fmt: skip
            img = fn.resize(img, resize_x=s, resize_y=s, interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.flip(img, horizontal=flip)
            for k in range(plan.slots):
                kind, mat = ins[4 + 2 * k], ins[5 + 2 * k]
                if kind == KIND_AFFINE:
                    img = fn.warp_affine(img, matrix=mat, fill_value=128.0, interp_type=types.INTERP_LINEAR)
                elif kind == KIND_AUTOCONTRAST:
                    img = _autocontrast(img)
                elif kind == KIND_EQUALIZE:
                    img = fn.equalize(img)
        return fn.crop_mirror_normalize(
            img,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in MEAN],
            std=[v * 255 for v in STD],
        )

    p = pipe()
    p.build()
    return p


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    t = tl.as_tensor()
    if device.type == "cuda":
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
        return out
    return torch.from_numpy(np.array(t))


class DaliLoader:
    """Iterable of Batch: a PIL-path ``Loader`` (its stream built over a ``DaliPlan``) feeding a DALI pipeline.

    Same interface as ``loader.Loader``: ``set_epoch``, ``state_dict`` / ``load_state_dict`` (exact resume,
    interchangeable with the PIL backend's), ``stats``, ``len``.
    """

    def __init__(self, inner, *, device=None, num_threads: int = 2, prefetch: int = 2):
        require_dali()
        self.inner, self.plan, self.tokenizer = inner, inner.stream.transform, inner.stream.tokenizer
        self.fmt, self.cfg = inner.stream.fmt, inner.cfg
        if self.fmt.decodes_video:
            raise ConfigError(f"data.backend=dali does not decode videos (task format '{self.fmt.name}': PyAV "
                             "decodes frames in the loader workers); use data.backend=pil")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.num_threads, self.prefetch = num_threads, prefetch
        self._state = inner.state_dict()  # the position after the last batch yielded
        self._fed: deque = deque()  # (EncodedBatch, inner state after it): in DALI, not yet yielded
        self._replay: deque = deque()  # fed to a pipeline that died: feed again first
        self._it, self._source_error = None, None
        self._logged = 0

    # -- Loader interface ---------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self.inner.stats

    @property
    def epoch(self) -> int:
        return int(self._state["epoch"])

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.inner.set_epoch(epoch)
            self._state = self.inner.state_dict()

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self._state = self.inner.state_dict()

    # -- the pipeline -------------------------------------------------------------------------------
    def _source(self):
        if self._replay:
            item = self._replay.popleft()
        else:
            try:
                b = next(self._it)  # StopIteration ends DALI's epoch
            except StopIteration:
                raise
            except BaseException as e:  # the reader's own error, not DALI's: re-raised as is by __iter__
                self._source_error = e
                raise
            item = (b, self.inner.state_dict())
        self._fed.append(item)
        return self.plan.feed(item[0])

    def _build(self):
        return build_pipeline(self.plan, self._source, batch_size=self.cfg.batch_size * self.fmt.images_per_sample,
                              device_id=self.device_id,
                              num_threads=self.num_threads, seed=self.cfg.seed, prefetch=self.prefetch)  # fmt: skip

    def _batch(self, pixels: torch.Tensor, b: EncodedBatch):
        """The task's batch from DALI's (B·K, 3, S, S) pixels and the worker's collated text part."""
        out = self.fmt.assemble(pixels.view(len(b), b.per_sample, *pixels.shape[1:]), b.text, b.image_ids, b.keys,
                                b.meta)  # fmt: skip
        return out.to(self.device) if self.device.type != "cpu" else out

    def _with_pil(self, b: EncodedBatch, err: Exception):
        """Redo a batch DALI failed on with PIL: same drawn transforms; a sample with an image PIL rejects too
        is skipped. Returns the batch (None when nothing was left) and how many samples PIL rejected."""
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "sample #" in ln), next((ln for ln in lines if "rror" in ln), ""))
        K = b.per_sample
        if (m := re.search(r"sample #(\d+)", detail)) and int(m.group(1)) < len(b) * K:
            detail += f" (key {b.keys[int(m.group(1)) // K]})"
        shard = b.meta[0].get("shard") if b.meta else "?"
        log.warning("DALI failed on a batch of %d in %s: %s; redoing the batch with PIL", len(b), shard, detail)
        stats = self.inner.stats
        stats["dali_fallback_batches"] = stats.get("dali_fallback_batches", 0) + 1
        pix, keep = [], []
        t = self.plan.transform
        for i in range(len(b)):
            try:
                imgs = [decode_image(b.payload(i * K + k), self.cfg.max_pixels)[0] for k in range(K)]
            except DecodeError as e:
                stats["ok"] -= 1
                stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
                if self._logged < MAX_LOGGED:
                    self._logged += 1
                    log.warning("skipped sample %s in %s: %s", b.keys[i], b.meta[i].get("shard"), e)
                continue
            pix += [t.apply(img, b.params[i * K + k]) if self.plan.train else t(img) for k, img in enumerate(imgs)]
            keep.append(i)
        rejected = len(b) - len(keep)
        if not keep:
            return None, rejected
        text = self.fmt.collate_text([b.fields[i] for i in keep], self.tokenizer, self.cfg)
        pixels = torch.stack(pix).view(len(keep), K, *pix[0].shape)
        out = self.fmt.assemble(pixels, text, [b.image_ids[i] for i in keep], [b.keys[i] for i in keep],
                                [b.meta[i] for i in keep])  # fmt: skip
        return (out.to(self.device) if self.device.type != "cpu" else out), rejected

    def __iter__(self):
        self.inner.load_state_dict(self._state)  # restart after the last batch yielded, not the prefetched ones
        self._it, self._source_error = iter(self.inner), None
        self._fed.clear()
        self._replay.clear()
        pipe, unexplained = self._build(), 0
        try:
            while True:
                try:
                    outs = pipe.run()
                except StopIteration:
                    break
                except RuntimeError as e:
                    if self._source_error is not None or not self._fed:
                        raise
                    # a decoder error: this pipeline is dead and the oldest batch fed to it failed
                    b, state = self._fed.popleft()
                    self._replay.extend(self._fed)
                    self._fed.clear()
                    del pipe
                    pipe = self._build()
                    out, rejected = self._with_pil(b, e)
                    unexplained = 0 if rejected else unexplained + 1
                    if unexplained >= MAX_FAILED_IN_A_ROW:
                        raise RuntimeError(f"DALI failed on {unexplained} batches in a row that PIL decodes "
                                           "without a bad image: not bad data") from e  # fmt: skip
                    self._state = state
                    if out is not None:
                        yield out
                    continue
                b, state = self._fed.popleft()
                self._state = state
                yield self._batch(_to_torch(outs[0], self.device), b)
            self._state = self.inner.state_dict()  # the inner loader ran to its end: next epoch
        finally:
            self._it = None
            del pipe
