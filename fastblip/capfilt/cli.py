"""`fastblip capfilt --recipe FILE captioner=CKPT filter=CKPT input=SHARDS output=DIR [key=value ...] [--json]`;
`fastblip capfilt view OUTPUT_DIR [--out DIR] [--no-thumbnails]`: the static HTML viewer (fastblip.capfilt.viewer).

Under torchrun every rank takes its own shards; rank 0 waits for all, then writes ``manifest.jsonl`` and
``totals.json`` and prints the totals: kept/dropped per source, ITM score statistics, and the filter's precision
and recall where the input has noise labels (one JSON line with ``--json``). A rerun skips finished shards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def run_cli(args: argparse.Namespace) -> int:
    from fastblip.capfilt import viewer

    if args.overrides[:1] == ["view"]:  # `fastblip capfilt view OUTPUT_DIR`: the static HTML viewer
        return viewer.view_cli(args)
    viewer.reject_view_options(args)
    import torch.distributed as dist

    from fastblip.capfilt import pipeline as pl
    from fastblip.capfilt.recipe import CapfiltRecipe
    from fastblip.config import check_device, load_recipe
    from fastblip.errors import InputError, NotFoundError

    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])  # --device wins
    recipe = load_recipe(CapfiltRecipe, args.recipe, overrides)
    check_device(recipe.device)  # a device this machine lacks: one line before anything is read
    recipe.check_paths()
    for key in ("captioner", "filter"):
        p = getattr(recipe, key)
        if "://" not in p and not os.path.exists(p):
            raise NotFoundError(f"capfilt: {key} checkpoint not found: {p}")
    urls = pl.expand_input(recipe.input)
    pl.check_inputs(urls)  # every input missing (a brace pattern matching nothing): one line, no model loaded
    from fastblip.train.distributed import init_distributed

    info = init_distributed(None if recipe.device == "auto" else recipe.device)
    world, rank, device = info.world_size, info.rank, info.device
    lock = pl.open_output(recipe, urls, device=device, overwrite=args.overwrite)  # rank 0 owns the output
    try:
        mine = pl.run_capfilt(recipe, rank=rank, world_size=world, device=device, owned=True)
        if world > 1:
            dist.barrier()
        if rank == 0:
            totals = pl.collect(Path(recipe.output), urls)
            totals["rank0"] = mine
            print(json.dumps(totals) if args.json else pl.format_totals(totals, recipe.output), flush=True)
    finally:
        if lock is not None:
            lock.release()
    if world > 1:
        dist.destroy_process_group()
    if rank == 0 and totals["missing_shards"]:  # not done, not marked done: say so in the exit code
        raise InputError(f"capfilt: {len(totals['missing_shards'])} of {len(urls)} input shards were missing or "
                         f"unreadable ({', '.join(totals['missing_shards'][:3])}...): not marked done; rerun when "
                         "they are there")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("capfilt", help="bootstrap a dataset: caption web images, filter web + synthetic texts",
                       description="CapFilt (BLIP §3.3): per input shard, K synthetic captions per image, ITM "
                                   "filtering of web and synthetic texts, atomic output shards + manifest.")
    p.add_argument("--recipe", help="YAML recipe (recipes/capfilt.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="captioner=CKPT filter=CKPT input=SHARDS output=DIR, and any recipe key")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line (default: a summary: "
                   "kept/dropped per source, ITM score statistics, precision/recall against noise labels)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (the recipe key 'device'; default auto: "
                   "cuda when available)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every shard when the output holds results of other settings (else refused)")
    from fastblip.capfilt.viewer import add_arguments

    add_arguments(p)  # `capfilt view`'s options: key=value positionals leave no room for a sub-parser
    p.set_defaults(func=run_cli)
