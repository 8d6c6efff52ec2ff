"""Task plug-in: image-text retrieval finetuning (the CapFilt filter) and its evaluation (COCO / Flickr30k).

Training batches carry ``image_ids`` (equal ids = same image, the ITC positives); the model's
``training_step`` does ITC + ITM with hard negatives (fastblip/models/blip_retrieval.py). Evaluation is the
official re-ranked recall (fastblip/eval/retrieval.py) on a BLIP eval JSON (one entry per image, ``caption``
a list).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastblip.tasks.contract import Task


@dataclass
class Options:
    k_test: int = 256  # ITM re-ranked candidates per row: 256 COCO, 128 Flickr30k (official configs)
    eval_batch_size: int = 0  # images per eval batch; 0 = data.batch_size


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None,
                 prompt: str | None = None):
    """The recipe's train (``data.train``) or eval (``data.eval``) loader. ``prompt`` overrides
    ``data.prompt`` (the captioner trains on "a picture of " + caption; eval references carry none)."""
    from fastblip.data import open_loader

    opts = recipe.options()
    bs = None if train or not opts.eval_batch_size else opts.eval_batch_size
    # the prompt is training text only: eval references carry none
    return open_loader(recipe.data, train=train, seed=recipe.train.seed, rank=rank, world_size=world_size, epoch=epoch,
                       device=device, batch_size=bs, prompt=prompt if train else "")


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """txt_r1 txt_r5 txt_r10 txt_r_mean img_r1 img_r5 img_r10 img_r_mean r_mean (percent)."""
    from fastblip.eval.retrieval import evaluate_retrieval

    opts = recipe.options()
    was_training = model.training
    model.eval()
    try:
        # every rank encodes the whole eval set (official), then scores its slice of the rows
        loader = build_loader(recipe, train=False, rank=0, world_size=1)
        return evaluate_retrieval(model, loader, k_test=opts.k_test, max_words=recipe.data.max_words,
                                  max_length=recipe.data.max_length, rank=rank, world_size=world_size,
                                  dtype=amp_dtype)
    finally:
        model.train(was_training)


TASK = Task(name="retrieval", model_kind="retrieval", options=Options, build_loader=build_loader,
            evaluate=evaluate, compilable=True)
