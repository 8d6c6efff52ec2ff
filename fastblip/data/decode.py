"""Safe image decoding: every failure becomes a named reason, never an exception that stops a run.

The official code sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` and ``MAX_IMAGE_PIXELS = None``
(BLIP_SPEC §7): half-decoded images train silently and one 50k×50k PNG exhausts a worker's memory.
Here the header is read first and images over ``max_pixels`` are refused before any pixel is decoded;
truncated and corrupt images are skipped and counted; CMYK, grayscale, 16-bit, palette and alpha
images are converted to RGB (alpha dropped like ``Image.convert("RGB")`` in the official loader and
DALI's RGB decode, so the two backends and the released models' preprocessing agree).
EXIF orientation is not applied (neither the official code nor DALI's decoder applies it).
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastblip.errors import InputError

# 64 MP, e.g. 8000×8000: beyond any real photo in web datasets and ~200 MB of RGB; PIL's own warning
# threshold is 89.5 MP and its hard error 179 MP, which a worker decoding in parallel should not reach.
DEFAULT_MAX_PIXELS = 64_000_000


# Input size limits (issue 15: a 0.9 MB gzip shard holding three 300 MB captions took 2.7 GB of RAM, and
# "image": "/dev/zero" in a JSON annotation read until MemoryError). Checked against the tar header's member size
# or the file's stat *before* reading, so an oversized member is skipped without being held in memory.
# - an image file: 64 MiB. img2dataset's web JPEGs are ~50 KB at 256-512 px; a 64 MP photo (the pixel limit
#   above) is ~20-30 MB as JPEG, ~100 MB only as an uncompressed-like PNG, which the pixel limit refuses anyway.
# - a caption / .json / any other member: 1 MiB. A BLIP caption is <= 30 words (~200 B); img2dataset's .json
#   with EXIF runs to a few KB.
# Environment overrides (FASTBLIP_MAX_IMAGE_BYTES, FASTBLIP_MAX_TEXT_BYTES) are the process's defaults (library
# calls, ``fastblip data check``); a recipe's data.max_image_bytes / data.max_text_bytes go to its loader directly
# (StreamConfig, pickled into every DataLoader worker), and CapFilt's recipe keys to its readers.
IMAGE_BYTES_ENV, TEXT_BYTES_ENV = "FASTBLIP_MAX_IMAGE_BYTES", "FASTBLIP_MAX_TEXT_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
DEFAULT_MAX_TEXT_BYTES = 1 << 20


def _env_int(name: str, default: int) -> int:
    try:
        v = int(os.environ.get(name, default))
    except ValueError:
        return default
    return v if v > 0 else default


def max_image_bytes() -> int:
    return _env_int(IMAGE_BYTES_ENV, DEFAULT_MAX_IMAGE_BYTES)


def max_text_bytes() -> int:
    return _env_int(TEXT_BYTES_ENV, DEFAULT_MAX_TEXT_BYTES)


def read_regular_file(path: str, limit: int | None = None) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason) for an image path from an annotation file: only a regular file is read
    (a FIFO would block, /dev/zero never ends), at most ``limit`` bytes. Opened non-blocking and checked with
    fstat on the open descriptor, so a path swapped between the check and the read cannot slip through."""
    limit = max_image_bytes() if limit is None else limit
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None, "missing_image"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not_a_file"
        if st.st_size > limit:
            return None, "too_large"
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # grew after the stat
            return None, "too_large"
        return data, None
    except OSError:
        return None, "missing_image"
    finally:
        os.close(fd)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Members that are images in a format the pipeline does not take (img2dataset never writes them).
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "svg", "heic", "heif", "avif", "jxl", "ico", "psd")
# Formats PIL may decode: what img2dataset writes (jpg/png/webp) plus what BLIP's JSON sets hold
# (COCO/Flickr/VG are JPEG; MPO is a multi-picture JPEG from phone cameras).
ALLOWED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP"}

_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF", b"GIF8", b"BM")

