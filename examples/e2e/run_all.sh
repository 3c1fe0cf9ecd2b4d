#!/usr/bin/env bash
# E2E NLG demo model, end to end: tokenizer -> from-scratch base -> Speculative Streaming
# fine-tune (shared mode, the paper's settings) + the plain fine-tune
# baseline -> MLX -> lossless stream self-distillation (the bundled demo) -> tune + bench.
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
#    the prompt template). Paper settings: γ = 4, N_s = N/2 = 3, a_j = 0.1, linear decay. The
#    model is small, so full fine-tuning (--lora-rank 0) instead of LoRA. CPU budget: 2 epochs
#    at lr 1e-3 (the paper: 5 at 5e-4 from a pretrained model; this base already saw the task
#    text for 2 epochs). ~2.5 h for the SS fine-tune on one core, ~1 h without streams.
FT="--data $E2E/trainset.csv.gz --format e2e --mode shared --lora-rank 0 --epochs 2 --lr 1e-3 \
    --warmup-steps 100 --batch-size 32 --eval-data $E2E/devset.csv.gz --eval-examples 300 \
    --eval-every 500 --save-every 500 --threads $THREADS"
[ -f "$RUNS/e2e_ss/config.json" ] || specstream train --model "$RUNS/e2e_base" $FT \
    --streams 4 --msa-layers 3 --stream-loss-weight 0.1 --output "$RUNS/e2e_ss"
# the quality baseline: same recipe, no streams
[ -f "$RUNS/e2e_plain/config.json" ] || specstream train --model "$RUNS/e2e_base" $FT \
    --streams 0 --output "$RUNS/e2e_plain"
[ -f "$RUNS/e2e_draft/config.json" ] || specstream train --model "$RUNS/e2e_draft_base" $FT \
    --streams 0 --output "$RUNS/e2e_draft"

# 4. PyTorch -> MLX (float32).
for m in e2e_ss e2e_plain e2e_draft; do
    [ -f "$RUNS/${m}_mlx/config.json" ] || specstream convert --hf-path "$RUNS/$m" \
        --mlx-path "$RUNS/${m}_mlx" --dtype float32
done

# 5. Self-distillation, the stage that makes the bundled demo, in two rounds. Round 1: the SS
#    fine-tune's own greedy description of every distinct train MR (4,862; ~7 min), then 2 more
#    epochs of the same shared-mode training (all weights, γ = 4, N_s = 3, a_j = 0.1) on them
#    (292 steps, ~11 min on one core). Round 2: the same from the round-1 model, 3 epochs (438
#    steps, ~12 min with THREADS=2). Human references vary (8.7 per MR); the model's own text is
#    the one continuation drafts are checked against, so the streams learn to predict it. The
#    main stream trains too, so the outputs change: quality is re-measured (ROUGE, step 6).
[ -f "$RUNS/e2e_distill/train.csv.gz" ] || python examples/e2e/distill_data.py \
    --model "$RUNS/e2e_ss_mlx" --output "$RUNS/e2e_distill/train.csv.gz"
SD="--format e2e --mode shared --lora-rank 0 --streams 4 --msa-layers 3 --stream-loss-weight 0.1 \
    --lr 5e-4 --warmup-steps 20 --batch-size 32 --eval-examples 200 --save-every 100 --threads $THREADS"
[ -f "$RUNS/e2e_ss_selfdistill/config.json" ] || specstream train --model "$RUNS/e2e_ss" \
    --data "$RUNS/e2e_distill/train.csv.gz" $SD --epochs 2 --output "$RUNS/e2e_ss_selfdistill"
[ -f "$RUNS/e2e_ss_selfdistill_mlx/config.json" ] || specstream convert --hf-path "$RUNS/e2e_ss_selfdistill" \
    --mlx-path "$RUNS/e2e_ss_selfdistill_mlx" --dtype float32
[ -f "$RUNS/e2e_distill2/train.csv.gz" ] || python examples/e2e/distill_data.py \
    --model "$RUNS/e2e_ss_selfdistill_mlx" --output "$RUNS/e2e_distill2/train.csv.gz"
[ -f "$RUNS/e2e_ss_selfdistill2/config.json" ] || specstream train --model "$RUNS/e2e_ss_selfdistill" \
    --data "$RUNS/e2e_distill2/train.csv.gz" $SD --epochs 3 --output "$RUNS/e2e_ss_selfdistill2"
[ -f "$RUNS/e2e_ss_selfdistill2_mlx/config.json" ] || specstream convert --hf-path "$RUNS/e2e_ss_selfdistill2" \
    --mlx-path "$RUNS/e2e_ss_selfdistill2_mlx" --dtype float32

