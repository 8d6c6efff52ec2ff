"""Task plug-ins for the generic trainer and the ``eval`` verb.

A recipe names its ``task``; ``get_task(name)`` imports ``fastblip.tasks.<name>``, which provides:

- ``Options``: a dataclass of the task's own recipe keys (``recipe.task_options``; unknown keys are errors),
- ``build_loader(recipe, *, train: bool, rank: int, world_size: int, epoch: int = 0)``: the data,
- ``evaluate(model, recipe, *, rank: int = 0, world_size: int = 1) -> dict``: metrics (official key names).

The model's own ``training_forward(batch, alpha) -> dict`` gives the losses, so the loop is the same for all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr", "video")


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}' (valid: {', '.join(TASKS)})")
    return importlib.import_module(f"fastblip.tasks.{name}")
