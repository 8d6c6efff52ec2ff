"""Cross-rank gathers along dim 0, in rank order: the only collectives a training step makes (queue enqueue,
retrieval's all-rank ITM negatives). Written with functional collectives so ``torch.compile(fullgraph=True)``
traces them into the step's graph (``dist.all_gather`` into a Python list does not trace); identity without an
initialised process group or with one rank.

Gradient choice (open_clip's ``gather_with_grad``, the official ``GatherLayer``): ``gather_with_grad``'s
backward is a reduce-scatter, i.e. every rank's gradient for our slice summed, so a negative drawn from another
rank trains the rank that owns it; ``gather_nograd`` is the official ``concat_all_gather`` (no gradient).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W·B, ...) without gradient."""
    if world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor

    return all_gather_tensor(x.detach().contiguous(), 0, dist.group.WORLD)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W·B, ...); backward sums every rank's gradient for this rank's slice."""
    if world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x.contiguous(), 0, dist.group.WORLD)
