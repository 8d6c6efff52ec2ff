"""Static kernel report: every Triton launch the fused ops make at BLIP shapes, compiled for H100 (sm_90) and
A100 (sm_80) on a machine with no GPU, with what decides whether it runs well there.

How (../shared/PLATFORM_NOTES.md): the real launchers run on fake CUDA tensors (``FakeTensorMode``: shapes,
dtypes, strides, no memory) with ``JITFunction.run`` replaced by a recorder, so each launch's grid, arguments
and meta-parameters are exactly what the launcher would pass; the recorded call is then specialised as
Triton's JIT does (``create_function_from_signature`` + ``_pack_args``: constexprs, dtypes, divisible-by-16
hints from each tensor's byte offset) and compiled with ``triton.compile(ASTSource, target=GPUTarget)``.
``cuobjdump`` (shipped in the triton wheel) reads registers and stack from the cubin and counts tensor-core
(HGMMA = Hopper wgmma, HMMA = mma.sync) and local-memory (LDL/STL: spills) instructions in the SASS.

Per launch and target: registers, spill bytes (STACK + LOCAL), dynamic shared memory vs the per-block
opt-in limit (H100 232,448 B; A100 166,912 B), warps, stages, grid, HGMMA/HMMA/LDL counts, and the op's
roofline floor on an H100 (the bytes it must move at 3.35 TB/s vs the FLOPs it must do at the rate of the
operand precision it uses; the larger is the floor, for the op phase the launch belongs to).

Usage: ``python -m benchmarks kstat --size base`` (JSON + markdown under results/), or
``python -m benchmarks.kstat --size base --json out.json`` (what tests/test_kernels_static.py runs).
The analysis always runs in a child process without ``TRITON_INTERPRET`` (the interpreter replaces the JIT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# per-block dynamic shared memory limits (opt-in) and SM counts the launchers would read from the driver
TARGETS = {90: dict(name="sm_90 (H100 SXM)", smem=232_448, sms=132),
           80: dict(name="sm_80 (A100)", smem=166_912, sms=108)}
H100 = dict(hbm=3.35e12, bf16=989e12, tf32=495e12, tf32x3=165e12, fp32=67e12)  # bytes/s, FLOP/s


@dataclass
class Scenario:
    """One op phase at one shape: ``call`` runs the real launcher(s) on fake CUDA tensors."""

    name: str  # e.g. "itc fwd B=64 N=57664 fp32"
    call: Callable[[], object]
    bytes: float  # the fewest bytes the phase must move through HBM
    flops: float  # the FLOPs it must do
    rate: str  # key of H100: the unit that does those FLOPs (operand precision)
    wgmma: bool = False  # its dots must lower to Hopper wgmma on sm_90 (not only mma.sync)

    def floor_us(self) -> dict:
        t_mem, t_math = self.bytes / H100["hbm"] * 1e6, self.flops / H100[self.rate] * 1e6
        return {"floor_us": float(f"{max(t_mem, t_math):.4g}"), "bound": "memory" if t_mem >= t_math else "compute",
                "mbytes": round(self.bytes / 1e6, 1), "gflop": round(self.flops / 1e9, 3)}


@dataclass
class Launch:
    scenario: Scenario
    fn: object  # triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    count: int = 1  # identical launches (same kernel, grid and specialisation) in the scenario
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- shapes
SIZES = {  # BLIP shapes (BLIP_SPEC §1-2, PERFORMANCE.md); large = bigger batch and the 384 px image tokens
    "tiny": dict(B=8, Q=56, d=32, H=2, Lq=9, Lk=(21,), D=16, V=301, dm=32, world=2),
    "base": dict(B=64, Q=57600, d=256, H=12, Lq=35, Lk=(197, 577), D=64, V=30524, dm=768, world=8),
    "large": dict(B=128, Q=57600, d=256, H=12, Lq=35, Lk=(577,), D=64, V=30524, dm=768, world=8),
}


def _fake(*shape, dtype=None):
    import torch

    return torch.empty(tuple(shape), device="cuda", dtype=dtype or torch.float32)


def scenarios(size: str) -> list[Scenario]:
    """Every launch the pretraining and retrieval steps make, at ``size``. One function per op below: each
    calls its kernel module's launchers exactly as ``fastblip.ops`` would on CUDA."""
    s = SIZES[size]
    return _itc(s) + _sampler(s) + _xattn(s) + _lm_ce(s)


