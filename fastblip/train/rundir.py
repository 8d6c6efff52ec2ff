"""A run owns its output directory (issue 15): one lock, one identity, no leftovers, checks before work.

- Lock: ``<out_dir>/.fastblip.lock``, a POSIX record lock (``fcntl.lockf``) held for the run's lifetime and
  released by the kernel when the process dies, kill -9 included, so a dead run never blocks the next one. The
  file holds the owner's pid, host, verb and start time for the one-line refusal a second run gets. Record
  locks are not inherited by ``fork`` (DataLoader workers), and a process registry refuses a second lock of
  the same directory inside one process (record locks are per process, so the kernel would grant it). The
  file itself stays (empty when released): unlinking it would let a waiting opener lock a dead inode.
- Identity: ``<out_dir>/run.json`` = {run_id, fingerprint (hash of what must match to resume), config (the
  fingerprint's fields, for the one-line diff), verb, host, pid, created}; written at the start of a fresh run.
  Checkpoints carry the run id; ``--resume`` refuses a checkpoint of another run or config.
- Leftovers of a killed run (``checkpoints/.tmp-*.pt``, ``model.tmp-*``, ``model.old-*``, ``.*.tmp-*``) are
  removed on the next start, under the lock (no writer can be mid-write then).
- A fresh run into a directory that holds anything refuses unless told ``overwrite`` (which removes the
  previous run's own files, never files it did not write) or ``resume``.
- ``fault_point(phase)``: the test hook of the fault tests. ``FASTBLIP_FAULT=PHASE[@N]`` SIGKILLs the process
  the N-th time (default 1st) it reaches PHASE: ``step`` (inside a training forward), ``ckpt_write`` (the
  checkpoint's temp file written, not renamed), ``ckpt_rotate`` (renamed, older ones not yet deleted),
  ``export`` (the export's temp directory written, not renamed).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastblip.errors import ConfigError, RunDirError

log = logging.getLogger("fastblip.train")

LOCK_NAME = ".fastblip.lock"
RUN_NAME = "run.json"
FAULT_ENV = "FASTBLIP_FAULT"
FAULT_PHASES = ("step", "ckpt_write", "ckpt_rotate", "export")
# files a training run writes at the top of its out_dir; --overwrite removes these and nothing else
RUN_FILES = ("run.json", "recipe.json", "log.jsonl", "checkpoints", "model", "vqa_result.json", "tensorboard")
STALE_GLOBS = ("checkpoints/.tmp-*.pt", "model.tmp-*", "model.tmp", "model.old-*", ".*.tmp-*")


class RunLockedError(RunDirError):
    """Another live process owns this output directory."""


class RunMismatchError(ConfigError):
    """``--resume`` against a directory or checkpoint of another run or config."""


# ----------------------------------------------------------------------------- fault hook (tests)

_fault_counts: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """SIGKILL this process here when ``FASTBLIP_FAULT`` names ``phase`` (and this is its N-th visit)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != phase:
        return
    _fault_counts[phase] = _fault_counts.get(phase, 0) + 1
    if _fault_counts[phase] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def install_step_fault(model) -> None:
    """``FASTBLIP_FAULT=step@N``: die inside the N-th training forward (a forward hook on the ViT, which every
    task model calls once per micro-batch; the optimiser has not stepped, the checkpoint is older)."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.partition("@")[0] == "step" and hasattr(model, "visual_encoder"):
        model.visual_encoder.register_forward_hook(lambda *_: fault_point("step") if model.training else None)


# ----------------------------------------------------------------------------- small file helpers


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp name in the same folder, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def truncate_log(path: Path, step: int) -> None:
    """Drop JSONL records past ``step`` (what a killed run logged after its last checkpoint), so a resumed
    run's log reads as the uninterrupted run's; a fresh file is left alone."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut off by the kill
        if not isinstance(rec, dict) or int(rec.get("step", 0)) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(x + "\n" for x in keep))


