"""Decoding-step cost of tree steps vs a plain step, for model shapes of 0.5B-8B parameters (MLX).

For each model shape (random weights, ``SpecStreamConfig(num_streams=4, num_msa_layers=N // 2)``)
and each weight format (bfloat16, 4-bit), times one decoding step at a fixed context: the plain
(autoregressive, one token) step and tree steps of 2 to 53 nodes (root included), each node carrying its γ = 4
stream tokens through the multi-stream layers. The steps are the generator's own compiled
steps, built by ``examples/perf/step_cost.py`` (``prepared_step`` / ``step_runner`` /
``median_time``, imported by path). Prints one table (shape, dtype, tree, nodes, tokens in the
MSA layers, ms/step, ratio to the plain step) and writes it as JSON to ``--out`` (rewritten
after every row, so a killed run leaves what it measured).

``--time-budget SECONDS`` stops cleanly when the budget is spent (checked before every model
and every step; a hard stop fires at budget + ``--grace`` should one step run long), prints
what was measured and marks the rest as skipped: one call of a few minutes always returns a
table. ``--bench-e2e DATA`` then runs ``specstream bench`` on a copy of the bundled demo model
(E2E test data, ``--baselines mlx-lm,lookup``) in the time left (or ``--bench-budget``).

    # on the CUDA machine, MLX's CUDA wheels installed (examples/gpu/README.md):
    python3 examples/gpu/mlx_step_cost.py --device gpu --time-budget 300 --bench-budget 60 \\
        --out $OUT/step_cost.json --bench-e2e .gpu_data/e2e/testset_w_refs.csv.gz
    # dry run on a CPU (hidden 64, 4 layers), a few seconds:
    python examples/gpu/mlx_step_cost.py --tiny --device cpu --out /tmp/step_cost.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GAMMA = 4
CONTEXT = 512

# Hugging Face-style configs of public models' shapes (weights random). Head dims 64-128, GQA.
SHAPES = {
    # Qwen2-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, tied head, vocab 151,936 (494M)
    "0.5B": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True),
    # Qwen2-1.5B: 28 layers, hidden 1536, 12 heads / 2 KV heads, tied head (1.54B)
    "1.5B": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True),
    # Qwen3-4B: 36 layers, hidden 2560, 32 heads / 8 KV heads of 128, QK norms, tied head (4.02B)
    "4B": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
               tie_word_embeddings=True),
    # Llama-3.1-8B: 32 layers, hidden 4096, 32 heads / 8 KV heads, untied head, vocab 128,256 (8.03B)
    "8B": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False),
    # dry-run shape: hidden 64, 4 layers (head dim 16)
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=4, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False),
}


def _paths(ks: list[int]) -> list[list[int]]:
    """Every path of the Cartesian tree ``ks`` (top-k per depth), parents before children."""
    out, level = [], [[]]
    for k in ks:
        level = [p + [i] for p in level for i in range(k)]
        out += level
    return out


# A 32-node sparse tree (root + 31 drafts): the 2,2,2,2 Cartesian tree plus a third depth-1 guess.
TREE_32 = json.dumps(_paths([2, 2, 2, 2]) + [[2]], separators=(",", ":"))
# Nodes counted with the root (the token being verified): "1" = 2 nodes, "4,4,1,1" = 53.
TREES = ["1", "1,1", "1,1,1", "1,1,1,1", "2,1,1", "3,1,1,1", TREE_32, "4,2,2,1", "4,4,1,1"]
DTYPES = {"fp32": ("float32", None), "fp16": ("float16", None), "bf16": ("bfloat16", None),
          "8bit": ("bfloat16", 8), "4bit": ("bfloat16", 4)}


def load_step_cost():
    """``examples/perf/step_cost.py`` as a module (the project's step builder)."""
    path = REPO / "examples" / "perf" / "step_cost.py"
    spec = importlib.util.spec_from_file_location("specstream_perf_step_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree_label(tree: str) -> str:
    if tree == "ar":
        return "plain"
    if tree.startswith("["):
        return f"sparse({len(json.loads(tree))})"
    return tree


class Budget:
    """Wall-clock budget from construction; ``spent(reserve)`` when less than ``reserve`` is left."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def spent(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve


class HardStop(Exception):
    """Raised by the alarm when one measurement overruns the budget by more than --grace."""


def build(shape: str, dtype: str, seed: int = 0):
    """A random-weight SpecStreamModel of ``shape`` in ``dtype`` (a key of :data:`DTYPES`), built as
    the loader builds a checkpoint: the family's mlx-lm model, cast, quantized (mlx-lm's rule: every
    layer with ``to_quantized`` whose input width divides by 64), then wrapped with γ streams over
    N / 2 MSA layers and random (non-zero) stream extras. Lazy until the end: no float32 copy of
    an 8B model is ever materialised."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_specstream.config import SpecStreamConfig
    from mlx_specstream.loading import cast_model
    from mlx_specstream.models import build_model
    from mlx_specstream.streams import SpecStreamModel
    from mlx_specstream.testing import _extra_params

    config = SHAPES[shape]
    float_dtype, bits = DTYPES[dtype]
    mx.random.seed(seed)
    base = build_model(config)
    base.set_dtype(getattr(mx, float_dtype))
    if bits:
        nn.quantize(base, group_size=64, bits=bits,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    spec = SpecStreamConfig(num_streams=GAMMA, num_msa_layers=config["num_hidden_layers"] // 2)
    model = SpecStreamModel(base, spec)
    model.attach_stream_lora()
    model.load_weights([(n, mx.random.normal(v.shape) * 0.3) for n, v in _extra_params(model)], strict=False)
    cast_model(model, float_dtype)
    mx.eval(model.parameters())
    model.eval()
    return model


def float_parameters(model) -> int:
    """The base's parameter count, counting packed quantized weights as the floats they stand for."""
    from mlx.utils import tree_flatten

    import mlx.core as mx

    flat = dict(tree_flatten(model.base.parameters()))
    total = 0
    for name, v in flat.items():
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in flat \
                and flat[name.rsplit(".", 1)[0] + ".weight"].dtype == mx.uint32:
            continue  # quantization metadata
        if v.dtype == mx.uint32:  # packed: 32 / bits values per uint32; scales tell the group count
            scales = flat.get(name.rsplit(".", 1)[0] + ".scales")
            total += scales.size * 64 if scales is not None else v.size
        else:
            total += v.size
    return total


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_table(rows: list[dict]) -> str:
    lines = ["| shape | dtype | tree | nodes | MSA tokens | ms/step | x plain |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['label']} | {r['nodes']} | {r['msa_tokens']} | "
                     f"{r['ms']:.3f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def device_description(device: str) -> dict:
    import mlx.core as mx

    info = {"mlx": mx.__version__, "device": device, "python": platform.python_version(),
            "machine": platform.machine()}
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception:  # older MLX, or a back-end that does not report
        pass
    return info


def run_bench(args, budget: Budget) -> dict:
    """``specstream bench`` on a copy of the bundled demo model (or --bench-model), in a subprocess
    with the time left; its markdown table goes to stdout, its JSON into the result."""
    seconds = args.bench_budget or None
    if args.time_budget:
        seconds = min(seconds or budget.left(), budget.left())
        if seconds < 20:
            print(f"\nE2E bench skipped: {seconds:.0f} s left of the time budget.", flush=True)
            return {"skipped": f"{seconds:.0f} s left"}
    work = Path(tempfile.mkdtemp(prefix="specstream_bench_"))
    try:
        model = work / "model"
        shutil.copytree(args.bench_model, model)  # a copy: --tune would write the model's default tree
        out_json = work / "bench.json"
        argv = ["bench", "--model", str(model), "--data", args.bench_e2e, "--baselines", args.bench_baselines,
                "--repeats", str(args.bench_repeats), "--max-tokens", str(args.bench_max_tokens),
                "--json", str(out_json)]
        if args.bench_samples:
            argv += ["--num-samples", str(args.bench_samples)]
        argv += args.bench_extra.split()
        limit = f"{seconds:.0f} s at most" if seconds else "no time limit"
        print(f"\n## E2E bench ({limit}): specstream {' '.join(argv)}\n", flush=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--_specstream", *argv], env=env, timeout=seconds,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            print(out[-3000:], flush=True)
            print(f"E2E bench stopped at its {seconds:.0f} s limit.", flush=True)
            return {"argv": argv, "timed_out": True, "seconds": round(time.perf_counter() - t0, 1)}
        print(proc.stdout[-6000:], flush=True)
        result = {"argv": argv, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if out_json.is_file():
            result["results"] = json.loads(out_json.read_text())
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def specstream_cli(argv: list[str]) -> int:
    """Run the ``specstream`` CLI from this checkout, installed or not: the repository's ``cli/``
    and ``convert/`` folders are the package's ``mlx_specstream.cli`` / ``.convert`` (pyproject's
    package-dir), so they are added to the package's search path."""
    sys.path.insert(0, str(REPO))
    import mlx_specstream

    if str(REPO) not in mlx_specstream.__path__:
        mlx_specstream.__path__.append(str(REPO))
    from mlx_specstream.cli.main import main

    return main(argv)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="MLX device (default gpu)")
    ap.add_argument("--sizes", default="0.5B,1.5B,4B,8B",
                    help=f"comma list of {', '.join(SHAPES)} ('' : no step table, e.g. the bench alone)")
    ap.add_argument("--dtypes", default="bf16,4bit", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--trees", default=";".join(TREES), help="';'-separated tree specs (γ = 4: depth <= 4)")
    ap.add_argument("--context", type=int, default=CONTEXT, help="committed tokens before the timed step")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per step (median)")
    ap.add_argument("--time-budget", type=float, help="seconds: stop cleanly when spent")
    ap.add_argument("--grace", type=float, default=45.0, help="hard stop this long after the budget")
    ap.add_argument("--tiny", action="store_true", help="dry run: the 'tiny' shape only (hidden 64, 4 layers)")
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--bench-e2e", metavar="DATA", help="then run specstream bench on this E2E CSV")
    ap.add_argument("--bench-model", default=str(REPO / "mlx_specstream" / "demo"),
                    help="model directory to copy and bench (default: the bundled demo model)")
    ap.add_argument("--bench-baselines", default="mlx-lm,lookup")
    ap.add_argument("--bench-samples", type=int, default=40, help="first N prompts (0: all 630)")
    ap.add_argument("--bench-repeats", type=int, default=2)
    ap.add_argument("--bench-max-tokens", type=int, default=128)
    ap.add_argument("--bench-budget", type=float, help="seconds for the bench (default: what the budget leaves); "
                    "with --time-budget the step table stops this much earlier")
    ap.add_argument("--bench-extra", default="", help="more specstream bench flags, space-separated")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes = "tiny"
    for size in filter(None, args.sizes.split(",")):
        if size not in SHAPES:
            ap.error(f"unknown size {size!r}; choose from {', '.join(SHAPES)}")
    for dt in filter(None, args.dtypes.split(",")):
        if dt not in DTYPES:
            ap.error(f"unknown dtype {dt!r}; choose from {', '.join(DTYPES)}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_specstream"]:  # internal: the bench subprocess
        return specstream_cli(argv[1:])
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import mlx.core as mx

    if args.device == "gpu":
        if not mx.is_available(mx.gpu):
            print("error: MLX has no GPU here (install mlx[cuda13]: examples/gpu/README.md), or pass --device cpu",
                  file=sys.stderr)
            return 2
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    from mlx_specstream import compiled

    sc = load_step_cost()
    budget = Budget(args.time_budget)
    reserve = (args.bench_budget or 0.0) if args.bench_e2e and args.time_budget else 0.0
    sizes = [s for s in args.sizes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    trees = [t for t in args.trees.split(";") if t.strip()]
    result = {"meta": dict(device_description(args.device), context=args.context, gamma=GAMMA,
                           repeats=args.repeats, time_budget=args.time_budget, sizes=sizes, dtypes=dtypes,
                           trees=trees, argv=argv),
              "models": [], "rows": [], "skipped": [], "stopped": None}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out + ".tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, args.out)

    def alarm(signum, frame):
        raise HardStop()

    if args.time_budget:
        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.1, args.time_budget - reserve + args.grace))
    print(f"MLX {mx.__version__} on {mx.default_device()}; context {args.context}, γ = {GAMMA}, "
          f"N_s = N/2, median of {args.repeats}" + (f"; budget {args.time_budget:.0f} s" if args.time_budget else ""),
          flush=True)
    todo = [(s, d) for s in sizes for d in dtypes]
    finished: set = set()
    try:
        for k, (shape, dtype) in enumerate(todo):
            if budget.spent(reserve):
                result["stopped"] = f"time budget spent before {shape} {dtype}"
                result["skipped"] += [f"{s} {d}" for s, d in todo[k:]]
                break
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            model = build(shape, dtype)
            n_params = float_parameters(model)
            entry = {"shape": shape, "dtype": dtype, "model_type": SHAPES[shape]["model_type"],
                     "layers": model.num_layers, "msa_layers": model.num_layers - model.msa_start,
                     "parameters": n_params, "build_s": round(time.perf_counter() - t0, 2),
                     "weights_gb": round(mx.get_active_memory() / 1e9, 3)}
            result["models"].append(entry)
            print(f"\n{shape} {dtype}: {SHAPES[shape]['model_type']}, {human(n_params)} parameters, "
                  f"{entry['weights_gb']:.2f} GB, built in {entry['build_s']:.1f} s", flush=True)
            plain = None
            for tree in ["ar"] + trees:
                if budget.spent(reserve):
                    result["stopped"] = f"time budget spent during {shape} {dtype}"
                    result["skipped"].append(f"{shape} {dtype} {tree_label(tree)}...")
                    break
                if tree != "ar":
                    from mlx_specstream.tree import parse_tree_spec

                    if parse_tree_spec(tree).max_depth > GAMMA:
                        result["skipped"].append(f"{shape} {dtype} {tree_label(tree)} (deeper than γ)")
                        continue
                t1 = time.perf_counter()
                run, nodes, msa = sc.step_runner(model, tree, args.context, True)
                seconds = sc.median_time(run, args.repeats)
                plain = seconds if tree == "ar" else plain
                row = {"shape": shape, "dtype": dtype, "tree": tree, "label": tree_label(tree), "nodes": nodes,
                       "msa_tokens": msa, "ms": seconds * 1e3, "ratio": seconds / plain,
                       "setup_and_timing_s": round(time.perf_counter() - t1, 2)}
                result["rows"].append(row)
                print(f"  {row['label']:>12}  {nodes:3d} nodes  {msa:4d} MSA tokens  {row['ms']:9.3f} ms  "
                      f"x{row['ratio']:.2f}", flush=True)
                del run
                save()
            entry["peak_gb"] = round(mx.get_peak_memory() / 1e9, 3)
            if not result["stopped"]:
                finished.add((shape, dtype))
            del model
            compiled.clear()  # the compiled steps hold their model: release it before the next
            save()
            if result["stopped"]:
                k_next = todo.index((shape, dtype)) + 1
                result["skipped"] += [f"{s} {d}" for s, d in todo[k_next:]]
                break
    except HardStop:
        result["stopped"] = f"hard stop at {budget.elapsed():.1f} s (budget {args.time_budget:g} s + grace)"
        done = {(r["shape"], r["dtype"]) for r in result["rows"]}
        result["skipped"] += [f"{s} {d}" + (" (partly)" if (s, d) in done else "") for s, d in todo
                              if (s, d) not in finished]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    result["meta"]["step_seconds"] = round(budget.elapsed(), 1)
    if sizes:
        print(f"\n## Decoding step cost: context {args.context}, γ = {GAMMA}, N_s = N/2, MLX {mx.__version__} "
              f"on {args.device}\n", flush=True)
        print(format_table(result["rows"]), flush=True)
    if result["stopped"]:
        print(f"\nStopped: {result['stopped']}; not measured: {', '.join(result['skipped']) or 'none'}", flush=True)
    save()
    if args.bench_e2e:
        result["bench"] = run_bench(args, budget)
        save()
    if args.out:
        print(f"\nJSON: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
