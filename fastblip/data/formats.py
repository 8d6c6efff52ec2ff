"""Sample formats: what one sample of a task is, read by the one stream (dataset.py) every task shares.

The stream owns sources, sharding across ranks and workers, shuffling, bad-input skip-and-count, input
limits, exact resume and the pixels (PIL in the workers, or DALI); a format only says how one annotation
entry or tar sample becomes image payloads and text fields, when its text is unusable (skipped and counted
like a bad image, never raised mid-run), and how samples collate into the task's batch:

==========  =======================================  ==========================  ======================
format      one sample                               skip reasons of its own      batch
==========  =======================================  ==========================  ======================
captions    image + caption (pretrain, retrieval,    missing_text, empty_caption  ``Batch``
            captioning, CapFilt)                     bad_caption_encoding
vqa         image + question + answers (weights as   empty_question,              ``VQABatch``
            the official vqa_dataset)                missing_answer, bad_answer
nlvr        two images + sentence + label; training  empty_caption, bad_label     ``NLVRBatch``
            swaps the images (and left/right) at 0.5
video       a video file → ``num_frames`` frames     corrupt_video                ``VideoBatch``
            (PyAV) + caption or question/answer
==========  =======================================  ==========================  ======================

Per sample the stream calls ``json_sample`` (JSON entry → image paths, raw text) or ``tar_sample`` (tar
members → image bytes, raw text, the .json meta), then ``fields`` (raw text → the sample's fields, or a skip
reason; it may draw from the sample's RNG), then decodes each payload (``decode``: one image, or a video's
frames) and transforms it with the same RNG. ``collate_text`` runs in the loader workers (tokenisation);
``assemble`` builds the batch from pixels ``(B, K, 3, S, S)`` (K images per sample) wherever the pixels
are: in the worker (PIL) or in the main process after DALI.

Tar layouts (webdataset, one key per sample): captions ``jpg|png|webp`` + ``txt`` (or ``json.caption``);
vqa ``jpg`` + ``json`` ``{question, answer: [...], question_id?, dataset?}``; nlvr ``left.jpg`` +
``right.jpg`` + ``json`` ``{sentence, label}``; video: JSON annotation files only.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batch import Batch, TensorFields, tokenize
from .decode import DecodeError, decode_image
from .readers import (
    JsonSource,
    SourceError,
    image_member,
    json_member,
    load_json_annotations,
    probe_image_file,
    read_json_list,
    split_sample,
    under_root,
)
from .text import clean_caption_bytes, pre_caption, pre_question


class SampleFormat:
    """The caption format (image + caption → ``Batch``), and the interface the other formats override."""

    name = "captions"
    images_per_sample = 1
    decodes_video = False  # a payload that is a video (PyAV in the workers; DALI does not take it)

    # -- reading ------------------------------------------------------------------------------------
    def load_json(self, path: str | Path, image_root: str | Path | None, flatten: bool) -> JsonSource:
        """A JSON annotation file → items ``{"image": first image path, "key", "image_id", ...}``; a file
        that cannot be this format is one ``SourceError`` naming it, before any work."""
        return load_json_annotations(path, image_root, flatten)

    def image_paths(self, item: dict) -> list[str]:
        return [item["image"]]

    def json_sample(self, item: dict, cfg) -> tuple[list[str], Any, str | None]:
        """(image paths, raw text, problem) of a JSON item; raw text over ``max_text_bytes`` is ``too_large``."""
        cap = item.get("caption")
        if isinstance(cap, str) and len(cap) > cfg.max_text_bytes:  # chars <= UTF-8 bytes: never too strict
            return [], None, "too_large"
        return self.image_paths(item), cap if isinstance(cap, str) else None, None

    def tar_sample(self, raw: dict, cfg) -> tuple[list[bytes], Any, dict, str | None]:
        """(image payloads, raw text, .json meta, problem) of a tar sample (one without an oversized member:
        the stream counts those as ``too_large`` for every format)."""
        img, _, cap, meta, problem = split_sample(raw)
        return [img], cap, meta, problem

    def fields(self, text: Any, meta: dict, cfg, rng: np.random.Generator) -> tuple[dict | None, str | None]:
        """The sample's text fields, or (None, skip reason)."""
        t, problem = clean_caption_bytes(text)
        if problem is not None:
            return None, problem
        t = pre_caption(t, cfg.max_words)
        if not t:
            return None, "empty_caption"
        return {"text": cfg.prompt + t}, None

    def decode(self, data: bytes, max_pixels: int) -> list[tuple[Any, str | None]]:
        """[(RGB PIL image, converted-from mode or None)] of one payload; raises DecodeError."""
        return [decode_image(data, max_pixels)]

    def probe(self, path: str) -> bool:
        """Whether a JSON item's file looks usable (the preflight's check of a few items per file)."""
        return probe_image_file(path)

    def meta(self, meta_in: dict, shard: str, image_id: int) -> dict:
        out = {"noisy": meta_in.get("noisy"), "shard": shard, "image_id": image_id}
        if "captions" in meta_in:
            out["captions"] = meta_in["captions"]
        return out

    # -- batching ------------------------------------------------------------------------------------
    def collate_text(self, fields: list[dict], tokenizer, cfg) -> dict:
        texts = [f["text"] for f in fields]
        enc = tokenize(texts, tokenizer, cfg.max_length, cfg.padding)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "texts": texts}

    def assemble(self, pixels: torch.Tensor, text: dict, image_ids: list[int], keys: list[str],
                 meta: list[dict]) -> Batch:  # fmt: skip
        return Batch(pixels[:, 0], text["input_ids"], text["attention_mask"],
                     torch.tensor(image_ids, dtype=torch.long), list(keys), text["texts"], list(meta))  # fmt: skip


