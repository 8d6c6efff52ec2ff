"""The task contract: what the trainer, ``fastblip eval`` and CapFilt may call on a model, a loader and a task.

The trainer calls these names and nothing else: no ``inspect.signature``, no ``hasattr`` probing.

- A trainable model (every BLIP task model, ``fastblip.models.base.BlipBase``) implements
  ``training_step(batch, *, alpha, update_momentum) -> dict``: named ``*_loss`` terms and their sum ``loss``.
  ``alpha`` is the momentum-distillation weight (a 0-dim device tensor in a compiled step: a Python float
  would be a constant); ``update_momentum`` says whether this call updates the momentum encoders before the
  momentum forward: True on the first micro-batch of an optimiser step, False on the others (BLIP updates
  them once per optimiser step) and False when the trainer updates them itself (FSDP2: between steps, on the
  sharded parameters). A model with momentum encoders has ``has_momentum = True`` and ``momentum_update()``;
  the others ignore the flag.
- A loader (``fastblip.data.loader.Loader``, built by ``fastblip.data.open_loader`` from the recipe's data
  section and the task's sample format, ``fastblip/data/formats.py``: every task reads through it) yields
  batches with ``.to(device)`` and ``len()``, counts its skipped samples in ``stats`` and resumes exactly
  through ``state_dict`` / ``load_state_dict`` at the position of the last batch it yielded; ``set_epoch``
  reshuffles.
- A ``Task`` (one per recipe ``task:`` name, ``TASK`` in ``fastblip.tasks.<name>``) holds the task's options
  dataclass (``task_options`` keys), its loader builder and its evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class TrainableModel(Protocol):
    has_momentum: bool

    def training_step(self, batch: Any, *, alpha: torch.Tensor | float, update_momentum: bool
                      ) -> dict[str, torch.Tensor]: ...

    def momentum_update(self) -> None: ...


class TaskLoader(Protocol):
    stats: dict

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Task:
    """One recipe ``task:``. ``build_loader(recipe, *, train, rank, world_size, epoch, device)`` and
    ``evaluate(model, recipe, *, rank, world_size, amp_dtype) -> dict`` (official metric names)."""

    name: str
    model_kind: str  # the ModelConfig.kind the task trains (pretrain, retrieval, caption, vqa, nlvr)
    options: type | None  # dataclass of the task's own recipe keys, or None (task_options must be empty)
    build_loader: Callable[..., TaskLoader]
    evaluate: Callable[..., dict]
    compilable: bool = False  # the whole training step compiles (fastblip.train.step); tested per task
