"""Issue 15, items 1 and 6: loading never executes code, and input cannot take the machine's memory.

- ``--resume`` read ``step-*.pt`` with a ``weights_only=False`` fallback: a checkpoint carrying a ``__reduce__``
  payload ran it (a real checkpoint with one injected object even resumed and exited 0). Now it is refused in
  one line and the payload never runs; ``fastblip migrate --i-trust-this-file`` is the one knowing way to
  convert a pre-weights_only training checkpoint.
- A 0.9 MB gzip shard holding three 300 MB captions took 2.7 GB of RAM in ``data check``; a JSON annotation
  with ``"image": "/dev/zero"`` read until MemoryError. Now members over the size limits are skipped unread
  (``too_large``) and only regular files are read.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastblip.cli import main
from fastblip.errors import CheckpointError
from fastblip.train import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
MARK = "FASTBLIP_TEST_PAYLOAD_RAN"


class Payload:
    """Unpickling this runs ``open(path, 'w')``: any code could run in its place."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_resume_never_unpickles_code(tmp_path):
    # a training checkpoint as the trainer writes it (weights_only-safe), then one injected object
    from fastblip.train.rundir import open_run

    run = open_run(tmp_path / "run", "pretrain", {"model": {}}, resume=False, overwrite=False)
    state = {"model": {"w": torch.ones(2)}, "optimizer": {}, "step": 1, "epoch": 0, "per_rank": [{}],
             "fingerprint": {}, "run_id": run.run_id}
    ck.save_checkpoint(tmp_path / "run", 1, state)
    marker = tmp_path / "payload_ran"
    ck.save_checkpoint(tmp_path / "run", 2, {**state, "step": 2, "extra": Payload(str(marker))})
    run.close()
    with pytest.raises(CheckpointError, match=r"step-00000002.pt: refused by torch.load\(weights_only=True\)"):
        ck.find_resume_checkpoint(tmp_path / "run")  # refused: never "skip to the older one" past a hostile file
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        ck.load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002.pt")
    assert not marker.exists()
    assert _unpickling_calls() == ["fastblip/train/checkpoint.py:migrate_checkpoint"]  # the one knowing verb


def _unpickling_calls() -> list[str]:
    """Every call passing ``weights_only=False`` (or pickle.load/loads) in the package, as file:function."""
    import ast

    found = []
    for p in sorted((ROOT / "fastblip").rglob("*.py")):
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                unsafe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False
                             for k in node.keywords)
                f = node.func
                unsafe |= isinstance(f, ast.Attribute) and f.attr in ("load", "loads") and \
                    isinstance(f.value, ast.Name) and f.value.id in ("pickle", "cPickle", "dill")
                if unsafe:
                    found.append(f"{p.relative_to(ROOT)}:{fn.name}")
    return sorted(set(found))


def test_migrate_converts_an_old_checkpoint_knowingly(tmp_path, capsys):
    old = tmp_path / "step-00000001.pt"  # as written before weights_only-safe checkpoints: numpy RNG keys inside
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    torch.save({"model": {"w": torch.ones(2)}, "per_rank": [{"rng": {"numpy": (name, keys, pos, has_gauss, gauss)}}]},
               old)
    with pytest.raises(CheckpointError, match="fastblip migrate"):
        ck.load_checkpoint(old)
    with pytest.raises(SystemExit):  # the flag that says "I trust this file" is required
        main(["migrate", str(old)])
    assert main(["migrate", str(old), str(tmp_path / "new.pt"), "--i-trust-this-file"]) == 0
    st = torch.load(tmp_path / "new.pt", weights_only=True)
    assert st["per_rank"][0]["rng"]["numpy"][1].equal(torch.from_numpy(keys.astype(np.int64)))
    ck.set_rng_state({**ck.rng_state(), "numpy": st["per_rank"][0]["rng"]["numpy"]})
    assert np.array_equal(np.random.get_state()[1], keys)


def test_oversized_members_are_skipped_unread(tmp_path):
    """Three 30 MB captions in a 90 KB gzip shard: counted as too_large, and the reader's peak Python memory stays
    far under one caption (tracemalloc sees every bytes object the reader holds)."""
    from fastblip.data.check import check_sources

    shard = tmp_path / "bomb-000.tar.gz"
    big = b"a" * (30 << 20)
    with tarfile.open(shard, "w:gz") as tf:
        for i in range(4):
            for ext, data in (("jpg", _jpeg(i)), ("txt", big if i < 3 else b"a fine caption")):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    del big
    assert shard.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        r = check_sources([str(shard)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r["ok"] == 1 and r["skipped"] == {"too_large": 3}, r
    assert peak < 8 << 20, peak  # was > 30 MB per caption held (2.7 GB for three 300 MB ones)
    # the limit is configurable: 100 bytes refuses the small caption too
    r = check_sources([str(shard)], max_text_bytes=10)
    assert r["ok"] == 0 and r["skipped"] == {"too_large": 4}


def _limit_memory():  # the old reader would fill RAM from /dev/zero: cap the child at 8 GB of address space
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def test_json_image_paths_are_regular_files_only(tmp_path):
    img = tmp_path / "ok.jpg"
    img.write_bytes(_jpeg())
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it for reading would block forever
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": str(img), "caption": "fine"}, {"image": "/dev/zero", "caption": "zeros"},
                               {"image": str(fifo), "caption": "a fifo"}, {"image": str(tmp_path), "caption": "dir"}]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fastblip", "data", "check", str(ann), "--json"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT, env=env, preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] == 1 and out["skipped"] == {"not_a_file": 3}, out