SKIP_REASONS = (  # images and captions, then the task formats' own (formats.py)
    "empty_image",
    "corrupt_image",
    "truncated_image",
    "unsupported_format",
    "decompression_bomb",
    "missing_image",
    "missing_text",
    "empty_caption",
    "bad_caption_encoding",
    "missing_shard",
    "truncated_tar",
    "unreadable_shard",
    "too_large",  # a member or file over the input size limits above: skipped without being read
    "not_a_file",  # an annotation's image path that is a device, FIFO or directory
    "empty_question",  # vqa: nothing left after pre_question
    "missing_answer",  # vqa training entry without answers
    "bad_answer",  # vqa: an answer that is not a string
    "bad_label",  # nlvr: a label other than True/False
    "corrupt_video",  # video: PyAV cannot decode it, or it has no frames
)


class DecodeError(InputError):
    """An image that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB image and the source mode when a conversion happened (for the stats)."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # convert("RGB") clips 16-bit values to 255 (a white image); scale the range to 8 bits instead.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB"), mode
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB"), mode


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (format, mode, size; no pixels decoded): the checks every backend shares.

    Raises DecodeError: missing_image, empty_image, unsupported_format, corrupt_image, decompression_bomb.
    """
    if data is None:
        raise DecodeError("missing_image")
    if len(data) == 0:
        raise DecodeError("empty_image", "0 bytes")
    known_magic = data[:12].startswith(_MAGIC) and (not data.startswith(b"RIFF") or data[8:12] == b"WEBP")
    with warnings.catch_warnings():
        # PIL's DecompressionBombWarning: we apply our own limit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise DecodeError("decompression_bomb", str(e)) from None
        except UnidentifiedImageError:
            reason = "corrupt_image" if known_magic else "unsupported_format"
            raise DecodeError(reason, f"{len(data)} bytes, header {data[:8]!r}") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DecodeError("corrupt_image", str(e)) from None
    if img.format not in ALLOWED_FORMATS:
        raise DecodeError("unsupported_format", str(img.format))
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("corrupt_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    return img


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Decode bytes into an RGB PIL image; returns (image, converted_from_mode or None).

    Raises DecodeError with the reason: empty_image, unsupported_format, corrupt_image, truncated_image,
    decompression_bomb.
    """
    img = open_image(data, max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
        except OSError as e:
            msg = str(e)
            if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
                raise DecodeError("truncated_image", msg) from None
            raise DecodeError("corrupt_image", msg) from None
        except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
            raise DecodeError("corrupt_image", str(e)) from None
    try:
        return _to_rgb(img)
    except (OSError, ValueError) as e:
        raise DecodeError("corrupt_image", f"mode {img.mode}: {e}") from None


# (format, mode) pairs a GPU/DALI decoder turns into the same RGB pixels as ``decode_image``: passed through
# as they are. Everything else (CMYK, palette, alpha, 16-bit, MPO, ...) is decoded and converted here
# exactly as the PIL path does, and handed on losslessly as BMP.
PASS_THROUGH = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("WEBP", "RGB")}


def _cut_short(fmt: str, data: bytes) -> str | None:
    """Why an image passed through undecoded is visibly truncated, or None (a cheap check on the bytes)."""
    if fmt == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "no end-of-image marker after the last scan"
    if fmt == "PNG" and b"IEND" not in data[-64:]:
        return "no IEND chunk"
    if fmt == "WEBP" and 8 + int.from_bytes(data[4:8], "little") > len(data):
        return f"RIFF size {int.from_bytes(data[4:8], 'little')} > {len(data) - 8} bytes"
    return None


def probe_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, int, int, str | None]:
    """Validate an image for a downstream decoder without decoding its pixels when it can pass through.

    Returns (payload, width, height, converted_from_mode or None): the original bytes for the formats in
    PASS_THROUGH after the header checks of ``decode_image`` and a truncation check; otherwise the image is
    decoded and converted here and the payload is a BMP of the RGB result. Raises DecodeError with the same
    reasons as ``decode_image``. Corruption inside the entropy-coded data is not visible without decoding:
    the DALI loader catches the decoder's error and redoes that batch with PIL (data/dali.py).
    """
    img = open_image(data, max_pixels)
    fmt, mode = img.format, img.mode
    if (fmt, mode) in PASS_THROUGH:
        if (why := _cut_short(fmt, data)) is not None:
            raise DecodeError("truncated_image", why)
        return data, img.width, img.height, (None if mode == "RGB" else mode)
    rgb, converted = decode_image(data, max_pixels)
    buf = io.BytesIO()
    rgb.save(buf, "BMP")
    return buf.getvalue(), rgb.width, rgb.height, converted
