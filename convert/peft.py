"""Merge a PEFT LoRA adapter directory into its base weights (shared mode), lazily.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``) with names like ``base_model.model.{module}.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``. Merging gives ``W + s * B @ A`` with ``s = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA), as ``peft``'s ``merge_and_unload`` does. Embedding LoRA
(``lora_embedding_A [r, vocab]``, ``lora_embedding_B [h, r]``) adds ``s * (B @ A).T``.
Whole modules the adapter saved (``modules_to_save``, ``base_layer`` copies) replace the base's.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from .errors import ConversionError, name_list
from .inventory import weight_refs
from .tensors import TensorRef

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(?P<leaf>\.weight|\.bias)?")
_COPY_KEY = re.compile(r"(?P<mod>.+)\.(base_layer|modules_to_save(\.default)?)\.(?P<leaf>[^.]+)")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(root: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((root / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{root / ADAPTER_CONFIG} is not valid JSON ({e}).") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConversionError(
            f"{root} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged. "
            "Merge it with peft (merge_and_unload + save_pretrained) and convert the result."
        )
    if cfg.get("use_dora"):
        raise ConversionError(
            f"{root} is a DoRA adapter; merge it with peft (merge_and_unload + save_pretrained) "
            "and convert the merged model."
        )
    return cfg


def base_model_of(root: Path) -> Optional[str]:
    return read_adapter_config(root).get("base_model_name_or_path")


def merge_adapter(base: dict[str, TensorRef], root: Path) -> tuple[dict[str, TensorRef], list[str]]:
    """``(base refs with the adapter merged in, names of the changed tensors)``; reads no data."""
    cfg = read_adapter_config(root)
    refs, _ = weight_refs(root, stem="adapter_model", bin_stem="adapter_model")
    lora: dict[str, dict[str, TensorRef]] = {}
    copies: dict[str, TensorRef] = {}
    unmapped = []
    for key, ref in refs.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_magnitude_vector" in name:
            raise ConversionError(f"{root} holds DoRA magnitudes ({key}); merge it with peft first.")
        if m := _LORA_KEY.fullmatch(name):
            part = m["kind"] + ("_bias" if m["leaf"] == ".bias" else "")
            lora.setdefault(m["mod"], {})[part] = ref
        elif m := _COPY_KEY.fullmatch(name):
            copies[f"{m['mod']}.{m['leaf']}"] = ref
        elif name in base:
            copies[name] = ref  # modules_to_save, as recent peft versions name them
        else:
            unmapped.append(key)

    merged = dict(base)
    problems = []
    for name, ref in copies.items():
        if name not in base:
            unmapped.append(name)
        elif ref.shape != base[name].shape:
            problems.append(f"{name}: adapter {ref.shape} vs base {base[name].shape}")
        else:
            merged[name] = ref
    for mod, parts in lora.items():
        problems += _add_lora(merged, base, mod, parts, cfg, unmapped)
    if unmapped or problems:
        msg = [f"The LoRA adapter in {root} does not fit the base model."]
        if unmapped:
            msg.append(f"Adapter tensors with no base tensor: {name_list(unmapped)}.")
        if problems:
            msg.append(f"Shape mismatches: {name_list(problems)}.")
        msg.append("Check that adapter_config.json's base model is the model you pass as the base.")
        raise ConversionError(" ".join(msg))
    changed = sorted(k for k in merged if merged[k] is not base[k])
    return merged, changed


def _add_lora(merged, base, mod, parts, cfg, unmapped) -> list[str]:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    target = f"{mod}.weight"
    if a_key not in parts or b_key not in parts:
        return [f"{mod}: has {sorted(parts)} but needs both {a_key} and {b_key}"]
    if target not in base:
        unmapped.append(target)
        return []
    a, b, w = parts[a_key], parts[b_key], merged[target]
    rank = a.shape[0]
    transpose = embedding or bool(cfg.get("fan_in_fan_out"))
    delta_shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    if len(a.shape) != 2 or b.shape[-1] != rank or delta_shape != w.shape:
        return [f"{mod}: A {a.shape}, B {b.shape} do not give the base shape {w.shape}"]
    scale = _scale(cfg, mod, rank)
    merged[target] = TensorRef(w.shape, w.dtype, f"{w.origin} + LoRA", _merged_reader(w, a, b, scale, transpose))
    if "lora_B_bias" in parts:
        bias_name = f"{mod}.bias"
        if bias_name not in base:
            return [f"{mod}: adapter has a LoRA bias but the base layer has no bias"]
        bias = merged[bias_name]
        merged[bias_name] = TensorRef(bias.shape, bias.dtype, f"{bias.origin} + LoRA", _bias_reader(bias, parts["lora_B_bias"], scale))
    return []


def _scale(cfg: dict[str, Any], mod: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", mod):
            alpha = value
            break
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _merged_reader(w: TensorRef, a: TensorRef, b: TensorRef, scale: float, transpose: bool):
    def read():
        delta = b.read().astype(mx.float32) @ a.read().astype(mx.float32)
        if transpose:
            delta = delta.T
        return w.read().astype(mx.float32) + scale * delta

    return read


def _bias_reader(bias: TensorRef, lora_bias: TensorRef, scale: float):
    def read():
        return bias.read().astype(mx.float32) + scale * lora_bias.read().astype(mx.float32)

    return read