def _itc(s: dict) -> list[Scenario]:
    import torch

    from fastblip.kernels import itc_loss as K

    B, d = s["B"], s["d"]
    N = B + s["Q"]
    out = []
    for ids in (False, True):  # pretraining (diagonal positives) / retrieval (image ids)
        tag = f"B={B} N={N} d={d} fp32" + (" ids" if ids else "")

        def args(ids=ids):
            f = _fake
            idx = _fake(B, dtype=torch.int64) if ids else None
            idx_all = _fake(N, dtype=torch.int64) if ids else None
            return (f(B, d), f(B, d), f(N, d), f(N, d), _fake(), _fake(), idx, idx_all)

        # fwd: two directions, each reads the N x d fp32 keys once, writes them rounded to bf16 for the
        # backward and does two B x N x d products (bf16 operands); bwd: reads the bf16 copies once and does
        # three products (student and teacher logits again, dS @ K)
        out.append(Scenario(f"itc fwd {tag}", lambda args=args: K.itc_forward(*args()), 2 * N * d * (4 + 2),
                            2 * 2 * 2 * B * N * d, "bf16", wgmma=True))
        out.append(Scenario(f"itc bwd {tag}",
                            lambda args=args: K.itc_backward(_fake(), *args(), _fake(2, 3, B),
                                                             *(_fake(N, d, dtype=torch.bfloat16),) * 2),
                            2 * N * d * 2, 2 * 3 * 2 * B * N * d, "bf16", wgmma=True))
    return out


def _sampler(s: dict) -> list[Scenario]:
    import torch

    from fastblip.kernels import hard_negatives as K

    B = s["B"]
    out = []
    for C, ids in ((B, False), (B * s["world"], True)):  # pretraining: local batch; retrieval: all ranks
        def call(C=C, ids=ids):
            idx = _fake(B, dtype=torch.int64) if ids else None
            idx_all = _fake(C, dtype=torch.int64) if ids else None
            return K.sample_forward(_fake(B, C), _fake(B, C), idx, idx_all, 1e-4, _fake(1, dtype=torch.int64))

        out.append(Scenario(f"sampler B={B} C={C}" + (" ids" if ids else ""), call, 2 * B * C * 4 * 2,
                            0.0, "fp32"))
    return out


def _xattn(s: dict) -> list[Scenario]:
    import torch

    from fastblip.kernels import cross_attention as K

    B, H, Lq, D = s["B"], s["H"], s["Lq"], s["D"]
    N, M = 3 * B, B  # ITM rows: positive, negative image per text, negative text per image
    bf = torch.bfloat16
    p_train = 0.1  # BLIP's attention dropout (attention_probs_dropout_prob) while training
    plan = (N + 2 * M + 1,)
    out = []

    def nhld(X, L):  # (X, H, L, D) as the model passes it: a transposed view of the linear's (X, L, H*D)
        return _fake(X, L, H, D, dtype=bf).transpose(1, 2)

    tile_q = K._blocks(N, M, Lq, s["Lk"][0], D, True)["tile_q"]
    out.append(Scenario(f"xattn plan N={N} M={M} Lq={Lq}",
                        lambda: K.xattn_plan(_fake(N, dtype=torch.int64), M, Lq, tile_q), N * 8 + plan[0] * 4, 0.0,
                        "fp32"))
    for Lk in s["Lk"]:
        tag = f"N={N} M={M} H={H} Lq={Lq} Lk={Lk} D={D} bf16"
        q_bytes, kv_bytes = N * H * Lq * D * 2, M * H * Lk * D * 2
        flops = 2 * 2 * N * H * Lq * Lk * D  # QK^T and PV

        def fwd_args(Lk=Lk, p=p_train):
            return (nhld(N, Lq), nhld(M, Lk), nhld(M, Lk), _fake(*plan, dtype=torch.int32), None, p,
                    _fake(1, dtype=torch.int64) if p else None)

        for p in (p_train, 0.0):  # training; inference (ITM scoring, CapFilt's filter, generation)
            out.append(Scenario(f"xattn fwd {tag} p={p}", lambda a=fwd_args, p=p: K.xattn_forward(*a(p=p)),
                                2 * q_bytes + 2 * kv_bytes, flops, "bf16", wgmma=True))

        def bwd(a=fwd_args):
            q, k, v, plan_, mask, p, seed = a()
            return K.xattn_backward(nhld(N, Lq), q, k, v, plan_, mask, nhld(N, Lq), _fake(N, H, Lq), p, seed)

        # reads q, o, do, k, v; writes dq, dk, dv; recomputes QK^T, then dV, dP, dQ, dK. Neither floor counts
        # the dropout mask's Philox integer work (~25 instructions per (q, k) element per pass, see the kernel)
        out.append(Scenario(f"xattn bwd {tag} p={p_train}", bwd, 4 * q_bytes + 4 * kv_bytes, 2.5 * flops, "bf16",
                            wgmma=True))
    return out


