"""Fused q/k/v and gate/up projections vs separate ones, AR and tree steps, in real generations.

``load`` fuses each decoder layer's q/k/v projections into one matmul and gate/up into
another (``mlx_specstream.models.fused``). This script measures what that buys: the model is
loaded twice, with ``fuse=True`` and ``fuse=False``; greedy generations of the first N prompts, the four
settings interleaved per prompt (each prompt starts with the next setting in turn), decode
tokens/s per setting (prefill excluded, each generation stops at EOS) and the SS/AR ratio
with and without fusion. Outputs are checked to be the same tokens in all four settings.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python examples/perf/fused.py [--model DIR] [--data CSV] [--num-samples 60] [--rounds 3]
"""

from __future__ import annotations

import mlx.core as mx

# this folder's helpers (its folder is on sys.path)
from pipeline import encoded_prompts, generation, generation_parser, interleaved_rounds

from mlx_specstream import load

SETTINGS = {  # name: (fused, speculate)
    "AR, separate": (False, False),
    "AR, fused": (True, False),
    "SS, separate": (False, True),
    "SS, fused": (True, True),
}


def main() -> None:
    args = generation_parser(__doc__.split("\n\n")[0], num_samples=60, rounds=3).parse_args()
    models = {}
    for flag in (False, True):
        models[flag], tokenizer = load(args.model, fuse=flag)
    if not all(models[True].fusion_state):
        raise SystemExit("This model has no plain float q/k/v or gate/up linears to fuse.")
    eos = set(tokenizer.eos_token_ids)
    prompts = encoded_prompts(models[True], tokenizer, args.data, args.num_samples)

    def run(name: str, prompt: mx.array) -> tuple[list[int], float]:
        flag, speculate = SETTINGS[name]
        return generation(models[flag], prompt, eos, args.max_tokens, speculate=speculate)

    print("| round | " + " | ".join(SETTINGS) + " | SS/AR separate | SS/AR fused |\n|---|" + "---|" * (len(SETTINGS) + 2))
    for r, tps, differ in interleaved_rounds(list(SETTINGS), prompts, run, args.rounds):
        ratios = [tps[f"SS, {e}"] / tps[f"AR, {e}"] for e in ("separate", "fused")]
        print(f"| {r} | " + " | ".join(f"{v:.1f}" for v in tps.values()) + " | "
              + " | ".join(f"{x:.2f}x" for x in ratios) + " |", flush=True)
    print(f"prompts whose four outputs were not all the same: {differ} of {len(prompts) * args.rounds}")


if __name__ == "__main__":
    main()
