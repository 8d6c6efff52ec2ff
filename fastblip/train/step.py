"""The training step, and how it is compiled (issue 14; DESIGN §4.9).

``TrainStep`` is what DDP/FSDP wrap: its forward runs the model's ``training_step`` (the task contract,
fastblip/tasks/contract.py; so the gradient hooks fire) and returns the named losses. ``compile_step`` applies the run's ``Backends.compile`` choice:

- ``step``: the whole forward of the step is one ``torch.compile(fullgraph=True, dynamic=False)`` graph: the
  towers, the momentum update and the momentum forward, ITC against the queue, the enqueue, hard-negative
  sampling, ITM and the LM loss (with the Triton kernels as opaque custom ops). AOTAutograd compiles the
  backward of that graph, so ``loss.backward()`` runs one compiled backward. A graph break is an error, not a
  silent slow path. Shapes are static: the batch size is fixed (``drop_last``) and caption lengths come in
  buckets of 8 tokens (``data.padding=auto``), so a run compiles at most one graph per bucket (x2 under
  gradient accumulation: the first micro-batch updates the momentum encoders, the others do not). ``alpha``
  enters as a device tensor (a Python float would be a constant: one recompile per step of the ramp).
- ``blocks`` (FSDP2): each ViT block and BERT layer compiled on its own (fullgraph), as torchtitan does: the
  full-step graph cannot hold FSDP2's per-module all-gather hooks.
- ``off``: eager.

The optimiser step is fused AdamW on CUDA (one multi-tensor kernel; ``torch.optim.AdamW(fused=True)``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger("fastblip.train")


class TrainStep(nn.Module):
    """``forward(batch, alpha, update_momentum) -> dict`` of ``*_loss`` terms and ``loss``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, alpha: torch.Tensor | float, update_momentum: bool = True) -> dict:
        return self.model.training_step(batch, alpha=alpha, update_momentum=update_momentum)


# graphs a run may hold per compiled function: buckets (<= 5 at max_length 35) x update_momentum (2), with room
MAX_GRAPHS = 16


def compile_step(step: TrainStep, mode: str) -> None:
    """Apply ``mode`` (``Backends.compile``: off | step | blocks) to ``step`` in place."""
    if mode == "off":
        return
    import torch._dynamo.config as dcfg

    dcfg.cache_size_limit = max(dcfg.cache_size_limit, MAX_GRAPHS)
    for flag in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):  # torch 2.14 / older names
        if hasattr(dcfg, flag):
            setattr(dcfg, flag, True)  # past the limit dynamo would fall back to eager: fail instead
            break
    if mode == "step":
        step.compile(fullgraph=True, dynamic=False)
        return
    if mode != "blocks":
        raise ValueError(f"compile mode {mode!r} is not off, step or blocks")
    from fastblip.models.med import BertLayer
    from fastblip.models.vit import Block

    n = 0
    for m in step.model.modules():
        if isinstance(m, (Block, BertLayer)):
            m.compile(fullgraph=True, dynamic=False)
            n += 1
    log.debug("compiled %d transformer blocks", n)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (for the bounded-recompile test and the log)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
