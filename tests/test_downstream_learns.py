"""Issue 8: every downstream task's tiny CPU recipe, started from the session's tiny pretrained models (the tiny
demo run, conftest.py), rises above chance on its synthetic set: VQA accuracy above the answer-type prior, NLVR2
accuracy above 50%, zero-shot text-to-video recall above the recall of a random ranking.

Measured on 2 CPU cores, 2026-11-28 (training is bit-reproducible since the index_select fix; VQA and NLVR2 read
through the one data pipeline since then, with its own shuffling and augmentation draws): VQA 66.7 (prior 28.1;
79.2 with the former loader), NLVR2 100.0 (89.1 before), video retrieval over 32 clips r_mean 51.0 (a random
ranking: 16.7).
The bounds leave room for another machine's numerics, not for a model at chance.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastblip.tasks import get_task
from fastblip.train.loop import Trainer
from fastblip.train.recipe import read_recipe

ROOT = Path(__file__).resolve().parents[1]


def _start(recipe, init_from: Path, out: Path) -> None:
    """The shipped tiny recipe (64 px / patch 16, as the demo models), started from ``init_from``."""
    assert recipe.data.image_size == 64 and recipe.model.config["vision"]["patch_size"] == 16
    recipe.model.init_from = str(init_from)
    recipe.train.out_dir = str(out)
    recipe.train.eval_every_epoch = False
    recipe.train.eval_at_end = False  # the test evaluates once itself


def _finetune_and_eval(recipe, task: str) -> dict:
    torch.manual_seed(0)
    tr = Trainer(recipe, progress=False)
    tr.fit()
    return get_task(task).evaluate(tr.model, recipe)


def test_vqa_finetune_beats_answer_type_prior(tiny_demo, tmp_path):
    demo_dir, _ = tiny_demo
    syn = tmp_path / "synth_vqa"
    r = read_recipe(ROOT / "recipes/finetune_vqa_tiny_cpu.yaml")
    r.data.train, r.data.eval = [str(syn / "vqa_train.json")], [str(syn / "vqa_val.json")]
    r.task_options = {"inference": "rank", "answer_list": str(syn / "answer_list.json"), "k_test": 8,
                      "synthetic": {"out_dir": str(syn), "num_train": 512, "num_val": 96, "image_size": 64,
                                    "seed": 0}}
    _start(r, demo_dir / "pretrain_boot" / "model", tmp_path / "run")
    ev = _finetune_and_eval(r, "vqa")  # the recipe: 20 epochs at lr 2e-3
    val = json.loads((syn / "vqa_val.json").read_text())
    by_type: dict[str, list[str]] = {}
    for q in val:
        by_type.setdefault(q["question_type"], []).append(q["answer"][0])
    prior = 100.0 * sum(Counter(a).most_common(1)[0][1] for a in by_type.values()) / len(val)
    print("measured", ev, "prior", prior)  # shown with -s: the figures quoted above
    assert ev["vqa_acc"] >= prior + 10.0, (ev["vqa_acc"], prior)


def test_nlvr_finetune_beats_chance(tiny_demo, tmp_path):
    demo_dir, _ = tiny_demo
    syn = tmp_path / "synth_nlvr"
    r = read_recipe(ROOT / "recipes/finetune_nlvr_tiny_cpu.yaml")
    r.data.train, r.data.eval = [str(syn / "nlvr_train.json")], [str(syn / "nlvr_dev.json")]
    r.task_options = {"synthetic": {"out_dir": str(syn), "num_train": 512, "num_dev": 128, "image_size": 64,
                                    "seed": 0}}
    # from the filter (the retrieval finetune: the best-trained cross-attention), mapped to the twin layout
    _start(r, demo_dir / "filter" / "model", tmp_path / "run")
    ev = _finetune_and_eval(r, "nlvr")  # the recipe: 40 epochs at lr 5e-4
    print("measured", ev)
    assert ev["num"] == 128 and ev["nlvr_acc"] >= 62.0, ev


def test_zero_shot_video_retrieval_beats_random_ranking(tiny_demo, tmp_path):
    pytest.importorskip("av")
    from fastblip.train.init import build_and_init

    demo_dir, _ = tiny_demo
    syn = tmp_path / "synth_video"
    r = read_recipe(ROOT / "recipes/eval_video_retrieval_tiny_cpu.yaml")
    r.data.eval = [str(syn / "video_test.json")]
    n = 32
    r.task_options = {"mode": "retrieval", "num_frames": 8, "k_test": 16, "video_root": str(syn / "videos"),
                      "synthetic": {"out_dir": str(syn), "num": n, "frames": 12, "image_size": 64, "seed": 0}}
    _start(r, demo_dir / "filter" / "model", tmp_path / "run")
    model = build_and_init(r).eval()
    ev = get_task("video").evaluate(model, r)
    chance = 100.0 * (1 + 5 + 10) / 3 / n  # mean of R@1, R@5, R@10 for a random ranking of n clips
    print("measured", ev, "chance", chance)
    assert ev["r_mean"] >= chance + 15.0, (ev, chance)