CAPTIONS = SampleFormat()


def _entries(path: str | Path, image_root, need: dict[str, type | tuple]) -> tuple[Path, list[dict], Path]:
    """The file's entries, each a dict with the ``need`` keys of the given types, else one SourceError."""
    p = Path(path)
    anns = read_json_list(p)
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            raise SourceError(f"{p}: item {i} is not an object")
        for k, t in need.items():
            if not isinstance(a.get(k), t) or isinstance(a.get(k), bool):
                raise SourceError(f"{p}: item {i}: '{k}' must be {getattr(t, '__name__', t)}, got {a.get(k)!r}")
    return p, anns, Path(image_root) if image_root is not None else p.parent


# -- VQA ------------------------------------------------------------------------------------------------
@dataclass
class VQABatch(TensorFields):
    pixel_values: torch.Tensor  # (B, 3, S, S)
    input_ids: torch.Tensor  # (B, Lq) questions, [CLS] first
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor  # (sum n, La) every question's answers, [CLS] first
    answer_mask: torch.Tensor
    n: torch.Tensor  # (B,) answers per question
    weights: torch.Tensor  # (sum n,)
    question_ids: list = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)  # human answers (eval) / unique answers (train)
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)


class VQAFormat(SampleFormat):
    """Official ``vqa_dataset``: ``pre_question`` (50 words); answers weighted by count / #answers ("vqa"
    entries) or 0.2 each ("vg"). A training entry without answers is skipped as ``missing_answer``."""

    name = "vqa"

    def __init__(self, train: bool, max_words: int = 50):
        self.train, self.max_words = train, max_words

    def load_json(self, path, image_root, flatten) -> JsonSource:
        p, anns, root = _entries(path, image_root, {"image": str, "question": str})
        items = []
        for i, a in enumerate(anns):
            qid = a.get("question_id", i)
            items.append({"image": under_root(root, a["image"]), "question": a["question"], "answer": a.get("answer"),
                          "dataset": a.get("dataset", "vqa"), "question_id": qid, "key": str(qid),
                          "image_id": i})  # fmt: skip
        return JsonSource(str(p), str(root), items, len({a["image"] for a in anns}))

    def json_sample(self, item, cfg):
        if len(item["question"]) > cfg.max_text_bytes:
            return [], None, "too_large"
        return [item["image"]], item, None

    def tar_sample(self, raw, cfg):
        img, _, problem = image_member(raw)
        meta = json_member(raw)
        if "answers" in meta and "answer" not in meta:
            meta["answer"] = meta["answers"]
        return [img], meta, meta, problem

    def fields(self, e, meta, cfg, rng):
        q = e.get("question")
        q = pre_question(q, self.max_words) if isinstance(q, str) else ""
        if not q.strip():
            return None, "empty_question"
        answers = e.get("answer")
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        if not all(isinstance(a, str) for a in answers):
            return None, "bad_answer"
        if self.train and not answers:
            return None, "missing_answer"
        if e.get("dataset", "vqa") == "vg":
            uniq, w = answers, [0.2] * len(answers)
        else:
            cnt = Counter(answers)
            uniq, w = list(cnt), [c / len(answers) for c in cnt.values()]
        return {"question": q, "qid": e.get("question_id"), "uniq": uniq, "w": w, "human": answers}, None

    def meta(self, meta_in, shard, image_id):
        return {"shard": shard, "question_id": meta_in.get("question_id")}

    def collate_text(self, fields, tokenizer, cfg):
        q = tokenize([f["question"] for f in fields], tokenizer, cfg.max_length, cfg.padding)
        ans = [a for f in fields for a in f["uniq"]]
        if ans:
            a = tokenize(ans, tokenizer, cfg.max_length, cfg.padding)
        else:  # evaluation entries without answers (the VQA test server's split)
            a = {"input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long)}
        return {"input_ids": q["input_ids"], "attention_mask": q["attention_mask"], "answer_ids": a["input_ids"],
                "answer_mask": a["attention_mask"], "n": torch.tensor([len(f["uniq"]) for f in fields]),
                "weights": torch.tensor([w for f in fields for w in f["w"]], dtype=torch.float),
                "question_ids": [f["qid"] for f in fields], "questions": [f["question"] for f in fields],
                "answers": [f["human"] for f in fields]}  # fmt: skip

    def assemble(self, pixels, text, image_ids, keys, meta) -> VQABatch:
        t = text
        return VQABatch(pixels[:, 0], t["input_ids"], t["attention_mask"], t["answer_ids"], t["answer_mask"], t["n"],
                        t["weights"], t["question_ids"], t["questions"], t["answers"], list(keys), list(meta))


# -- NLVR2 ----------------------------------------------------------------------------------------------
@dataclass
class NLVRBatch(TensorFields):
    pixel_values: torch.Tensor  # (B, 3, S, S) left images
    pixel_values_1: torch.Tensor  # (B, 3, S, S) right images
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (B,) 1 = true
    texts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def swap_sides(sentence: str) -> str:
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in sentence.split(" "))


