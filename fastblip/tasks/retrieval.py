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
    from fastblip.data.loader import build_loader as _build

    d = recipe.data
    sources = d.sources(train)
    opts = recipe.options()
    bs = d.batch_size if train or not getattr(opts, "eval_batch_size", 0) else opts.eval_batch_size
    loader = _build(sources, image_size=d.image_size, batch_size=bs, train=train, max_words=d.max_words,
                    max_length=d.max_length, prompt=(d.prompt if prompt is None else prompt) if train else "",
                    min_scale=d.min_scale, randaugment=d.randaugment, hflip=d.hflip, backend=d.backend,
                    num_workers=d.num_workers, seed=recipe.train.seed, rank=rank, world_size=world_size,
                    resampled=d.resampled and train, padding=d.padding, device=device,
                    batches_per_epoch=d.batches_per_epoch if train else None)
    loader.set_epoch(epoch)
    return loader


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
