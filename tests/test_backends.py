"""One resolver for every implementation choice of a run (fastblip.backends): environment overrides apply over
``auto`` only, an explicit request that cannot be served is an error (never a silent substitute), and the
record a run prints and stores says what each choice resolved to."""

from __future__ import annotations

import pytest
import torch

import fastblip.backends as B
from fastblip.backends import BackendUnavailableError, resolve


def test_cpu_defaults_are_the_reference_paths():
    bk = resolve("cpu")
    assert bk.attention == "sdpa" and set(dict(bk.ops).values()) == {"reference"}
    assert (bk.compile, bk.amp, bk.optimizer, bk.padding) == ("off", "fp32", "adamw_foreach", "longest")
    line = bk.line()
    assert line.startswith("backends: device=cpu attention=sdpa itc_loss=reference") and "compile=off" in line
    assert bk.to_dict()["ops"]["lm_cross_entropy"] == "reference"


def test_cuda_auto_takes_the_measured_defaults_without_a_gpu():
    bk = resolve("cuda", compile="auto", padding="auto", max_length=30)  # resolution needs no device
    assert dict(bk.ops) == B.CUDA_DEFAULT
    assert (bk.compile, bk.amp, bk.optimizer) == ("step", "bf16", "adamw_fused") and bk.amp_dtype == torch.bfloat16
    assert bk.padding == "buckets:8,16,24,30"  # a bounded number of compiled graphs


def test_environment_overrides_apply_over_auto_only(monkeypatch):
    monkeypatch.setenv("FASTBLIP_OPS_BACKEND", "itc_loss=triton,lm_cross_entropy=reference")
    monkeypatch.setenv("FASTBLIP_COMPILE", "1")
    monkeypatch.setenv("FASTBLIP_AMP", "bf16")
    monkeypatch.setenv("FASTBLIP_ATTENTION", "reference")
    monkeypatch.setattr(B, "TRITON_INTERPRET", True)  # triton on CPU tensors is served by the interpreter
    bk = resolve("cpu", compile="auto", padding="auto")
    assert dict(bk.ops)["itc_loss"] == "triton" and dict(bk.ops)["sample_hard_negatives"] == "reference"
    assert (bk.compile, bk.amp, bk.attention) == ("step", "bf16", "reference")
    explicit = resolve("cpu", attention="sdpa", ops="reference", compile=False, amp="fp32")
    assert (explicit.attention, explicit.compile, explicit.amp) == ("sdpa", "off", "fp32")
    assert set(dict(explicit.ops).values()) == {"reference"}
    monkeypatch.setenv("FASTBLIP_OPS_BACKEND", "nope=triton")
    with pytest.raises(BackendUnavailableError, match="unknown op 'nope'"):
        resolve("cpu")


def test_requests_that_cannot_be_served_are_errors(monkeypatch):
    monkeypatch.setattr(B, "TRITON_INTERPRET", False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        resolve("cpu", ops={"itc_loss": "triton"})
    with pytest.raises(BackendUnavailableError, match="padding=longest"):
        resolve("cpu", compile=True, padding="longest")
    with pytest.raises(BackendUnavailableError, match="unknown attention backend"):
        resolve("cpu", attention="fast")
    with pytest.raises(BackendUnavailableError, match="is not auto, true or false"):
        resolve("cpu", compile="sometimes")
    import fastblip.data.dali as dali

    monkeypatch.setattr(dali, "HAS_DALI", False)
    with pytest.raises(BackendUnavailableError, match="DALI"):
        resolve("cpu", data="dali")
    assert issubclass(BackendUnavailableError, __import__("fastblip").FastblipError)


def test_fsdp2_compiles_per_block():
    assert resolve("cuda", compile=True, padding="auto", distributed="fsdp2").compile == "blocks"


def test_a_run_fails_on_its_backends_before_taking_its_out_dir(tmp_path, monkeypatch):
    """An unservable request is refused before the run writes anything (no lock, no run.json): fixing the
    recipe and running again needs no --overwrite."""
    from pathlib import Path

    import fastblip.data.dali as dali
    from fastblip.train.loop import Trainer
    from fastblip.train.recipe import read_recipe

    monkeypatch.setattr(dali, "HAS_DALI", False)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "pretrain_tiny_cpu.yaml"
    out = tmp_path / "run"
    r = read_recipe(recipe, ["data.synthetic={}", "data.train=[x.json]", f"train.out_dir={out}",
                             "data.backend=dali"])
    with pytest.raises(BackendUnavailableError, match="DALI"):
        Trainer(r, progress=False, device="cpu")
    assert not (out / "run.json").exists()
