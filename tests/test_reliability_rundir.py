"""Issue 15, items 2-5 and 8: a run owns its output directory, nothing is marked done that was not done.

- Two runs sharing an out_dir corrupted each other (no lock; a fresh run in an old run's directory had its new
  checkpoint rotated away and ``--resume`` continued the old run). Now: a lock naming the owner (pid, host),
  released by the kernel when the owner dies; a non-empty out_dir needs --resume or --overwrite; --resume
  refuses another run's checkpoint; a truncated newest checkpoint is skipped, naming it.
- Training on data with no usable sample exited 0 with an untrained model; garbage shards over 512 bytes passed
  the preflight. Now both are one line before (or instead of) any export.
- CapFilt marked missing inputs done and silently kept results of other settings. Now: no done marker for a
  shard that could not be read, every input missing is refused before loading models, other settings are
  refused (``overwrite`` redoes them).
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastblip.errors import InputError, RunDirError
from fastblip.train import checkpoint as ck
from fastblip.train.recipe import read_recipe
from fastblip.train.rundir import LOCK_NAME, RunLockedError, RunMismatchError, acquire_lock

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "pretrain_tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core CI: one intra-op thread does the same work in less CPU time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastblip.data.synth import make_synthetic

    out = tmp_path_factory.mktemp("rundir_synth")
    return make_synthetic(out, num=24, noise=0.3, seed=0, image_size=32, human=16, eval_num=8, shard_size=12)


def _recipe(synth, out_dir: Path, *extra: str):
    return read_recipe(RECIPE, [
        "data.synthetic={}", f"data.train=[{synth['out']}/human.json]", "data.eval=[]", "data.num_workers=0",
        "data.batch_size=4", "data.image_size=32", "model.config.queue_size=8", "train.epochs=1",
        "train.max_steps=2", "train.ckpt_every=1", "train.keep_last=3", "train.log_every=1",
        f"train.out_dir={out_dir}", *extra])


def _train(synth, out_dir: Path, *extra: str, **kw):
    from fastblip.train.loop import Trainer

    tr = Trainer(_recipe(synth, out_dir, *extra), progress=False, **kw)
    tr.fit()
    return tr


# ----------------------------------------------------------------------------- the lock


def test_lock_names_its_owner_and_dies_with_it(synth, tmp_path):
    from fastblip.train.loop import Trainer

    d = tmp_path / "run"
    code = ("import sys, time\nfrom fastblip.train.rundir import acquire_lock\n"
            "lock = acquire_lock(sys.argv[1], 'pretrain')\nprint('held', flush=True)\ntime.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert owner.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pretrain, pid {owner.pid} on "
                                                 rf"{socket.gethostname()}"):
            acquire_lock(d, "pretrain")
        with pytest.raises(RunLockedError, match=f"pid {owner.pid}"):  # a second trainer: refused before any work
            Trainer(_recipe(synth, d), progress=False)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    lock = acquire_lock(d, "pretrain")  # the kernel released the dead owner's lock: no stale-lock cleanup needed
    assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError, match="in use by this process"):
        acquire_lock(d, "pretrain")
    lock.release()
    assert (d / LOCK_NAME).read_text() == ""


# ----------------------------------------------------------------------------- run identity


def test_fresh_run_refuses_a_used_out_dir_overwrite_replaces_it(synth, tmp_path):
    from fastblip.train.loop import Trainer

    d = tmp_path / "run"
    first = _train(synth, d)
    run1 = json.loads((d / "run.json").read_text())["run_id"]
    assert first.run.run_id == run1 and (d / "model" / "model.safetensors").is_file()
    (d / "notes.txt").write_text("mine")  # a file the run did not write: never deleted
    with pytest.raises(RunDirError, match=r"is not empty .*--resume continues the run in it, --overwrite replaces"):
        Trainer(_recipe(synth, d), progress=False)
    second = _train(synth, d, "train.seed=7", overwrite=True)
    run2 = json.loads((d / "run.json").read_text())["run_id"]
    assert run2 != run1 and second.run.run_id == run2 and (d / "notes.txt").read_text() == "mine"
    for p in ck.list_checkpoints(d):  # only the new run's checkpoints, none rotated away by the old ones
        assert torch.load(p, weights_only=True)["run_id"] == run2
    assert [p.name for p in ck.list_checkpoints(d)] == ["step-00000001.pt", "step-00000002.pt"]
    assert json.loads((d / "model" / "export.json").read_text()) == {"run_id": run2, "step": 2}


def test_resume_refuses_another_runs_checkpoint_and_skips_a_truncated_one(synth, tmp_path, caplog):
    from fastblip.train.loop import Trainer

    a, b = tmp_path / "a", tmp_path / "b"
    _train(synth, a)
    _train(synth, b, "train.max_steps=1")
    shutil.copy(a / "checkpoints" / "step-00000002.pt", b / "checkpoints" / "step-00000002.pt")
    with pytest.raises(RunMismatchError, match=r"step-00000002.pt belongs to run [0-9a-f]+, but .* is run"):
        Trainer(_recipe(synth, b), resume=True, progress=False)
    (b / "checkpoints" / "step-00000002.pt").unlink()
    # a's newest checkpoint truncated (a bad copy, a full disk outside our atomic write): resume from step 1
    newest = a / "checkpoints" / "step-00000002.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    caplog.set_level("WARNING", logger="fastblip.train")
    tr = Trainer(_recipe(synth, a), resume=True, progress=False)
    assert tr.step == 1 and "skipping unreadable checkpoint" in caplog.text and "step-00000002.pt" in caplog.text
    tr.fit()
    assert tr.step == 2 and torch.load(newest, weights_only=True)["step"] == 2  # rewritten whole


# ----------------------------------------------------------------------------- "done" only when done


def _truncated_jpegs(d: Path, n: int) -> Path:
    d.mkdir()
    anns = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        (d / f"{i}.jpg").write_bytes(data[: len(data) // 2])  # the header whole, the scan cut: decoding fails
        anns.append({"image": f"{i}.jpg", "caption": f"picture {i}"})
    (d / "ann.json").write_text(json.dumps(anns))
    return d / "ann.json"


def test_no_usable_sample_is_an_error_not_an_untrained_model(synth, tmp_path):
    from fastblip.data.loader import build_loader
    from fastblip.data.readers import SourceError, shard_problem

    ann = _truncated_jpegs(tmp_path / "bad", 8)
    with pytest.raises(InputError, match=r"yielded no usable batch \(epoch 0, step 0: 0 samples ok, skipped \{") as e:
        _train(synth, tmp_path / "run", f"data.train=[{ann}]")  # was: exit 0, 0 steps, an untrained model exported
    skipped = ast.literal_eval(str(e.value).partition("skipped ")[2].partition(")")[0])  # the counts it reports
    assert sum(skipped.values()) == 8 and set(skipped) <= {"truncated_image", "corrupt_image"}
    assert not (tmp_path / "run" / "model").exists()  # nothing exported
    junk = tmp_path / "junk-000.tar"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert shard_problem(str(junk)) == "unreadable_shard"  # was: any file over 512 bytes passed the preflight
    with pytest.raises(SourceError, match="nothing readable"):
        build_loader(str(junk), image_size=32, batch_size=2, train=False, num_workers=0)


# ----------------------------------------------------------------------------- CapFilt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import fastblip
    from fastblip.config import tiny_config
    from fastblip.models import build_model

    torch.manual_seed(0)
    cap, flt = build_model(tiny_config("caption")).eval(), build_model(tiny_config("itm")).eval()
    d = tmp_path_factory.mktemp("rundir_models")
    return cap, flt, fastblip.save(cap, d / "cap"), fastblip.save(flt, d / "flt")


def _capfilt(inp: str, out: Path, **kw):
    from fastblip.capfilt.recipe import CapfiltRecipe

    base = dict(input=inp, output=str(out), num_captions=1, image_size=32, batch_size=12, max_length=8,
                num_workers=1, dtype="fp32", device="cpu", progress=False, captioner="c", filter="f")
    return CapfiltRecipe(**{**base, **kw})


def test_capfilt_marks_only_work_done_and_refuses_other_settings(synth, models, tmp_path):
    from fastblip.capfilt.pipeline import collect, expand_input, run_capfilt

    cap, flt, _, _ = models
    web = Path(synth["web"].split("{")[0]).parent  # web-00000.tar, web-00001.tar
    inp = str(web / "web-{00000..00002}.tar")  # web-00002 does not exist yet
    out = tmp_path / "out"
    s = run_capfilt(_capfilt(inp, out), captioner=cap, filter_model=flt)
    assert s["shards"] == 2 and s["missing"] == ["web-00002"]
    assert not list(out.glob("web-00002*"))  # no empty shard, no done marker
    assert collect(out, expand_input(inp))["missing_shards"] == ["web-00002"]
    shutil.copy(web / "web-00000.tar", tmp_path / "web-00002.tar")  # the shard appears: the rerun does it, only it
    shutil.copy(web / "web-00000.tar", web / "web-00002.tar")
    (out / "web-00002.tar.tmp4242").write_bytes(b"half a shard")  # what a run killed mid-write leaves
    try:
        s = run_capfilt(_capfilt(inp, out), captioner=cap, filter_model=flt)
        assert not list(out.glob("*.tmp*"))  # removed on the next start
        assert s["shards"] == 1 and s["skipped_done"] == 2 and s["missing"] == []
        assert collect(out, expand_input(inp))["missing_shards"] == []
        # other settings into the same output: refused naming the difference, or redone with overwrite
        with pytest.raises(RunMismatchError, match=r"threshold: capfilt.json has 0.5, this run has 0.7"):
            run_capfilt(_capfilt(inp, out, threshold=0.7), captioner=cap, filter_model=flt)
        s = run_capfilt(_capfilt(inp, out, threshold=0.7), captioner=cap, filter_model=flt, overwrite=True)
        assert s["shards"] == 3 and s["skipped_done"] == 0
        fp = json.loads((out / "capfilt.json").read_text())["fingerprint"]
        assert {json.loads(p.read_text())["fingerprint"] for p in out.glob("*.manifest.json")} == {fp}
    finally:
        (web / "web-00002.tar").unlink()


def test_capfilt_cli_refuses_inputs_that_match_nothing(models, tmp_path):
    _, _, cap_dir, flt_dir = models
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fastblip", "capfilt", f"captioner={cap_dir}", f"filter={flt_dir}",
                        f"input={tmp_path}/nothing-{{000..003}}.tar", f"output={out}", "device=cpu"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "none of the 4 input shards can be read" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()  # was: exit 0, four empty shards "done"


def _log_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "img_per_sec"} for r in recs]  # all but the timing


def test_demo_reruns_replace_their_own_output(tmp_path, monkeypatch):
    """``fastblip demo`` (and so ``make demo``) may be rerun into the same --out: every stage replaces its own
    output (fresh run ids, logs not appended to the first run's), and a second demo into a busy --out is refused.
    A micro budget (24 web images, one epoch per stage): ~12 s a run on 2 cores."""
    import fastblip.demo as demo

    monkeypatch.setitem(demo.BUDGETS, "tiny", demo.Budget(web=24, human=16, eval=16, pre_epochs=1, cap_epochs=1,
                                                          filt_epochs=1, batch=8))
    out = tmp_path / "demo"
    first = demo.run_demo(out, "tiny", progress=False)
    ids = {s: json.loads((out / s / "run.json").read_text())["run_id"] for s in ("pretrain_noisy", "pretrain_boot")}
    logs = {s: _log_records(out / s) for s in ids}
    second = demo.run_demo(out, "tiny", progress=False)  # was: the stages' logs appended, old checkpoints mixed in
    for s in ids:
        assert json.loads((out / s / "run.json").read_text())["run_id"] != ids[s]
        assert _log_records(out / s) == logs[s]  # same seed, same run: the same log, once
    assert second["filter"] == first["filter"] and second["data"] == first["data"]
    lock = acquire_lock(out, "demo")
    try:
        with pytest.raises(RunLockedError):
            demo.run_demo(out, "tiny", progress=False)
    finally:
        lock.release()


def test_vqa_eval_owns_its_results_directory(tmp_path, capsys):
    """`fastblip eval` of a task that writes into train.out_dir (VQA: the answers file) takes that directory's
    lock first, so a run using it is refused in one line before any model is loaded (init_from does not even
    exist here); the lock is released when the evaluation ends, however it ends."""
    from fastblip.cli import main

    d = tmp_path / "vqa_out"
    args = ["eval", "--recipe", str(ROOT / "recipes" / "finetune_vqa_tiny_cpu.yaml"),
            f"model.init_from={tmp_path / 'no_model'}", f"data.eval=[{tmp_path / 'val.json'}]",
            f"train.out_dir={d}", "task_options.synthetic={}"]
    held = acquire_lock(d, "finetune")
    try:
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by" in err[0] and "finetune" in err[0], err
    finally:
        held.release()
    assert main(args) == 1  # now the lock is free: it fails later, on the missing checkpoint, and lets go
    assert "no_model" in capsys.readouterr().err
    acquire_lock(d, "pretrain").release()  # released after the failed evaluation
