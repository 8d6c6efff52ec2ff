"""Sources: webdataset tar shards (img2dataset layout) and BLIP JSON annotation files.

Source specs (``parse_sources``):
- a shard spec string: a path, a URL the ``webdataset`` library opens (``http(s)://``, ``pipe:``, ...), a
  brace pattern ``dir/web-{00000..00009}.tar``, or several joined by ``::``;
- a BLIP JSON file: ``"path/ann.json"`` (images relative to the file's folder), ``"json:path/ann.json"`` or
  ``"json:path/ann.json::IMAGE_ROOT"``, or a dict ``{"json": path, "image_root": root}``;
- a list of any of these.

A reader yields raw samples ``{"__key__", "__shard__", ext: bytes, ...}``; decoding happens later
(``dataset.py``) so that a resumed run can skip samples without decoding them. Work is cut into *units*:
one tar shard, or a slice of JSON items; units are what ranks and workers split.

Input limits (decode.py): a tar member over the size limit (images: ``max_image_bytes``, captions / .json /
anything else: ``max_text_bytes``) is skipped by its header's size, never read into memory; its sample counts
as ``too_large``. A local shard must start with a valid tar header (or a gzip/bzip2/xz magic) to count as
readable in the preflight, so garbage named ``.tar`` no longer passes it.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls

from fastblip.errors import InputError, NotFoundError

from .decode import (
    IMAGE_EXTS,
    OTHER_IMAGE_EXTS,
    DecodeError,
    max_image_bytes,
    max_text_bytes,
    open_image,
    read_regular_file,
)


class SourceError(InputError):
    """A data source that cannot be used at all."""


@dataclass
class JsonSource:
    path: str
    image_root: str
    items: list[dict] = field(
        default_factory=list
    )  # {"image": abs path, "caption": str, "image_id": int, ...}
    num_images: int = 0


@dataclass
class Sources:
    shards: list[str] = field(default_factory=list)
    json: list[JsonSource] = field(default_factory=list)

    @property
    def json_items(self) -> list[dict]:
        return [it for s in self.json for it in s.items]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def read_json_list(path: str | Path) -> list:
    """The JSON list in an annotation file; a missing file, bad JSON or another top-level type is one error."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"annotation file not found: {p}")
    try:
        anns = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{p}: not valid JSON ({e})") from None
    except OSError as e:
        raise SourceError(f"{p}: cannot read it ({e.strerror or e})") from None
    if not isinstance(anns, list):
        raise SourceError(f"{p}: expected a JSON list of entries, got {type(anns).__name__}")
    return anns


def load_json_annotations(
    path: str | Path, image_root: str | Path | None = None, flatten: bool = True
) -> JsonSource:
    """BLIP annotation file ``[{"image": relpath, "caption": str | [str], "image_id"?: ...}, ...]``.

    ``flatten``: one item per (image, caption) as the official train sets do; else one per image with
    all captions in ``captions`` and the first as ``caption`` (eval sets). Image ids: the file's
    ``image_id`` when all are ints, else ids numbered by first appearance (official coco_karpathy_train).
    """
    p = Path(path)
    anns = read_json_list(p)
    if not isinstance(anns, list) or not all(isinstance(a, dict) and "image" in a for a in anns):
        raise SourceError(f"{p}: expected a JSON list of objects with an 'image' field")
    for i, a in enumerate(anns):
        if not isinstance(a["image"], str) or not a["image"]:
            raise SourceError(f"{p}: item {i}: 'image' must be a non-empty path string, got {a['image']!r}")
    root = Path(image_root) if image_root is not None else p.parent
    raw_ids = [a.get("image_id", a["image"]) for a in anns]
    use_raw = all(isinstance(x, int) and not isinstance(x, bool) for x in raw_ids)
    id_map: dict = {}
    items: list[dict] = []
    for i, a in enumerate(anns):
        rid = raw_ids[i]
        image_id = rid if use_raw else id_map.setdefault(rid, len(id_map))
        img = under_root(root, a["image"])
        caps = a.get("caption")
        caps = caps if isinstance(caps, list) else [caps]
        extra = {k: a[k] for k in ("noisy", "true_caption") if k in a}
        if flatten:
            for j, c in enumerate(caps):
                items.append({"image": img, "caption": c, "image_id": image_id, "key": f"{i}_{j}", **extra})
        else:
            items.append(
                {
                    "image": img,
                    "caption": caps[0],
                    "captions": caps,
                    "image_id": image_id,
                    "key": str(i),
                    **extra,
                }
            )
    n_images = len(set(raw_ids))
    return JsonSource(str(p), str(root), items, n_images)


