#!/usr/bin/env bash
# DialogSum, end to end: tokenizer -> from-scratch base -> Speculative Streaming fine-tune
# (shared mode, the paper's settings) + the plain fine-tune baseline -> MLX -> bench.
# Run from the repository root. Every step skips itself when its output already exists;
# an interrupted base pretraining resumes from its newest checkpoint when rerun.
# The tokenizer and pretraining scripts are the E2E recipe's, with --format dialogsum.
#
#   bash examples/dialogsum/run_all.sh
#
# Environment: SPECSTREAM_SHARED (default ../shared), RUNS (default runs),
# THREADS (torch threads, default 1: the machine is shared).
# Smoke test of the commands (not a benchmark): FT_EXTRA="--max-steps 3" and
# BENCH_EXTRA="--num-samples 2 --max-tokens 16" are appended to every train / bench command.
set -euo pipefail

SHARED=${SPECSTREAM_SHARED:-../shared}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-1}
FT_EXTRA=${FT_EXTRA:-}
BENCH_EXTRA=${BENCH_EXTRA:-}
DS=$SHARED/data/dialogsum

# 1. SentencePiece BPE tokenizer, vocab 4096, pieces may cross script/digit boundaries (one piece
#    per speaker tag), on the train split's prompts and summaries.
[ -f "$RUNS/dialogsum_tokenizer/tokenizer.json" ] || python examples/e2e/train_tokenizer.py \
    --format dialogsum --train-data "$DS/train.jsonl.gz" --output "$RUNS/dialogsum_tokenizer"

# 2. Base model from scratch: Llama, hidden 256, 8 layers, 4 heads / 2 KV heads, intermediate
#    768, 1536 positions, 7.34M parameters (29.4 MB float32), 2 epochs = 1,558 steps of 16
#    dialogues (~1.1 h on one quiet core; ~1.4 h measured on the loaded machine).
[ -f "$RUNS/dialogsum_base/model.safetensors" ] || python examples/e2e/pretrain_base.py \
    --format dialogsum --tokenizer "$RUNS/dialogsum_tokenizer" --output "$RUNS/dialogsum_base" \
    --train-data "$DS/train.jsonl.gz" --dev-data "$DS/dev.jsonl.gz" --epochs 2 --threads "$THREADS"

# 3. Fine-tunes on the train split (loss on the summary only; the model directory records the
#    prompt template). Paper settings: γ = 4, N_s = N/2 = 4, a_j = 0.1, lr 5e-4 linear; 3 epochs
#    for the CPU budget (~3.4 h SS, ~1.7 h plain on the loaded machine). Full fine-tuning
#    (--lora-rank 0): the model is small. --max-length 1536 keeps every dialogue whole (the
#    trainer's default 512 would drop 108 and cut the summaries of 72 more).
FT="--data $DS/train.jsonl.gz --format dialogsum --mode shared --lora-rank 0 --epochs 3 --lr 5e-4 \
    --batch-size 16 --max-length 1536 --eval-data $DS/dev.jsonl.gz --threads $THREADS $FT_EXTRA"
# shellcheck disable=SC2086
[ -f "$RUNS/dialogsum_ss/config.json" ] || specstream train --model "$RUNS/dialogsum_base" $FT \
    --streams 4 --msa-layers 4 --stream-loss-weight 0.1 --output "$RUNS/dialogsum_ss"
# the quality baseline: same recipe, no streams
# shellcheck disable=SC2086
[ -f "$RUNS/dialogsum_plain/config.json" ] || specstream train --model "$RUNS/dialogsum_base" $FT \
    --streams 0 --output "$RUNS/dialogsum_plain"

# 4. PyTorch -> MLX, float32.
for m in dialogsum_ss dialogsum_plain; do
    [ -f "$RUNS/${m}_mlx/config.json" ] || specstream convert --hf-path "$RUNS/$m" \
        --mlx-path "$RUNS/${m}_mlx" --dtype float32
done

# 5. Benchmark on the 500 test dialogues (greedy, float32, a fast BLAS preloaded by specstream;
#    ROUGE against summary1..3), with mlx-lm generate and prompt lookup decoding as baselines.
# shellcheck disable=SC2086
specstream bench --model "$RUNS/dialogsum_ss_mlx" --data "$DS/test.jsonl.gz" \
    --max-tokens 128 --repeats 3 --baselines "mlx-lm,lookup" --json "$RUNS/dialogsum_bench.json" $BENCH_EXTRA
# quality baseline: ROUGE of the plain fine-tune on the same dialogues
# shellcheck disable=SC2086
specstream bench --model "$RUNS/dialogsum_plain_mlx" --data "$DS/test.jsonl.gz" \
    --max-tokens 128 --repeats 1 --json "$RUNS/dialogsum_plain_bench.json" $BENCH_EXTRA
