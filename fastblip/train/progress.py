"""What a run tells a person while it works: a progress bar on a terminal, plain lines in a log.

On a terminal (stderr is a TTY) a run shows a tqdm bar, and its messages (checkpoints written, evaluations,
warnings) are printed above the bar instead of splitting it. Anywhere else (a redirected log, CI, ``nohup``)
there is no bar: carriage-return frames are unreadable in a file (the demo's log held 151 KB of them); instead
one line every ``train.log_every`` steps, at most one per ``LINE_SECONDS`` (the first and the last always)::

    12:03:41 train 150/600 steps (25%), epoch 2/8 | 312.4 img/s, 9.8 steps/s | 0:15 elapsed, ETA 0:46 | loss 4.812 (itc 1.930 itm 0.640 lm 2.242) | lr 2.00e-03

Lines, checkpoint writes and evaluations go to the ``fastblip.run`` logger at INFO: the run's own account, which
the CLI shows without ``-v`` (the rest of the library's INFO needs ``-v``); a program using fastblip as a library
sees them once it configures logging. ``log.jsonl`` in the run directory keeps every record either way, and
``train.tensorboard: true`` also writes them as TensorBoard scalars into ``out_dir/tensorboard``
(``tensorboard --logdir runs/``), as open_clip and LAVIS runs are watched.

The trainer calls ``update`` once per optimiser step (no host sync: it only counts) and ``record`` with each
log.jsonl record; the loss values in a record were read once per ``log_every`` steps (the one labelled sync).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

RUN_LOG = "fastblip.run"
log = logging.getLogger(RUN_LOG)
# a caller whose runs write a checkpoint every few seconds (the demo: one per epoch of a tiny model) sets this
# logger above INFO to leave those lines out, on a terminal too
CKPT_LOG = RUN_LOG + ".checkpoints"
# lines no closer than this in a log: a tiny CPU run logs every 5 steps at ~10 steps/s, which would be 2 lines
# a second; log.jsonl keeps every record
LINE_SECONDS = 10.0
TB_DIR = "tensorboard"


def fmt_duration(seconds: float | None) -> str:
    """``0:07``, ``4:05``, ``1:02:03``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def want_bar(allowed: bool, stream=None) -> bool:
    """A progress bar only when the caller allows one and ``stream`` (stderr) is a terminal."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(allowed and isatty is not None and isatty())


class Progress:
    """Progress of ``total`` units (steps, shards) from ``initial``: a tqdm bar when ``bar``, else lines.

    The rate (and so the ETA) is measured from the end of the first unit on, so a first step that compiles or
    waits for the first batch does not skew it; until a second unit is done it is the first unit's."""

    def __init__(self, desc: str, total: int, initial: int = 0, *, unit: str = "step", bar: bool = False,
                 min_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter):
        self.desc, self.total, self.unit, self.initial, self.done = desc, total, unit, initial, initial
        self.min_seconds = LINE_SECONDS if min_seconds is None else min_seconds
        self.clock = clock
        self.t0 = clock()
        self._mark: tuple[float, int] | None = None  # (time, done) at the end of the first unit
        self._last_line: float | None = None
        self._stack = contextlib.ExitStack()
        self._bar = None
        if bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
            # a warning logged while the bar is drawn is printed above it (tqdm.write), not through it
            self._stack.enter_context(logging_redirect_tqdm())

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._mark is None:
            self._mark = (self.clock(), self.done)
        if self._bar is not None:
            self._bar.update(n)

    def rate(self) -> float | None:
        """Units per second (see the class docstring); None before the first unit."""
        now = self.clock()
        if self._mark is not None and self.done > self._mark[1] and now > self._mark[0]:
            return (self.done - self._mark[1]) / (now - self._mark[0])
        n, dt = self.done - self.initial, now - self.t0
        return n / dt if n > 0 and dt > 0 else None

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if r else None

    def status(self) -> str:
        """``train 150/600 steps (25%)``."""
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.desc} {self.done}/{self.total} {self.unit}s{pct}"

    def timing(self) -> str:
        """``0:15 elapsed, ETA 0:46``."""
        return f"{fmt_duration(self.clock() - self.t0)} elapsed, ETA {fmt_duration(self.eta())}"

    def show(self, fields: list[str], postfix: dict | None = None, *, force: bool = False) -> str | None:
        """Bar: ``postfix`` beside it. Lines: status | fields | timing, when due; returns the line written."""
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return None
        now = self.clock()
        due = (force or self._last_line is None or self.done >= self.total
               or now - self._last_line >= self.min_seconds)
        if not due:
            return None
        self._last_line = now
        r = self.rate()
        speed = [f"{r:.3g} {self.unit}s/s"] if r else []
        line = " | ".join([self.status(), *fields[:1], *speed, self.timing(), *fields[1:]])
        log.info("%s", line)
        return line

    def note(self, msg: str) -> None:
        """A message of the run (a checkpoint written, an evaluation): above the bar, or one log line."""
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            log.info("%s", msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stack.close()


class TensorBoardLog:
    """log.jsonl records as TensorBoard scalars (``train/<loss>``, ``train/lr``, ``eval/<metric>``, ...) at the
    optimiser step. ``purge_step``: a resumed run hides what the killed run logged past its checkpoint (the
    trainer cuts log.jsonl back the same way)."""

    def __init__(self, log_dir: Path, purge_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            from fastblip.errors import MissingDependencyError

            raise MissingDependencyError(f"train.tensorboard=true needs the tensorboard package (pip install "
                                         f"tensorboard): {e}") from None
        log_dir = Path(log_dir)
        if purge_step == 0 and log_dir.is_dir():  # a new run (or one with no checkpoint yet) starts a clean curve
            for p in log_dir.glob("events.out.tfevents.*"):
                p.unlink()
        self.dir = log_dir
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None)

    def record(self, rec: dict) -> None:
        step = int(rec["step"])
        if "eval" in rec:
            for k, v in rec["eval"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"eval/{k}", v, step)
            self.writer.flush()  # an evaluation is rare and what one watches for
            return
        for k, v in rec.items():
            if k in ("step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            self.writer.add_scalar(f"train/{k}", v, step)
        skipped = (rec.get("data") or {}).get("skipped") or {}
        if skipped:
            self.writer.add_scalar("train/data_skipped", sum(skipped.values()), step)

    def close(self) -> None:
        self.writer.close()


def _fmt_metric(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class TrainProgress(Progress):
    """The trainer's progress: optimiser steps, the losses of each log.jsonl record, evaluations, checkpoint
    writes, and the TensorBoard scalars when ``tensorboard`` names a directory."""

    def __init__(self, total: int, initial: int = 0, *, epochs: int, steps_per_epoch: int, bar: bool = False,
                 tensorboard: Path | None = None, min_seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.tb = TensorBoardLog(tensorboard, purge_step=initial) if tensorboard is not None else None
        super().__init__("train", total, initial, unit="step", bar=bar, min_seconds=min_seconds, clock=clock)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        if initial:
            self.note(f"resuming at step {initial}/{total}")

    def record(self, rec: dict) -> str | None:
        """One log.jsonl record (training or ``{"eval": ...}``); returns the line written, if any."""
        if self.tb is not None:
            self.tb.record(rec)
        if "eval" in rec:
            metrics = " ".join(f"{k} {_fmt_metric(v)}" for k, v in rec["eval"].items())
            line = f"eval at step {rec['step']} (epoch {rec['epoch'] + 1}/{self.epochs}): {metrics}"
            self.note(line)
            return line
        self.done = max(self.done, int(rec["step"]))
        losses = {k: v for k, v in rec.items() if k.endswith("loss")}
        total = losses.pop("loss", None)
        parts = " ".join(f"{k.removesuffix('_loss')} {v:.3f}" for k, v in losses.items())
        loss = (f"loss {total:.4f}" + (f" ({parts})" if parts else "")) if total is not None else parts
        fields = [f"{rec['img_per_sec']:.1f} img/s", f"epoch {rec['epoch'] + 1}/{self.epochs}", loss,
                  f"lr {rec['lr']:.2e}"]
        skipped = (rec.get("data") or {}).get("skipped") or {}
        if skipped:
            fields.append("skipped " + ", ".join(f"{k} {n}" for k, n in sorted(skipped.items())))
        postfix = {k.removesuffix("_loss"): f"{v:.3f}" for k, v in rec.items() if k.endswith("loss")}
        postfix.update(lr=f"{rec['lr']:.2e}", img_s=f"{rec['img_per_sec']:.1f}")
        return self.show(fields, postfix)

    def checkpoint(self, path: Path | None, step: int, exported: Path | None = None) -> None:
        """A checkpoint written (and the model exported): one line, with its size (unless ``CKPT_LOG``'s level
        was set above INFO)."""
        if path is None or logging.getLogger(CKPT_LOG).level > logging.INFO:
            return
        try:
            size = f" ({Path(path).stat().st_size / 2**20:.1f} MB)"
        except OSError:
            size = ""
        msg = f"step {step}: checkpoint written to {path}{size}"
        if exported is not None:
            msg += f"; model exported to {exported}"
        self.note(msg)

    def finish(self, data: dict | None = None) -> None:
        """The run's last line: steps, time, and the data it read."""
        msg = f"train finished at step {self.done}/{self.total} in {fmt_duration(self.clock() - self.t0)}"
        if data is not None:
            msg += f"; data: {data.get('ok', 0)} samples ok, skipped {data.get('skipped') or 'none'}"
        self.note(msg)

    def close(self) -> None:
        super().close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
