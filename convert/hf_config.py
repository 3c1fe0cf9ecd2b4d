"""config.json in and out: read the source's (an adapter's block wins), translate it into the
config mlx-lm reads, write the output's.

transformers >= 5 writes configs that mlx-lm 0.32 misreads: the rotary settings move into
``rope_parameters`` (nested per layer type for Gemma 3), Gemma 3's sliding-window layout
becomes ``layer_types``, Qwen3-MoE's ``num_experts`` becomes ``num_local_experts``, and a
``head_dim`` left at its default is not written. mlx-lm reads the old top-level keys and
falls back to *its own* defaults when they are missing, which often differ from
transformers' (qwen2's rope_theta, phi's partial_rotary_factor, tied embeddings, ...), so a
wrong value loads silently. :func:`mlx_lm_config` writes every key mlx-lm's model of the
family reads, as transformers would interpret the source config; the transformers-5 keys
stay in place, so both libraries read the output alike. A setting mlx-lm's model cannot
express (a per-layer-type rope it lacks, logit soft-capping it does not apply, a Gemma 3
layer layout other than its repeating pattern) is a :class:`ConversionError`, never a
silently different model; a difference real checkpoints have and mlx-lm accepts (Phi-3's
sliding window, LongRoPE's short factor) is a note in the conversion summary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig, read_config

from .errors import ConversionError

# mlx-lm's name <- transformers-5's name (transformers' ``attribute_map`` aliases)
ALIASES = {"num_experts": "num_local_experts"}

# Keys whose mlx-lm default differs from transformers' default for the family: filled with
# transformers' value when the source config does not set them.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2": {"rope_theta": 10000.0},
    "phi": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    "phi3": {"max_position_embeddings": 4096},
    "gemma3_text": {"sliding_window": 4096, "max_position_embeddings": 131072},
}

_ROPE_BASE_KEYS = ("rope_theta", "partial_rotary_factor")
FULL, SLIDING = "full_attention", "sliding_attention"


def source_config(base_dir: Path, adapter_dir: Optional[Path]) -> dict[str, Any]:
    """The base's config.json; an adapter directory's own config block takes precedence."""
    config = read_config(base_dir)
    if adapter_dir is not None and (adapter_dir / "config.json").is_file():
        block = read_config(adapter_dir).get(CONFIG_KEY)
        if block is not None:
            config[CONFIG_KEY] = block
    for key in ("quantization", "quantization_config"):
        if key in config:
            raise ConversionError(
                f"config.json of {base_dir} has '{key}': the checkpoint is already quantized. Convert the "
                "unquantized (float) checkpoint; pass --quantize to quantize it for MLX."
            )
    return config


def mlx_lm_config(config: dict[str, Any], weight_names: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``(config mlx-lm reads as transformers reads the source, notes for the user)``.

    weight_names: the source's base tensor names (whether it has ``lm_head.weight`` decides
    ``tie_word_embeddings`` when the config does not say).
    """
    out = copy.deepcopy(config)
    notes: list[str] = []
    model_type = out.get("model_type")
    if model_type not in _NESTED_ROPE_FAMILIES:
        _flat_rope_to_top_level(out)
    for mlx_key, hf_key in ALIASES.items():
        if out.get(mlx_key) is None and out.get(hf_key) is not None:
            out[mlx_key] = out[hf_key]
    rule = _FAMILY_RULES.get(model_type)
    if rule is not None:
        rule(out, notes)
    for key, value in HF_DEFAULTS.get(model_type, {}).items():
        if out.get(key) is None:
            out[key] = value
    fields = _args_fields(out)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if out.get(key) and fields and key not in fields:
            raise ConversionError(
                f"config.json sets {key}={out[key]}, which mlx-lm's {model_type} model does not apply; "
                "its logits would differ from the checkpoint's."
            )
    if "head_dim" in fields and out.get("head_dim") is None and _positive(out, "hidden_size", "num_attention_heads"):
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]  # transformers' fallback
    if "tie_word_embeddings" in fields and out.get("tie_word_embeddings") is None:
        out["tie_word_embeddings"] = "lm_head.weight" not in set(weight_names)
    scaling = out.get("rope_scaling")
    if isinstance(scaling, dict) and "type" not in scaling and "rope_type" in scaling:
        out["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}  # mlx-lm's phi3 reads "type"
    return out, notes


def output_config(config, spec: Optional[SpecStreamConfig], dtype, quantization: Optional[dict]) -> dict[str, Any]:
    """config.json of the output: ``config`` (already :func:`mlx_lm_config`'s), the block
    normalised, dtype, and the ``quantization`` entry mlx-lm's ``quantize_model`` wrote
    (also copied to ``quantization_config``, as mlx-lm does)."""
    out = dict(config)
    if spec is not None:
        out[CONFIG_KEY] = spec.to_dict()
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in out:
                out[key] = dtype
    if quantization is not None:
        out["quantization"] = dict(quantization)
        out["quantization_config"] = dict(quantization)
    return out


def window_notes(config: dict[str, Any], skeleton: Any) -> list[str]:
    """Where transformers attends within a sliding window but mlx-lm's model attends to the
    whole context (Phi-3's and Mistral's ``sliding_window``), or the other way round."""
    hf = _hf_windows(config)
    mlx = _mlx_windows(skeleton)
    if hf is None or mlx is None or len(hf) != len(mlx):
        return []
    differ = [i for i, (a, b) in enumerate(zip(hf, mlx)) if a != b]
    if not differ:
        return []
    shortest = min(w for i in differ for w in (hf[i], mlx[i]) if w)
    first = differ[0]

    def reach(window):
        return f"a window of {window} tokens" if window else "the whole context"

    return [
        f"in layer(s) {', '.join(map(str, differ[:8]))}{' ...' if len(differ) > 8 else ''} transformers attends "
        f"to {reach(hf[first])} and mlx-lm's {config.get('model_type')} model to {reach(mlx[first])}: logits of "
        f"sequences longer than {shortest} tokens differ from transformers'."
    ]


def _mlx_windows(skeleton: Any) -> Optional[list[Optional[int]]]:
    """The sliding window of each layer of mlx-lm's model: from the caches ``make_cache()``
    gives (a ``RotatingKVCache(max_size=w)`` per windowed layer), else from the ``layer_types``
    and ``sliding_window`` of its args (mlx-lm's llama masks by those); None: not attention."""
    if hasattr(skeleton, "make_cache"):
        windows = []
        for cache in skeleton.make_cache():
            kind = type(cache).__name__
            if kind not in ("KVCache", "RotatingKVCache"):
                return None  # recurrent or other state: not a plain attention layer
            windows.append(getattr(cache, "max_size", None) if kind == "RotatingKVCache" else None)
        return windows
    args = getattr(skeleton, "args", None)
    layers = getattr(skeleton, "layers", None)
    if layers is None:
        return None
    types, window = getattr(args, "layer_types", None), getattr(args, "sliding_window", None)
    if types and window and len(types) == len(layers):
        return [window if t == SLIDING else None for t in types]
    return [None] * len(layers)


def _hf_windows(config: dict[str, Any]) -> Optional[list[Optional[int]]]:
    """The sliding window of each layer as transformers 5 applies it (None: full attention)."""
    n = config.get("num_hidden_layers")
    if not isinstance(n, int):
        return None
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if config.get("model_type") == "gemma3_text" and not types:
        period = config.get("sliding_window_pattern") or 6
        types = [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]
    if not window or config.get("use_sliding_window") is False:
        return [None] * n
    if types:
        return [window if t == SLIDING else None for t in types] if len(types) == n else None
    return [window] * n  # phi3, mistral: every layer


def _args_fields(config: dict[str, Any]) -> set[str]:
    """Field names of the ModelArgs mlx-lm uses for ``config`` (empty for an unknown family)."""
    from mlx_specstream.models import model_classes

    try:
        _, args_class = model_classes(config)
    except (ValueError, ImportError):
        return set()
    return {f.name for f in dataclasses.fields(args_class)} if dataclasses.is_dataclass(args_class) else set()


def _positive(config: dict[str, Any], *keys: str) -> bool:
    return all(isinstance(config.get(k), int) and config[k] > 0 for k in keys)


def _rope_type(params: dict[str, Any]) -> str:
    return params.get("rope_type") or params.get("type") or "default"


def _scaling_of(params: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The ``rope_scaling`` dict (transformers-4 format) of one ``rope_parameters`` dict."""
    kind = _rope_type(params)
    if kind == "default":
        return None
    scaling = {k: v for k, v in params.items() if k not in _ROPE_BASE_KEYS}
    scaling.setdefault("rope_type", kind)
    scaling.setdefault("type", kind)
    return scaling


def _flat_rope_to_top_level(config: dict[str, Any]) -> None:
    """Copy ``rope_parameters`` (one dict, or the same dict for every layer type) to the
    top-level ``rope_theta``, ``partial_rotary_factor`` and ``rope_scaling`` mlx-lm reads.

    The values in ``rope_parameters`` win, as in transformers 5; an explicit legacy
    ``rope_scaling`` is kept (transformers 5 also prefers it).
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or not params:
        return
    nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    if nested:
        kinds = list(nested.values())
        if any(p != kinds[0] for p in kinds):
            raise ConversionError(
                f"config.json's rope_parameters differ per layer type ({', '.join(nested)}), which mlx-lm's "
                f"{config.get('model_type')} model cannot express (it has one rotary embedding for all layers)."
            )
        params = kinds[0]
    for key in _ROPE_BASE_KEYS:
        if params.get(key) is not None:
            config[key] = params[key]
    if config.get("rope_scaling") is None:
        scaling = _scaling_of(params)
        if scaling is not None:
            config["rope_scaling"] = scaling


def _gemma3_text(config: dict[str, Any], notes: list[str]) -> None:
    """Gemma 3: per-layer-type rope -> rope_theta (global layers), rope_local_base_freq
    (sliding layers) and rope_scaling (global layers only, as in mlx-lm); layer_types ->
    sliding_window_pattern (mlx-lm makes every p-th layer global)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        # transformers 5 reads only the nested form for Gemma 3 (a flat dict there is ignored)
        other = sorted(set(params) - {FULL, SLIDING})
        if other:
            raise ConversionError(f"config.json's rope_parameters has layer types {other} that gemma3_text lacks.")
        full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
        if full.get("rope_theta") is not None:
            config["rope_theta"] = full["rope_theta"]
        if sliding.get("rope_theta") is not None:
            config["rope_local_base_freq"] = sliding["rope_theta"]
        if _rope_type(sliding) != "default":
            raise ConversionError(
                f"config.json scales the rotary embedding of gemma3_text's sliding-window layers "
                f"({_rope_type(sliding)!r}); mlx-lm's gemma3_text scales only its global layers."
            )
        if config.get("rope_scaling") is None:
            scaling = _scaling_of(full)
            if scaling is not None:
                config["rope_scaling"] = scaling
    layer_types = config.get("layer_types")
    if layer_types:
        config["sliding_window_pattern"] = _window_pattern(layer_types, config.get("num_hidden_layers"))
    if config.get("use_bidirectional_attention"):
        raise ConversionError("config.json sets use_bidirectional_attention; mlx-lm's gemma3_text is causal only.")


def _window_pattern(layer_types: list[str], num_layers: Optional[int]) -> int:
    """The period p with layer i global iff (i + 1) % p == 0, which mlx-lm's gemma3_text uses."""
    if num_layers is not None and len(layer_types) != num_layers:
        raise ConversionError(
            f"config.json's layer_types has {len(layer_types)} entries for {num_layers} layers."
        )
    unknown = sorted(set(layer_types) - {FULL, SLIDING})
    if unknown:
        raise ConversionError(f"config.json's layer_types has {unknown}; gemma3_text layers are {FULL} or {SLIDING}.")
    if FULL not in layer_types:
        raise ConversionError("config.json's layer_types has no full_attention layer; mlx-lm's gemma3_text needs one.")
    period = layer_types.index(FULL) + 1
    if [FULL if (i + 1) % period == 0 else SLIDING for i in range(len(layer_types))] != list(layer_types):
        raise ConversionError(
            f"config.json's layer_types ({', '.join(t.split('_')[0] for t in layer_types)}) is not a repeating "
            "pattern of sliding layers ending in one global layer, the only layout mlx-lm's gemma3_text "
            "(sliding_window_pattern) can express."
        )
    return period


def _phi3(config: dict[str, Any], notes: list[str]) -> None:
    """Phi-3: mlx-lm reads ``rope_scaling["type"]`` and a top-level
    ``original_max_position_embeddings``; its LongRoPE applies ``long_factor`` at every length."""
    scaling = config.get("rope_scaling")
    if not isinstance(scaling, dict):
        return
    kind = _rope_type(scaling)
    if kind == "default":
        config["rope_scaling"] = None
        return
    scaling = {**scaling, "type": kind}
    if kind == "linear":
        scaling["factor"] = float(scaling["factor"])  # mlx-lm asserts a float
    config["rope_scaling"] = scaling
    if kind not in ("longrope", "su"):
        return
    if config.get("original_max_position_embeddings") is None and scaling.get("original_max_position_embeddings"):
        config["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    original = config.get("original_max_position_embeddings") or 4096
    if scaling.get("short_factor") != scaling.get("long_factor"):
        notes.append(
            f"LongRoPE: mlx-lm's phi3 applies long_factor at every length; transformers uses short_factor for "
            f"sequences up to original_max_position_embeddings ({original}) tokens, so logits of shorter "
            "sequences differ from transformers'."
        )
    if scaling.get("attention_factor") is not None:
        factor = (config.get("max_position_embeddings") or 131072) / original
        default = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        if abs(scaling["attention_factor"] - default) > 1e-6:
            raise ConversionError(
                f"config.json's rope attention_factor {scaling['attention_factor']} differs from the default "
                f"{default:.6f} that mlx-lm's phi3 always uses."
            )


_FAMILY_RULES = {"gemma3_text": _gemma3_text, "phi3": _phi3}
_NESTED_ROPE_FAMILIES = {"gemma3_text"}
