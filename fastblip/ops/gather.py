"""Cross-rank gathers along dim 0, in rank order: the only collectives a training step makes (queue enqueue,
retrieval's all-rank ITM negatives); identity without an initialised process group or with one rank.

Inside ``torch.compile`` they are functional collectives, which dynamo traces into the step's graph
(``dist.all_gather`` into a Python list does not trace); eagerly they are the classic c10d calls: with gloo
(torch 2.14, CPU) processes that had run functional collectives died at exit about one time in two
("terminate called without an active exception", SIGABRT after the run's last line), the classic calls never.

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
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as fc

        gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # torch 2.14's name / 2.11's
        return gather(x.detach().contiguous(), 0, dist.group.WORLD)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W·B, ...); backward sums every rank's gradient for this rank's slice."""
    if world_size() == 1:
        return x
    if torch.compiler.is_compiling():
        import torch.distributed._functional_collectives as fc

        # all_gather_single_autograd is torch 2.14's name; 2.11 (the GPU machine) has all_gather_tensor_autograd
        gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
        return gather(x.contiguous(), 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))
