"""``fastblip.Processor``: BLIP's eval image transform + ``pre_caption`` + tokenizer in one object.

    proc = fastblip.Processor.from_model(model)          # image size and tokenizer of the checkpoint
    batch = proc(images=["cat.jpg"], text=["a cat on a sofa"])
    model.itm_logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fastblip.data.decode import DecodeError, decode_image, read_regular_file
from fastblip.data.text import pre_caption
from fastblip.data.transforms import eval_transform
from fastblip.errors import InputError


class ImageReadError(InputError):
    """An image path that cannot be read or decoded (one line: path and reason)."""


_READ_REASONS = {"missing_image": "cannot be read", "not_a_file": "is not a regular file",
                 "too_large": "is larger than the image size limit (FASTBLIP_MAX_IMAGE_BYTES)"}


def read_image(src: str | Path | bytes | Image.Image) -> Image.Image:
    """A path, raw bytes or PIL image -> RGB PIL image; failures raise ``ImageReadError`` naming the path."""
    if isinstance(src, Image.Image):
        return src if src.mode == "RGB" else src.convert("RGB")
    if isinstance(src, (bytes, bytearray)):
        data, name = bytes(src), "<bytes>"
    else:
        p = Path(src)
        if not p.exists():
            raise ImageReadError(f"image not found: {p}")
        data, problem = read_regular_file(str(p))  # a regular file, within the size limit (not /dev/zero)
        if problem is not None:
            raise ImageReadError(f"image {p} {_READ_REASONS.get(problem, problem)}")
        name = str(p)
    try:
        return decode_image(data)[0]
    except DecodeError as e:
        raise ImageReadError(f"cannot decode image {name}: {e}") from None


class Processor:
    """Eval preprocessing of the official code: bicubic resize to ``image_size``², BLIP mean/std;
    ``pre_caption(text, max_words)``; tokenised to at most ``max_length`` tokens, padded to the longest."""

    def __init__(self, image_size: int = 384, max_words: int = 50, tokenizer=None, max_length: int = 35):
        from fastblip.data.tokenizer import load_tokenizer

        self.image_size = int(image_size)
        self.max_words = int(max_words)
        self.max_length = int(max_length)
        self.transform = eval_transform(self.image_size)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()

    @classmethod
    def from_model(cls, model, **kw) -> Processor:
        return cls(image_size=model.cfg.vision.image_size, tokenizer=model.tokenizer, **kw)

    def images(self, images) -> torch.Tensor:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return torch.stack([self.transform(read_image(x)) for x in images])  # (B, 3, S, S)

    def text(self, text) -> dict[str, torch.Tensor]:
        if isinstance(text, str):
            text = [text]
        for i, t in enumerate(text):
            if not isinstance(t, str):
                raise InputError(f"text {i} is a {type(t).__name__}, not a string")
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (argv, a bad file)
                raise InputError(f"text {i} is not valid UTF-8 (position {e.start})") from None
        cleaned = [pre_caption(t, self.max_words) for t in text]
        return self.tokenizer(cleaned, max_length=self.max_length, padding="longest", truncation=True)

    def __call__(self, images=None, text=None) -> dict[str, torch.Tensor]:
        """``images``: path(s), bytes or PIL image(s); ``text``: str or list. Returns ``pixel_values``
        (B, 3, S, S) and/or ``input_ids`` / ``attention_mask`` (B, L) LongTensors."""
        if images is None and text is None:
            raise InputError("Processor needs images and/or text")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            out.update(self.text(text))
        return out
