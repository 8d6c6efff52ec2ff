"""Every Triton launch of the fused ops at BLIP base shapes, compiled for H100 (sm_90) and A100 (sm_80) on this
CPU machine (benchmarks/kstat.py): each compiles, fits the per-block shared memory, spills nothing, puts its
``tl.dot`` on tensor cores (Hopper wgmma for the ITC and cross-attention kernels) and issues no GPU-wide fence.
The interpreter tests check the numbers; this one checks that the GPU can run them well. Large shapes are in
``python -m benchmarks kstat --size large`` only (CI budget: the base set compiles cold in ~1 min on 2 cores).
The same base set is compiled again under triton 3.6, the version on the GPU machine users run (``make install``
puts it in ``.venv-triton36``, a venv over this interpreter's packages): a kernel healthy under one Triton can
spill under another (the cross-attention dK/dV kernel did, on sm_80).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


TRITON36 = ROOT / ".venv-triton36" / "bin" / "python"


def _kstat(python: str, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the JIT, not the interpreter
    proc = subprocess.run([python, "-m", "benchmarks.kstat", "--size", "base", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return _kstat(sys.executable, tmp_path_factory.mktemp("kstat") / "base.json")


def test_every_op_is_covered(rows):
    kernels = {r["kernel"] for r in rows}
    assert {"_itc_fwd_kernel", "_itc_bwd_kernel", "_sample_kernel"} <= kernels
    assert any("xattn" in k for k in kernels) and any("ce" in k for k in kernels), kernels
    assert {r["cap"] for r in rows} == {80, 90}
    for op in ("itc fwd", "itc bwd", "sampler", "xattn fwd", "xattn bwd", "lm_ce"):
        assert sum(r["op"].startswith(op) for r in rows) >= 2, op  # both targets


def test_every_launch_is_healthy(rows):
    bad = [f"{r['target']} {r['op']} {r['kernel']}: {r.get('error') or r['problems']}" for r in rows
           if "error" in r or r["problems"] != "ok"]
    assert not bad, "\n".join(bad)


def test_roofline_is_reported(rows):
    for r in rows:
        assert r["floor_us"] > 0 and r["bound"] in ("memory", "compute"), r["op"]


@pytest.mark.skipif(not TRITON36.exists(), reason="no .venv-triton36 (make install creates it when the triton 3.6 "
                                                  "wheel is installable)")
def test_every_launch_is_healthy_under_the_gpu_machines_triton(tmp_path):
    version = subprocess.run([str(TRITON36), "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version.startswith("3.6"), version
    rows36 = _kstat(str(TRITON36), tmp_path / "base36.json")
    assert {r["cap"] for r in rows36} == {80, 90} and len(rows36) >= 20
    bad = [f"{r['target']} {r['op']} {r['kernel']}: {r.get('error') or r['problems']}" for r in rows36
           if "error" in r or r["problems"] != "ok"]
    assert not bad, "\n".join(bad)