class NLVRFormat(SampleFormat):
    """Official ``nlvr_dataset``: ``pre_caption(sentence, 40)``, label ``"True"`` → 1; in training, with
    probability 0.5 the two images swap and so do "left"/"right" in the sentence. The swap is drawn from the
    sample's RNG before its transforms and applied to the transformed pair (the two transforms are drawn
    independently, so swapping before or after draws the same distribution)."""

    name = "nlvr"
    images_per_sample = 2

    def __init__(self, train: bool, max_words: int = 40):
        self.train, self.max_words = train, max_words

    def load_json(self, path, image_root, flatten) -> JsonSource:
        p, anns, root = _entries(path, image_root, {"images": list, "sentence": str})
        items = []
        for i, a in enumerate(anns):
            imgs = a["images"]
            if len(imgs) != 2 or not all(isinstance(x, str) and x for x in imgs):
                raise SourceError(f"{p}: item {i}: 'images' must be two image paths, got {imgs!r}")
            key = str(a.get("identifier", i))
            items.append({"image": under_root(root, imgs[0]), "image_1": under_root(root, imgs[1]), "sentence": a["sentence"],
                          "label": a.get("label"), "key": key, "image_id": i})  # fmt: skip
        return JsonSource(str(p), str(root), items, len(anns))

    def image_paths(self, item):
        return [item["image"], item["image_1"]]

    def json_sample(self, item, cfg):
        if len(item["sentence"]) > cfg.max_text_bytes:
            return [], None, "too_large"
        return self.image_paths(item), item, None

    def tar_sample(self, raw, cfg):
        a, _, pa = image_member(raw, "left.")
        b, _, pb = image_member(raw, "right.")
        meta = json_member(raw)
        return [a, b], meta, meta, pa or pb

    def fields(self, e, meta, cfg, rng):
        s, problem = clean_caption_bytes(e.get("sentence"))
        if problem is not None:
            return None, problem
        s = pre_caption(s, self.max_words)
        if not s:
            return None, "empty_caption"
        label = e.get("label")
        if str(label) not in ("True", "False", "1", "0"):
            return None, "bad_label"
        swap = bool(self.train and rng.random() < 0.5)
        if swap and ("left" in s.split(" ") or "right" in s.split(" ")):
            s = swap_sides(s)
        return {"text": s, "label": 1 if str(label) in ("True", "1") else 0, "swap": swap}, None

    def collate_text(self, fields, tokenizer, cfg):
        out = super().collate_text(fields, tokenizer, cfg)
        out["labels"] = torch.tensor([f["label"] for f in fields])
        out["swap"] = torch.tensor([f["swap"] for f in fields])
        return out

    def assemble(self, pixels, text, image_ids, keys, meta) -> NLVRBatch:
        swap = text["swap"].to(pixels.device).view(-1, 1, 1, 1)
        a, b = pixels[:, 0], pixels[:, 1]
        meta = [{"shard": m["shard"], "swapped": bool(sw)} for m, sw in zip(meta, text["swap"].tolist(), strict=True)]
        return NLVRBatch(torch.where(swap, b, a), torch.where(swap, a, b), text["input_ids"], text["attention_mask"],
                         text["labels"], text["texts"], list(keys), meta)  # fmt: skip


