"""Strict source -> target mapping: every source tensor placed, every target filled, shapes equal.

Targets come from the runtime itself, so converter and loader cannot drift apart:

* base weights: the parameters of ``mlx_specstream.models.build_model(config)`` (Hugging Face
  names), after the family's ``sanitize()`` (which drops rotary ``inv_freq`` buffers and the
  tied ``lm_head.weight``);
* extras: ``loading.extras_from_model`` of a ``SpecStreamModel`` with the config block, under
  the canonical names of ``mlx_specstream.config``.

Models are built lazily (MLX does not allocate parameters until they are evaluated), so
planning a 7B model costs no weight memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig
from mlx_specstream.loading import extras_from_model
from mlx_specstream.models import FAMILIES, build_model
from mlx_specstream.streams import SpecStreamModel

from .errors import ConversionError, name_list
from .tensors import TensorRef

EXTRA_PREFIXES = ("stream_embeddings", "stream_init.", "pruning.", "stream_lora.")
BASE_PREFIX = "model."  # Hugging Face's base_model_prefix for every supported family


@dataclasses.dataclass
class MappingPlan:
    """base/extras: target name -> source ref, in the runtime's parameter order.

    dropped: source names the family's ``sanitize()`` discards on purpose.
    renamed: source name -> target name where the ``model.`` prefix was missing
    (checkpoints saved from the bare decoder, e.g. early OPT files).
    skeleton: the lazily built family model, for planning quantization.
    """

    base: dict[str, TensorRef]
    extras: dict[str, TensorRef]
    dropped: list[str]
    renamed: dict[str, str]
    skeleton: nn.Module


def is_extra_name(name: str) -> bool:
    return name.startswith(EXTRA_PREFIXES)


def build_skeleton(config: dict[str, Any]) -> nn.Module:
    """The family model for ``config``, unevaluated; unknown families give a clear error."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConversionError("config.json has no 'model_type'; it must name the architecture (e.g. 'llama').")
    if model_type not in FAMILIES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}, which mlx-specstream does not support. "
            f"Supported: {', '.join(sorted(FAMILIES))}."
        )
    try:
        return build_model(config)
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"config.json does not describe a valid {model_type} model: {e}") from e


def expected_extras(config: dict[str, Any], spec: Optional[SpecStreamConfig]) -> dict[str, tuple[int, ...]]:
    """Canonical extras name -> shape for the config block (empty for a plain model)."""
    if spec is None or spec.num_streams == 0:
        return {}
    model = SpecStreamModel(build_skeleton(config), spec)
    model.attach_stream_lora()
    return {k: tuple(v.shape) for k, v in extras_from_model(model).items()}


def plan_mapping(config: dict[str, Any], refs: dict[str, TensorRef], spec: Optional[SpecStreamConfig]) -> MappingPlan:
    """Map every source tensor to a target; raise one :class:`ConversionError` listing all problems."""
    skeleton = build_skeleton(config)
    targets = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    src_base = {k: r for k, r in refs.items() if not is_extra_name(k)}
    src_extras = {k: r for k, r in refs.items() if is_extra_name(k)}

    kept = _sanitized_names(skeleton, src_base)
    used = set(kept.values())
    dropped = [k for k in src_base if k not in used]
    base: dict[str, TensorRef] = {}
    renamed, unmapped = {}, []
    for name, src in kept.items():
        if name not in targets and BASE_PREFIX + name in targets and BASE_PREFIX + name not in kept:
            renamed[src] = name = BASE_PREFIX + name
        if name in targets:
            base[name] = src_base[src]
        else:
            unmapped.append(src)

    extra_shapes = expected_extras(config, spec)
    extras = {k: r for k, r in src_extras.items() if k in extra_shapes}
    unmapped += [k for k in src_extras if k not in extra_shapes]
    missing = [k for k in targets if k not in base] + [k for k in extra_shapes if k not in extras]
    wrong = [
        f"{k} {r.shape} (expected {shape})"
        for group, shapes in ((base, targets), (extras, extra_shapes))
        for k, r in group.items()
        if tuple(r.shape) != (shape := shapes[k])
    ]
    if unmapped or missing or wrong:
        raise ConversionError(_mapping_message(config, spec, unmapped, missing, wrong))
    ordered = {k: base[k] for k in targets}
    return MappingPlan(ordered, {k: extras[k] for k in extra_shapes}, dropped, renamed, skeleton)


def _sanitized_names(skeleton: nn.Module, src: dict[str, TensorRef]) -> dict[str, str]:
    """Run the family's ``sanitize()`` on lazy placeholders: kept target name -> source name.

    Placeholders are never evaluated, so this allocates nothing; a tensor is followed by
    identity, which holds because sanitize only drops or renames entries for our families.
    """
    if not hasattr(skeleton, "sanitize"):
        return {k: k for k in src}
    holders = {k: mx.zeros(r.shape, dtype=mx.float32 if r.is_float else mx.int32) for k, r in src.items()}
    by_id = {id(v): k for k, v in holders.items()}
    out = {}
    for name, value in skeleton.sanitize(dict(holders)).items():
        if id(value) not in by_id:
            raise ConversionError(
                f"The {skeleton.model_type} family's sanitize() computes tensor {name!r} instead of "
                "copying it, which the converter cannot stream; please report this as a bug."
            )
        out[name] = by_id[id(value)]
    return out


def _mapping_message(config, spec, unmapped, missing, wrong) -> str:
    lines = [f"The checkpoint does not match its config.json ({config.get('model_type')} model):"]
    if unmapped:
        lines.append(f"  unmapped source tensors ({len(unmapped)}): {name_list(unmapped)}")
    if missing:
        lines.append(f"  missing target tensors ({len(missing)}): {name_list(missing)}")
    if wrong:
        lines.append(f"  shape mismatches ({len(wrong)}): {name_list(wrong)}")
    if any(is_extra_name(k) for k in unmapped + missing):
        block = "none" if spec is None else spec.to_dict()
        lines.append(f"  (stream extras are checked against the '{CONFIG_KEY}' block: {block})")
    lines.append("Check that config.json belongs to these weights (layer count, sizes, tied embeddings).")
    return "\n".join(lines)