def _lm_ce(s: dict) -> list[Scenario]:
    import torch

    from fastblip.kernels import lm_cross_entropy as K

    Nt, dm, V = s["B"] * s["Lq"], s["dm"], s["V"]
    bf = torch.bfloat16

    def call():  # the training forward ("mean"): hidden in the autocast dtype, fp32 weight and bias
        return K.lm_ce_forward(_fake(Nt, dm, dtype=bf), _fake(V, dm), _fake(V), _fake(Nt, dtype=torch.int64),
                               0.1, -100, _fake(Nt))

    # logits, d hidden, [d weight | d bias]: three Nt x V x dm products (+ 8 padding columns in the last);
    # bytes: the design's HBM traffic, the (Nt, V) bf16 logits/gradient buffer's five passes included
    return [Scenario(f"lm_ce fwd+bwd N={Nt} V={V} d={dm} bf16", call, K.floor_bytes(Nt, V, dm),
                     2 * Nt * V * dm * 2 + 2 * Nt * V * (dm + K._PAD), "bf16")]


# ----------------------------------------------------------------------------------------------- capture
class _Props:
    """What a launcher may read from ``torch.cuda.get_device_properties`` for the target being compiled."""

    def __init__(self, cap: int):
        self.multi_processor_count = TARGETS[cap]["sms"]
        self.major, self.minor = divmod(cap, 10)
        self.name = TARGETS[cap]["name"]


@contextlib.contextmanager
def _capturing(sink: list, cap: int) -> Iterator[None]:
    """Record every ``JITFunction.run`` instead of launching; answer device queries for the target."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import jit

    def record(self, *args, grid, warmup, **kwargs):
        sink.append((self, grid, args, kwargs))
        return None

    saved = jit.JITFunction.run, torch.cuda.get_device_properties, torch.cuda.get_device_capability
    jit.JITFunction.run = record
    torch.cuda.get_device_properties = lambda *a, **k: _Props(cap)
    torch.cuda.get_device_capability = lambda *a, **k: divmod(cap, 10)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        jit.JITFunction.run, torch.cuda.get_device_properties, torch.cuda.get_device_capability = saved


def capture(size: str, cap: int) -> list[Launch]:
    """Run every scenario's launchers for target ``cap`` (the SM count can change the grid)."""
    launches = []
    for sc in scenarios(size):
        sink: list = []
        with _capturing(sink, cap):
            sc.call()
        seen: dict = {}
        for fn, grid, args, kwargs in sink:
            if callable(grid):
                grid = grid(dict(zip([p.name for p in fn.params], args)) | kwargs)
            key = (fn.__name__, tuple(grid), _spec_key(args), tuple(sorted(kwargs.items())))
            if key in seen:  # e.g. the LM CE's row chunks: one compile, counted
                seen[key].count += 1
                continue
            seen[key] = Launch(sc, fn, tuple(grid), args, kwargs)
            launches.append(seen[key])
    return launches


