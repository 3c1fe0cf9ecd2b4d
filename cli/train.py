"""``specstream train``: fine-tune a model into a Speculative Streaming checkpoint.

Thin over :func:`mlx_specstream.train.run_training` (PyTorch, the ``train`` extra; same option
names as :class:`mlx_specstream.train.TrainArgs`) or, with ``--backend mlx``, over
:func:`mlx_specstream.mlx_train.run_training` (MLX, any model directory the runtime loads).
The PyTorch back-end runs under ``torchrun --nproc_per_node N -m mlx_specstream train ...``
for DDP; ``--device`` picks the device (auto: CUDA, then MPS, then CPU), and a device the
back-end cannot use is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

_MODES = ("shared", "lossless")


def train(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model directory to fine-tune (Hugging Face; with "
                                        "--backend mlx also a converted or mlx-community directory or hub id).",
                                        show_default=False)],
    data: Annotated[Path, typer.Option("--data", help="Training data: JSONL {prompt, completion} or {messages}, "
                                       "E2E CSV, or DialogSum JSONL (.gz allowed).", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output model directory (must not exist "
                                         "unless --overwrite).", show_default=False)],
    mode: Annotated[str, typer.Option("--mode", help="shared (LoRA/full FT shared by all streams) or lossless "
                                      "(base frozen, main stream unchanged).")] = "shared",
    streams: Annotated[int, typer.Option("--streams", min=0, help="Speculative streams γ; 0 = plain fine-tuning "
                                         "baseline.")] = 4,
    msa_layers: Annotated[Optional[int], typer.Option("--msa-layers", min=1, help="Multi-stream (top) layers N_s "
                                                      "[default: half the layers].", show_default=False)] = None,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=0, help="shared: LoRA rank (0 = full fine-tuning); "
                                           "lossless: stream-only LoRA rank (0 = none).")] = 8,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha [default: 2 x rank].",
                                                        show_default=False)] = None,
    lora_targets: Annotated[Optional[str], typer.Option("--lora-targets", help="Comma-separated linear names, "
                                                        "e.g. q_proj,v_proj [default: attention projections].",
                                                        show_default=False)] = None,
    stream_init: Annotated[str, typer.Option("--stream-init", help="identity or linear (rank --stream-init-rank)."
                                             )] = "identity",
    stream_init_rank: Annotated[Optional[int], typer.Option("--stream-init-rank", min=1,
                                                            show_default=False)] = None,
    pruning_rank: Annotated[int, typer.Option("--pruning-rank", min=0, help="Tree pruning adapter rank (0 = none)."
                                              )] = 8,
    pruning_threshold: Annotated[float, typer.Option("--pruning-threshold", min=0.0, max=0.999,
                                                     help="Stored in the config for inference.")] = 0.0,
    stream_loss_weight: Annotated[float, typer.Option("--stream-loss-weight", min=0.0,
                                                      help="a_j of every stream (a_0 = 1).")] = 0.1,
    prune_loss_weight: Annotated[float, typer.Option("--prune-loss-weight", min=0.0)] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Stop after this many steps.",
                                                     show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear decay).")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", min=0)] = 0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Examples per step per process."
                                            )] = 8,
    grad_accumulation_steps: Annotated[int, typer.Option("--grad-accumulation-steps", min=1,
                                                         help="Micro-batches per optimizer step (same gradient as "
                                                         "one batch N times as large).")] = 1,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", min=0, help="Fill each micro-batch with "
                                              "similar-length examples up to this many padded tokens, instead "
                                              "of --batch-size examples (0: off).")] = 0,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Truncate examples to this many tokens."
                                            )] = 512,
    data_format: Annotated[str, typer.Option("--format", help="auto, jsonl, e2e or dialogsum.")] = "auto",
    max_examples: Annotated[Optional[int], typer.Option("--max-examples", min=1, help="Use only the first N "
                                                        "examples.", show_default=False)] = None,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="Evaluation data (same formats).",
                                                      show_default=False)] = None,
    eval_examples: Annotated[int, typer.Option("--eval-examples", min=0, help="Without --eval-data, hold out the "
                                               "last N training examples; with it, evaluate on N evenly spaced "
                                               "examples of it (0: all).")] = 0,
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="Evaluate every N steps (0: each epoch)."
                                            )] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Checkpoint every N steps (0: each "
                                            "epoch).")] = 0,
    checkpoint_dir: Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="[default: OUTPUT.checkpoints]",
                                                           show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output / earlier checkpoints."
                                            )] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads per process.",
                                                   show_default=False)] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu."
                                        )] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16: frozen weights and the "
                                       "forward's autocast; trainable weights and optimizer state stay float32."
                                       )] = "float32",
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute each layer in the "
                                                  "backward pass: less memory, same gradients.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", min=1, help="--backend mlx: positions whose "
                                                      "streams run through the MSA layers together (memory vs "
                                                      "speed; same result) [default: 64].",
                                                      show_default=False)] = None,
    prefill_chunk: Annotated[Optional[int], typer.Option("--prefill-chunk", min=1, help="--backend mlx: main-stream "
                                                         "tokens per piece of the frozen prefix pass "
                                                         "[default: 512].", show_default=False)] = None,
    backend: Annotated[str, typer.Option("--backend", help="torch (a Hugging Face model directory, PyTorch) or mlx "
                                         "(any model directory specstream loads, quantized included; in MLX, "
                                         "on the Mac).")] = "torch",
) -> None:
    """Fine-tune a model with Speculative Streaming (PyTorch, the 'train' extra; or MLX with --backend mlx).

    Example: specstream train --model ./opt-125m --data ../shared/data/e2e/trainset.csv.gz
    --mode shared --streams 4 --msa-layers 6 --output ./opt-125m-e2e

    On a Mac: specstream train --backend mlx --model mlx-community/Qwen3-0.6B-4bit
    --data distilled.jsonl --mode lossless --output ./qwen3-streams

    On a GPU: --device cuda --dtype bfloat16 (add --grad-checkpoint and --grad-accumulation-steps
    for long sequences or big batches).
    """
    if mode not in _MODES:
        raise ValueError(f"--mode must be one of {_MODES}, got {mode!r}.")
    if backend not in ("torch", "mlx"):
        raise ValueError(f"--backend must be torch or mlx, got {backend!r}.")
    if backend == "mlx":  # the same options, on the runtime's own model (mlx_specstream.mlx_train)
        from mlx_specstream.loading import resolve_model_path
        from mlx_specstream.mlx_train import TrainOptions as TrainArgs
        from mlx_specstream.mlx_train import run_training

        model = resolve_model_path(str(model))  # a directory or a hub id, as generate takes it
        extra = {k: v for k, v in (("chunk_size", chunk_size), ("prefill_chunk", prefill_chunk)) if v is not None}
    else:
        if chunk_size is not None or prefill_chunk is not None:
            raise ValueError("--chunk-size and --prefill-chunk are the MLX trainer's; add --backend mlx.")
        from mlx_specstream.train import TrainArgs, run_training

        extra = {}

    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else None
    args = TrainArgs(
        model=str(model), data=str(data), output=str(output), mode=mode, streams=streams, msa_layers=msa_layers,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=targets, stream_init=stream_init,
        stream_init_rank=stream_init_rank, pruning_rank=pruning_rank, pruning_threshold=pruning_threshold,
        prune_loss_weight=prune_loss_weight, stream_loss_weight=stream_loss_weight, epochs=epochs,
        max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, batch_size=batch_size,
        max_length=max_length, data_format=data_format, max_examples=max_examples,
        eval_data=str(eval_data) if eval_data else None, eval_examples=eval_examples, eval_every=eval_every,
        save_every=save_every, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, resume=resume,
        overwrite=overwrite, seed=seed, num_threads=threads, progress=not quiet, device=device, dtype=dtype,
        grad_accumulation_steps=grad_accumulation_steps, grad_checkpoint=grad_checkpoint, batch_tokens=batch_tokens,
        **extra,
    )
    result = run_training(args)
    if result.output_dir is not None:
        final = result.metrics.get("eval") or result.metrics.get("train") or {}
        accs = ", ".join(f"{k[:-4]} {v:.3f}" for k, v in final.items() if k.endswith(".acc") and v == v)
        typer.echo(f"Saved {result.output_dir} after {result.steps} steps" + (f" (accuracy: {accs})" if accs else ""),
                   err=True)