def os_reason(e: BaseException) -> str:
    """The OS reason of an error, also when torch wrapped it in a RuntimeError ('No space left on device')."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.strerror or errno.errorcode.get(e.errno, str(e.errno))
        e = e.__cause__ or e.__context__
    return ""


def fingerprint_hash(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- the lock

_held: dict[str, RunLock] = {}  # realpath of the lock file -> the lock this process holds on it


@dataclass
class RunLock:
    path: Path
    fd: int | None
    info: dict = field(default_factory=dict)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file = nobody's
        except OSError:
            pass
        os.close(self.fd)  # closing releases the record lock
        self.fd = None
        _held.pop(str(self.path.resolve()), None)

    def __del__(self):  # a Trainer dropped without fit() (or whose __init__ failed) lets go of the directory
        try:
            self.release()
        except Exception:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def prepare_dir(out_dir: Path, what: str) -> None:
    """``out_dir`` exists (created when missing) and is a writable directory, or one line saying why not."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"{what} {out_dir}: exists and is not a directory") from None
    except OSError as e:
        raise RunDirError(f"{what} {out_dir}: cannot create it ({e.strerror or e})") from None
    if not out_dir.is_dir():
        raise RunDirError(f"{what} {out_dir}: not a directory")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"{what} {out_dir}: not writable ({e.strerror or e})") from None


def acquire_lock(out_dir: str | Path, verb: str, what: str = "output directory") -> RunLock:
    """Own ``out_dir`` (created when missing) until ``release()`` or process exit; ``RunLockedError`` naming
    the owner when another live process has it."""
    out_dir = Path(out_dir)
    prepare_dir(out_dir, what)
    path = out_dir / LOCK_NAME
    key = str(path.resolve())
    if key in _held:
        import gc

        gc.collect()  # a Trainer of this process that failed or was dropped: its lock goes with it
    if key in _held:
        h = _held[key].info
        raise RunLockedError(f"{what} {out_dir} is in use by this process ({h.get('verb', '?')} started "
                             f"{h.get('started', '?')}); finish or drop that run first")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"{what} {out_dir}: cannot create the lock file {path} ({e.strerror or e})") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise RunDirError(f"{what} {out_dir}: cannot lock {path} ({e.strerror or e})") from None
        h = _holder(path)
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}"
        raise RunLockedError(f"{what} {out_dir} is in use by another run ({h.get('verb', '?')}, {who}, started "
                             f"{h.get('started', '?')}; lock file {path}): wait for it to finish or use another "
                             "directory") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "verb": verb,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    lock = RunLock(path, fd, info)
    _held[key] = lock
    return lock


# ----------------------------------------------------------------------------- leftovers and identity


def remove_stale(out_dir: Path, globs: tuple[str, ...] = STALE_GLOBS) -> list[str]:
    """Delete temp files/dirs a killed run left (call with the lock held); returns what was removed."""
    gone = []
    for pattern in globs:
        for p in sorted(out_dir.glob(pattern)):
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(str(p.relative_to(out_dir)))
    if gone:
        log.info("removed leftovers of an interrupted run in %s: %s", out_dir, ", ".join(gone))
    return gone


def read_identity(out_dir: Path) -> dict | None:
    p = out_dir / RUN_NAME
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{p}: unreadable run identity ({e}); use --overwrite to start a new run") from None
    if not isinstance(d, dict) or not isinstance(d.get("run_id"), str):
        raise RunDirError(f"{p}: not a fastblip run identity; use --overwrite to start a new run")
    return d


