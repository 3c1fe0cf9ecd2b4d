"""Which parameters train, how they start, and their checkpoint-convention names (MLX side).

Lossless mode: the base model (float or quantized) is frozen; the stream embeddings, the
optional ``stream_init`` map, the optional pruning adapter and the stream-only LoRA of the
MSA layers train, in float32. Fresh extras start as the PyTorch trainer starts them
(``mlx_specstream.train.model`` / ``.adapters``): stream embeddings ~ N(0, initializer_range²),
low-rank maps with ``down`` ~ N(0, 1/h) and ``up`` = 0, LoRA ``a`` ~ N(0, 1/in) and ``b`` = 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_specstream.loading import extras_from_model, extras_to_module_names, layers_prefix, load_model
from mlx_specstream.streams import LowRankResidual, SpecStreamModel, StreamLoRALinear


def attention_linears(model: nn.Module, layer: int) -> tuple[str, ...]:
    """Names of the linear layers directly inside decoder layer ``layer``'s attention
    (``self_attn``): the stream-LoRA targets by default, as the PyTorch trainer's per-family
    defaults (q/k/v/o; ``dense`` for phi, ``qkv_proj``/``o_proj`` for phi3, ``out_proj`` for OPT)."""
    attn = model.layers[layer].get("self_attn") if hasattr(model.layers[layer], "get") else None
    if not isinstance(attn, nn.Module):
        raise ValueError(f"Decoder layer {layer} has no self_attn module; pass --lora-targets explicitly.")
    names = tuple(name for name, child in attn.children().items()
                  if isinstance(child, (nn.Linear, nn.QuantizedLinear, StreamLoRALinear)))
    if not names:
        raise ValueError(f"The attention of decoder layer {layer} has no linear layer; pass --lora-targets.")
    return names


def _unwrap_stream_lora(base: nn.Module) -> None:
    """Put every stream-only LoRA linear's base layer back in its place."""
    for layer in base.layers:
        for path, module in list(layer.named_modules()):
            if isinstance(module, StreamLoRALinear):
                parent = layer
                *parts, name = path.split(".")
                for part in parts:
                    parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)
                setattr(parent, name, module.base)


def init_extras(model: SpecStreamModel, seed: int, std: float = 0.02) -> None:
    """Fresh float32 extras, initialised as the PyTorch trainer initialises them."""
    if not model.num_streams:
        return
    key = mx.random.key(seed)
    k_emb, k_init, k_prune, k_lora = mx.random.split(key, 4)
    h = model.stream_embeddings.shape[-1]
    model.stream_embeddings = mx.random.normal(model.stream_embeddings.shape, key=k_emb) * std
    for name, k in (("stream_init", k_init), ("pruning", k_prune)):
        if name in model:
            adapter: LowRankResidual = model[name]
            adapter.down.weight = mx.random.normal(adapter.down.weight.shape, key=k) / math.sqrt(h)
            adapter.up.weight = mx.zeros(adapter.up.weight.shape)
    lora = model.stream_lora_modules()
    for k, module in zip(mx.random.split(k_lora, max(1, len(lora))), lora.values()):
        rank, in_dims = module.lora_a.shape
        module.lora_a = mx.random.normal((rank, in_dims), key=k) / math.sqrt(in_dims)
        module.lora_b = mx.zeros(module.lora_b.shape)
    mx.eval(model.parameters())


def freeze_for_lossless(model: SpecStreamModel) -> None:
    """Freeze everything but the extras (the main stream stays the base model's)."""
    model.freeze()
    model.unfreeze(keys=["stream_embeddings"], recurse=False)
    for name in ("stream_init", "pruning"):
        if name in model:
            model[name].unfreeze()
    for module in model.stream_lora_modules().values():
        module.unfreeze(keys=["lora_a", "lora_b"], recurse=False)


def prepare_model(model_dir: str | Path, spec_fn, seed: int,
                  dtype: Optional[str] = None) -> tuple[SpecStreamModel, dict[str, Any], list[str]]:
    """Load ``model_dir`` (any directory :func:`~mlx_specstream.loading.load_model` reads, float or
    quantized, with or without streams) and give it the run's streams.

    ``spec_fn(base) -> SpecStreamConfig``; ``dtype``: cast the base's float weights (the extras
    train in float32 whatever it is). Returns ``(model, config, warm)``; ``warm`` lists the
    extras taken over from the directory: all of them when its block equals the run's
    (continue training), else those whose canonical names and shapes match (e.g. lossless
    streams on top of a shared-mode checkpoint), as the PyTorch trainer's warm start.
    """
    loaded, config = load_model(model_dir, dtype=dtype)
    base = loaded.base
    spec = spec_fn(base)
    saved = loaded.spec if loaded.num_streams else None
    if saved is not None and saved == spec:
        model, warm = loaded, sorted(extras_from_model(loaded))
    else:
        old = extras_from_model(loaded) if saved is not None else {}
        _unwrap_stream_lora(base)
        model = SpecStreamModel(base, spec)
        model.attach_stream_lora()
        init_extras(model, seed, float(config.get("initializer_range", config.get("init_std", 0.02)) or 0.02))
        own = extras_from_model(model)
        fit = {k: v for k, v in old.items() if k in own and v.shape == own[k].shape}
        if saved is not None and (saved.num_streams, saved.num_msa_layers, saved.stream_init) != (
                spec.num_streams, spec.num_msa_layers, spec.stream_init):
            fit = {}
        if fit:
            model.load_weights(list(extras_to_module_names(model, fit).items()), strict=False)
        warm = sorted(fit)
    cast_extras_float32(model)
    model.train()
    return model, config, warm


def cast_extras_float32(model: SpecStreamModel) -> None:
    """Extras train in float32 whatever the base's dtype."""
    names = extras_to_module_names(model, extras_from_model(model))
    model.load_weights([(k, v.astype(mx.float32)) for k, v in names.items()], strict=False)
    mx.eval(model.parameters())


def canonical_names(model: SpecStreamModel, tree: dict) -> dict[str, mx.array]:
    """A tree shaped like ``model.trainable_parameters()`` (parameters, gradients) -> its
    arrays under the checkpoint convention's names (``stream_lora.{i}.{path}.lora_a``, ...)."""
    prefix = layers_prefix(model)
    out = {}
    for k, v in tree_flatten(tree):
        if k.startswith("base."):
            if ".lora_" not in k or not k.startswith(f"base.{prefix}."):
                raise AssertionError(f"unexpected trainable base parameter {k}")
            k = "stream_lora." + k[len(f"base.{prefix}."):]
        out[k] = v
    return out
