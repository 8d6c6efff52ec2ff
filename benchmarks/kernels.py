"""Kernel micro-benchmarks: each fused op (triton) vs its reference vs torch.compile(reference).

Rows: {"suite", "op", "impl", "shape", "ms_median", "ms_p20", "ms_p80", "peak_mem_mb",
"speedup_vs_reference", "speedup_vs_compiled"} (+ "error" when an impl failed, e.g. compile on CPU).
Timing covers forward + backward (what a training step pays) except sampling (forward only).
GPU: triton.testing.do_bench (CUDA events, warm-up excluded, L2 flushed); CPU: time.perf_counter after one
warm-up call. peak_mem_mb = peak allocated minus what was allocated before the call (CUDA only; NaN on CPU).
Usage: python -m benchmarks.kernels --device cuda --size base
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from fastblip.ops import (
    cross_attention,
    cross_attention_reference,
    itc_loss,
    itc_loss_reference,
    lm_cross_entropy,
    lm_cross_entropy_reference,
    sample_hard_negatives,
    sample_hard_negatives_reference,
)

SIZES = {  # BLIP shapes (BLIP_SPEC §1-2): ITC B x (B + 57,600) x 256; 12 heads x 64; V 30,524, d 768
    "tiny": dict(B=8, Q=56, d=32, H=2, Lq=9, Lk=(21,), D=16, V=301, dm=32),
    "base": dict(B=64, Q=57600, d=256, H=12, Lq=35, Lk=(197, 577), D=64, V=30524, dm=768),
    "large": dict(B=128, Q=57600, d=256, H=12, Lq=35, Lk=(197, 577), D=64, V=30524, dm=768),
}


def _cases(device: str, s: dict):
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    B, Q, d = s["B"], s["Q"], s["d"]
    f = lambda n: F.normalize(torch.randn(n, d, device=device), dim=1)  # noqa: E731
    itc_in = (f(B), f(B), f(B + Q), f(B + Q))
    temp = torch.tensor(0.07, device=device)

    def itc(fn, **kw):
        def call():
            img, txt = (t.detach().requires_grad_() for t in itc_in[:2])
            t = temp.detach().requires_grad_()
            fn(img, txt, *itc_in[2:], t, 0.4, **kw)[0].backward()
        return call

    yield "itc_loss", f"B={B} N={B + Q} d={d} fp32", itc(itc_loss, backend="triton"), itc(itc_loss_reference), \
        lambda: itc(torch.compile(itc_loss_reference))

    sim = torch.randn(B, B, device=device) * 5

    def samp(fn, **kw):
        return lambda: fn(sim, sim, eps=1e-4, **kw)

    yield "sample_hard_negatives", f"B={B} C={B}", samp(sample_hard_negatives, backend="triton"), \
        samp(sample_hard_negatives_reference), lambda: samp(torch.compile(sample_hard_negatives_reference))

    N, M, H, Lq, D = 3 * B, B, s["H"], s["Lq"], s["D"]
    kvi = torch.cat([torch.arange(M), torch.randint(0, M, (N - M,))]).to(device)
    for Lk in s["Lk"]:
        # the model's layout: q/k/v are (X, L, H, D) projections viewed as (X, H, L, D) (med.py ``_split``)
        q = torch.randn(N, Lq, H, D, device=device, dtype=dt).transpose(1, 2)
        k, v = (torch.randn(M, Lk, H, D, device=device, dtype=dt).transpose(1, 2) for _ in range(2))
        for p in (0.0, 0.1):  # BLIP trains with attention dropout 0.1

            def xa(fn, q=q, k=k, v=v, p=p, **kw):
                def call():
                    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                    fn(qq, kk, vv, kvi, dropout_p=p, **kw).float().sum().backward()
                return call

            yield "cross_attention", f"N={N} M={M} H={H} Lq={Lq} Lk={Lk} D={D} p={p} {str(dt)[6:]}", \
                xa(cross_attention, backend="triton"), xa(cross_attention_reference), \
                lambda xa=xa: xa(torch.compile(cross_attention_reference))

    Ntok, dm, V = B * s["Lq"], s["dm"], s["V"]
    h = torch.randn(Ntok, dm, device=device, dtype=dt)
    w = torch.randn(V, dm, device=device, dtype=dt) * 0.02
    b = torch.zeros(V, device=device, dtype=dt)
    y = torch.randint(0, V, (Ntok,), device=device)

    def ce(fn, **kw):
        def call():
            hh, ww, bb = (t.detach().requires_grad_() for t in (h, w, b))
            fn(hh, ww, bb, y, 0.1, **kw).backward()
        return call

    yield "lm_cross_entropy", f"N={Ntok} d={dm} V={V} {str(dt)[6:]}", ce(lm_cross_entropy, backend="triton"), \
        ce(lm_cross_entropy_reference), lambda: ce(torch.compile(lm_cross_entropy_reference))


def _time(fn, device: str, reps: int) -> tuple[float, float, float, float]:
    if device == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        p20, med, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
        return med, p20, p80, peak
    fn()  # warm-up (first interpreter/compile call excluded)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
    return statistics.median(ts), qs[1], qs[7], float("nan")


def run(device: str = "cpu", size: str = "tiny", on_row=None) -> list[dict]:
    """Time every op at ``size`` on ``device``; returns one row per (op, shape, impl)."""
    if size not in SIZES:
        raise ValueError(f"size {size!r} not in {sorted(SIZES)}")
    torch.manual_seed(0)
    rows: list[dict] = []
    reps = 5 if device == "cpu" else 0
    tri_name = "triton" if device == "cuda" else "triton-interpret"
    for op, shape, tri, ref, make_compiled in _cases(device, SIZES[size]):
        res = {}
        for impl, get in ((tri_name, lambda tri=tri: tri), ("reference", lambda ref=ref: ref),
                          ("compiled-reference", make_compiled)):
            row = {"suite": "kernels", "op": op, "impl": impl, "shape": shape}
            try:
                med, p20, p80, mem = _time(get(), device, reps)
                row.update(ms_median=med, ms_p20=p20, ms_p80=p80, peak_mem_mb=mem)
            except Exception as e:  # noqa: BLE001 - a failed impl is recorded in the table, not fatal
                row.update(ms_median=float("nan"), ms_p20=float("nan"), ms_p80=float("nan"),
                           peak_mem_mb=float("nan"), error=f"{type(e).__name__}: {str(e)[:300]}")
            res[impl] = row
            rows.append(row)
        for row in res.values():
            m = row["ms_median"]
            row["speedup_vs_reference"] = res["reference"]["ms_median"] / m if m == m and m > 0 else float("nan")
            cm = res["compiled-reference"]["ms_median"]
            row["speedup_vs_compiled"] = cm / m if m == m and m > 0 and not math.isnan(cm) else float("nan")
        if on_row:  # after each op: a timeout keeps the ops already timed
            on_row(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--out", default=None, help="write rows as JSON here")
    a = ap.parse_args()
    rows = run(a.device, a.size)
    meta = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
            "torch": torch.__version__, "triton": __import__("triton").__version__}
    for r in rows:
        print(f"{r['op']:<22} {r['impl']:<19} {r['shape']:<44} {r['ms_median']:9.3f} ms  "
              f"mem {r['peak_mem_mb']:9.1f} MB  x{r['speedup_vs_reference']:.2f} ref  "
              f"x{r['speedup_vs_compiled']:.2f} compiled {r.get('error', '')[:80]}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