def parse_sources(sources, flatten_json: bool = True, fmt=None) -> Sources:
    """Expand source specs into shard URLs and loaded JSON annotation sets. ``fmt`` (a
    ``formats.SampleFormat``; default: captions) reads the JSON files."""
    load = fmt.load_json if fmt is not None else load_json_annotations
    out = Sources()
    if isinstance(sources, (str, dict, Path)):
        sources = [sources]
    if not sources:
        raise SourceError("no data source given")
    for s in sources:
        if isinstance(s, dict):
            if "json" not in s:
                raise SourceError(f"a dict source needs a 'json' key, got {sorted(s)}")
            out.json.append(load(s["json"], s.get("image_root"), flatten_json))
            continue
        s = str(s)
        if s.startswith("json:"):
            path, _, root = s[5:].partition("::")
            out.json.append(load(path, root or None, flatten_json))
        elif s.endswith(".json") and "{" not in s and "::" not in s:
            out.json.append(load(s, None, flatten_json))
        else:
            out.shards.extend(expand_urls(s))
    return out


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _tar_head(head: bytes) -> bool:
    """Whether 512 bytes are a tar header: its checksum matches (what tarfile itself checks first)."""
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def shard_problem(url: str) -> str | None:
    """For local shards: 'missing_shard' / 'unreadable_shard' when it cannot be a tar; None when fine.
    Readable = a regular file starting with a valid tar header, or with gzip/bzip2/xz magic (a gzip's first
    block is decompressed and checked too: garbage behind a gzip magic is unreadable)."""
    if not _is_local(url):
        return None
    p = Path(url.removeprefix("file:"))
    if not p.is_file():
        return "missing_shard"
    try:
        with open(p, "rb") as f:
            head = f.read(64 << 10)
    except OSError:
        return "unreadable_shard"
    if head.startswith(b"\x1f\x8b"):
        try:  # the first 512 decompressed bytes, at most 64 KiB read: bounded whatever the ratio
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 512)
        except zlib.error:
            return "unreadable_shard"
    elif head.startswith(_COMPRESSED_MAGIC):
        return None
    if len(head) < 512 or not _tar_head(head[:512]):
        return "unreadable_shard"
    return None


