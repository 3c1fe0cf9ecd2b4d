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

from pipeline import encoded_prompts, generation, generation_parser, interleaved_rounds  # this folder's helpers

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

    def run(name: str, prompt: mx.array) -> tuple[list[int], float]:
        flag, speculate = SETTINGS[name]
        os.environ[ENV] = flag
        return generation(models[flag][0], prompt, eos, args.max_tokens, speculate=speculate)

    print("| round | " + " | ".join(SETTINGS) + " | SS/AR native | SS/AR power |\n|---|" + "---|" * (len(SETTINGS) + 2))
    for r, tps, differ in interleaved_rounds(list(SETTINGS), prompts, run, args.rounds):
        ratios = [tps[f"SS, {e}"] / tps[f"AR, {e}"] for e in ("native exp", "power")]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)
    # the two exps differ in the last bits, so greedy outputs may part where two tokens nearly tie
    print(f"prompts whose four outputs were not all the same: {differ} of {len(prompts) * args.rounds}")

if __name__ == "__main__":
    main()
