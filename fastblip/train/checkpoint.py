"""Training checkpoints: atomic, rotating, exact resume (DESIGN §5).

One file per save, ``<out_dir>/checkpoints/step-00001234.pt``, written to a temporary name in the same folder
and renamed (``os.replace`` is atomic on POSIX), so a crash or Ctrl-C mid-write leaves the previous checkpoint
intact and no half file under a checkpoint name. It holds: the model's state dict (momentum encoders and
queues included: they are parameters/buffers), optimiser, scheduler position (step/epoch), the autocast
scaler when one is used, every rank's RNG states and data position, and a fingerprint of the config; a
checkpoint from another config is refused with one line before any training.
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

from fastblip.config import ConfigError

log = logging.getLogger("fastblip.train")

CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")
# model config fields that choose an implementation, not the model: resuming with another backend is allowed
IMPL_KEYS = ("attention_backend", "ops_backend", "shared_cross_kv")


class CheckpointMismatchError(ConfigError):
    """The checkpoint was written by a run with another config."""


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


def _first_diff(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix[:-1]}: checkpoint has {a!r}, this run has {b!r}"


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    diff = _first_diff(saved, current)
    if diff:
        raise CheckpointMismatchError(f"checkpoint {path} is from another config ({diff}); use a new "
                                      "train.out_dir or drop --resume")


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: remove the partial temp file, keep the old checkpoints
        if os.path.exists(tmp):
            os.unlink(tmp)
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
    """Write ``state`` as ``checkpoints/step-XXXXXXXX.pt`` atomically, then delete all but the last K."""
    path = atomic_save(state, Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt")
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:  # tensors, numbers, strings and containers only (rng_state stores numpy's keys as a tensor)
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # written before that change: numpy arrays inside (our own files)
            log.info("checkpoint %s predates weights_only-safe checkpoints; loading it with weights_only=False", path)
            return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from None
