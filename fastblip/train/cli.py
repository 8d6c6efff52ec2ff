"""``fastblip pretrain`` and ``fastblip finetune``: ``--recipe FILE [key=value ...] [--resume] [--json]``.

Both run the same Trainer; ``finetune`` only insists that the recipe names a non-pretrain task. A run owns
``train.out_dir`` (lock, run identity: fastblip/train/rundir.py): a non-empty one needs ``--resume`` (continue
it) or ``--overwrite`` (replace it). Under torchrun (``torchrun --nproc_per_node N -m fastblip pretrain ...``)
every rank runs this verb.
"""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace, verb: str) -> int:
    from fastblip.config import ConfigError
    from fastblip.train.loop import Trainer
    from fastblip.train.recipe import read_recipe

    recipe = read_recipe(args.recipe, args.overrides)
    if verb == "pretrain" and recipe.task != "pretrain":
        raise ConfigError(f"fastblip pretrain: the recipe's task is '{recipe.task}'; use fastblip finetune")
    if verb == "finetune" and recipe.task == "pretrain":
        raise ConfigError("fastblip finetune: the recipe's task is 'pretrain'; use fastblip pretrain")
    trainer = Trainer(recipe, resume=args.resume, overwrite=args.overwrite, device=args.device,
                      progress=not args.json)  # a bar on a terminal, else log lines (train.progress)
    if trainer.info.is_main:  # every implementation choice of the run, once (also in out_dir/recipe.json)
        print(f"fastblip {verb}: {trainer.backends.line()}", file=sys.stderr, flush=True)
    metrics = trainer.fit()
    if trainer.info.is_main:
        if args.json:
            print(json.dumps(metrics))
        else:
            print(" ".join(f"{k}={v}" for k, v in metrics.items()))
    from fastblip.train.distributed import destroy_distributed

    destroy_distributed()
    return 0


def add_parsers(sub) -> None:
    for verb, help_ in (("pretrain", "pretrain BLIP (ITC + ITM + LM) from a recipe"),
                        ("finetune", "finetune a task model (retrieval, caption, vqa, nlvr) from a recipe")):
        p = sub.add_parser(verb, help=help_, description=f"{help_}. Options are key=value recipe overrides "
                           "with dotted keys, e.g. train.lr=1e-4 data.batch_size=32; an unknown key is an error.")
        p.add_argument("--recipe", required=True, help="YAML recipe (recipes/*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last "
                          "checkpoint (exports the model if the run had finished without exporting)")
        mode.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty train.out_dir "
                          "(its checkpoints, model/, logs); without it or --resume such a directory is refused")
        p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
        p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
        p.set_defaults(func=lambda a, v=verb: _run(a, v))