# 6. The bundled demo model (<= 16 MB) is the round-2 model, its default tree tuned on 16 dev
#    MRs (saved into config.json), then all 630 test MRs (greedy, float32, OpenBLAS preloaded
#    by specstream) with every baseline: mlx-lm generate, mlx-lm draft-model speculative
#    decoding, prompt lookup decoding through our verifier. Then the round-1 model and the
#    paper-recipe fine-tune before self-distillation (e2e_ss_mlx), tuned the same way.
specstream bench --model "$RUNS/e2e_ss_selfdistill2_mlx" --data "$E2E/testset_w_refs.csv.gz" \
    --max-tokens 128 --repeats 1 --tune --tune-data "$E2E/devset.csv.gz" --tune-samples 16 \
    --baselines "mlx-lm,draft:$RUNS/e2e_draft_mlx,lookup" --json "$RUNS/e2e_demo_bench.json" \
    --plot "$RUNS/e2e_demo_tune.png"
for m in e2e_ss_selfdistill e2e_ss; do
    specstream bench --model "$RUNS/${m}_mlx" --data "$E2E/testset_w_refs.csv.gz" \
        --max-tokens 128 --repeats 1 --tune --tune-data "$E2E/devset.csv.gz" --tune-samples 16 \
        --json "$RUNS/${m}_bench.json"
done
# the quality baseline: ROUGE of the plain fine-tune on the same MRs
specstream bench --model "$RUNS/e2e_plain_mlx" --data "$E2E/testset_w_refs.csv.gz" \
    --max-tokens 128 --repeats 1 --json "$RUNS/e2e_plain_bench.json"
# 8- and 4-bit: tokens per step, memory, outputs vs float32 (the JSONs' modes.ar.outputs),
# first 200 test MRs, the demo's tuned tree
TREE=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['speculative_streaming']['default_tree'])" \
    "$RUNS/e2e_ss_selfdistill2_mlx/config.json")
for bits in 8 4; do
    [ -f "$RUNS/e2e_selfdistill2_q$bits/config.json" ] || specstream convert --hf-path "$RUNS/e2e_ss_selfdistill2" \
        --mlx-path "$RUNS/e2e_selfdistill2_q$bits" --quantize --q-bits "$bits"
    specstream bench --model "$RUNS/e2e_selfdistill2_q$bits" --data "$E2E/testset_w_refs.csv.gz" \
        --num-samples 200 --max-tokens 128 --repeats 1 --tree "$TREE" --json "$RUNS/e2e_demo_q${bits}_bench.json"
done
# the float32 model on the same 200 MRs, for the quantized table
specstream bench --model "$RUNS/e2e_ss_selfdistill2_mlx" --data "$E2E/testset_w_refs.csv.gz" \
    --num-samples 200 --max-tokens 128 --repeats 1 --json "$RUNS/e2e_demo_f32_200_bench.json"

# 7. Optional (DISTILL_LOSSLESS=1): the lossless alternative to step 5. Round-1 data, but the
#    fine-tuned model frozen (outputs stay exactly e2e_ss's) and only the streams trained:
#    stream embeddings and pruning adapter warm-started, stream-only LoRA rank 8 on the seven
#    linears of the 3 multi-stream layers, 4 epochs (584 steps, ~11 min with THREADS=2). More
#    tokens per step than e2e_ss, but the LoRA makes every tree step dearer (BENCHMARKS.md).
if [ "${DISTILL_LOSSLESS:-0}" = 1 ]; then
    [ -f "$RUNS/e2e_distilled/config.json" ] || specstream train --model "$RUNS/e2e_ss" \
        --data "$RUNS/e2e_distill/train.csv.gz" --format e2e --mode lossless --lora-rank 8 \
        --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --streams 4 --msa-layers 3 \
        --epochs 4 --lr 1e-3 --warmup-steps 20 --batch-size 32 --eval-examples 200 --save-every 150 \
        --threads "$THREADS" --output "$RUNS/e2e_distilled"
    [ -f "$RUNS/e2e_distilled_mlx/config.json" ] || specstream convert --hf-path "$RUNS/e2e_distilled" \
        --mlx-path "$RUNS/e2e_distilled_mlx" --dtype float32
    for tree in 1,1,1 1,1,1,1; do
        specstream bench --model "$RUNS/e2e_distilled_mlx" --data "$E2E/testset_w_refs.csv.gz" \
            --max-tokens 128 --repeats 1 --tree "$tree" --json "$RUNS/e2e_distilled_bench_$tree.json"
    done
fi
