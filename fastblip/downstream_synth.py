"""Synthetic downstream datasets drawn with the scene renderer of ``fastblip.data.synth``, in the official layouts.

- VQA (``make_vqa``): single-group scenes, questions on colour ("what color are the shapes?"), count ("how many
  shapes are there?", digit answers) and shape ("what shape is it?"); 10 "human" answers per question (one
  sometimes written as its number word, "two" for "2", so the evaluator's normalisation is exercised). Files:
  ``vqa_train.json`` / ``vqa_val.json`` ([{question_id, question, answer: [10], image, dataset}]) and
  ``answer_list.json``, as BLIP's ``data/vqa_dataset.py`` reads them.
- NLVR2 (``make_nlvr``): image pairs and statements "there is a {colour} shape in the {left|right} image",
  half true; ``nlvr_train.json`` / ``nlvr_dev.json`` ([{images: [a, b], sentence, label: "True"|"False"}]).
- Video (``make_video``): short clips (``frames`` frames, mp4 via PyAV) of one group of shapes sliding across
  the frame; ``video_test.json`` ([{clip_name, caption, question, answer}]), the MSRVTT-style layout.

Chance levels for the tests: VQA answer-type prior 1/7 (colour), 1/3 (count), 1/4 (shape); NLVR 1/2;
video R@1 = 1/num_videos.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fastblip.data.synth import COLOURS, SHAPES, render_scene
from fastblip.errors import ConfigError

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ("color", "count", "shape")
VQA_CHANCE = (1 / 7 + 1 / 3 + 1 / 4) / 3  # the best answer per question type without looking at the image


def _scene(rng: np.random.Generator, colours: tuple[str, ...] = tuple(COLOURS)) -> list[tuple[int, str, str, str]]:
    return [(int(rng.integers(1, 4)), colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(4))],
             "center")]


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=92)


def _check(n: int, image_size: int) -> None:
    if n < 1 or image_size < 16:
        raise ConfigError(f"task_options.synthetic: need at least 1 sample and image_size >= 16, got {n}, {image_size}")


def vqa_question(scene, qtype: str) -> tuple[str, str]:
    count, colour, shape, _ = scene[0]
    if qtype == "color":
        return "what color are the shapes?", colour
    if qtype == "count":
        return "how many shapes are there?", str(count)
    return "what shape is it?", shape


def make_vqa(out_dir, num_train: int = 512, num_val: int = 96, image_size: int = 32, seed: int = 0) -> dict:
    """Write the synthetic VQA set; returns paths {train_json, val_json, answer_list, out}."""
    _check(min(num_train, num_val), image_size)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    answers = sorted(set(COLOURS) | {"1", "2", "3"} | set(SHAPES))
    qid = 0
    paths = {}
    for split, n in (("train", num_train), ("val", num_val)):
        anns = []
        for i in range(n):
            scene = _scene(rng)
            rel = f"images/vqa_{split}/{i:06d}.jpg"
            _save(render_scene(scene, image_size, rng), out / rel)
            for qtype in QUESTION_TYPES:
                question, ans = vqa_question(scene, qtype)
                human = [ans] * 10
                if qtype == "count" and rng.random() < 0.3:
                    human[int(rng.integers(10))] = NUMBER_WORDS[int(ans)]  # a human writing "two" for "2"
                anns.append({"question_id": qid, "question": question, "answer": human, "image": rel,
                             "dataset": "vqa", "question_type": qtype})
                qid += 1
        p = out / f"vqa_{split}.json"
        p.write_text(json.dumps(anns), encoding="utf-8")
        paths[f"{split}_json"] = str(p)
    (out / "answer_list.json").write_text(json.dumps(answers), encoding="utf-8")
    paths.update(answer_list=str(out / "answer_list.json"), out=str(out))
    return paths


NLVR_COLOURS = ("red", "green", "blue", "yellow")  # 4 well-separated colours keep the tiny task learnable


def make_nlvr(out_dir, num_train: int = 512, num_dev: int = 128, image_size: int = 32, seed: int = 0) -> dict:
    """Write the synthetic NLVR2 set; statements are true for exactly half the pairs."""
    _check(min(num_train, num_dev), image_size)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    paths = {}
    for split, n in (("train", num_train), ("dev", num_dev)):
        anns = []
        for i in range(n):
            scenes = [_scene(rng, NLVR_COLOURS), _scene(rng, NLVR_COLOURS)]
            rels = []
            for j, sc in enumerate(scenes):
                rel = f"images/nlvr_{split}/{i:06d}_{j}.jpg"
                _save(render_scene(sc, image_size, rng), out / rel)
                rels.append(rel)
            side = int(rng.integers(2))
            truth = i % 2 == 0
            have = scenes[side][0][1]
            # a false statement names a colour in neither image: a tiny model can answer from the colours both
            # images show (a false colour present in the other image would need the side as well: measured, a
            # tiny model then stays at chance for 1,000+ steps)
            absent = [c for c in NLVR_COLOURS if c not in (scenes[0][0][1], scenes[1][0][1])]
            colour = have if truth else absent[int(rng.integers(len(absent)))]
            sentence = f"there is a {colour} shape in the {('left', 'right')[side]} image"
            anns.append({"images": rels, "sentence": sentence, "label": "True" if truth else "False",
                         "identifier": f"{split}-{i}"})
        p = out / f"nlvr_{split}.json"
        p.write_text(json.dumps(anns), encoding="utf-8")
        paths[f"{split}_json"] = str(p)
    paths["out"] = str(out)
    return paths


def write_clip(path: Path, frames: list[np.ndarray], fps: int = 8) -> None:
    """Encode uint8 HWC frames as an mp4 (mpeg4 codec, always present in PyAV's bundled FFmpeg)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "2"}  # near-lossless: colours must survive 4:2:0 at 32-64 px
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video(out_dir, num: int = 16, frames: int = 12, image_size: int = 32, seed: int = 0) -> dict:
    """Write ``num`` clips of a group of shapes sliding left to right; captions name count, colour, shape."""
    _check(num, image_size)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    anns = []
    seen = set()
    i = 0
    while len(anns) < num:
        scene = _scene(rng)
        count, colour, shape, _ = scene[0]
        if (count, colour, shape) in seen:  # distinct captions: retrieval has one right answer per text
            continue
        seen.add((count, colour, shape))
        img = np.asarray(render_scene(scene, image_size, rng))
        # the centred group slides from -1/4 to +1/4 of the width (np.roll wraps the noisy background only)
        shifts = np.linspace(-image_size / 4, image_size / 4, frames).round().astype(int)
        clip = [np.ascontiguousarray(np.roll(img, int(s), axis=1)) for s in shifts]
        name = f"video{i:05d}"
        write_clip(out / "videos" / f"{name}.mp4", clip)
        noun = shape if count == 1 else shape + "s"
        article = ("an" if colour[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
        anns.append({"clip_name": name, "caption": f"{article} {colour} {noun} moving to the right",
                     "question": "what color are the shapes?", "answer": colour})
        i += 1
    p = out / "video_test.json"
    p.write_text(json.dumps(anns), encoding="utf-8")
    return {"test_json": str(p), "video_root": str(out / "videos"), "out": str(out)}


_MAKERS = {"vqa": ("answer_list.json", make_vqa), "nlvr": ("nlvr_dev.json", make_nlvr),  # last file written
           "video": ("video_test.json", make_video)}


def ensure_downstream(kind: str, spec: dict) -> None:
    """Generate the ``kind`` set (``make_<kind>(**spec)``) when ``spec["out_dir"]`` lacks it; a recipe's
    ``task_options.synthetic``. Under torchrun rank 0 writes and the other ranks wait at a barrier (every rank
    builds its loader at the same point, so the barrier is collective)."""
    if not spec:
        return
    if "out_dir" not in spec:
        raise ConfigError("recipe key 'task_options.synthetic' needs an 'out_dir'")
    import torch.distributed as dist

    marker, make = _MAKERS[kind]
    distributed = dist.is_available() and dist.is_initialized()
    if not (Path(spec["out_dir"]) / marker).is_file() and (not distributed or dist.get_rank() == 0):
        try:
            make(**spec)
        except TypeError as e:
            raise ConfigError(f"recipe key 'task_options.synthetic': {e}") from None
    if distributed:
        dist.barrier()
