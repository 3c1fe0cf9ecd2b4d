"""OpenBLAS with 1 thread vs 2, AR and tree steps, in real generations.

A tree step's matmuls have ~16 rows, enough for OpenBLAS to split them over its threads; an
AR step's 1-row products take its single-threaded small-matrix kernel. This script measures
what the second thread buys each mode: one model, greedy generations of the first N prompts,
four settings (AR and SS, each with ``openblas_set_num_threads(1)`` and ``(2)``) interleaved
per prompt (each prompt starts with the next setting in turn), decode tokens/s per setting
(prefill excluded, each generation stops at EOS) and the SS/AR ratios. Outputs are checked to
be the same tokens in all four settings. Needs OpenBLAS preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python docs/lab/scripts/blas_threads.py [--model DIR] [--data CSV] [--num-samples 60] [--rounds 3]
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))  # pipeline.py, step_cost.py

from blas_choice import switched_runner  # noqa: E402 (this folder)
from pipeline import encoded_prompts, generation_parser, interleaved_rounds  # noqa: E402

from mlx_specstream import load
from mlx_specstream.blas import preload_command

SETTINGS = {  # name: (OpenBLAS threads, speculate)
    "AR, 1 thread": (1, False),
    "AR, 2 threads": (2, False),
    "SS, 1 thread": (1, True),
    "SS, 2 threads": (2, True),
}


def openblas_threads():
    """The process's ``(openblas_get_num_threads, openblas_set_num_threads)``; exits with a hint
    when OpenBLAS isn't loaded."""
    process = ctypes.CDLL(None)
    try:
        getter, setter = process.openblas_get_num_threads, process.openblas_set_num_threads
    except AttributeError:
        raise SystemExit(f"OpenBLAS is not loaded in this process: `{preload_command()}` first.") from None
    getter.restype = ctypes.c_int
    setter.argtypes = [ctypes.c_int]
    setter.restype = None
    return getter, setter


def main() -> None:
    args = generation_parser(__doc__.split("\n\n")[0], num_samples=60, rounds=3).parse_args()
    get_threads, set_threads = openblas_threads()
    initial = get_threads()
    model, tokenizer = load(args.model)
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(model, tokenizer, args.data, args.num_samples)
    run = switched_runner(model, eos, args.max_tokens, SETTINGS, set_threads)

    print("| round | " + " | ".join(SETTINGS) + " | SS/AR 1 thread | SS/AR 2 threads | best SS / best AR |\n|---|"
          + "---|" * (len(SETTINGS) + 3))
    for r, tps, differ in interleaved_rounds(list(SETTINGS), prompts, run, args.rounds):
        ratios = [tps[f"SS, {e}"] / tps[f"AR, {e}"] for e in ("1 thread", "2 threads")]
        best = max(tps["SS, 1 thread"], tps["SS, 2 threads"]) / max(tps["AR, 1 thread"], tps["AR, 2 threads"])
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + f" | {best:.2f}x |", flush=True)
    set_threads(initial)
    print(f"prompts whose four outputs were not all the same: {differ} of {len(prompts) * args.rounds}")


if __name__ == "__main__":
    main()
