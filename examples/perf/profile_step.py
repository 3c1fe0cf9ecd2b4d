"""Run one kind of decoding step in a loop, for a native profiler to attach to.

Builds the compiled step the generator runs (autoregressive, or a tree step with its stream
tokens, acceptance, drafting and cache commit) at a fixed context, then calls it for
``--seconds`` and prints the mean time per step. Python-level profilers mostly see the
import; attach a native one once the loop runs:

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
    python examples/perf/profile_step.py --model runs/stories260k/lossless_mlx --tree 1,1 --seconds 20 &
    sleep 12; perf record -F 4000 -g -p $! -o step.perf -- sleep 4
    perf report -i step.perf --no-children --sort sym

``--tree ar`` profiles the autoregressive step.
"""

from __future__ import annotations

import argparse
import time

from step_cost import step_runner  # this folder's step builder (the script's folder is on sys.path)

from mlx_specstream import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled demo)")
    ap.add_argument("--tree", default="ar", help='"ar" or a tree spec such as 1,1 (default: ar)')
    ap.add_argument("--context", type=int, default=64, help="committed tokens before the step")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    model, _ = load(args.model)
    step, _, _ = step_runner(model, args.tree, args.context)
    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        n += 1
    print(f"{args.tree}: {(time.perf_counter() - start) / n * 1e3:.3f} ms per step over {n} steps", flush=True)


if __name__ == "__main__":
    main()
