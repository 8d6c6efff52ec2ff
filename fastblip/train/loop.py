"""The trainer shared by ``fastblip pretrain`` and ``fastblip finetune``.

One optimiser step = ``train.grad_accum`` micro-batches. Gradient accumulation (issue 4): the momentum
encoders are updated once per optimiser step (on its first micro-batch, before the momentum forward), the
queues are written every micro-batch, and the lr and alpha schedules count optimiser steps. The lr schedule
(BLIP pretrain.py / train_*.py): linear warmup from ``warmup_lr`` over ``warmup_steps`` in epoch 0, then per
epoch ``max(min_lr, lr · decay^epoch)`` (step) or ``min_lr + (lr − min_lr)(1 + cos(π·epoch/epochs))/2`` (cosine);
alpha = ``alpha · min(1, step / (alpha_ramp_epochs · steps_per_epoch))``.

The step has no host sync: loss terms are summed on device and read (one labelled sync) every ``log_every``
steps for the JSONL log and the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from fastblip.errors import InputError
from fastblip.train import checkpoint as ck
from fastblip.train import rundir
from fastblip.train.distributed import DistInfo, barrier, init_distributed, reduce_mean, wrap_model
from fastblip.train.recipe import Recipe, check_train_data, ensure_synthetic
from fastblip.train.step import TrainStep, compile_step

log = logging.getLogger("fastblip.train")
EXPORT_MARK = "export.json"  # inside out_dir/model: {run_id, step} of the export


def _iter_isolated(loader):
    """Iterate ``loader`` without touching the global torch RNG: starting a DataLoader iterator draws its base
    seed from it, which a resumed run would draw at another point than the straight run (bit-exact resume)."""
    it = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is None:
        return
    yield first
    yield from it


def lr_at(step: int, steps_per_epoch: int, t) -> float:
    """Learning rate for optimiser step ``step`` (0-based) under recipe train section ``t``."""
    epoch = step // max(1, steps_per_epoch)
    if epoch == 0 and t.warmup_steps > 0 and step <= t.warmup_steps:
        return min(t.lr, t.warmup_lr + (t.lr - t.warmup_lr) * step / t.warmup_steps)
    if t.schedule == "cosine":
        return (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / t.epochs)) + t.min_lr
    return max(t.min_lr, t.lr * t.lr_decay_rate**epoch)


def alpha_at(step: int, steps_per_epoch: int, t) -> float:
    ramp = t.alpha_ramp_epochs * steps_per_epoch
    return t.alpha * (min(1.0, step / ramp) if ramp > 0 else 1.0)


class Trainer:
    """``Trainer(recipe, resume=False).fit() -> dict`` of final metrics (last logged losses + eval)."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, device: str | None = None,
                 progress: bool = True, model: nn.Module | None = None, overwrite: bool = False):
        self.recipe, t = recipe, recipe.train
        # run-directory lifecycle (issue 15, train/rundir.py): checks that can fail do so before any work
        from fastblip.config import check_device

        check_device(device)
        check_train_data(recipe)
        self.info: DistInfo = init_distributed(device)
        self.out_dir = Path(t.out_dir)
        self.progress = progress and self.info.is_main
        from fastblip.tasks import get_task

        self.task = get_task(recipe.task)
        # what must match to resume (the model config is the recipe's, known before building anything)
        model_cfg = (model.cfg if model is not None else recipe.model_config()).to_dict()
        # every implementation choice of the run, once (printed by the CLI, written into recipe.json); an
        # explicit request that cannot be served fails here, before the run takes its out_dir
        from fastblip.backends import resolve

        d = recipe.data
        self.backends = resolve(self.info.device, attention=model_cfg["attention_backend"],
                                ops=model_cfg["ops_backend"] or "auto", compile=t.compile, amp=t.amp,
                                data=d.backend, padding=d.padding, max_length=d.max_length,
                                distributed=t.distributed if self.info.enabled else "none")
        d.padding = self.backends.padding  # the loader pads as resolved (buckets when compiled)
        self.fp = ck.fingerprint(model_cfg, recipe.data.batch_size, t.grad_accum, self.info.world_size)
        self.fp["distributed"] = t.distributed if self.info.enabled else "none"  # optimiser state layouts differ
        # lock, leftovers of a killed run, run identity; a non-empty out_dir needs --resume or --overwrite
        self.run = rundir.open_run(self.out_dir, recipe.task, self.fp, resume=resume, overwrite=overwrite)
        self.resume_path, self.resume_state = ck.find_resume_checkpoint(self.out_dir) if resume else (None, None)
        if self.resume_state is not None:  # refuse another config's or another run's checkpoint before any work
            ck.check_fingerprint(self.resume_state["fingerprint"], self.fp, self.resume_path)
            rundir.check_run_id(self.resume_state, self.run, self.resume_path)
        elif resume:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.out_dir / "checkpoints")
        if self.info.is_main:
            ensure_synthetic(recipe)
        barrier()

        torch.manual_seed(t.seed)  # same initial weights on every rank (DDP also broadcasts them)
        if model is None:
            from fastblip.train.init import build_and_init

            model = build_and_init(recipe)
        self.model = model.to(self.info.device)
        rundir.install_step_fault(self.model)  # FASTBLIP_FAULT=step@N (fault tests); nothing otherwise
        torch.manual_seed(t.seed + self.info.rank)  # per-rank dropout / sampling streams

        self.model.set_backends(attention=self.backends.attention, ops=dict(self.backends.ops))
        self.loader = self.task.build_loader(recipe, train=True, rank=self.info.rank,
                                             world_size=self.info.world_size, epoch=0)
        self.steps_per_epoch = len(self.loader) // t.grad_accum
        if self.steps_per_epoch < 1:
            raise InputError(f"the training data gives {len(self.loader)} batches per epoch per rank, fewer than "
                             f"train.grad_accum={t.grad_accum}")
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

        self.amp_dtype = self.backends.amp_dtype
        if self.resume_state is not None and self._sharded():
            self.model.load_state_dict(self.resume_state["model"])  # full tensors, before fully_shard
        step = TrainStep(self.model)
        compile_step(step, self.backends.compile)  # before wrapping: DDP/FSDP2 call the compiled module
        self.step_module = wrap_model(step, self.info, t.distributed)
        self._alpha = torch.zeros((), device=self.info.device)  # a device tensor: see fastblip.train.step
        # after wrapping: FSDP2 replaces the parameters by sharded DTensor parameters
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                           fused=self.backends.optimizer == "adamw_fused" or None)
        # FSDP2: the trainer updates the momentum encoders itself, between steps (see _train_epoch)
        self.external_momentum = self.info.enabled and t.distributed == "fsdp2" and self.model.has_momentum
        self.step, self.epoch = 0, 0
        self._progress = None  # fastblip.train.progress.TrainProgress on rank 0 while fit() runs
        if self.resume_state is not None:
            self._restore(self.resume_state)
            log.info("resumed from %s at step %d (epoch %d)", self.resume_path, self.step, self.epoch)
        self.resume_state = None
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        per_rank = {"rng": ck.rng_state(), "data": self.loader.state_dict()}
        if self.info.enabled:
            gathered: list = [None] * self.info.world_size
            dist.all_gather_object(gathered, per_rank)
        else:
            gathered = [per_rank]
        model_sd, optim_sd = self._model_optim_state()
        return {"model": model_sd, "optimizer": optim_sd, "step": self.step,
                "epoch": self.epoch, "scaler": None, "per_rank": gathered, "fingerprint": self.fp,
                "recipe": self.recipe.to_dict(), "run_id": self.run.run_id}

    def _sharded(self) -> bool:
        return self.info.enabled and self.recipe.train.distributed == "fsdp2"

    def _model_optim_state(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimiser state; under FSDP2 gathered to CPU (a collective)."""
        if not self._sharded():
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(self.step_module, self.optimizer, options=opts)
        return {k.removeprefix("model."): v for k, v in msd.items()}, osd

    def _restore(self, st: dict) -> None:
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            # the model state was loaded before sharding (__init__); tied MED modules break set_model_state_dict
            set_optimizer_state_dict(self.step_module, self.optimizer, optim_state_dict=st["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.epoch = int(st["step"]), int(st["epoch"])
        mine = st["per_rank"][self.info.rank]
        try:
            self.loader.load_state_dict(mine["data"])
        except ValueError as e:  # data position of another seed / world size / worker count: one line
            raise rundir.RunMismatchError(f"--resume: {self.resume_path}: {e}; resume with the same data.num_workers "
                                          "and train.seed, or use a new train.out_dir") from None
        ck.set_rng_state(mine["rng"])

    def save(self, export: bool = False) -> Path | None:
        """Write the resumable checkpoint; ``export`` also writes ``out_dir/model``, a fastblip directory
        that ``fastblip.load`` (and ``capfilt captioner=... filter=...``, ``eval``, ``init_from``) reads."""
        st = self.state_dict()  # collective under torchrun: every rank calls it
        path = None
        if self.info.is_main:
            path = ck.save_checkpoint(self.out_dir, self.step, st, self.recipe.train.keep_last)
            if export:
                self._export(st["model"])
            if self._progress is not None:  # "step N: checkpoint written to ... (X MB)"
                self._progress.checkpoint(path, self.step, self.out_dir / "model" if export else None)
        barrier()
        return path

    def _finished(self) -> bool:
        return self.step >= self.total_steps or self.epoch >= self.recipe.train.epochs

    def _export(self, model_sd: dict) -> Path:
        """``out_dir/model`` written as ``model.tmp-<pid>`` and renamed (io.publish_dir), with ``export.json``
        {run_id, step}: a resumed run knows whether the export is this run's last step (else it re-exports)."""
        import os

        from fastblip.checkpoints.io import publish_dir, write_fastblip_files

        model = self.model
        if self._sharded():  # parameters are DTensor shards: a CPU copy from the gathered full state
            from fastblip.models import build_model

            model = build_model(self.model.cfg)
            model.load_state_dict(model_sd)
            model.tokenizer = self.model.tokenizer
        final, tmp = self.out_dir / "model", self.out_dir / f"model.tmp-{os.getpid()}"
        write_fastblip_files(model, tmp, extra={EXPORT_MARK: {"run_id": self.run.run_id, "step": self.step}})
        rundir.fault_point("export")
        publish_dir(tmp, final)
        log.info("exported %s (step %d)", final, self.step)
        return final

    def _ensure_exported(self) -> None:
        """A finished run whose export is missing or older than its last step (killed during the export, or
        extended by --resume with more steps) exports now; every rank agrees (FSDP2 gathers collectively)."""
        ok = None
        if self.info.is_main:
            mark = self.out_dir / "model" / EXPORT_MARK
            try:
                m = json.loads(mark.read_text())
            except (OSError, ValueError):
                m = {}
            ok = m.get("run_id") == self.run.run_id and m.get("step") == self.step
        if self.info.enabled:
            box = [ok]
            dist.broadcast_object_list(box, src=0)
            ok = box[0]
        if ok:
            return
        log.info("the run finished at step %d but %s is missing or older: exporting it", self.step,
                 self.out_dir / "model")
        model_sd = self._model_optim_state()[0]  # collective under FSDP2
        if self.info.is_main:
            self._export(model_sd)
        barrier()

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def fit(self) -> dict:
        log_f = None
        try:
            if self.info.is_main:
                rundir.atomic_write_text(self.out_dir / "recipe.json", json.dumps(
                    {**self.recipe.to_dict(), "backends": self.backends.to_dict(), "run_id": self.run.run_id},
                    indent=1))
                rundir.truncate_log(self.out_dir / "log.jsonl", self.step)  # a killed run logged past its checkpoint
                log_f = open(self.out_dir / "log.jsonl", "a")
                from fastblip.train.progress import TB_DIR, TrainProgress, want_bar

                # a bar on a terminal, else one line per log_every steps (fastblip.train.progress); TensorBoard
                # scalars beside log.jsonl when train.tensorboard
                t = self.recipe.train
                self._progress = TrainProgress(
                    self.total_steps, self.step, epochs=t.epochs, steps_per_epoch=self.steps_per_epoch,
                    bar=want_bar(self.progress), tensorboard=self.out_dir / TB_DIR if t.tensorboard else None)
            while not self._finished():
                before = self.step
                self._train_epoch(log_f)
                if self.step == before:  # an epoch without a single optimiser step would loop (or "finish") on nothing
                    s = self._data_stats()
                    raise InputError(f"the training data yielded no usable batch (epoch {self.epoch}, step {self.step}:"
                                     f" {s['ok']} samples ok, skipped {s['skipped'] or 'none'}); check data.train "
                                     "with `fastblip data check`")
                if self.step % self.steps_per_epoch == 0:
                    self._end_epoch(log_f, advance=True)
                elif self.step >= self.total_steps:  # max_steps inside an epoch: resumable mid-epoch
                    self._end_epoch(log_f, advance=False)
            t = self.recipe.train
            if t.eval_at_end and not t.eval_every_epoch and self.recipe.data.eval:
                # the final metrics hold the task's evaluation (retrieval recall, CIDEr, ...) when the recipe does
                # not evaluate every epoch (the tiny CPU recipes: one evaluation instead of 15)
                self._evaluate(log_f, max(0, self.step - 1) // self.steps_per_epoch)
            self._ensure_exported()  # --resume of a run killed during its export (or extended): export now
            self.last_metrics["data"] = self._data_stats()
            if self._progress is not None:  # the last line: steps, time, data over this process's run
                self._progress.finish(self.last_metrics["data"])
        finally:
            if self._progress is not None:
                self._progress.close()
            self._progress = None
            if log_f is not None:
                log_f.close()
            self.run.close()  # the out_dir lock: released at the end of the run, whatever ended it
        return self.last_metrics

    def _train_epoch(self, log_f) -> None:
        t, accum = self.recipe.train, self.recipe.train.grad_accum
        spe = self.steps_per_epoch
        epoch_end_step = min((self.epoch + 1) * spe, self.total_steps)
        if self.step >= epoch_end_step:
            return
        sums: dict[str, torch.Tensor] = {}
        n_logged, t0, images = 0, time.perf_counter(), 0
        micro = 0
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for batch in _iter_isolated(self.loader):
            if micro == 0:
                lr = lr_at(self.step, spe, t)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                alpha = alpha_at(self.step, spe, t)
                self._alpha.fill_(alpha)  # a fill kernel, not a host-to-device copy: no sync
            batch = batch.to(self.info.device)
            last = micro == accum - 1
            sync = contextlib.nullcontext()
            if not last and isinstance(self.step_module, DistributedDataParallel):
                sync = self.step_module.no_sync()  # DDP: all-reduce once per optimiser step
            update_momentum = micro == 0  # once per optimiser step, before its first momentum forward
            if update_momentum and self.external_momentum:
                # FSDP2: between steps every parameter is a sharded DTensor, so the foreach update runs on the
                # shards; inside forward the root unit's params are unsharded copies, discarded at reshard
                self.model.momentum_update()
                update_momentum = False
            with sync:
                with self._autocast():
                    out = self.step_module(batch, self._alpha, update_momentum=update_momentum)
                (out["loss"] / accum).backward()
            for k, v in out.items():
                if k.endswith("loss"):
                    sums[k] = sums.get(k, 0) + v.detach().float()
            n_logged += 1
            images += len(batch) * self.info.world_size
            micro += 1
            if not last:
                continue
            micro = 0
            if t.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(params, t.clip_grad, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self._progress is not None:
                self._progress.update(1)
            if self.step % t.log_every == 0 or self.step == epoch_end_step:
                dt = time.perf_counter() - t0
                if self.info.enabled:  # mean over ranks: one small all-reduce per log line
                    keys = sorted(sums)
                    red = reduce_mean(torch.stack([sums[k] for k in keys]))
                    sums = dict(zip(keys, red.unbind(0)))
                rec = {k: round(float(v) / n_logged, 5) for k, v in sums.items()}  # sync: once per log_every
                rec.update(step=self.step, epoch=self.epoch, lr=lr, alpha=round(alpha, 5),
                           img_per_sec=round(images / max(dt, 1e-9), 2), data=self._data_stats())
                self._log(rec, log_f)
                sums, n_logged, t0, images = {}, 0, time.perf_counter(), 0
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step != epoch_end_step:
                self.save()
            if self.step >= epoch_end_step:
                break

    def _end_epoch(self, log_f, advance: bool) -> None:
        t = self.recipe.train
        if advance:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
        if t.eval_every_epoch and self.recipe.data.eval:
            self._evaluate(log_f, self.epoch - int(advance))
        self.save(export=self._finished())

    def _evaluate(self, log_f, epoch: int) -> dict:
        """The task's evaluation of the current weights (training RNG untouched), logged and merged into the
        final metrics as ``eval_*``."""
        self.model.eval()
        with torch.random.fork_rng(devices=[]), self._full_weights():
            metrics = self.task.evaluate(self.model, self.recipe, rank=self.info.rank,
                                         world_size=self.info.world_size, amp_dtype=self.amp_dtype)
        self.model.train()
        self._log({"eval": metrics, "step": self.step, "epoch": epoch}, log_f)
        self.last_metrics.update({f"eval_{k}": v for k, v in metrics.items()})
        return metrics

    @contextlib.contextmanager
    def _full_weights(self):
        """FSDP2 keeps sharded DTensor parameters between steps; evaluation calls the model's own methods (not
        the wrapped forward that gathers them), so every FSDP unit is unsharded for its duration."""
        if not self._sharded():
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.step_module.modules() if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()

    def _data_stats(self) -> dict:
        s = getattr(self.loader, "stats", None) or {}
        return {"ok": s.get("ok", 0), "skipped": dict(s.get("skipped", {}))}

    def _log(self, rec: dict, log_f) -> None:
        """One record of the run: log.jsonl (every record), then the bar or a log line and the TensorBoard
        scalars (``self._progress``: rank 0 during ``fit``)."""
        if "eval" not in rec:
            self.last_metrics.update({k: v for k, v in rec.items() if k.endswith("loss")})
            self.last_metrics["step"] = rec["step"]
        if log_f is not None:
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
        if self._progress is not None:
            self._progress.record(rec)


def train(recipe: Recipe, *, resume: bool = False, device: str | None = None, progress: bool = True) -> dict:
    return Trainer(recipe, resume=resume, device=device, progress=progress).fit()
