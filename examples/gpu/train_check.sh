#!/usr/bin/env bash
# Training cost on a CUDA machine: specstream train (LoRA, γ = 4, N_s = N/2) vs plain PEFT LoRA,
# Qwen2-0.5B-shaped random model, bfloat16, T = 512 and 2,048. Extra arguments pass through
# (e.g. --batch-size 4, --grad-checkpoint, --steps 10). Dry run on a CPU:
#   examples/gpu/train_check.sh --device cpu --preset tiny --lengths 64,128 --dtype float32
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import torch; assert torch.cuda.is_available() or '--device' in '$*', 'no CUDA device (pass --device cpu for a dry run)'"
python examples/gpu/train_check.py --preset qwen2-0.5b --device cuda --dtype bfloat16 --lengths 512,2048 "$@"