def new_identity(out_dir: Path, verb: str, config: dict) -> dict:
    ident = {"run_id": uuid.uuid4().hex, "fingerprint": fingerprint_hash(config), "config": config,
             "verb": verb, "host": socket.gethostname(), "pid": os.getpid(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out_dir / RUN_NAME, json.dumps(ident, indent=1, default=str))
    return ident


def first_diff(a, b, which: str, prefix: str = "") -> str | None:
    """'model.embed_dim: WHICH has 32, this run has 16' for the first differing leaf of two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_diff(a.get(k), b.get(k), which, f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return None if a == b else f"{prefix[:-1]}: {which} has {a!r}, this run has {b!r}"


def _listing(out_dir: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir() if p.name != LOCK_NAME)


@dataclass
class RunDir:
    """What ``open_run`` hands the trainer: the lock (rank 0 only) and the identity (every rank)."""

    path: Path
    identity: dict
    lock: RunLock | None = None

    @property
    def run_id(self) -> str:
        return self.identity["run_id"]

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _open_main(out_dir: Path, verb: str, config: dict, resume: bool, overwrite: bool, what: str) -> RunDir:
    lock = acquire_lock(out_dir, verb, what)
    try:
        remove_stale(out_dir)
        ident = read_identity(out_dir)
        existing = _listing(out_dir)
        if resume:
            if ident is None:
                # a directory of a fastblip from before run identities (checkpoints without run ids), or empty
                ident = new_identity(out_dir, verb, config)
                if existing:
                    log.info("%s holds no run.json: adopting it as run %s", out_dir, ident["run_id"])
            elif ident.get("fingerprint") != fingerprint_hash(config):
                diff = first_diff(ident.get("config", {}), config, RUN_NAME) or "fingerprint differs"
                raise RunMismatchError(f"--resume: {what} {out_dir} holds run {ident['run_id']} of another config "
                                       f"({diff}); use a new {what} or --overwrite")
        else:
            if existing and not overwrite:
                shown = ", ".join(existing[:5]) + (f", ... ({len(existing)} entries)" if len(existing) > 5 else "")
                raise RunDirError(f"{what} {out_dir} is not empty ({shown}): --resume continues the run in it, "
                                  f"--overwrite replaces it, or choose another {what}")
            if existing:
                removed = []
                for name in RUN_FILES:
                    p = out_dir / name
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                        removed.append(name + "/")
                    elif p.exists() or p.is_symlink():
                        p.unlink()
                        removed.append(name)
                kept = [x for x in _listing(out_dir)]
                log.warning("--overwrite: removed the previous run in %s (%s)%s", out_dir, ", ".join(removed) or
                            "nothing", f"; kept files it did not write: {', '.join(kept[:5])}" if kept else "")
            ident = new_identity(out_dir, verb, config)
    except BaseException:
        lock.release()
        raise
    return RunDir(out_dir, ident, lock)


def on_rank0(fn, rank: int | None = None, world_size: int | None = None, share=None):
    """Run ``fn`` on rank 0 only (a directory's lock, its cleanup, its identity). Under torchrun every rank then
    raises rank 0's error, if any (one line on every rank instead of the others waiting in a collective
    forever), and receives ``share(result)``. Returns ``(result on rank 0 / None elsewhere, shared)``."""
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not multi:
        result = fn()
        return result, (share(result) if share is not None else None)
    result, err = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # a bug included: the other ranks must not wait for rank 0 forever
            err = e
    box = [(type(err).__name__, str(err)) if err is not None else None,
           share(result) if (share is not None and err is None and dist.get_rank() == 0) else None]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        kinds = {"RunLockedError": RunLockedError, "RunMismatchError": RunMismatchError}
        raise kinds.get(box[0][0], RunDirError)(f"on rank 0: {box[0][1]}")
    return result, box[1]


def open_run(out_dir: str | Path, verb: str, config: dict, *, resume: bool, overwrite: bool,
             what: str = "train.out_dir") -> RunDir:
    """Lock ``out_dir``, clean a killed run's leftovers, check or write the run identity (module docstring).
    Under torchrun rank 0 does the work and every rank gets its identity (or its error)."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    out_dir = Path(out_dir)
    run, ident = on_rank0(lambda: _open_main(out_dir, verb, config, resume, overwrite, what),
                          share=lambda r: r.identity)
    return run if run is not None else RunDir(out_dir, ident, None)


def check_run_id(state: dict, run: RunDir, path: Path) -> None:
    """A checkpoint written by another run (copied in, or left by a run this one replaced) is refused."""
    rid = state.get("run_id")
    if rid is not None and rid != run.run_id:
        raise RunMismatchError(f"--resume: checkpoint {path} belongs to run {rid}, but {run.path} is run "
                               f"{run.run_id} ({RUN_NAME}); use a new train.out_dir or --overwrite")
