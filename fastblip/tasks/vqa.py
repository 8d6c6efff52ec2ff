"""Task plug-in: VQA finetuning and evaluation on the official JSON layout (BLIP's ``data/vqa_dataset.py``).

Data: ``data.train`` / ``data.eval`` list JSON files (a path, image paths relative to the file's folder, or
``{json: ..., image_root: ...}``); entries ``{question_id, question, answer: [...], image, dataset}``.
Training sample: ``pre_question(question)``, unique answers weighted by count / #answers ("vqa"; "vg" entries:
each answer weight 0.2), as the official dataset. Evaluation: ``answer`` by ``task_options.inference`` (rank over
``answer_list``, k_test 128; or generate), results JSON for the VQA server, and VQA accuracy when the eval JSON
carries human answers.

``JsonTaskLoader`` (also used by NLVR2): map-style, sharded by rank, per-epoch seeded shuffle, per-sample seeded
augmentation, resumable by (epoch, batches) like ``fastblip.data.Loader``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastblip.tasks.contract import Task


@dataclass
class Options:
    inference: str = "rank"  # rank | generate
    answer_list: str = ""  # JSON list of candidate answers (rank); official: answer_list.json (3,128)
    k_test: int = 128
    results_file: str = ""  # default: <train.out_dir>/vqa_result.json
    eval_batch_size: int = 0  # 0 = data.batch_size
    # make_vqa kwargs (out_dir, num_train, num_val, image_size, seed): generated when out_dir has no set yet
    synthetic: dict = field(default_factory=dict)


def pre_question(question: str, max_words: int = 50) -> str:
    """Official ``pre_question``: lowercase, delete ``.!"()*#:;~``, strip trailing spaces, keep max_words."""
    q = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def read_json_sources(sources) -> list[dict]:
    """Entries of every JSON source with ``_root`` (image folder) attached."""
    items = []
    for s in sources:
        if isinstance(s, dict):
            path, root = Path(s["json"]), Path(s.get("image_root") or Path(s["json"]).parent)
        else:
            path = Path(s)
            root = path.parent
        if not path.is_file():
            raise FileNotFoundError(f"annotation file not found: {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of entries")
        items += [dict(d, _root=str(root)) for d in data]
    return items


class _MapDataset(Dataset):
    def __init__(self, items: list[dict], make: Callable[[dict, np.random.Generator], dict], seed: int):
        self.items, self.make, self.seed, self.epoch = items, make, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.make(self.items[i], np.random.default_rng((self.seed, self.epoch, i)))


class JsonTaskLoader:
    """Batches of ``collate(list of samples)``; ``state_dict``/``load_state_dict`` resume mid-epoch."""

    def __init__(self, items: list[dict], make, collate, *, batch_size: int, train: bool, seed: int, rank: int,
                 world_size: int, num_workers: int, device=None):
        if not items:
            raise ValueError("the task's annotation files hold no entries")
        self.ds = _MapDataset(items, make, seed)
        self.collate, self.batch_size, self.train = collate, batch_size, train
        self.seed, self.rank, self.world, self.workers, self.device = seed, rank, world_size, num_workers, device
        self.epoch, self.batches, self.stats = 0, 0, {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = int(epoch), 0

    def _indices(self) -> list[int]:
        n = len(self.ds)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.train else np.arange(n)
        per = math.ceil(n / self.world)
        if self.train:  # equal batch counts on every rank (DDP), padded by wrapping
            order = np.concatenate([order, order[: per * self.world - n]])
            return order[self.rank::self.world].tolist()
        return order[self.rank * per:(self.rank + 1) * per].tolist()  # eval: disjoint slices, no duplicates

    def __len__(self) -> int:
        k = len(self._indices())
        return k // self.batch_size if self.train else math.ceil(k / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        batches = [idx[a:a + self.batch_size] for a in range(0, len(idx), self.batch_size)]
        if self.train and batches and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]  # drop_last in training, as the official loaders
        self.ds.epoch = self.epoch
        todo = batches[self.batches:]
        kw = {"num_workers": self.workers, "collate_fn": self.collate, "batch_sampler": todo}
        for b in DataLoader(self.ds, **kw):
            self.batches += 1
            yield b.to(self.device) if self.device is not None else b
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        for k, have in (("seed", self.seed), ("world_size", self.world)):
            if state.get(k) != have:
                raise ValueError(f"data position saved with {k}={state.get(k)}, this loader has {k}={have}")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