def _spec_key(args: tuple) -> tuple:
    """What the JIT specialises on: tensors by dtype and 16-byte alignment, integers by value class."""
    import torch

    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((str(a.dtype), (a.storage_offset() * a.element_size()) % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(repr(a))
        else:
            out.append(("int", a == 1, a % 16 == 0))
    return tuple(out)


class _Ptr:
    """What the JIT's specialiser reads from a tensor: dtype and data_ptr (for the divisible-by-16 hint).
    A fresh allocation is 512-byte aligned; a view is off by its storage offset, as on the GPU."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = 1 << 20 | (t.storage_offset() * t.element_size())

    def data_ptr(self) -> int:
        return self._ptr


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(launch: Launch, cap: int) -> dict:
    """Specialise and compile one recorded launch for ``cap``; returns the report row's measurements."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    fn = launch.fn
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    t0 = time.perf_counter()
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    row = {"compile_s": round(time.perf_counter() - t0, 2)}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    res = {}
    for line in usage.splitlines():
        if "REG:" in line:
            res = dict(tok.split(":", 1) for tok in line.split() if ":" in tok and tok.split(":", 1)[1].isdigit())
    ops = [ln.split(";")[0] for ln in sass.splitlines() if "/*" in ln and ";" in ln]
    row.update(
        regs=int(res.get("REG", -1)),
        spill_bytes=int(res.get("STACK", 0)) + int(res.get("LOCAL", 0)),
        smem=int(k.metadata.shared),
        smem_limit=TARGETS[cap]["smem"],
        warps=int(k.metadata.num_warps),
        stages=int(k.metadata.num_stages),
        has_dot="tt.dot" in k.asm["ttir"],
        hgmma=sum("HGMMA" in o for o in ops),
        hmma=sum("HMMA" in o for o in ops),
        ldl_stl=sum((" LDL" in o) or (" STL" in o) for o in ops),
        # a GPU-wide fence after atomics (acq_rel/seq_cst semantics) shows as MEMBAR.*.GPU/SYS in the SASS
        membar_gpu=sum(("MEMBAR" in o) and ("GPU" in o or "SYS" in o) for o in ops),
    )
    return row


def _describe(launch: Launch) -> dict:
    import torch

    meta = {k: v for k, v in launch.kwargs.items() if k.isupper()}
    return {"op": launch.scenario.name, "kernel": launch.fn.__name__, "launches": launch.count,
            "grid": "x".join(str(g) for g in launch.grid), "meta": " ".join(f"{k}={v}" for k, v in meta.items()),
            "programs": int(torch.tensor(launch.grid).prod()), **launch.scenario.floor_us(),
            "needs_wgmma": launch.scenario.wgmma}


def verdict(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty = healthy); the CI test asserts this is empty."""
    bad = []
    if row["smem"] > row["smem_limit"]:
        bad.append(f"shared memory {row['smem']} B > {row['smem_limit']} B limit")
    if row["spill_bytes"] or row["ldl_stl"]:
        bad.append(f"spills {row['spill_bytes']} B ({row['ldl_stl']} LDL/STL)")
    if row["has_dot"] and not (row["hgmma"] or row["hmma"]):
        bad.append("tl.dot without tensor-core instructions")
    if row["cap"] == 90 and row["needs_wgmma"] and not row["hgmma"]:
        bad.append("no wgmma (HGMMA) on sm_90")
    if row["membar_gpu"]:
        bad.append(f"{row['membar_gpu']} GPU-wide MEMBAR (acq_rel atomics?)")
    return bad


def analyse(size: str, caps: tuple[int, ...] = (90, 80), workers: int | None = None) -> list[dict]:
    """Capture and compile every launch at ``size`` for each target; one row per (launch, target)."""
    jobs = [(cap, launch) for cap in caps for launch in capture(size, cap)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        import multiprocessing as mp

        global _JOBS
        _JOBS = jobs
        with mp.get_context("fork").Pool(workers) as pool:  # children inherit the captured launches
            results = pool.map(_compile_job, range(len(jobs)), chunksize=1)
    else:
        results = [compile_launch(launch, cap) for cap, launch in jobs]
    rows = []
    for (cap, launch), res in zip(jobs, results):
        row = {"target": TARGETS[cap]["name"], "cap": cap, **_describe(launch), **res}
        row["problems"] = "; ".join(verdict(row)) or "ok"
        rows.append(row)
    return rows


_JOBS: list = []


def _compile_job(i: int) -> dict:
    cap, launch = _JOBS[i]
    try:
        return compile_launch(launch, cap)
    except Exception as e:  # reported per row; the test fails on it
        return {"error": f"{type(e).__name__}: {e}"}


COLUMNS = ["op", "kernel", "launches", "target", "grid", "meta", "warps", "stages", "regs", "spill_bytes", "smem",
           "smem_limit", "hgmma", "hmma", "membar_gpu", "floor_us", "bound", "problems"]


# ----------------------------------------------------------------------------------------------- entry points
def run(device: str = "cpu", size: str = "base", on_row=None) -> list[dict]:
    """Suite entry for ``python -m benchmarks kstat``: analysis in a clean child process (no interpreter)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kstat.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, "-m", "benchmarks.kstat", "--size", size, "--json", out], env=env,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            rows = json.load(f)
    return [{"suite": "kstat", **{c: r.get(c) for c in COLUMNS}, **({"error": r["error"]} if "error" in r else {})}
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kstat", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", choices=tuple(SIZES))
    p.add_argument("--target", type=int, action="append", choices=tuple(TARGETS), help="default: 90 and 80")
    p.add_argument("--json", help="write every row (all fields) to this file")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks.kstat: unset TRITON_INTERPRET (the interpreter replaces the JIT being analysed)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = analyse(args.size, tuple(args.target or TARGETS), args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    from benchmarks.common import markdown_table

    print(markdown_table(rows, COLUMNS))
    print(f"\n{len(rows)} compiled launches in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
