"""Shared mode (the paper's): LoRA shared by the main stream and the streams, plus the extras.

The float base gets mlx-lm's ``LoRALinear`` (``mlx_lm.tuner.lora``) on the targeted linears
of every layer, initialised as peft initialises the PyTorch trainer's (``a`` ~ U(±1/sqrt(in)),
``b`` = 0, scale alpha / rank); the fine-tuned model replaces the base (LoRA is fused into its
weights when saved). The main stream trains too, so the main pass is part of the gradient: it
runs as an ordinary fine-tune's forward (with its cache, for the MSA layers' keys/values);
each chunk of streams runs under :func:`mx.checkpoint` with M and the main keys/values as
inputs, so its activations are recomputed in the backward pass instead of kept for every
chunk at once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_specstream.streams import SpecStreamModel

from .data import IGNORE_INDEX, stream_targets
from .forward import ChunkLayout, chunk_bounds, main_pass, stream_chunk
from .loss import LOGITS_BUDGET, _add, _select, _vocab, head_ce, stream_names
from .params import attention_linears


def attach_shared_lora(model: SpecStreamModel, rank: int, alpha: Optional[float],
                       targets: Optional[Sequence[str]], seed: int) -> int:
    """LoRA on the linears named ``targets`` (default: the attention's) of every decoder layer;
    returns how many were wrapped. The base must be float (fusing LoRA into quantized weights
    would re-quantize them)."""
    from mlx_lm.tuner.lora import LoRALinear

    names = tuple(targets) if targets else attention_linears(model.base, 0)
    scale = float(alpha or 2 * rank) / rank
    mx.random.seed(seed)
    count = 0
    for i, layer in enumerate(model.base.layers):
        found = 0
        for path, module in list(layer.named_modules()):
            *parts, name = path.split(".")
            if name not in names:
                continue
            if isinstance(module, nn.QuantizedLinear):
                raise ValueError("Shared mode needs a float base (LoRA is fused into its weights when saved); "
                                 "train lossless streams on a quantized base (--mode lossless), or start from "
                                 "the float model.")
            if not isinstance(module, nn.Linear):
                continue
            parent = layer
            for part in parts:
                parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)
            setattr(parent, name, LoRALinear.from_base(module, r=rank, scale=scale))
            found += 1
        if not found:
            raise ValueError(f"--lora-targets {list(names)} match no linear layer in decoder layer {i}; "
                             "use Hugging Face names such as 'q_proj'.")
        count += found
    mx.eval(model.parameters())
    return count


def freeze_for_shared(model: SpecStreamModel) -> None:
    """Train the LoRA pairs and the extras; the base weights stay frozen."""
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    if model.num_streams:
        model.unfreeze(keys=["stream_embeddings"], recurse=False)
    for name in ("stream_init", "pruning"):
        if name in model:
            model[name].unfreeze()
    for _, module in model.base.named_modules():
        if isinstance(module, LoRALinear):
            module.unfreeze(keys=["lora_a", "lora_b"], recurse=False)


def fuse_shared_lora(model: SpecStreamModel) -> None:
    """Fold every LoRA pair into its base weight (in place): plain linears again."""
    from mlx_lm.tuner.lora import LoRALinear

    for layer in model.base.layers:
        for path, module in list(layer.named_modules()):
            if isinstance(module, LoRALinear):
                *parts, name = path.split(".")
                parent = layer
                for part in parts:
                    parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)
                setattr(parent, name, module.fuse())
    mx.eval(model.parameters())


def shared_batch_loss(model: SpecStreamModel, ids: np.ndarray, labels: np.ndarray, counts: dict[str, int],
                      opts, grads: bool = True):
    """:func:`.loss.batch_loss` for shared mode: one gradient over the whole micro-batch."""
    g = model.num_streams
    names = stream_names(g, model.has_pruning)
    weights = model.spec.weights()
    head_rows = opts.head_rows or max(16, LOGITS_BUDGET // _vocab(model))
    tgt = stream_targets(labels, g)
    tokens = mx.array(ids)
    parts = [_select(tgt[..., :1], ["main"], [weights[0]], counts)]
    if model.has_pruning:
        parts.append(_select(tgt[..., :1], ["prune"], [opts.prune_loss_weight], counts))
    layouts = []
    if g:
        positions = np.flatnonzero((tgt[..., 1:] != IGNORE_INDEX).any(axis=(0, 2)))
        if len(positions):
            for a, b in chunk_bounds(int(positions[0]), int(positions[-1]) + 1, opts.chunk_size):
                rows = _select(tgt[:, a:b, 1:], names[1: g + 1], weights[1:], counts)
                if rows is not None:
                    layouts.append(ChunkLayout.of(a, b, g, ids.shape[0]))
                    parts.append(rows)
    split = model.msa_start
    layers = range(split, model.num_layers)

    def loss_fn(model):
        main = main_pass(model, tokens, opts.prefill_chunk, frozen=False)
        h = main.final.shape[-1]
        total, outs = mx.array(0.0), []
        if parts[0] is not None:
            ce, ok = head_ce(model, main.final.reshape(-1, h)[parts[0].index], parts[0].targets, head_rows)
            total, outs = total + (ce * parts[0].weights).sum(), outs + [ce, ok]
        if model.has_pruning and parts[1] is not None:
            m = mx.stop_gradient(main.inserted).reshape(-1, h)[parts[1].index]
            ce, ok = head_ce(model, model.pruning(m), parts[1].targets, head_rows)
            total, outs = total + (ce * parts[1].weights).sum(), outs + [ce, ok]
        for layout, rows in zip(layouts, parts[len(parts) - len(layouts):]):
            def chunk(params, m, keys, values, layout=layout, rows=rows):
                model.update(params)
                x = stream_chunk(model, m, dict(zip(layers, keys)), dict(zip(layers, values)), layout,
                                 opts.grad_checkpoint)
                ce, ok = head_ce(model, x.reshape(-1, h)[rows.index], rows.targets, head_rows)
                return (ce * rows.weights).sum(), ce, ok

            b = layout.b
            value, ce, ok = mx.checkpoint(chunk)(
                model.trainable_parameters(), main.inserted[:, layout.a: b],
                [main.keys[i][:, :, :b] for i in layers], [main.values[i][:, :, :b] for i in layers])
            total, outs = total + value, outs + [ce, ok]
        return (total, *outs)

    if grads:
        (total, *outs), grad = nn.value_and_grad(model, loss_fn)(model)
    else:
        (total, *outs), grad = loss_fn(model), None
    totals: dict[str, mx.array] = {}
    live = [p for p in parts if p is not None]  # prune rows exist exactly when main rows do
    for rows, ce, ok in zip(live, outs[0::2], outs[1::2]):
        for name, s, e in rows.segments:
            _add(totals, name, mx.stop_gradient(ce), ok, s, e)
    total = mx.stop_gradient(total)
    mx.eval(total, totals, grad if grad is not None else [])
    return total, totals, grad
