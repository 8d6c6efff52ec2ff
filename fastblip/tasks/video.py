"""Task plug-in: zero-shot video-language evaluation (no training): text-to-video retrieval with a retrieval
model, or video QA with a VQA model (``task_options.mode``).

``data.eval``: MSRVTT-style JSON files, entries ``{clip_name | video, caption}`` (retrieval) or
``{clip_name | video, question, answer}`` (QA); videos are ``<video_root>/<clip_name><video_ext>``
(``video_root`` defaults to the JSON's folder). Read by the one data pipeline (``fastblip.data.VideoFormat``);
``data.backend=dali`` is refused (PyAV decodes the frames in the loader workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastblip.errors import ConfigError, InputError
from fastblip.tasks.contract import Task


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
    """The evaluation loader of ``data.eval`` (``VideoBatch``es through the one data pipeline: an unreadable
    video is skipped and counted with its caption). Every rank reads every video (as image-text retrieval:
    the score rows are split afterwards). Training: refused, the task is zero-shot."""
    from fastblip.data import VideoFormat, open_loader
    from fastblip.downstream_synth import ensure_downstream

    if train:
        raise ConfigError("task 'video' is evaluation only (zero-shot transfer); use `fastblip eval`")
    opts = recipe.options()
    if opts.mode not in ("retrieval", "qa"):
        raise ConfigError(f"task_options.mode: {opts.mode!r} is not retrieval or qa")
    ensure_downstream("video", opts.synthetic)
    fmt = VideoFormat(opts.num_frames, opts.mode, opts.video_root, opts.video_ext, recipe.data.max_words)
    return open_loader(recipe.data, train=False, seed=recipe.train.seed, epoch=epoch, device=device,
                       batch_size=opts.video_batch, fmt=fmt)


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype=None) -> dict:
    """retrieval: txt_r1.. img_r1.. r_mean (img = video); qa: {"video_qa_acc": percent, "num"}."""
    from fastblip.eval.video import evaluate_video_retrieval, video_qa
    from fastblip.tasks.vqa import load_answer_list

    opts = recipe.options()
    loader = build_loader(recipe, train=False)
    answers = None
    if opts.mode == "qa" and opts.inference == "rank":
        if not opts.answer_list:
            raise ConfigError("task_options.answer_list is needed for video QA with inference=rank")
        answers = load_answer_list(opts.answer_list)
    was_training = model.training
    model.eval()
    dev = model.device
    ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else torch.autocast(dev.type, enabled=False)
    try:
        with ctx:
            if opts.mode == "retrieval":
                return evaluate_video_retrieval(model, loader, k_test=opts.k_test, max_length=recipe.data.max_length,
                                                rank=rank, world_size=world_size)
            preds, gold = video_qa(model, loader, answer_list=answers, method=opts.inference, k_test=opts.k_test)
    finally:
        model.train(was_training)
    scored = [(p, g) for p, g in zip(preds, gold, strict=True) if g is not None]
    if not scored:
        raise InputError("video QA: no evaluated entry has an 'answer'")
    correct = sum(p == g for p, g in scored)
    return {"video_qa_acc": 100.0 * correct / len(scored), "num": len(scored)}


# zero-shot: evaluation only (build_loader refuses); the retrieval layout by default, a VQA model for mode qa
TASK = Task(name="video", model_kind="retrieval", options=Options, build_loader=build_loader, evaluate=evaluate)
