"""What the stream-only LoRA of a lossless-mode model costs in one tree step.

Loads the model twice, strips the stream-only LoRA from the second copy (its linears become
the plain base layers), and times the AR step, the tree step and the tree step without the
LoRA, interleaved call by call; prints the medians.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python docs/lab/scripts/lora_share.py --model runs/stories260k/lossless_mlx [--tree 1,1] [--calls 400]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))
from step_cost import step_runner  # noqa: E402 (examples/perf/step_cost.py)

from mlx_specstream import load


def strip_stream_lora(model) -> int:
    """Replace every stream-only LoRA linear by its base layer; returns how many were replaced."""
    found = model.stream_lora_modules()
    for name, module in found.items():
        layer, path = name.split(".", 1)
        parent = model.base.layers[int(layer)]
        for part in path.split(".")[:-1]:
            parent = getattr(parent, part)
        setattr(parent, path.rsplit(".", 1)[-1], module.base)
    return len(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a lossless-mode model directory")
    ap.add_argument("--tree", default="1,1")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    with_lora, _ = load(args.model)
    without, _ = load(args.model)
    if not strip_stream_lora(without):
        raise SystemExit(f"{args.model} has no stream-only LoRA (not a lossless-mode model).")
    runs = {
        "AR": step_runner(with_lora, "ar", args.context)[0],
        f"{args.tree}": step_runner(with_lora, args.tree, args.context)[0],
        f"{args.tree} without LoRA": step_runner(without, args.tree, args.context)[0],
    }
    times = {name: [] for name in runs}
    for run in runs.values():
        for _ in range(5):
            run()
    for _ in range(args.calls):
        for name, run in runs.items():
            tic = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - tic)
    print(" | ".join(f"{name}: {statistics.median(t) * 1e3:.3f} ms" for name, t in times.items()))


if __name__ == "__main__":
    main()
