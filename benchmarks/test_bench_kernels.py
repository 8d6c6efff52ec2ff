"""pytest-benchmark micro-benchmarks of the kernels at tiny CPU shapes (interpreter vs reference).
Not collected by ``pytest tests``; run explicitly: ``pytest benchmarks/test_bench_kernels.py``."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (no-op when a GPU runs it)

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.kernels import SIZES, _cases  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = list(_cases(DEVICE, SIZES["tiny"]))


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}[{c[1]}]" for c in CASES])
def test_bench(benchmark, case, impl):
    op, shape, tri, ref, _ = case
    fn = tri if impl == "triton" else ref
    fn()  # warm-up: compile / interpreter setup excluded
    benchmark.extra_info.update(op=op, shape=shape, impl=impl, device=DEVICE)
    benchmark(fn)
