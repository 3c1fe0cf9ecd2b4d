#!/usr/bin/env bash
# stories260K, lossless mode, end to end: import the real pretrained llama2.c model, make
# self-distillation data with it, train streams with the base frozen, convert, benchmark.
# Run from the repository root. Every step skips itself when its output already exists.
#
#   bash examples/stories260k/run_all.sh
#
# Environment: SPECSTREAM_SHARED (default ../shared), RUNS (default runs/stories260k),
# THREADS (torch threads, default 1: the machine is shared).
set -euo pipefail

SHARED=${SPECSTREAM_SHARED:-../shared}
RUNS=${RUNS:-runs/stories260k}
THREADS=${THREADS:-1}
MODEL_SRC=$SHARED/models/stories260K

# 1. llama2.c -> Hugging Face Llama directory.
[ -f "$RUNS/base/config.json" ] || python examples/stories260k/import_llama2c.py \
    --checkpoint "$MODEL_SRC/stories260K.bin" --tokenizer "$MODEL_SRC/tok512.model" --output "$RUNS/base"

# 1b. The known greedy text ("Once upon a time, there was a little girl named Lily.").
python -m pytest -q tests/test_examples_stories260k.py -k "known_story or mlx_lm_greedy"

# 2. Self-distillation data: 5000 story openings + the model's greedy continuations,
#    and 100 held-out openings for the benchmark.
[ -f "$RUNS/data/train.jsonl" ] || python examples/stories260k/make_distill_data.py \
    --model "$RUNS/base" --output "$RUNS/data" --num-train 5000 --num-heldout 100 \
    --max-new-tokens 256 --threads "$THREADS"

# 3. Streams in lossless mode: base frozen, main stream untouched (DESIGN.md rule 10).
#    5 layers: the top 2 are multi-stream layers; stream-only LoRA (rank 8) on all seven linears
#    of those layers (the default would adapt the attention projections only).
[ -f "$RUNS/lossless/config.json" ] || specstream train \
    --model "$RUNS/base" --data "$RUNS/data/train.jsonl" --format jsonl \
    --mode lossless --streams 4 --msa-layers 2 \
    --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --eval-examples 200 \
    --epochs 3 --lr 1e-3 --batch-size 16 --threads "$THREADS" --output "$RUNS/lossless"

# 4. PyTorch checkpoint -> MLX (float32: the fast path on MLX CPU).
[ -f "$RUNS/lossless_mlx/config.json" ] || specstream convert \
    --hf-path "$RUNS/lossless" --mlx-path "$RUNS/lossless_mlx" --dtype float32

# 5. Benchmark on the held-out openings: speculative output must be identical to plain
#    (specstream preloads a fast BLAS itself: MKL on Intel CPUs when installed, else OpenBLAS).
specstream bench --model "$RUNS/lossless_mlx" \
    --data "$RUNS/data/heldout_prompts.jsonl" --num-samples 100 --max-tokens 128 \
    --repeats 3 --json "$RUNS/bench.json"
