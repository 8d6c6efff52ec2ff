"""Training checkpoints: atomic, rotating, exact resume (DESIGN §5).

One file per save, ``<out_dir>/checkpoints/step-00001234.pt``, written to a temporary name in the same folder
and renamed (``os.replace`` is atomic on POSIX), so a crash or Ctrl-C mid-write leaves the previous checkpoint
intact and no half file under a checkpoint name. It holds: the model's state dict (momentum encoders and
queues included: they are parameters/buffers), optimiser, scheduler position (step/epoch), the autocast
scaler when one is used, every rank's RNG states and data position, a fingerprint of the config and the run
id (``rundir.py``); a checkpoint from another config or run is refused with one line before any training.

Loading never executes code: ``torch.load(weights_only=True)`` only (tensors, numbers, strings, containers).
Checkpoints written before they were weights_only-safe hold numpy arrays and are refused with a pointer to
``fastblip migrate``, the one place that unpickles, run by the user on a file they trust.
A truncated or unreadable newest checkpoint is skipped (named in the log) and the previous one resumed.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastblip.errors import CheckpointError, RunDirError
from fastblip.train import rundir
from fastblip.train.rundir import RunMismatchError

log = logging.getLogger("fastblip.train")

CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")
# model config fields that choose an implementation, not the model: resuming with another backend is allowed
IMPL_KEYS = ("attention_backend", "ops_backend", "shared_cross_kv")


# ``--resume`` against a checkpoint or out_dir of another run or config (one class: rundir.RunMismatchError)
CheckpointMismatchError = RunMismatchError


def rng_state() -> dict:
    """Every RNG's state in types ``torch.load(weights_only=True)`` accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, *rest = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # older files: an ndarray
    np.random.set_state((name, keys.astype(np.uint32), *rest))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def fingerprint(model_cfg: dict, batch_size: int, grad_accum: int, world_size: int) -> dict:
    """What must match for a resume to continue the same run."""
    m = {k: v for k, v in model_cfg.items() if k not in IMPL_KEYS}
    return {"model": m, "batch_size": batch_size, "grad_accum": grad_accum, "world_size": world_size}


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    diff = rundir.first_diff(saved, current, "checkpoint")
    if diff:
        raise CheckpointMismatchError(f"checkpoint {path} is from another config ({diff}); use a new "
                                      "train.out_dir or --overwrite")


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``. A full disk or another
    OS error is one ``RunDirError`` naming the file and the reason (torch wraps it in a RuntimeError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            rundir.fault_point("ckpt_write")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included: remove the partial temp file, keep the old checkpoints
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = rundir.os_reason(e) if isinstance(e, (OSError, RuntimeError)) else ""
        if reason:
            raise RunDirError(f"cannot write checkpoint {path}: {reason}; the previous checkpoints are "
                              "intact") from e
        raise
    return path


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    d = Path(out_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, state: dict, keep_last: int = 3) -> Path:
    """Write ``state`` as ``checkpoints/step-XXXXXXXX.pt`` atomically, then delete all but the last K
    (``keep_last`` 0 keeps all). Rotation deletes only older steps of this run: the directory is the run's."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    path = atomic_save(state, Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt")
    rundir.fault_point("ckpt_rotate")
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


TRAINER_KEYS = ("model", "optimizer", "step", "epoch", "per_rank", "fingerprint")


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, read with ``weights_only=True``; ``CheckpointError`` (one line) when the file is
    truncated, not a checkpoint, or holds a non-finite model tensor."""
    from fastblip.checkpoints.io import check_finite, read_tensor_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = read_tensor_file(path, what="training checkpoint")
    except CheckpointError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError) or "weights_only" in str(e):
            raise CheckpointError(f"{e}. A training checkpoint written before fastblip's checkpoints were "
                                  "weights_only-safe holds numpy arrays: if you trust the file, convert it once "
                                  f"with `fastblip migrate {path}`") from None
        raise
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        check_finite(obj["model"], str(path))
    return obj


def check_trainer_state(obj, path: Path) -> None:
    missing = [k for k in TRAINER_KEYS if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not a fastblip training checkpoint (no {', '.join(missing)})")


def find_resume_checkpoint(out_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that reads back whole, newest first; an unreadable one (truncated by a crash
    outside our atomic writes, a full disk, a bad copy) is named in the log and skipped. Every checkpoint
    unreadable is an error: starting over silently would throw the run away."""
    skipped = []
    for p in reversed(list_checkpoints(out_dir)):
        try:
            st = load_checkpoint(p)
            check_trainer_state(st, p)
        except CheckpointError as e:
            if "migrate" in str(e):  # an old-format file: say so, never fall back past it silently
                raise
            log.warning("--resume: skipping unreadable checkpoint %s (%s)", p, e)
            skipped.append(f"{p.name} ({e})")
            continue
        if skipped:
            log.warning("--resume: resuming from %s; skipped %d newer unreadable checkpoint(s): %s", p.name,
                        len(skipped), "; ".join(skipped))
        return p, st
    if skipped:
        raise CheckpointError(f"--resume: no readable checkpoint in {Path(out_dir) / 'checkpoints'}: "
                              + "; ".join(skipped))
    return None, None


def _to_weights_only(obj):
    """numpy arrays/scalars -> tensors/Python numbers, recursively (what older checkpoints held)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_weights_only(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_to_weights_only(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def migrate_checkpoint(src: str | Path, dst: str | Path | None = None) -> Path:
    """``fastblip migrate``: rewrite a training checkpoint from before weights_only-safe checkpoints (numpy
    arrays inside) as one that ``torch.load(weights_only=True)`` reads. This unpickles ``src`` with
    ``weights_only=False``, which runs any code the file carries: the user runs it knowingly, on a file they
    trust; nothing in fastblip calls it on its own."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)  # the one unpickling load: see docstring
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(f"{src}: not a PyTorch checkpoint ({type(e).__name__}: {e})") from None
    out = _to_weights_only(obj)
    dst = Path(dst) if dst is not None else src
    atomic_save(out, dst)
    torch.load(dst, map_location="cpu", weights_only=True)  # the result is safe to load
    return dst
