"""How long OpenBLAS's idle threads spin: OpenBLAS's default vs ``OPENBLAS_THREAD_TIMEOUT``, in one process.

After each multi-threaded product OpenBLAS's worker threads spin (``sched_yield``) for
2^timeout CPU cycles before sleeping; the timeout is read once, when the library loads (default
28: ~0.1 s). To compare two timeouts in one process (this host's speed drifts by ±20% between
processes), this script loads two copies of the same OpenBLAS through ``blas_switch.c`` (built
as in ``blas_choice.py``): the library itself with OpenBLAS's default, and a private copy of its
file loaded with ``OPENBLAS_THREAD_TIMEOUT`` = ``--timeout``. Every product goes to one copy or
the other. AR and SS greedy generations under both are interleaved per prompt; before each, the
script waits ``--gap`` seconds so that the previous generation's spinning threads are asleep
(otherwise one setting's spinner runs into the next setting's generation). Prints decode
tokens/s per setting after each round and checks that all four settings gave the same tokens.

    python docs/lab/scripts/blas_timeout.py [--model DIR] [--data CSV] [--num-samples 40] [--rounds 2] \\
        [--timeout 23] [--gap 0.2] [--library LIB]
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlx_specstream.blas import TIMEOUT_ENV

HERE = Path(__file__).resolve().parent


def load_copies(switch, library: str, timeout: int, folder: str) -> None:
    """The "small" side: ``library`` with OpenBLAS's default timeout; the "large" side: a copy of
    its file in ``folder`` (a distinct file loads as a second, independent library) with
    ``timeout``."""
    copy = os.path.join(folder, "libopenblas-copy.so")
    shutil.copyfile(library, copy)
    for large, path, value in ((0, library, None), (1, copy, str(timeout))):
        if value is None:
            os.environ.pop(TIMEOUT_ENV, None)
        else:
            os.environ[TIMEOUT_ENV] = value
        if switch.blas_switch_load_one(large, path.encode()) != 0:
            raise SystemExit(f"could not load cblas_sgemm from {path}")
    os.environ.pop(TIMEOUT_ENV, None)


def main() -> None:
    from blas_choice import DEFAULT_LARGE, _SHIM_ENV, reexec_with_shim
    from pipeline import generation_parser

    ap = generation_parser(__doc__.split("\n\n")[0], num_samples=40, rounds=2)
    ap.add_argument("--timeout", type=int, default=23, help="OPENBLAS_THREAD_TIMEOUT of the second copy (4-30)")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds to wait before each generation")
    ap.add_argument("--library", default=DEFAULT_LARGE, help="the OpenBLAS (default: Debian's pthread build)")
    args = ap.parse_args()
    if not 4 <= args.timeout <= 30:
        ap.error("--timeout must be 4..30 (OpenBLAS ignores other values)")
    if not os.path.exists(args.library):
        ap.error(f"{args.library} does not exist (Debian: apt-get install libopenblas0-pthread)")
    if os.environ.get(TIMEOUT_ENV):
        ap.error(f"unset {TIMEOUT_ENV}: the script sets it for one copy only")
    if os.environ.get(_SHIM_ENV) is None:
        reexec_with_shim()
    switch = ctypes.CDLL(None)
    switch.blas_switch_set_rows.argtypes = [ctypes.c_int]
    with tempfile.TemporaryDirectory() as folder:
        load_copies(switch, args.library, args.timeout, folder)
        run_settings(args, switch)


def run_settings(args, switch) -> None:
    from blas_choice import switched_runner
    from pipeline import encoded_prompts, interleaved_rounds

    from mlx_specstream import load

    everything = 1 << 30  # products with M <= this take the "small" side: all of them
    settings = {}  # name: (rows limit, speculate)
    for mode, speculate in (("AR", False), ("SS", True)):
        settings[f"{mode}, default (28)"] = (everything, speculate)
        settings[f"{mode}, timeout {args.timeout}"] = (-1, speculate)
    model, tokenizer = load(args.model)
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(model, tokenizer, args.data, args.num_samples)

    def switch_after_gap(rows: int) -> None:
        time.sleep(args.gap)
        switch.blas_switch_set_rows(rows)

    run = switched_runner(model, eos, args.max_tokens, settings, switch_after_gap)
    t = f"timeout {args.timeout}"
    print("| round | " + " | ".join(settings) + f" | SS/AR default | SS/AR {t} |\n|---|" + "---|" * (len(settings) + 2))
    for r, tps, differ in interleaved_rounds(list(settings), prompts, run, args.rounds, warmup=3):
        ratios = [tps[f"SS, {s}"] / tps[f"AR, {s}"] for s in ("default (28)", t)]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)
    print(f"prompts whose {len(settings)} outputs were not all the same: {differ} of {len(prompts) * args.rounds}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))  # pipeline.py, step_cost.py
    main()
