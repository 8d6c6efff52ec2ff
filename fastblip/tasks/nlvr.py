"""Task plug-in: NLVR2 finetuning and evaluation on the official JSON layout (BLIP's ``data/nlvr_dataset.py``).

Entries ``{images: [left, right], sentence, label: "True"|"False"}``; text = ``pre_caption(sentence, 40)``.
Training augmentation as the official dataset: with probability 0.5 the two images are swapped, and then
"left"/"right" in the sentence are swapped too (when it names a side). Evaluation keeps the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fastblip.tasks.contract import Task
from fastblip.tasks.vqa import _open_rgb, _transform, json_task_loader


@dataclass
class Options:
    max_words: int = 40  # official nlvr_dataset: pre_caption(sentence, 40)
    eval_batch_size: int = 0  # 0 = data.batch_size
    # make_nlvr kwargs (out_dir, num_train, num_dev, image_size, seed): generated when out_dir has no set yet
    synthetic: dict = field(default_factory=dict)


@dataclass
class NLVRBatch:
    pixel_values: torch.Tensor  # (B, 3, S, S) left images
    pixel_values_1: torch.Tensor  # (B, 3, S, S) right images
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor
    labels: torch.Tensor  # (B,) 1 = true
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> NLVRBatch:
        t = [x.to(device, non_blocking=True) for x in (self.pixel_values, self.pixel_values_1, self.input_ids,
                                                        self.attention_mask, self.labels)]
        return NLVRBatch(*t, self.texts)


def swap_sides(sentence: str) -> str:
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in sentence.split(" "))


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    from fastblip.data.text import pre_caption
    from fastblip.data.tokenizer import load_tokenizer
    from fastblip.downstream_synth import ensure_downstream

    d = recipe.data
    sources = d.sources(train)
    opts = recipe.options()
    ensure_downstream("nlvr", opts.synthetic)
    tf, tok = _transform(recipe, train), load_tokenizer()

    def make(e: dict, rng: np.random.Generator) -> dict:
        if len(e.get("images", [])) != 2:
            raise ValueError(f"NLVR2 entry {e.get('identifier', '?')} needs exactly two images")
        sentence = pre_caption(e["sentence"], opts.max_words)
        label = 1 if str(e["label"]) == "True" else 0
        a, b = (_open_rgb(e["_root"], p) for p in e["images"])
        if train and rng.random() < 0.5:
            a, b = b, a
            words = sentence.split(" ")
            if "left" in words or "right" in words:
                sentence = swap_sides(sentence)
        return {"a": tf(a, rng=rng), "b": tf(b, rng=rng), "text": sentence, "label": label}

    def collate(samples: list[dict]) -> NLVRBatch:
        enc = tok([s["text"] for s in samples], max_length=d.max_length, padding="longest")
        return NLVRBatch(torch.stack([s["a"] for s in samples]), torch.stack([s["b"] for s in samples]),
                         enc["input_ids"], enc["attention_mask"], torch.tensor([s["label"] for s in samples]),
                         [s["text"] for s in samples])

    return json_task_loader(recipe, sources, make, collate, train=train, rank=rank, world_size=world_size,
                            epoch=epoch, device=device, eval_batch_size=opts.eval_batch_size)


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