def preflight(src: Sources, fmt=None) -> dict:
    """Fail before any work when nothing is readable; report the listed shards that are not. ``fmt`` probes
    a JSON item's file (default: an image header)."""
    probe_file = fmt.probe if fmt is not None else probe_image_file
    problems = {u: r for u in src.shards if (r := shard_problem(u))}
    readable_shards = [u for u in src.shards if u not in problems]
    json_ok = 0
    for js in src.json:
        # A handful of images tells a wrong image_root apart from a few missing files; their headers (format,
        # size: no pixels decoded) tell images from garbage.
        probe = js.items[:: max(1, len(js.items) // 16)][:16]
        json_ok += sum(probe_file(it["image"]) for it in probe)
    if not readable_shards and not json_ok:
        what = [f"{u} ({r})" for u, r in list(problems.items())[:3]] + [
            f"{js.path} (no image found under {js.image_root}: the probed ones are missing or not images)" for js in src.json
        ]
        raise SourceError("nothing readable in the data source: " + "; ".join(what))
    return {"missing_or_unreadable_shards": problems}


def probe_image_file(path: str) -> bool:
    """Whether the file is a regular file whose header parses as an image we take (no pixels decoded)."""
    data, problem = read_regular_file(path)
    if problem is not None:
        return False
    try:
        open_image(data)
    except DecodeError:
        return False
    return True


def member_limit(ext: str, image_limit: int, text_limit: int) -> int:
    """The size limit of a tar member by its extension (the part after the key's first dot)."""
    last = ext.rpartition(".")[2]
    return image_limit if (last in IMAGE_EXTS or last in OTHER_IMAGE_EXTS) else text_limit


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first '.' of the basename; ext = the rest, lowercased."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def iter_tar(url: str, counts: dict, max_image_bytes_: int | None = None,
             max_text_bytes_: int | None = None) -> Iterator[dict]:
    """Samples of one shard, members grouped by key. Problems are counted in ``counts`` (reason → n). A member
    over its size limit is not read: its sample carries ``__too_large__`` (``split_sample`` reports it)."""
    img_lim = max_image_bytes() if max_image_bytes_ is None else max_image_bytes_
    txt_lim = max_text_bytes() if max_text_bytes_ is None else max_text_bytes_
    problem = shard_problem(url)
    if problem:
        counts[problem] = counts.get(problem, 0) + 1
        return
    try:
        stream = wds.gopen(url)
    except (OSError, ValueError):
        reason = "missing_shard" if _is_local(url) else "unreadable_shard"
        counts[reason] = counts.get(reason, 0) + 1
        return
    current: dict | None = None
    n_members = 0
    reading = None  # key of the member being read: an error there leaves that sample incomplete
    raw = stream
    try:
        peek = getattr(stream, "peek", None)
        if peek is not None and peek(2)[:2] == b"\x1f\x8b":
            # gzip decompressed here, in bounded reads: tarfile's own stream inflates each 8 KB chunk whole, up
            # to ~1000x (30 MB peaks for a caption of zeros), GzipFile never returns more than asked
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                n_members += 1  # a parsed header: the file is a tar, so a later error is truncation
                if not info.isreg():
                    continue
                key, ext = _split_key(info.name)
                if key.startswith("__") or not ext:
                    continue
                reading = key
                too_large = info.size > member_limit(ext, img_lim, txt_lim)
                if not too_large:  # an oversized member's bytes are skipped by the stream, never held
                    data = tf.extractfile(info).read()
                    if len(data) != info.size:
                        raise EOFError("member cut off")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": url}
                if too_large:
                    current["__too_large__"] = f"{ext} member of {info.size} bytes"
                else:
                    current[ext] = data
                tf.members = []  # streaming: do not keep every TarInfo of a 10k-sample shard
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        reason = "truncated_tar" if n_members else "unreadable_shard"
        counts[reason] = counts.get(reason, 0) + 1
        if current is not None and current["__key__"] == reading:
            current = None  # the sample being read when the tar ended is incomplete
    finally:
        for f in (stream, raw) if stream is not raw else (raw,):
            close = getattr(f, "close", None)
            if close is not None:
                close()
    if current is not None:
        yield current


def image_member(sample: dict, prefix: str = "") -> tuple[bytes | None, str | None, str | None]:
    """(bytes, ext, None) of a tar sample's image member ``<prefix><ext>`` (``prefix``: "left." / "right." for
    NLVR2's pairs), or (None, None, reason): ``unsupported_format`` when only an image we do not take is there."""
    for ext in IMAGE_EXTS:
        if prefix + ext in sample:
            return sample[prefix + ext], ext, None
    other = any(prefix + e in sample for e in OTHER_IMAGE_EXTS)
    return None, None, "unsupported_format" if other else "missing_image"


def json_member(sample: dict) -> dict:
    """A tar sample's ``.json`` member as a dict ({} when absent, not JSON or not an object)."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def under_root(root: str | Path, path: str) -> str:
    """An annotation's file path: absolute as given, else relative to the image root."""
    return path if os.path.isabs(path) else str(Path(root) / path)


def split_sample(sample: dict) -> tuple[bytes | None, str | None, bytes | None, dict, str | None]:
    """(image bytes, image ext, caption bytes, json meta, problem) of a raw tar sample."""
    if "__too_large__" in sample:
        return None, None, None, {}, "too_large"
    meta = json_member(sample)
    img, img_ext, problem = image_member(sample)
    cap = sample.get("txt")
    if cap is None and "caption" in meta:
        c = meta["caption"]
        cap = c.encode("utf-8") if isinstance(c, str) else None
    return img, img_ext, cap, meta, problem
