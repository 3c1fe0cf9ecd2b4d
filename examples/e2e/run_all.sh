#!/usr/bin/env bash
# E2E NLG demo model, end to end: tokenizer -> from-scratch base -> Speculative Streaming
# fine-tune (shared mode, the paper's settings) + the plain fine-tune baseline -> MLX -> bench.
# Run from the repository root. Every step skips itself when its output already exists;
# the pretraining steps resume from their newest checkpoint when rerun.
#
#   bash examples/e2e/run_all.sh
#
# Environment: SPECSTREAM_SHARED (default ../shared), RUNS (default runs),
# THREADS (torch threads, default 1: the machine is shared).
set -euo pipefail

SHARED=${SPECSTREAM_SHARED:-../shared}
RUNS=${RUNS:-runs}
THREADS=${THREADS:-1}
E2E=$SHARED/data/e2e
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0

# 1. SentencePiece BPE tokenizer, vocab 1024, on the train split's prompts and references.
[ -f "$RUNS/e2e_tokenizer/tokenizer.json" ] || python examples/e2e/train_tokenizer.py \
    --train-csv "$E2E/trainset.csv.gz" --output "$RUNS/e2e_tokenizer"

# 2. Base model from scratch: Llama, hidden 256, 6 layers, 4 heads / 2 KV heads, 3.80M
#    parameters (15.2 MB float32), 2 epochs (~35 min at 2,650 tokens/s on one quiet core).
python examples/e2e/pretrain_base.py --tokenizer "$RUNS/e2e_tokenizer" --output "$RUNS/e2e_base" \
    --train-csv "$E2E/trainset.csv.gz" --dev-csv "$E2E/devset.csv.gz" --epochs 2 --threads "$THREADS"

# 2b. A smaller draft model by the same recipe, for mlx-lm's draft-model speculative
#     decoding baseline (0.43M parameters, 1.7 MB).
python examples/e2e/pretrain_base.py --tokenizer "$RUNS/e2e_tokenizer" --output "$RUNS/e2e_draft_base" \
    --train-csv "$E2E/trainset.csv.gz" --dev-csv "$E2E/devset.csv.gz" --epochs 2 --threads "$THREADS" \
    --hidden 128 --layers 2 --heads 2 --kv-heads 1 --intermediate 256

# 3. Fine-tunes on the train split (loss on the reference only; the model directory records
#    the prompt template). Paper settings: γ = 4, N_s = N/2 = 3, a_j = 0.1, 5 epochs,
#    lr 5e-4 linear. The model is small, so full fine-tuning (--lora-rank 0) instead of LoRA.
FT="--data $E2E/trainset.csv.gz --format e2e --mode shared --lora-rank 0 --epochs 5 --lr 5e-4 \
    --batch-size 32 --eval-data $E2E/devset.csv.gz --threads $THREADS"
[ -f "$RUNS/e2e_ss/config.json" ] || specstream train --model "$RUNS/e2e_base" $FT \
    --streams 4 --msa-layers 3 --stream-loss-weight 0.1 --output "$RUNS/e2e_ss"
# the quality baseline: same recipe, no streams
[ -f "$RUNS/e2e_plain/config.json" ] || specstream train --model "$RUNS/e2e_base" $FT \
    --streams 0 --output "$RUNS/e2e_plain"
[ -f "$RUNS/e2e_draft/config.json" ] || specstream train --model "$RUNS/e2e_draft_base" $FT \
    --streams 0 --output "$RUNS/e2e_draft"

# 4. PyTorch -> MLX (float32, <= 16 MB: the bundled demo model), plus 8- and 4-bit variants.
for m in e2e_ss e2e_plain e2e_draft; do
    [ -f "$RUNS/${m}_mlx/config.json" ] || specstream convert --hf-path "$RUNS/$m" \
        --mlx-path "$RUNS/${m}_mlx" --dtype float32
done
for bits in 8 4; do
    [ -f "$RUNS/e2e_ss_mlx_q$bits/config.json" ] || specstream convert --hf-path "$RUNS/e2e_ss" \
        --mlx-path "$RUNS/e2e_ss_mlx_q$bits" --quantize --q-bits "$bits"
done

# 5. Benchmark on all 630 test MRs (greedy, float32, OpenBLAS preloaded), with baselines:
#    mlx-lm generate, mlx-lm draft-model speculative decoding, prompt lookup decoding.
#    (Flags as specified in issue 5.)
LD_PRELOAD=$OPENBLAS specstream bench --model "$RUNS/e2e_ss_mlx" --data "$E2E/testset_w_refs.csv.gz" \
    --max-tokens 128 --repeats 3 --baselines "mlx-lm,draft:$RUNS/e2e_draft_mlx,lookup" \
    --json "$RUNS/e2e_bench.json"
# quality baseline: ROUGE of the plain fine-tune on the same MRs
LD_PRELOAD=$OPENBLAS specstream bench --model "$RUNS/e2e_plain_mlx" --data "$E2E/testset_w_refs.csv.gz" \
    --max-tokens 128 --repeats 1 --json "$RUNS/e2e_plain_bench.json"
