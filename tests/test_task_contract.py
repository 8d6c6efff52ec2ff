"""The task contract (fastblip/tasks/contract.py) and the trainer that calls it without reflection.

Momentum encoders move once per optimiser step (BLIP_SPEC §2), for retrieval too (it updated them on every
micro-batch before): with 2 micro-batches per step, the momentum weights after step 2 must equal one update
from the weights saved after step 1, ``pm2 = m·pm1 + (1−m)·p1``, to fp32 rounding (two updates give
``m²·pm1 + (1−m²)·p1``: a difference of ~0.5% of ``p1 − pm1``, far above the tolerance). The same holds under
2-rank FSDP2 (gloo), where the trainer updates the sharded parameters itself between steps; the simulation is
that formula applied in one process to the gathered checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastblip.train.recipe import read_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune_retrieval_tiny_cpu.yaml"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastblip.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, num=48, noise=0.0, seed=0, image_size=32, human=32, eval_num=8)
    return out


def _recipe(synth: Path, out_dir: Path, *extra: str):
    return read_recipe(RECIPE, [
        "data.synthetic={}", f"data.train=[{synth}/human.json]", f"data.eval=[{synth}/eval.json]",
        "data.num_workers=0", "data.batch_size=4", "data.image_size=32", "model.config.queue_size=16",
        "model.config.vision.patch_size=8", f"train.out_dir={out_dir}", "train.grad_accum=2", "train.max_steps=2",
        "train.ckpt_every=1", "train.keep_last=0", "train.warmup_steps=0", "train.lr=5e-3", "train.log_every=1",
        "train.eval_every_epoch=true", "task_options.k_test=4",
        *extra])


def _check_one_update_per_step(out_dir: Path) -> None:
    from fastblip.models.contrastive import MOMENTUM_PAIRS
    from fastblip.train import checkpoint as ck

    c1, c2 = (ck.load_checkpoint(out_dir / "checkpoints" / f"step-{s:08d}.pt")["model"] for s in (1, 2))
    m = 0.995
    n = 0
    for src, dst in MOMENTUM_PAIRS:
        for k in [k for k in c1 if k.startswith(dst + ".")]:
            p1, pm1, pm2 = c1[src + k[len(dst):]].float(), c1[k].float(), c2[k].float()
            if (p1 - pm1).abs().max() < 1e-6:
                continue  # a parameter the first step did not move (e.g. its gradient is exactly 0)
            once = m * pm1 + (1 - m) * p1
            torch.testing.assert_close(pm2, once, rtol=1e-6, atol=1e-7, msg=k)
            n += 1
    assert n > 20, n  # most momentum tensors were checked


def test_retrieval_momentum_moves_once_per_optimiser_step(synth, tmp_path):
    from fastblip.train.loop import Trainer

    tr = Trainer(_recipe(synth, tmp_path / "run"), progress=False)
    tr.fit()
    _check_one_update_per_step(tmp_path / "run")


def _fsdp_worker(rank: int, world: int, port: int, synth: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fastblip.train.distributed import destroy_distributed
    from fastblip.train.loop import Trainer

    Trainer(_recipe(Path(synth), Path(out_dir), "train.distributed=fsdp2"), progress=False, device="cpu").fit()
    destroy_distributed()
    # torch 2.14 + gloo + FSDP2: about one spawned worker in five still aborts in C++ teardown at interpreter
    # exit ("terminate called without an active exception") after everything above finished and was written;
    # leave without that teardown (torchrun runs of the CLI, with destroy_distributed's barrier: 0 of 20)
    os._exit(0)


def test_retrieval_momentum_under_two_rank_fsdp2(synth, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, str(synth), str(tmp_path / "run")), nprocs=2, join=True)
    _check_one_update_per_step(tmp_path / "run")


def test_the_trainer_moves_each_batch_to_its_device(synth, tmp_path, monkeypatch):
    """The step runs on the trainer's device: every batch goes through ``Batch.to(device)``."""
    from fastblip.data.batch import Batch
    from fastblip.train.loop import Trainer

    seen = []
    to = Batch.to
    monkeypatch.setattr(Batch, "to", lambda self, device, **kw: seen.append(torch.device(device)) or to(self, device))
    tr = Trainer(_recipe(synth, tmp_path / "run", "train.max_steps=1"), progress=False, device="cpu")
    tr.fit()
    assert len(seen) >= 2 and set(seen) == {torch.device("cpu")}  # 2 micro-batches per step


def test_every_task_declares_the_contract():
    from fastblip.tasks import TASKS, get_task
    from fastblip.tasks.contract import Task

    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert callable(task.build_loader) and callable(task.evaluate)
    assert {n for n in TASKS if get_task(n).compilable} == {"pretrain", "retrieval", "caption"}


def test_every_trainable_model_implements_training_step():
    from fastblip.config import tiny_config
    from fastblip.models import build_model
    from fastblip.models.base import BlipBase

    for kind, momentum in (("pretrain", True), ("retrieval", True), ("itm", False), ("caption", False),
                           ("vqa", False), ("nlvr", False)):
        m = build_model(tiny_config(kind))
        assert m.has_momentum is momentum, kind
        assert type(m).training_step is not BlipBase.training_step, kind
        if momentum:
            m.momentum_update()


@pytest.mark.parametrize("model_key,data_key,model_val,data_val", [
    ("vision.image_size", "image_size", 384, 64), ("max_text_len", "max_length", 35, 30),
    ("prompt", "prompt", "'a photo of '", "'a picture of '")])
def test_one_source_per_setting(model_key, data_key, model_val, data_val):
    """``model.config.vision.image_size=384`` with ``data.image_size=64`` built a 64 px model silently."""
    from fastblip.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"model\.config\.{model_key}.*data\.{data_key}"):
        read_recipe(RECIPE, [f"model.config.{model_key}={model_val}", f"data.{data_key}={data_val}"])
    cfg = read_recipe(RECIPE, [f"model.config.{model_key}={data_val}", f"data.{data_key}={data_val}"]).model_config()
    got = cfg.vision.image_size if data_key == "image_size" else (
        cfg.max_text_len if data_key == "max_length" else repr(cfg.prompt))
    assert str(got) == str(data_val)
