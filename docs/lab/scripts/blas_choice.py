"""Which BLAS for which product: OpenBLAS vs BLIS, AR and tree steps, in one process.

Different BLAS libraries can't be compared fairly in separate processes on a host whose
speed drifts by ±20% between runs. This script compiles ``blas_switch.c`` (gcc), a
``cblas_sgemm`` that sends each product to one of two libraries by its row count, re-executes
itself with it preloaded, and interleaves per prompt (each prompt starts with the next
setting in turn) AR and SS greedy generations with three routings: every product to the
"large" library (default: OpenBLAS), every product to the "small" one (default: BLIS), and
1-row products (AR steps) to the small one, the rest to the large one. Prints decode tokens/s
per setting (prefill excluded, each generation stops at EOS) after each round, and checks
that all six settings gave the same tokens. Debian: ``apt-get install libopenblas0-pthread
libblis4-pthread``.

    python docs/lab/scripts/blas_choice.py [--model DIR] [--data CSV] [--num-samples 40] [--rounds 3] \\
        [--small LIB] [--large LIB]
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBDIR = "/usr/lib/x86_64-linux-gnu" if os.uname().machine == "x86_64" else "/usr/lib/aarch64-linux-gnu"
DEFAULT_SMALL = f"{LIBDIR}/blis-pthread/libblas.so.3"
DEFAULT_LARGE = f"{LIBDIR}/openblas-pthread/libopenblas.so.0"
_SHIM_ENV = "_BLAS_CHOICE_SHIM"
ROUTES = {"large": -1, "small": 1 << 30, "1-row small": 1}  # products with M <= this go to the small library


def build_shim(name: str = "blas_switch") -> str:
    """Compile this folder's ``{name}.c`` once per version of its source (a shared library in
    the temporary folder, named by the source's hash, written under a temporary name and
    renamed); its path."""
    source = HERE / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    out = os.path.join(tempfile.gettempdir(), f"lib{name}-{digest}.so")
    if os.path.exists(out):
        return out
    partial = f"{out}.{os.getpid()}.partial"
    cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", partial, str(source), "-ldl"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(f"{Path(sys.argv[0]).name} needs gcc to build {source.name} (apt-get install gcc).") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"building {source.name} failed:\n{e.stderr}") from None
    os.replace(partial, out)
    return out


def reexec_with_shim(name: str = "blas_switch") -> None:
    """Re-execute this script with the compiled ``{name}.c`` preloaded (and no other BLAS
    preload)."""
    shim = build_shim(name)
    env = dict(os.environ, LD_PRELOAD=shim, SPECSTREAM_NO_OPENBLAS="1", **{_SHIM_ENV: shim})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    from pipeline import generation_parser  # examples/perf/pipeline.py (on sys.path, see the end)

    ap = generation_parser(__doc__.split("\n\n")[0], num_samples=40, rounds=3)
    ap.add_argument("--small", default=DEFAULT_SMALL, help="library for small products (default: Debian's BLIS)")
    ap.add_argument("--large", default=DEFAULT_LARGE, help="library for the rest (default: Debian's OpenBLAS)")
    args = ap.parse_args()
    for lib in (args.small, args.large):
        if not os.path.exists(lib):
            ap.error(f"{lib} does not exist (Debian: apt-get install libopenblas0-pthread libblis4-pthread)")
    if os.environ.get(_SHIM_ENV) is None:
        reexec_with_shim()
    switch = ctypes.CDLL(None)
    if switch.blas_switch_load(args.small.encode(), args.large.encode()) != 0:
        raise SystemExit(f"could not load cblas_sgemm from {args.small} and {args.large}")
    switch.blas_switch_set_rows.argtypes = [ctypes.c_int]
    run_settings(args, switch)


def switched_runner(model, eos: set[int], max_tokens: int, settings: dict, switch):
    """``run(name, prompt)`` for settings ``{name: (value, speculate)}``: waits until no product
    is in flight (a pipelined step may outlive its generation), calls ``switch(value)`` (a
    process-wide setting such as the BLAS thread count), then runs ``pipeline.generation``."""
    import mlx.core as mx
    from pipeline import generation

    def run(name: str, prompt) -> tuple[list[int], float]:
        value, speculate = settings[name]
        mx.synchronize()
        switch(value)
        return generation(model, prompt, eos, max_tokens, speculate=speculate)

    return run


def library_label(path: str) -> str:
    """A short name for a BLAS file: Debian's folder ("openblas-pthread", "blis-pthread"),
    else the file's stem ("libmkl_rt" for ``.venv/lib/libmkl_rt.so.3``)."""
    p = Path(path)
    return p.parent.name if p.parent.name not in ("lib", "lib64", LIBDIR.rsplit("/", 1)[-1]) else p.name.split(".so")[0]


def run_settings(args, switch) -> None:
    from pipeline import encoded_prompts, interleaved_rounds

    from mlx_specstream import load

    names = {"large": library_label(args.large), "small": library_label(args.small)}
    settings = {}  # name: (rows limit, speculate)
    for mode, speculate in (("AR", False), ("SS", True)):
        for route, rows in ROUTES.items():
            label = names.get(route, f"1-row {names['small']}, rest {names['large']}")
            settings[f"{mode}, {label}"] = (rows, speculate)
    model, tokenizer = load(args.model)
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(model, tokenizer, args.data, args.num_samples)
    run = switched_runner(model, eos, args.max_tokens, settings, switch.blas_switch_set_rows)

    print("| round | " + " | ".join(settings) + " |\n|---|" + "---|" * len(settings))
    for r, tps, differ in interleaved_rounds(list(settings), prompts, run, args.rounds):
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " |", flush=True)
    print(f"prompts whose {len(settings)} outputs were not all the same: {differ} of {len(prompts) * args.rounds}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.append(str(Path(__file__).resolve().parents[3] / "examples" / "perf"))  # pipeline.py, step_cost.py
    main()
