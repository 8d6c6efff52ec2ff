"""Task plug-in: VQA finetuning and evaluation on the official JSON layout (BLIP's ``data/vqa_dataset.py``).

Data: ``data.train`` / ``data.eval`` list JSON files (a path, image paths relative to the file's folder, or
``{json: ..., image_root: ...}``; entries ``{question_id, question, answer: [...], image, dataset}``) and/or
webdataset shards (``jpg`` + ``json`` with the same keys). They are read by the one data pipeline
(``fastblip.data.open_loader`` with ``VQAFormat``): sharding, shuffling, DALI or PIL, bad-input skip-and-count,
padding and exact resume as every task. Training sample: ``pre_question(question)``, unique answers weighted
by count / #answers ("vqa"; "vg" entries: each answer weight 0.2), as the official dataset. Evaluation:
``answer`` by ``task_options.inference`` (rank over ``answer_list``, k_test 128; or generate), results JSON
for the VQA server, and VQA accuracy when the eval JSON carries human answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastblip.data.formats import VQABatch
from fastblip.data.text import pre_question
from fastblip.errors import ConfigError, InputError, NotFoundError
from fastblip.tasks.contract import Task

__all__ = ["TASK", "Options", "VQABatch", "build_loader", "evaluate", "load_answer_list", "pre_question"]


@dataclass
class Options:
    inference: str = "rank"  # rank | generate
    answer_list: str = ""  # JSON list of candidate answers (rank); official: answer_list.json (3,128)
    k_test: int = 128
    results_file: str = ""  # default: <train.out_dir>/vqa_result.json
    eval_batch_size: int = 0  # 0 = data.batch_size
    # make_vqa kwargs (out_dir, num_train, num_val, image_size, seed): generated when out_dir has no set yet
    synthetic: dict = field(default_factory=dict)


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    from fastblip.data import VQAFormat, open_loader
    from fastblip.downstream_synth import ensure_downstream

    opts = recipe.options()
    ensure_downstream("vqa", opts.synthetic)
    bs = None if train or not opts.eval_batch_size else opts.eval_batch_size
    return open_loader(recipe.data, train=train, seed=recipe.train.seed, rank=rank, world_size=world_size, epoch=epoch,
                       device=device, batch_size=bs, fmt=VQAFormat(train))


def load_answer_list(path: str) -> list[str]:
    """The candidate answers of ``task_options.answer_list`` (a JSON list; missing, bad or empty: one error)."""
    from fastblip.data.readers import read_json_list

    if not Path(path).is_file():
        raise NotFoundError(f"task_options.answer_list not found: {path}")
    answers = read_json_list(path)
    if not answers:
        raise InputError(f"task_options.answer_list {path}: the list of answers is empty")
    return [str(a) for a in answers]


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """{"vqa_acc" (percent, when the eval JSON has answers), "num_questions", "results_file"}."""
    import torch.distributed as dist

    from fastblip.downstream_synth import ensure_downstream
    from fastblip.eval.vqa import vqa_accuracy, write_results

    opts = recipe.options()
    ensure_downstream("vqa", opts.synthetic)  # an eval-only run reads the answer list before any loader
    if opts.inference not in ("rank", "generate"):
        raise ConfigError(f"task_options.inference: {opts.inference!r} is not rank or generate")
    answer_list = load_answer_list(opts.answer_list) if opts.inference == "rank" else None
    was_training = model.training
    model.eval()
    dev = model.device
    dtype = amp_dtype
    ctx = torch.autocast(dev.type, dtype=dtype) if dtype is not None else torch.autocast(dev.type, enabled=False)
    results, gts = [], {}
    try:
        with ctx:
            for b in build_loader(recipe, train=False, rank=rank, world_size=world_size):
                preds = model.answer(b.pixel_values.to(dev), b.input_ids, attention_mask=b.attention_mask,
                                     method=opts.inference, answer_list=answer_list, k_test=opts.k_test)
                for qid, p, human in zip(b.question_ids, preds, b.answers, strict=True):
                    results.append({"question_id": qid, "answer": p})
                    if human:
                        gts[qid] = human
    finally:
        model.train(was_training)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (results, gts))
        results, gts = [r for g in gathered for r in g[0]], {k: v for g in gathered for k, v in g[1].items()}
    out = {"num_questions": len(results)}
    if rank == 0:
        path = opts.results_file or str(Path(recipe.train.out_dir) / "vqa_result.json")
        out["results_file"] = str(write_results(results, path))
    if gts and len(gts) == len(results):
        acc = vqa_accuracy(results, gts)
        out["vqa_acc"] = acc["vqa_acc"]
    return out


TASK = Task(name="vqa", model_kind="vqa", options=Options, build_loader=build_loader, evaluate=evaluate)
