"""``python -m benchmarks [kernels|attention|pretrain|capfilt|data|kstat|all] [--device cpu|cuda] [--size tiny|base|large]``.

From the repository root as above, or from any directory as ``python PATH/TO/fastblip/benchmarks ...``. On
``--device cpu`` (the default) the Triton rows run in Triton's interpreter (``TRITON_INTERPRET=1`` is set unless
the environment sets it: without it every Triton row fails, there being no GPU to compile for).

Runs each suite (fastblip and its reference path in the same process), prints a markdown table and writes
JSON + markdown under ``benchmarks/results/`` (``--plot`` adds a PNG). ``kstat`` is the static report
(every Triton launch compiled for sm_90 and sm_80 on this machine, no GPU needed); ``all`` runs the timed
suites only (``kstat`` compiles ~50 kernels: tests/test_kernels_static.py runs it in CI).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not __package__:  # `python path/to/benchmarks`: the repo root replaces benchmarks/ (whose data.py,
    # kernels.py, ... would shadow top-level modules of those names) at the head of sys.path
    if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
        sys.path.pop(0)
    sys.path.insert(0, str(_HERE.parent))

from benchmarks.common import clean_rows, environment, markdown_table, plot, write_results  # noqa: E402

SUITES = ("kernels", "attention", "pretrain", "capfilt", "data")  # what `all` runs: timed suites
STATIC = ("kstat",)


def interpret_on_cpu(device: str, environ=os.environ) -> bool:
    """On ``--device cpu`` set ``TRITON_INTERPRET=1`` (before any suite imports triton), unless the environment
    chose; returns whether it was set here."""
    if device != "cpu" or "TRITON_INTERPRET" in environ:
        return False
    environ["TRITON_INTERPRET"] = "1"
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", nargs="?", default="all", choices=SUITES + STATIC + ("all",))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", default="tiny", choices=("tiny", "base", "large"))
    p.add_argument("--plot", action="store_true", help="also write a PNG bar chart per suite")
    p.add_argument("--no-write", action="store_true", help="print only; write nothing under results/")
    p.add_argument("--out", default=None, help="write the results here instead of benchmarks/results/")
    args = p.parse_args(argv)
    if interpret_on_cpu(args.device) and "triton" in sys.modules:  # too late for this process: say so
        print("benchmarks: triton was imported before TRITON_INTERPRET=1 could be set; run with "
              "TRITON_INTERPRET=1 for the Triton rows on CPU", file=sys.stderr)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda requested but no CUDA device is available", file=sys.stderr)
            return 2
    env = environment(args.device)
    failed = 0
    out_kw = {"out_dir": Path(args.out)} if args.out else {}

    def partial(suite: str):
        """Every suite's ``run(..., on_row=)`` hands over its rows as they are measured: the results files
        are rewritten then, so a run stopped by a timeout (a short GPU loan) keeps every finished row."""
        if args.no_write:
            return None
        return lambda rows: write_results(suite, clean_rows([dict(r) for r in rows]), env, args.size, **out_kw)

    for suite in SUITES if args.suite == "all" else (args.suite,):
        try:
            rows = importlib.import_module(f"benchmarks.{suite}").run(device=args.device, size=args.size,
                                                                      on_row=partial(suite))
        except Exception as e:  # a suite that breaks is reported, and the others still run
            traceback.print_exc()
            rows, failed = [{"suite": suite, "error": f"{type(e).__name__}: {e}"}], failed + 1
        rows = clean_rows(rows)  # NaN "not measured" (peak_mem_mb on CPU) -> None: n/a in tables, null in JSON
        print(f"\n## {suite} ({args.size}, {env.get('gpu', args.device)}, torch {env['torch']}, "
              f"triton {env['triton']}, {env['date']})\n")
        print(markdown_table(rows))
        if not args.no_write:
            path = write_results(suite, rows, env, args.size, **out_kw)
            print(f"\nwrote {path}")
            if args.plot:
                plot(rows, path.with_suffix(".png"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
