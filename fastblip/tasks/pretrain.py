"""Task plug-in: BLIP pretraining (ITC + ITM + LM) on web shards and/or BLIP JSON caption sets.

Evaluation = the three pretraining losses on the eval split (no momentum update, no enqueue, fixed-seed
negatives) plus in-batch ITC recall@1 both ways and ITM accuracy on the positive/negative pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastblip.tasks.contract import Task


@dataclass
class Options:
    eval_batches: int = 0  # eval on at most this many batches; 0 = the whole eval split
    eval_batch_size: int = 0  # 0 = data.batch_size


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    """The recipe's train (``data.train``, one sample per image-caption pair) or eval (``data.eval``) loader."""
    from fastblip.data import open_loader

    opts = recipe.options()
    bs = None if train or not opts.eval_batch_size else opts.eval_batch_size
    return open_loader(recipe.data, train=train, seed=recipe.train.seed, rank=rank, world_size=world_size, epoch=epoch,
                       device=device, batch_size=bs, prompt="")


@torch.no_grad()
def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """Mean itc/itm/lm losses over the eval split, in-batch ITC recall@1 (i2t, t2i) and ITM accuracy."""
    opts = recipe.options()
    was_training = model.training
    model.eval()
    device = model.device
    gen = torch.Generator(device=device).manual_seed(recipe.train.seed)
    sums: dict[str, torch.Tensor] = {}
    n = 0
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else torch.autocast(device.type, enabled=False)
    try:
        loader = build_loader(recipe, train=False, rank=rank, world_size=world_size)
        for i, batch in enumerate(loader):
            if opts.eval_batches and i >= opts.eval_batches:
                break
            batch = batch.to(device)
            B = len(batch)
            if B < 2:  # ITM needs a negative within the batch
                continue
            # fixed-seed negatives: the same eval pairs at every epoch, and the training RNG untouched
            w = torch.ones(B, B, device=device).fill_diagonal_(0)
            neg = (torch.multinomial(w, 1, generator=gen).squeeze(1), torch.multinomial(w, 1, generator=gen).squeeze(1))
            with ctx:
                out = model(batch.pixel_values, batch.input_ids, batch.attention_mask, alpha=0.0, negatives=neg,
                            update_momentum=False, update_queue=False)
                img = model.image_features(batch.pixel_values)
                txt = model.text_features(batch.input_ids, batch.attention_mask)
            sim = img.float() @ txt.float().t()
            target = torch.arange(B, device=device)
            # duplicate captions make several columns right: count a hit when the picked text equals the true one
            ids = batch.image_ids.to(device)
            stats = {**{k: v.float() for k, v in out.items() if k != "loss"},
                     "itc_i2t_r1": (ids[sim.argmax(1)] == ids).float().mean(),
                     "itc_t2i_r1": (ids[sim.argmax(0)] == ids[target]).float().mean()}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0) + v
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        return {}
    return {k: round(float(v) / n, 5) for k, v in sums.items()}  # sync: once per evaluation


TASK = Task(name="pretrain", model_kind="pretrain", options=Options, build_loader=build_loader, evaluate=evaluate,
            compilable=True)
