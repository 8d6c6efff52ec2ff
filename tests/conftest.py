"""Test-wide setup.

Triton kernels run on CPU through Triton's interpreter; ``TRITON_INTERPRET`` must be set before
``triton`` is imported, so it is set here, before anything imports torch/triton. On a machine with an
NVIDIA driver the real kernels run instead. ``gpu``-marked tests are skipped with a reason on CPU.
"""

import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``fastblip demo --budget tiny`` once per session (~3 min on 2 cores): its report and its trained tiny
    models (``pretrain_noisy/model``, ``captioner/model``, ``filter/model``, ``pretrain_boot/model``, fastblip
    dirs at 64 px / patch 16) serve the demo, CapFilt and downstream-task tests."""
    from fastblip.demo import run_demo

    out = tmp_path_factory.mktemp("tiny_demo")
    return out, run_demo(out, "tiny", seed=0, progress=False)
