"""A plain wheel of the repo installs ``kernels/`` as the import package ``fastblip.kernels`` (setup.py
package_dir), not only the editable install: build it with ``pip wheel --no-deps``, install it into an empty
``--target`` and import from there in a fresh interpreter that cannot see the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~15-40 s: a setuptools build in an isolated env; still run in CI
def test_wheel_installs_fastblip_kernels(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # --no-build-isolation: the build uses the installed setuptools/wheel (no network at test time)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, env=env, cwd=tmp_path, timeout=300)
    (whl,) = wheels.glob("fastblip-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True, env=env, timeout=300)
    assert (target / "fastblip" / "kernels" / "__init__.py").is_file()
    assert (target / "fastblip" / "data" / "assets" / "vocab.txt").is_file()  # package data shipped
    code = ("import fastblip, fastblip.kernels as k, pathlib; "
            "print(pathlib.Path(fastblip.__file__).parent); print(pathlib.Path(k.__file__).parent)")
    # -I: isolated mode (no cwd / PYTHONPATH / user site), then only the target dir and the system packages
    p = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    pkg, kern = p.stdout.split()
    assert Path(pkg) == target / "fastblip" and Path(kern) == target / "fastblip" / "kernels"
