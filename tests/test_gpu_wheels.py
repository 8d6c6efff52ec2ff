"""benchmarks/gpu_wheels.sh: a wheel too large for one device call is split here and joined there only when every
part arrived intact (a half wheel must never reach pip on a 15-minute loan)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(whl: Path, *args: str) -> str:
    env = dict(os.environ, WHL_DIR=str(whl), PART_MB="1")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh"), *args], env=env, capture_output=True,
                       text=True, check=True)
    return r.stdout


def test_split_then_join_only_complete_intact_parts(tmp_path):
    src = tmp_path / "big-1.0-py3-none-any.whl"
    data = os.urandom(2 * (1 << 20) + 12345)
    src.write_bytes(data)
    whl = tmp_path / "whl"
    _run(whl, "split", str(src))
    parts = sorted(whl.glob("big-1.0-py3-none-any.whl.part-*"))
    assert [p.name[-2:] for p in parts] == ["aa", "ab", "ac"] and all(p.stat().st_size <= 1 << 20 for p in parts)
    out = whl / src.name
    # a part still missing (the next call brings it): nothing joined, said in one line
    held = parts[-1].read_bytes()
    parts[-1].unlink()
    assert "2 of 3 parts arrived, not installed" in _run(whl, "join") and not out.exists()
    # a damaged part: the sha256 of the manifest refuses it
    parts[-1].write_bytes(held[:-1] + bytes([held[-1] ^ 1]))
    assert "do not match the sha256" in _run(whl, "join") and not out.exists()
    parts[-1].write_bytes(held)
    assert "joined from 3 parts" in _run(whl, "join")
    assert out.read_bytes() == data
