"""Task plug-ins for the generic trainer and the ``eval`` verb.

A recipe names its ``task``; ``get_task(name)`` returns ``fastblip.tasks.<name>.TASK``, a ``Task``
(fastblip/tasks/contract.py: the written contract between tasks, models, loaders and the trainer): the task's
``Options`` dataclass (``task_options``; unknown keys are errors), its loader builder and its evaluation.
"""

from __future__ import annotations

import importlib

from fastblip.errors import ConfigError
from fastblip.tasks.contract import Task

TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr", "video")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}' (valid: {', '.join(TASKS)})")
    return importlib.import_module(f"fastblip.tasks.{name}").TASK