# -- video ----------------------------------------------------------------------------------------------
@dataclass
class VideoBatch(TensorFields):
    pixel_values: torch.Tensor  # (B, F, 3, S, S) frames
    texts: list[str] = field(default_factory=list)  # captions (retrieval) or questions (qa), cleaned
    answers: list[str] = field(default_factory=list)  # qa: the gold answer
    keys: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)


class VideoFormat(SampleFormat):
    """MSRVTT-style entries ``{clip_name | video, caption}`` (retrieval) or ``{..., question, answer}`` (qa);
    the video is ``<video_root>/<clip_name><video_ext>`` (``video_root`` defaults to the JSON's folder). Frames:
    PyAV, ``num_frames`` by the official uniform sampling (fastblip/eval/video.py)."""

    name = "video"
    decodes_video = True

    def __init__(self, num_frames: int = 8, mode: str = "retrieval", video_root: str = "", video_ext: str = ".mp4",
                 max_words: int = 30):  # fmt: skip
        self.images_per_sample, self.mode = int(num_frames), mode
        self.video_root, self.video_ext, self.max_words = video_root, video_ext, max_words

    def load_json(self, path, image_root, flatten) -> JsonSource:
        p, anns, root = _entries(path, image_root, {})
        root = Path(self.video_root) if self.video_root else root
        text_key = "caption" if self.mode == "retrieval" else "question"
        items = []
        for i, a in enumerate(anns):
            name = a.get("clip_name") or a.get("video")
            if not isinstance(name, str) or not name:
                raise SourceError(f"{p}: item {i}: needs 'clip_name' or 'video', got {sorted(a)}")
            if not isinstance(a.get(text_key), str):
                raise SourceError(f"{p}: item {i}: '{text_key}' must be a string, got {a.get(text_key)!r}")
            path_ = root / name if Path(name).suffix else root / f"{name}{self.video_ext}"
            ans = a.get("answer")
            items.append({"image": under_root(root, str(path_)), "text": a[text_key], "key": name, "image_id": i,
                          "answer": ans if isinstance(ans, str) else (ans[0] if ans else None)})  # fmt: skip
        return JsonSource(str(p), str(root), items, len(anns))

    def json_sample(self, item, cfg):
        if len(item["text"]) > cfg.max_text_bytes:
            return [], None, "too_large"
        return [item["image"]], item, None

    def tar_sample(self, raw, cfg):
        return [None], None, {}, "missing_image"  # no tar layout for videos: JSON annotation files only

    def fields(self, e, meta, cfg, rng):
        t = e["text"]
        if self.mode == "retrieval":
            t = pre_caption(t, self.max_words)
        else:
            t = pre_question(t)
        if not t.strip():
            return None, "empty_caption"
        return {"text": t, "answer": e.get("answer")}, None

    def decode(self, data, max_pixels):
        from PIL import Image

        from .video import decode_video

        frames = decode_video(data, self.images_per_sample)
        for f in frames:
            if f.shape[0] * f.shape[1] > max_pixels:
                raise DecodeError("decompression_bomb", f"video frames of {f.shape[1]}x{f.shape[0]}")
        return [(Image.fromarray(f), None) for f in frames]

    def probe(self, path):
        try:
            return os.path.isfile(path) and os.path.getsize(path) > 0
        except OSError:
            return False

    def meta(self, meta_in, shard, image_id):
        return {"shard": shard}

    def collate_text(self, fields, tokenizer, cfg):
        return {"texts": [f["text"] for f in fields], "answers": [f["answer"] for f in fields]}

    def assemble(self, pixels, text, image_ids, keys, meta) -> VideoBatch:
        return VideoBatch(pixels, text["texts"], text["answers"], list(keys), list(meta))
