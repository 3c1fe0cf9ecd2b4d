"""Count the primitives of the compiled decoding steps, by kind.

Builds the step the generator runs (autoregressive, or a tree step with its stream tokens,
acceptance, drafting and cache commit) at a fixed context, calls the compiled function once
and reads the graph of its outputs (``mx.export_to_dot``): after compilation, elementwise
runs are fused into ``Compiled*`` primitives and everything else (matmuls, reshapes,
transposes, reductions, gathers) stays one primitive each. On a small model every primitive
costs a few microseconds of dispatch whatever its size.

    python docs/lab/scripts/graph_ops.py [--model DIR] [--trees "ar;1,1,1"] [--context 64]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))
from step_cost import step_outputs  # noqa: E402 (examples/perf/step_cost.py)

from mlx_specstream import load

_NODE = re.compile(r'\{ \d+ \[label ="([A-Za-z0-9_]+)"?, shape=rectangle\]; \}')


def primitive_counts(outputs) -> collections.Counter:
    """Primitives (one per node of the graph, multi-output ones once) by name; every fused
    elementwise kernel counts as ``Compiled``."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *outputs)
        with open(path) as f:
            names = _NODE.findall(f.read())
    finally:
        os.remove(path)
    return collections.Counter("Compiled" if n.startswith("Compiled") else n for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled demo)")
    ap.add_argument("--trees", default="ar;1,1,1", help='";"-separated: "ar" or tree specs')
    ap.add_argument("--context", type=int, default=64)
    args = ap.parse_args()
    model, _ = load(args.model)
    for tree in args.trees.split(";"):
        counts = primitive_counts(step_outputs(model, tree, args.context))
        top = ", ".join(f"{name} {n}" for name, n in counts.most_common(12))
        print(f"{tree}: {sum(counts.values())} primitives ({top}, ...)")


if __name__ == "__main__":
    main()
