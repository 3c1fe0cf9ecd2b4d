"""Where a decoding step's matrix-product time goes: BLAS time per product shape.

Compiles ``blas_trace.c`` (gcc), a ``cblas_sgemm`` that times each call and passes it on to a
BLAS library, re-executes itself with it preloaded, then runs each step kind in a steady loop
(the compiled step the generator runs, as ``profile_step.py`` does) and prints, per product
shape (rows M, output columns N, depth K), the calls per step, the microseconds per call and
per step, and the BLAS's share of the step. Debian: ``apt-get install libopenblas0-pthread``.

    python docs/lab/scripts/blas_trace.py [--model DIR] [--trees "ar;1,1,1"] [--steps 1000] [--library LIB]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRANS = {111: "N", 112: "T"}  # CBLAS_TRANSPOSE


def main() -> None:
    from blas_choice import DEFAULT_LARGE, _SHIM_ENV, reexec_with_shim

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled demo)")
    ap.add_argument("--trees", default="ar;1,1,1", help='";"-separated step kinds: "ar" or tree specs')
    ap.add_argument("--context", type=int, default=64, help="committed tokens before the step")
    ap.add_argument("--steps", type=int, default=1000, help="timed steps per kind")
    ap.add_argument("--library", default=DEFAULT_LARGE, help="the BLAS that does the products (default: Debian's OpenBLAS)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if not os.path.exists(args.library):
        ap.error(f"{args.library} does not exist (Debian: apt-get install libopenblas0-pthread)")
    if os.environ.get(_SHIM_ENV) is None:
        reexec_with_shim("blas_trace")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "23")  # as specstream sets it (read when the library loads)
    trace = ctypes.CDLL(None)
    if trace.blas_trace_load(args.library.encode()) != 0:
        raise SystemExit(f"could not load cblas_sgemm from {args.library}")

    from step_cost import step_runner

    from mlx_specstream import load

    model, _ = load(args.model)
    print(f"BLAS: {args.library}; context {args.context}; {args.steps} steps per kind")
    for tree in filter(None, args.trees.split(";")):
        step, _, _ = step_runner(model, tree, args.context)
        for _ in range(20):
            step()
        trace.blas_trace_reset()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        step_us = (time.perf_counter() - start) / args.steps * 1e6
        print_table(tree, read_table(trace), args.steps, step_us, trace.blas_trace_untraced())


def read_table(trace) -> list[tuple[tuple[int, ...], int, float]]:
    """``(M, N, K, trans_a, trans_b), calls, seconds`` per traced shape."""
    trace.blas_trace_get.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                     ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_double)]
    trace.blas_trace_untraced.restype = ctypes.c_long
    rows = []
    for i in range(trace.blas_trace_count()):
        dims, calls, seconds = (ctypes.c_int * 5)(), ctypes.c_long(), ctypes.c_double()
        trace.blas_trace_get(i, dims, ctypes.byref(calls), ctypes.byref(seconds))
        rows.append((tuple(dims), calls.value, seconds.value))
    return rows


def print_table(tree: str, rows, steps: int, step_us: float, untraced: int) -> None:
    total = sum(seconds for _, _, seconds in rows) / steps * 1e6
    print(f"\n### {tree}: {step_us / 1e3:.2f} ms per step, of which BLAS {total / 1e3:.2f} ms ({total / step_us:.0%})\n")
    print("| M | N | K | op | calls/step | µs/call | µs/step |\n|---|---|---|---|---|---|---|")
    for (m, n, k, ta, tb), calls, seconds in sorted(rows, key=lambda r: -r[2]):
        op = f"{TRANS.get(ta, ta)}{TRANS.get(tb, tb)}"
        print(f"| {m} | {n} | {k} | {op} | {calls / steps:.1f} | {seconds / calls * 1e6:.1f} | {seconds / steps * 1e6:.1f} |")
    if untraced:
        print(f"({untraced} calls of further shapes were not traced)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))  # pipeline.py, step_cost.py
    main()
