"""Shared benchmark plumbing: environment record, timing, result files, markdown tables, plots.

Every suite module (``kernels``, ``pretrain``, ``capfilt``, ``data``) exposes ``run(device, size) -> list[dict]``
and measures fastblip and its reference path in the same process. This module never invents a number: a row
holds what its suite measured, or an ``error`` field saying why it could not.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        env["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 5) -> dict:
    """Median/p20/p80 wall time in ms of ``fn`` (device-synchronised; warm-up excluded) and peak memory."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    out = {"ms_median": statistics.median(times), "ms_p20": q[0], "ms_p80": q[-1]}
    out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return out


def peak_tflops(device: str) -> float | None:
    """Dense bf16 peak of the GPU for MFU (datasheet figures; None when unknown)."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0)):
        if key in name:
            return tf
    return None


# columns that only a CUDA device measures: on CPU they hold None (or a suite's NaN), shown "n/a (CUDA only)"
CUDA_ONLY = ("peak_mem_mb",)


def clean_rows(rows: list[dict]) -> list[dict]:
    """Rows as written: a non-finite float (a suite's NaN for "not measured") becomes None, so the JSON is valid
    JSON (``json.dumps`` writes a bare ``NaN`` otherwise) and nothing reads as a measured ``nan``."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return [{k: clean(v) for k, v in r.items()} for r in rows]


def markdown_table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    cols = cols or sorted({k for r in rows for k in r if k != "suite"}, key=lambda c: (c != "impl", c))

    def fmt(v, col: str = "", row: dict | None = None):
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        if v is None and col in CUDA_ONLY and "error" not in (row or {}):
            return "n/a (CUDA only)"
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(r.get(c), c, r) for c in cols) + " |" for r in rows)


def write_results(suite: str, rows: list[dict], env: dict, size: str, out_dir: Path = RESULTS) -> Path:
    """JSON + markdown under benchmarks/results/, named by suite, size, device and date."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = clean_rows(rows)
    dev = env.get("gpu", env["device"]).replace(" ", "-")
    stem = f"{suite}_{size}_{dev}_{env['date'][:10]}"
    (out_dir / f"{stem}.json").write_text(json.dumps({"env": env, "size": size, "rows": rows}, indent=2,
                                                     allow_nan=False))
    md = f"# {suite} ({size})\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
    (out_dir / f"{stem}.md").write_text(md + markdown_table(rows) + "\n")
    return out_dir / f"{stem}.json"


def plot(rows: list[dict], path: Path, value: str = "images_per_sec") -> Path | None:
    """Bar chart of ``value`` per (suite, impl) row; returns the PNG path (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.get(value), (int, float))]
    if not rows:
        return None
    labels = [f"{r.get('suite')}:{r.get('impl')}:{r.get('size', r.get('image_size', ''))}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 4))
    ax.bar(range(len(rows)), [r[value] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(value)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
