"""`fastblip eval --recipe FILE [key=value ...] [--json]`: evaluate ``model.init_from`` on ``data.eval``.

Dispatches on the recipe's ``task`` through ``fastblip.tasks.get_task(task).evaluate``; under torchrun every rank
joins and rank 0 prints. Keys: retrieval txt_r1 txt_r5 txt_r10 img_r1 img_r5 img_r10 r_mean (+ txt_r_mean,
img_r_mean); caption bleu4 cider (DESIGN §3).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("fastblip.eval")


# tasks whose evaluate() writes into train.out_dir (VQA: the answers file for the evaluation server); eval owns
# that directory while it runs, as a training run would (fastblip/train/rundir.py)
WRITES_OUT_DIR = ("vqa",)


def load_model_for(recipe, device):
    """The checkpoint named by ``model.init_from`` (any format ``fastblip.load`` reads), in eval mode."""
    from fastblip.config import ConfigError

    path = recipe.model.init_from
    if not path:
        raise ConfigError("recipe key 'model.init_from' must name the checkpoint to evaluate")
    import fastblip

    return fastblip.load(path, image_size=recipe.data.image_size, device=device)


def run_eval(args: argparse.Namespace) -> int:
    from fastblip.config import ConfigError
    from fastblip.tasks import get_task
    from fastblip.train.recipe import read_recipe

    recipe = read_recipe(args.recipe, args.overrides)
    task = get_task(recipe.task)
    if not recipe.data.eval:
        raise ConfigError("recipe key 'data.eval' is empty: nothing to evaluate")
    from fastblip.config import check_device
    from fastblip.train.distributed import init_distributed
    from fastblip.train.rundir import acquire_lock, on_rank0

    check_device(args.device)  # `--device cuda` on a machine without one: one line, before loading anything
    info = init_distributed(args.device)
    rank, world, device = info.rank, info.world_size, info.device
    lock = None
    if recipe.task in WRITES_OUT_DIR:
        results = getattr(recipe.options(), "results_file", "") or ""
        where = Path(results).parent if results else Path(recipe.train.out_dir)
        lock = on_rank0(lambda: acquire_lock(where, "eval", "eval results directory"))[0]
    try:
        model = load_model_for(recipe, device)
        from fastblip.backends import resolve

        bk = resolve(device, attention=model.cfg.attention_backend, ops=model.cfg.ops_backend or "auto",
                     amp=recipe.train.amp, data=recipe.data.backend, max_length=recipe.data.max_length)
        model.set_backends(attention=bk.attention, ops=dict(bk.ops))
        if rank == 0:  # every implementation choice of the run, once
            print(f"fastblip eval: {bk.line()}", file=sys.stderr, flush=True)
        metrics = task.evaluate(model, recipe, rank=rank, world_size=world, amp_dtype=bk.amp_dtype)
    finally:
        if lock is not None:
            lock.release()
    if rank == 0:
        if args.json:
            print(json.dumps(metrics))
        else:
            for k, v in metrics.items():
                print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: retrieval recall, captioning BLEU-4/CIDEr, VQA, NLVR2",
                       description="Evaluate model.init_from on data.eval with the recipe's task metrics.")
    p.add_argument("--recipe", required=True, help="YAML recipe (task, model.init_from, data.eval, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, dotted keys")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.set_defaults(func=run_eval)
