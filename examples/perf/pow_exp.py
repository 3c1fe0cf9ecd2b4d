"""Exps through ``power`` vs MLX's native ``exp``, AR and tree steps, in real generations.

``mlx_specstream.models.fastmath`` computes the attention softmax and the gated activations'
exps as ``2 ** (x log2 e)`` on x86-64 CPUs, where MLX's own ``exp`` runs one element at a
time. This script measures what that buys: the model is loaded twice, one copy traced with
native exps (``SPECSTREAM_POW_EXP=0``) and one with ``power`` (``=1``; the choice is made when
a step is traced, so the variable is set before every generation of its copy). Greedy
generations of the first N prompts, the four settings interleaved per prompt (each prompt
starts with the next setting in turn), decode tokens/s
per setting (prefill excluded, each generation stops at EOS) and the SS/AR ratio per exp.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/perf/pow_exp.py [--model DIR] [--data CSV] [--num-samples 60] [--rounds 2]
"""

from __future__ import annotations

import os

import mlx.core as mx

from pipeline import decode, encoded_prompts, generation_parser  # this folder's helpers (its folder is on sys.path)

from mlx_specstream import load
from mlx_specstream.models.fastmath import ENV

SETTINGS = {  # name: (exp via power, speculate)
    "AR, native exp": ("0", False),
    "AR, power": ("1", False),
    "SS, native exp": ("0", True),
    "SS, power": ("1", True),
}


def main() -> None:
    args = generation_parser(__doc__.split("\n\n")[0], num_samples=60, rounds=2).parse_args()
    models = {flag: load(args.model) for flag in ("0", "1")}
    tokenizer = models["0"][1]
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(models["0"][0], tokenizer, args.data, args.num_samples)

    def run(name: str, prompt: mx.array) -> tuple[int, float]:
        flag, speculate = SETTINGS[name]
        os.environ[ENV] = flag
        return decode(models[flag][0], prompt, eos, args.max_tokens, speculate=speculate)

    for name in SETTINGS:  # trace every step kind and cache size first
        for p in prompts[:5]:
            run(name, p)
    totals = {name: [0, 0.0] for name in SETTINGS}
    print("| round | " + " | ".join(SETTINGS) + " | SS/AR native | SS/AR power |\n|---|" + "---|" * (len(SETTINGS) + 2))
    for r in range(1, args.rounds + 1):
        for i, p in enumerate(prompts):
            names = list(SETTINGS)
            for name in names[i % len(names):] + names[: i % len(names)]:  # each setting first in turn
                n, t = run(name, p)
                totals[name][0] += n
                totals[name][1] += t
        tps = {name: n / t for name, (n, t) in totals.items()}
        ratios = [tps[f"SS, {e}"] / tps[f"AR, {e}"] for e in ("native exp", "power")]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