@dataclass
class VQABatch:
    pixel_values: torch.Tensor  # (B, 3, S, S)
    input_ids: torch.Tensor  # (B, Lq) questions, [CLS] first
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor  # (sum n, La) every question's answers, [CLS] first
    answer_mask: torch.Tensor
    n: torch.Tensor  # (B,) answers per question
    weights: torch.Tensor  # (sum n,)
    question_ids: list = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)  # human answers (eval) / unique answers (train)

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def to(self, device) -> VQABatch:
        t = [x.to(device, non_blocking=True) for x in (self.pixel_values, self.input_ids, self.attention_mask,
                                                        self.answer_ids, self.answer_mask, self.n, self.weights)]
        return VQABatch(*t, self.question_ids, self.questions, self.answers)


def _open_rgb(root: str, rel: str):
    from fastblip.data.decode import decode_image

    path = Path(root) / rel
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return decode_image(path.read_bytes())[0]  # DecodeError names the reason


def _transform(recipe, train: bool):
    from fastblip.data.transforms import eval_transform, train_transform

    d = recipe.data
    return train_transform(d.image_size, (d.min_scale, 1.0), d.randaugment, d.hflip) if train else eval_transform(d.image_size)


def build_loader(recipe, *, train: bool, rank: int = 0, world_size: int = 1, epoch: int = 0, device=None):
    from fastblip.data.tokenizer import load_tokenizer
    from fastblip.downstream_synth import ensure_downstream

    d = recipe.data
    sources = d.sources(train)
    opts = recipe.options()
    ensure_downstream("vqa", opts.synthetic)
    tf, tok, max_len = _transform(recipe, train), load_tokenizer(), d.max_length

    def make(e: dict, rng: np.random.Generator) -> dict:
        answers = list(e.get("answer") or [])
        if isinstance(e.get("answer"), str):
            answers = [e["answer"]]
        if e.get("dataset", "vqa") == "vg":
            uniq, w = answers, [0.2] * len(answers)
        else:
            cnt = Counter(answers)
            uniq, w = list(cnt), [c / len(answers) for c in cnt.values()]
        return {"pixel": tf(_open_rgb(e["_root"], e["image"]), rng=rng), "question": pre_question(e["question"]),
                "qid": e.get("question_id"), "uniq": uniq, "w": w, "human": answers}

    def collate(samples: list[dict]) -> VQABatch:
        q = tok([s["question"] for s in samples], max_length=max_len, padding="longest")
        ans = [a for s in samples for a in s["uniq"]]
        if train and not ans:
            raise ValueError("a VQA training entry has no answers")
        a = tok(ans, max_length=max_len, padding="longest") if ans else {
            "input_ids": torch.zeros(0, 1, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long)}
        return VQABatch(torch.stack([s["pixel"] for s in samples]), q["input_ids"], q["attention_mask"],
                        a["input_ids"], a["attention_mask"], torch.tensor([len(s["uniq"]) for s in samples]),
                        torch.tensor([w for s in samples for w in s["w"]], dtype=torch.float),
                        [s["qid"] for s in samples], [s["question"] for s in samples],
                        [s["human"] for s in samples])

    return json_task_loader(recipe, sources, make, collate, train=train, rank=rank, world_size=world_size,
                            epoch=epoch, device=device, eval_batch_size=opts.eval_batch_size)


def json_task_loader(recipe, sources, make, collate, *, train: bool, rank: int, world_size: int, epoch: int,
                     device=None, eval_batch_size: int = 0) -> JsonTaskLoader:
    """A ``JsonTaskLoader`` over the recipe's JSON ``sources`` (VQA, NLVR2), positioned at ``epoch``."""
    d = recipe.data
    bs = d.batch_size if train or not eval_batch_size else eval_batch_size
    loader = JsonTaskLoader(read_json_sources(sources), make, collate, batch_size=bs, train=train,
                            seed=recipe.train.seed, rank=rank, world_size=world_size, num_workers=d.num_workers,
                            device=device)
    loader.set_epoch(epoch)
    return loader


def load_answer_list(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task_options.answer_list not found: {p}")
    return [str(a) for a in json.loads(p.read_text(encoding="utf-8"))]


def evaluate(model, recipe, *, rank: int = 0, world_size: int = 1, amp_dtype: torch.dtype | None = None) -> dict:
    """{"vqa_acc" (percent, when the eval JSON has answers), "num_questions", "results_file"}."""
    import torch.distributed as dist

    from fastblip.downstream_synth import ensure_downstream
    from fastblip.eval.vqa import vqa_accuracy, write_results

    opts = recipe.options()
    ensure_downstream("vqa", opts.synthetic)  # an eval-only run reads the answer list before any loader
    if opts.inference not in ("rank", "generate"):
        raise ValueError(f"task_options.inference: {opts.inference!r} is not rank or generate")
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
