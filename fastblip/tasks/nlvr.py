"""Task plug-in: NLVR2 finetuning and evaluation on the official JSON layout (BLIP's ``data/nlvr_dataset.py``).

Entries ``{images: [left, right], sentence, label: "True"|"False"}`` (or webdataset shards with ``left.jpg``,
``right.jpg`` and a ``json`` ``{sentence, label}``), read by the one data pipeline (``open_loader`` with
``NLVRFormat``: two images per sample; sharding, DALI or PIL, bad-input skip-and-count, padding and exact
resume as every task); text = ``pre_caption(sentence, 40)``. Training augmentation as the official dataset:
with probability 0.5 the two images are swapped, and then "left"/"right" in the sentence are swapped too
(when it names a side). Evaluation keeps the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastblip.data.formats import NLVRBatch, swap_sides
from fastblip.tasks.contract import Task

__all__ = ["TASK", "NLVRBatch", "Options", "build_loader", "evaluate", "swap_sides"]


@dataclass
class Options:
    max_words: int = 40  # official nlvr_dataset: pre_caption(sentence, 40)
    eval_batch_size: int = 0  # 0 = data.batch_size
    # make_nlvr kwargs (out_dir, num_train, num_dev, image_size, seed): generated when out_dir has no set yet
    synthetic: dict = field(default_factory=dict)


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    from fastblip.data import NLVRFormat, open_loader
    from fastblip.downstream_synth import ensure_downstream

    opts = recipe.options()
    ensure_downstream("nlvr", opts.synthetic)
    bs = None if train or not opts.eval_batch_size else opts.eval_batch_size
    return open_loader(recipe.data, train=train, seed=recipe.train.seed, rank=rank, world_size=world_size, epoch=epoch,
                       device=device, batch_size=bs, fmt=NLVRFormat(train, opts.max_words))


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """{"nlvr_acc": percent, "num": n} over ``data.eval`` (summed over ranks under torchrun)."""
    from fastblip.eval.nlvr import evaluate_nlvr

    was_training = model.training
    model.eval()
    try:
        loader = build_loader(recipe, train=False, rank=rank, world_size=world_size)
        return evaluate_nlvr(model, loader, dtype=amp_dtype)
    finally:
        model.train(was_training)


TASK = Task(name="nlvr", model_kind="nlvr", options=Options, build_loader=build_loader, evaluate=evaluate)
