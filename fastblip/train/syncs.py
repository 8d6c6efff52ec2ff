"""Count host syncs without a GPU: a dispatch mode that records every op which makes the host wait for the
device on CUDA (STYLE.md §7: the training step has none; each deliberate one carries a ``# sync:`` comment).

What counts (each reads device memory on the host or sizes an output by its data):
- ``aten._local_scalar_dense`` (``aten.item`` where it is not decomposed first): ``.item()``, ``int()``, ``float()``, ``bool()`` of a tensor, ``if tensor:``;
- data-dependent output shapes: ``nonzero``, ``masked_select``, ``unique*``, ``repeat_interleave`` without
  ``output_size``, boolean-mask indexing (``index``/``index_put_`` with a bool index runs ``nonzero`` inside);
- ops whose CUDA kernels check their input on the host: ``multinomial`` (``(max < inf & min >= 0).item()`` and
  a zero-row count before its fast path), ``bincount`` (reads ``max``), ``equal``, ``is_nonzero``.

Inside a custom op (the Triton kernels' ``torch.library.custom_op``) the mode re-enters itself, so the ops a
launcher runs are counted too. Not seen on a CPU-only machine: device-to-host copies (``.cpu()`` of a CUDA
tensor is a no-op on CPU tensors) and CUDA-stream waits; tests look for those on the GPU.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.bincount.default, aten.multinomial.default, aten.equal.default,
    aten.is_nonzero.default,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: step()`` then ``c.counts`` ({op name: n}) and ``c.total``."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            if not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
                self.counts[str(func.overloadpacket.__name__)] += 1
        elif func in _INDEX_OPS and _has_bool_index(args):
            self.counts[f"{func.overloadpacket.__name__}[bool mask]"] += 1
        opdef = _custom_opdef(func)
        if opdef is not None:  # a torch.library.custom_op: run its Python implementation under this mode
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def _custom_opdef(func):
    """The ``CustomOpDef`` behind a ``torch.library.custom_op`` overload (None for aten and other ops)."""
    if func.namespace in ("aten", "prim", "prims"):
        return None
    from torch._library.custom_ops import OPDEFS

    return OPDEFS.get(f"{func.namespace}::{func._opname}")
