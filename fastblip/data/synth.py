"""A synthetic noisy image-text dataset: PIL-drawn scenes with template captions (``fastblip data synth``).

Scenes: one or two groups of 1–3 identical shapes (circle, square, triangle, star) in one of 7 colours at one
of 5 positions, on a dark, slightly noisy background. Captions name count, colour, shape and position:
"two red circles on the left", "a blue square on the top and a yellow star on the bottom". The vocabulary
is ~25 words and every attribute is a large, distinct visual feature, so a tiny model (ViT width 64, patch
8 on 32–64 px; BERT hidden 64, 2 layers) learns retrieval and captioning in a few CPU minutes.

Web split: a fraction ``noise`` of captions is replaced by another scene's (different) caption and marked
``"noisy": true``, so a filter's ITM scores can be evaluated. Human split: clean. Eval split: clean,
BLIP eval JSON (``caption`` a list) with image ids. Everything is written both as webdataset shards
(img2dataset layout: key.jpg, key.txt, key.json) and as BLIP JSON over ``images/``.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastblip.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 230, 30),
    "purple": (160, 40, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
POSITIONS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
PAIRS = (("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top"))
NUMBERS = ("a", "two", "three")


def _group_text(count: int, colour: str, shape: str, pos: str) -> str:
    noun = shape if count == 1 else shape + "s"
    where = "in the center" if pos == "center" else f"on the {pos}"
    article = ("an" if colour[0] in "aeiou" else "a") if count == 1 else NUMBERS[count - 1]
    return f"{article} {colour} {noun} {where}"


def random_scene(rng: np.random.Generator) -> list[tuple[int, str, str, str]]:
    if rng.random() < 0.6:
        pos = [list(POSITIONS)[int(rng.integers(5))]]
    else:
        pos = list(PAIRS[int(rng.integers(len(PAIRS)))])
    groups = []
    for p in pos:
        groups.append(
            (int(rng.integers(1, 4)), list(COLOURS)[int(rng.integers(7))], SHAPES[int(rng.integers(4))], p)
        )
    return groups


def scene_caption(scene) -> str:
    return " and ".join(_group_text(*g) for g in scene)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # five-pointed star
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        d.polygon(pts, fill=fill)


def render_scene(scene, size: int, rng: np.random.Generator) -> Image.Image:
    bg = rng.integers(0, 50, size=3)
    arr = np.clip(bg + rng.normal(0, 6, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    two = len(scene) > 1
    for count, colour, shape, pos in scene:
        cx, cy = POSITIONS[pos]
        cx, cy = (cx + rng.uniform(-0.03, 0.03)) * size, (cy + rng.uniform(-0.03, 0.03)) * size
        r = size * (0.075 if count > 1 else 0.11) * rng.uniform(0.85, 1.15)
        step = 2.4 * r
        # members in a line across the group's axis: vertical for left/right groups, horizontal otherwise
        vertical = pos in ("left", "right") or (not two and rng.random() < 0.5)
        for k in range(count):
            off = (k - (count - 1) / 2) * step
            x, y = (cx, cy + off) if vertical else (cx + off, cy)
            _draw_shape(d, shape, x, y, r, COLOURS[colour])
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def _write_split(out: Path, name: str, records: list[dict], shard_size: int) -> str:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    n_shards = max(1, math.ceil(len(records) / shard_size))
    for s in range(n_shards):
        with tarfile.open(d / f"{name}-{s:05d}.tar", "w") as tf:
            for r in records[s * shard_size : (s + 1) * shard_size]:
                key = f"{r['image_id']:09d}"
                meta = {k: r[k] for k in ("caption", "noisy", "image_id", "true_caption")}
                _add(tf, key + ".jpg", r["_jpg"])
                _add(tf, key + ".txt", r["caption"].encode("utf-8"))
                _add(tf, key + ".json", json.dumps(meta).encode("utf-8"))
    return str(d / f"{name}-{{00000..{n_shards - 1:05d}}}.tar")


def make_synthetic(
    out_dir,
    num: int,
    noise: float,
    seed: int,
    image_size: int = 64,
    human: int | None = None,
    eval_num: int | None = None,
    shard_size: int = 200,
) -> dict:
    """Write web (noisy), human (clean) and eval splits; returns their paths and counts."""
    if num < 1 or not 0.0 <= noise <= 1.0 or image_size < 16 or shard_size < 1:
        raise ConfigError(f"need num >= 1, 0 <= noise <= 1, image_size >= 16, shard_size >= 1; got {num}, {noise}, "
                         f"{image_size}, {shard_size}")  # fmt: skip
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    human = max(1, num // 2) if human is None else human
    eval_num = max(8, num // 10) if eval_num is None else eval_num
    next_id = 0
    result: dict = {"out": str(out), "image_size": image_size}
    for split, n, noisy_frac in (("web", num, noise), ("human", human, 0.0), ("eval", eval_num, 0.0)):
        if n == 0:
            continue
        records = []
        n_noisy = int(round(noisy_frac * n))
        noisy_idx = set(rng.permutation(n)[:n_noisy].tolist())
        for i in range(n):
            scene = random_scene(rng)
            true = scene_caption(scene)
            caption = true
            if i in noisy_idx:
                while caption == true:  # another scene's caption, never the true one
                    caption = scene_caption(random_scene(rng))
            jpg = _jpeg(render_scene(scene, image_size, rng))
            rel = f"images/{split}/{next_id:09d}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(jpg)
            records.append({"image": rel, "caption": caption, "noisy": i in noisy_idx, "image_id": next_id,
                            "true_caption": true, "_jpg": jpg})  # fmt: skip
            next_id += 1
        result[split] = _write_split(out, split, records, shard_size)
        anns = [{k: v for k, v in r.items() if k != "_jpg"} for r in records]
        if split == "eval":
            for a in anns:
                a["caption"] = [a["caption"]]
        (out / f"{split}.json").write_text(json.dumps(anns, indent=0), encoding="utf-8")
        result[f"{split}_json"] = str(out / f"{split}.json")
        result[f"num_{split}"] = n
        if split == "web":
            result["num_noisy"] = n_noisy
    (out / "synth.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result
