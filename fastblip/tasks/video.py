"""Task plug-in: zero-shot video-language evaluation (no training): text-to-video retrieval with a retrieval
model, or video QA with a VQA model (``task_options.mode``).

``data.eval``: MSRVTT-style JSON files, entries ``{clip_name | video, caption}`` (retrieval) or
``{clip_name | video, question, answer}`` (QA); videos are ``<video_root>/<clip_name><video_ext>``
(``video_root`` defaults to the JSON's folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fastblip.tasks.contract import Task
from fastblip.tasks.vqa import read_json_sources


@dataclass
class Options:
    mode: str = "retrieval"  # retrieval | qa
    num_frames: int = 8
    k_test: int = 128
    video_root: str = ""
    video_ext: str = ".mp4"
    answer_list: str = ""  # qa with inference=rank
    inference: str = "rank"  # qa: rank | generate
    video_batch: int = 4
    # make_video kwargs (out_dir, num, frames, image_size, seed): generated when out_dir has no clips yet
    synthetic: dict = field(default_factory=dict)


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    raise ValueError("task 'video' is evaluation only (zero-shot transfer); use `fastblip eval`")


def _entries(recipe, opts: Options) -> list[tuple[str, dict]]:
    from fastblip.downstream_synth import ensure_downstream

    ensure_downstream("video", opts.synthetic)
    if not recipe.data.eval:
        raise ValueError("recipe key 'data.eval' is empty")
    out = []
    for e in read_json_sources(recipe.data.eval):
        name = e.get("clip_name") or e.get("video")
        if not name:
            raise ValueError(f"video entry without 'clip_name' or 'video': {e}")
        root = Path(opts.video_root or e["_root"])
        path = root / name if Path(name).suffix else root / f"{name}{opts.video_ext}"
        out.append((str(path), e))
    return out


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype=None) -> dict:
    """retrieval: txt_r1.. img_r1.. r_mean (img = video); qa: {"video_qa_acc": percent, "num"}."""
    from fastblip.eval.video import evaluate_video_retrieval, video_qa

    opts = recipe.options()
    if opts.mode not in ("retrieval", "qa"):
        raise ValueError(f"task_options.mode: {opts.mode!r} is not retrieval or qa")
    entries = _entries(recipe, opts)
    paths = [p for p, _ in entries]
    was_training = model.training
    model.eval()
    try:
        if opts.mode == "retrieval":
            return evaluate_video_retrieval(model, paths, [e["caption"] for _, e in entries],
                                            num_frames=opts.num_frames, k_test=opts.k_test,
                                            max_words=recipe.data.max_words, max_length=recipe.data.max_length,
                                            video_batch=opts.video_batch, rank=rank, world_size=world_size)
        answers = None
        if opts.inference == "rank":
            if not opts.answer_list:
                raise ValueError("task_options.answer_list is needed for video QA with inference=rank")
            answers = json.loads(Path(opts.answer_list).read_text(encoding="utf-8"))
        preds = video_qa(model, paths, [e["question"] for _, e in entries], answer_list=answers,
                         method=opts.inference, num_frames=opts.num_frames, k_test=opts.k_test,
                         video_batch=opts.video_batch)
        gold = [e["answer"] if isinstance(e["answer"], str) else e["answer"][0] for _, e in entries]
        correct = sum(p == g for p, g in zip(preds, gold, strict=True))
        return {"video_qa_acc": 100.0 * correct / len(gold), "num": len(gold)}
    finally:
        model.train(was_training)


# zero-shot: evaluation only (build_loader refuses); the retrieval layout by default, a VQA model for mode qa
TASK = Task(name="video", model_kind="retrieval", options=Options, build_loader=build_loader, evaluate=evaluate)
