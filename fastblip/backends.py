"""Every implementation choice of a run, resolved once: attention, each fused op, compile, autocast, data.

One resolver, one error class. ``resolve(...)`` turns the recipe's requests into a frozen ``Backends`` record
that the trainer (and CapFilt, eval) pushes into the model, prints as one line at start and writes into the
run's ``recipe.json``; library calls that pass ``backend=None`` resolve per call through the same
``resolve_op`` / ``resolve_attention`` (by the tensors' device), quietly.

Rules (STYLE.md §5): ``auto`` picks the fastest *measured* path and may fall back; an explicit request that
cannot be served raises ``BackendUnavailableError`` naming what is missing, never a silent substitute.
Environment overrides apply only where the request is ``auto``:

- ``FASTBLIP_ATTENTION``: reference | sdpa | xformers | flash_attn
- ``FASTBLIP_OPS_BACKEND``: triton | reference for every fused op, or per op ``itc_loss=triton,lm_cross_entropy=reference``
- ``FASTBLIP_COMPILE``: 1 | 0
- ``FASTBLIP_AMP``: bf16 | fp32

Attention ``auto`` = PyTorch SDPA with its own kernel choice: on an H100 (torch 2.11, bf16,
benchmarks/results/attention_base_*) SDPA's pick equalled forced cuDNN attention for BLIP's shapes and pinning
a priority list per call cost ~0.1 ms of context-manager overhead (``FASTBLIP_SDPA_PRIORITY=1`` pins it again
for re-measuring). ``flash_attn`` takes no key-padding mask (``flash_attn_func``), and every BLIP text layer
has one, so a model-level request for it is refused rather than served by SDPA behind the user's back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fastblip.errors import FastblipError

log = logging.getLogger("fastblip")

OPS = ("itc_loss", "sample_hard_negatives", "cross_attention", "lm_cross_entropy")
OP_BACKENDS = ("reference", "triton")
ATTENTION = ("auto", "reference", "sdpa", "flash_attn", "xformers")

# The CUDA default per op comes from measurement only (issue 13: set it from the measured kernel suite,
# `bash benchmarks/gpu_session.sh`, stage kernels:base). The only H100 run so far (torch 2.11, triton 3.6,
# 2026-11-23, benchmarks/results/kernels_base_*) measured the first versions of the kernels: ITC, sampling and
# LM CE were slower than (or failed against) their reference, so those stay on the reference; the indexed
# cross-attention kernel measured 1.14x / 1.22x the eager reference at Lk 197 / 577 with 40-48% less memory.
# All four were reworked since (2026-11-28: static sm_90/sm_80 report clean, benchmarks/kstat.py; attention
# dropout inside the cross-attention kernel) and none of the new versions has been timed on a GPU yet.
CUDA_DEFAULT = {"itc_loss": "reference", "sample_hard_negatives": "reference", "cross_attention": "triton",
                "lm_cross_entropy": "reference"}

try:  # optional dependencies, checked once; the import error is kept for the message
    import triton  # noqa: F401

    HAS_TRITON, _TRITON_ERR = True, None
except ImportError as e:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON, _TRITON_ERR = False, e
try:
    import flash_attn as _flash_attn  # noqa: F401

    HAS_FLASH_ATTN, _FLASH_ERR = True, None
except ImportError as e:  # pragma: no cover - not installable on the CPU machines
    HAS_FLASH_ATTN, _FLASH_ERR = False, e
try:
    import xformers.ops as _xops  # noqa: F401

    HAS_XFORMERS, _XFORMERS_ERR = True, None
except ImportError as e:  # pragma: no cover
    HAS_XFORMERS, _XFORMERS_ERR = False, e

# Read once: the interpreter is chosen when triton is imported, so a later change would not take effect.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class BackendUnavailableError(FastblipError, ValueError):
    """A requested backend is unknown or cannot run here (missing package, no GPU, unsupported input)."""


# ----------------------------------------------------------------------------------------------- per choice
def resolve_attention(requested: str | None = None, *, masked: bool = True) -> str:
    """A concrete attention backend: reference | sdpa | xformers | flash_attn. ``masked``: the caller needs
    key-padding masks (every BLIP model does), which flash_attn cannot take."""
    name = (requested or "auto").lower()
    if name == "auto":
        name = (os.environ.get("FASTBLIP_ATTENTION") or "auto").lower()
    if name not in ATTENTION:
        raise BackendUnavailableError(f"unknown attention backend '{name}' (valid: {', '.join(ATTENTION)})")
    if name == "flash_attn":
        if not (HAS_FLASH_ATTN and torch.cuda.is_available()):
            why = "no CUDA device" if HAS_FLASH_ATTN else f"flash-attn not installed ({_FLASH_ERR})"
            raise BackendUnavailableError(f"attention backend 'flash_attn' requested but unavailable: {why}")
        if masked:
            raise BackendUnavailableError("attention backend 'flash_attn' cannot take the key-padding masks of "
                                          "BLIP's text layers (flash_attn_func has no mask); use auto (SDPA)")
    if name == "xformers" and not (HAS_XFORMERS and torch.cuda.is_available()):
        why = "no CUDA device" if HAS_XFORMERS else f"xformers not installed ({_XFORMERS_ERR})"
        raise BackendUnavailableError(f"attention backend 'xformers' requested but unavailable: {why}")
    return "sdpa" if name == "auto" else name


def _env_ops() -> dict[str, str]:
    """FASTBLIP_OPS_BACKEND as {op: backend}: one name for every op, or ``op=backend,...``."""
    raw = os.environ.get("FASTBLIP_OPS_BACKEND", "").strip()
    if not raw:
        return {}
    if "=" not in raw:
        return dict.fromkeys(OPS, raw)
    out = {}
    for part in raw.split(","):
        op, _, be = part.partition("=")
        if op.strip() not in OPS:
            raise BackendUnavailableError(f"FASTBLIP_OPS_BACKEND: unknown op '{op.strip()}' (ops: {', '.join(OPS)})")
        out[op.strip()] = be.strip()
    return out


def resolve_op(op: str, requested: str | None, device_type: str) -> str:
    """``"triton"`` or ``"reference"`` for fused op ``op`` on ``device_type`` ("cuda", "cpu", ...)."""
    if op not in OPS:
        raise BackendUnavailableError(f"unknown fused op '{op}' (ops: {', '.join(OPS)})")
    name = requested if requested not in (None, "auto") else _env_ops().get(op, "auto")
    if name not in OP_BACKENDS + ("auto",):
        raise BackendUnavailableError(f"{op}: unknown backend {name!r}; expected one of {OP_BACKENDS} or auto")
    on_cuda = device_type == "cuda"
    if name == "auto":
        return CUDA_DEFAULT[op] if (on_cuda and HAS_TRITON) else "reference"
    if name == "triton":
        if not HAS_TRITON:
            raise BackendUnavailableError(f"{op}: backend 'triton' requested but triton failed to import: "
                                          f"{_TRITON_ERR}")
        if not on_cuda and not TRITON_INTERPRET:
            raise BackendUnavailableError(f"{op}: backend 'triton' on {device_type} tensors needs TRITON_INTERPRET=1 "
                                          "set before triton is imported (or a CUDA device)")
    return name


def _flag(requested: str | bool | None, env: str) -> str:
    val = str(requested if requested is not None else "auto").lower()
    if val == "auto":
        val = os.environ.get(env, "auto").lower()
    table = {"1": "on", "true": "on", "on": "on", "yes": "on", "0": "off", "false": "off", "off": "off",
             "no": "off", "auto": "auto"}
    if val not in table:
        raise BackendUnavailableError(f"{env.lower().removeprefix('fastblip_')}: {val!r} is not auto, true or false")
    return table[val]


def resolve_compile(requested: str | bool | None, device_type: str, distributed: str = "none") -> str:
    """off | step (the whole training step, fullgraph) | blocks (each transformer block: FSDP2, whose
    per-module hooks the full-step graph cannot hold). ``auto`` = on for CUDA."""
    on = _flag(requested, "FASTBLIP_COMPILE")
    if on == "auto":
        on = "on" if device_type == "cuda" else "off"
    if on == "off":
        return "off"
    return "blocks" if distributed == "fsdp2" else "step"


def resolve_amp(requested: str | None, device_type: str) -> str:
    """bf16 | fp32. ``auto`` = bf16 autocast on CUDA, fp32 elsewhere (fp32 master weights always)."""
    name = (requested or "auto").lower()
    if name == "auto":
        name = os.environ.get("FASTBLIP_AMP", "auto").lower()
    if name not in ("auto", "bf16", "fp32"):
        raise BackendUnavailableError(f"amp: {name!r} is not auto, bf16 or fp32")
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def resolve_padding(requested: str, compile_mode: str, max_length: int) -> str:
    """Text padding: ``auto`` = buckets of 8 tokens up to ``max_length`` when compiled (a bounded number of
    graphs: 4 at BLIP's 30), the batch's longest caption otherwise."""
    if requested == "auto":
        if compile_mode == "off":
            return "longest"
        sizes = list(range(8, max_length, 8)) + [max_length]
        return "buckets:" + ",".join(map(str, sizes))
    if requested == "longest" and compile_mode != "off":
        raise BackendUnavailableError("train.compile with data.padding=longest compiles one graph per caption "
                                      "length; use data.padding=auto (buckets of 8) or buckets:...")
    return requested


def resolve_data(requested: str) -> str:
    if requested not in ("pil", "dali"):
        raise BackendUnavailableError(f"data.backend: {requested!r} is not pil or dali")
    if requested == "dali":
        from fastblip.data.dali import DALI_IMPORT_ERROR, HAS_DALI

        if not HAS_DALI:
            raise BackendUnavailableError(f"data.backend=dali requested but NVIDIA DALI failed to import "
                                          f"({DALI_IMPORT_ERROR}); pip install nvidia-dali-cuda130")
    return requested


# ----------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Backends:
    """What a run uses, decided once (``resolve``); printed with ``line()``, stored with ``to_dict()``."""

    device: str
    attention: str
    ops: tuple[tuple[str, str], ...]  # (op, backend) for each of OPS
    compile: str = "off"
    amp: str = "fp32"
    data: str = "pil"
    padding: str = "longest"
    optimizer: str = "adamw_foreach"  # adamw_fused on CUDA: one multi-tensor kernel per step

    def op(self, name: str) -> str:
        return dict(self.ops)[name]

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.amp == "bf16" else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ops"] = dict(self.ops)
        return d

    def line(self) -> str:
        ops = " ".join(f"{k}={v}" for k, v in self.ops)
        return (f"backends: device={self.device} attention={self.attention} {ops} compile={self.compile} "
                f"amp={self.amp} optimizer={self.optimizer} data={self.data} padding={self.padding}")


def resolve(device: torch.device | str, *, attention: str | None = "auto",
            ops: str | Mapping[str, str] | None = "auto", compile: str | bool | None = False,
            amp: str | None = "auto", data: str = "pil", padding: str = "longest", max_length: int = 30,
            distributed: str = "none") -> Backends:
    """Resolve every choice of a run for ``device``; raises ``BackendUnavailableError`` before any work."""
    dev = torch.device(device).type
    per_op = dict(ops) if isinstance(ops, Mapping) else dict.fromkeys(OPS, ops)
    unknown = set(per_op) - set(OPS)
    if unknown:
        raise BackendUnavailableError(f"unknown fused op(s) {sorted(unknown)} (ops: {', '.join(OPS)})")
    mode = resolve_compile(compile, dev, distributed)
    return Backends(
        device=dev,
        attention=resolve_attention(attention),
        ops=tuple((op, resolve_op(op, per_op.get(op), dev)) for op in OPS),
        compile=mode,
        amp=resolve_amp(amp, dev),
        data=resolve_data(data),
        padding=resolve_padding(padding, mode, max_length),
        optimizer="adamw_fused" if dev == "cuda" else "adamw_foreach",
    )
