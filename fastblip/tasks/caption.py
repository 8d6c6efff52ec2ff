"""Task plug-in: captioning finetuning (the CapFilt captioner) and its evaluation (BLEU-4, CIDEr).

Training: LM loss on ``data.prompt`` + caption ("a picture of " in BLIP's recipes) with the prompt tokens
masked (``BlipCaption.training_step``). Evaluation: beam search (3 beams, max 20, min 5) on the eval JSON's
images, scored against all their reference captions with pycocoevalcap (the ``eval`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastblip.tasks.contract import Task
from fastblip.tasks.retrieval import build_loader as _retrieval_loader


@dataclass
class Options:
    num_beams: int = 3
    max_length: int = 20  # counts the prompt tokens (HF generate semantics, BLIP's caption_coco.yaml)
    min_length: int = 5
    repetition_penalty: float = 1.0  # 1.1 for NoCaps
    eval_batch_size: int = 0  # 0 = data.batch_size


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    """Train batches with the prompt prepended to each caption; eval batches with clean reference captions."""
    return _retrieval_loader(recipe, train=train, rank=rank, world_size=world_size, epoch=epoch, device=device)


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """{"bleu4", "cider"} (pycocoevalcap fractions). Each rank captions its share; rank 0's dict holds the
    scores of all images when run under torchrun (captions gathered before scoring)."""
    import torch.distributed as dist

    from fastblip.eval.caption_metrics import caption_scores, evaluate_captions

    opts = recipe.options()
    was_training = model.training
    model.eval()
    try:
        loader = build_loader(recipe, train=False, rank=rank, world_size=world_size)
        kw = dict(num_beams=opts.num_beams, max_length=opts.max_length, min_length=opts.min_length,
                  repetition_penalty=opts.repetition_penalty, dtype=amp_dtype)
        if world_size == 1 or not dist.is_initialized():
            return evaluate_captions(model, loader, **kw)
        cands, refs = evaluate_captions(model, loader, return_captions=True, **kw)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (cands, refs))
        all_c, all_r = {}, {}
        for c, r in gathered:
            all_c.update(c)
            all_r.update(r)
        return caption_scores(all_c, all_r)
    finally:
        model.train(was_training)


TASK = Task(name="caption", model_kind="caption", options=Options, build_loader=build_loader, evaluate=evaluate,
            compilable=True)
