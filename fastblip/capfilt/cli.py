"""`fastblip capfilt --recipe FILE captioner=CKPT filter=CKPT input=SHARDS output=DIR [key=value ...] [--json]`.

Under torchrun every rank takes its own shards; rank 0 waits for all, then writes ``manifest.jsonl`` and
``totals.json`` and prints the totals (JSON with ``--json``). A rerun skips finished shards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def run_cli(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from fastblip.capfilt.pipeline import collect, expand_input, run_capfilt
    from fastblip.capfilt.recipe import CapfiltRecipe
    from fastblip.config import load_recipe

    recipe = load_recipe(CapfiltRecipe, args.recipe, args.overrides)
    recipe.check_paths()
    for key in ("captioner", "filter"):
        p = getattr(recipe, key)
        if "://" not in p and not os.path.exists(p):
            raise FileNotFoundError(f"capfilt: {key} checkpoint not found: {p}")
    urls = expand_input(recipe.input)
    from fastblip.train.distributed import init_distributed

    info = init_distributed(None if recipe.device == "auto" else recipe.device)
    world, rank, device = info.world_size, info.rank, info.device
    mine = run_capfilt(recipe, rank=rank, world_size=world, device=device)
    if world > 1:
        dist.barrier()
    if rank == 0:
        totals = collect(Path(recipe.output), urls)
        totals["rank0"] = mine
        print(json.dumps(totals) if args.json else json.dumps(totals, indent=1))
    if world > 1:
        dist.destroy_process_group()
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("capfilt", help="bootstrap a dataset: caption web images, filter web + synthetic texts",
                       description="CapFilt (BLIP §3.3): per input shard, K synthetic captions per image, ITM "
                                   "filtering of web and synthetic texts, atomic output shards + manifest.")
    p.add_argument("--recipe", help="YAML recipe (recipes/capfilt.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="captioner=CKPT filter=CKPT input=SHARDS output=DIR, and any recipe key")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line")
    p.set_defaults(func=run_cli)
