"""Strict source -> target mapping: every source tensor placed, every target filled, shapes equal.

Targets come from the model mlx-lm builds, so converter and loader cannot drift apart:

* base weights: the parameters of ``mlx_specstream.models.build_model(config)`` (mlx-lm's
  class for the ``model_type``; ours for OPT) after the family's ``sanitize()``, which may
  drop tensors (rotary ``inv_freq`` buffers, a tied ``lm_head.weight``), change the model
  (Gemma 3 removes its ``lm_head`` when the checkpoint has none) or compute tensors
  (Qwen3-MoE stacks each layer's experts into ``switch_mlp``);
* extras: ``loading.extras_from_model`` of a ``SpecStreamModel`` with the config block, under
  the canonical names of ``mlx_specstream.config``.

Models are built lazily (MLX does not allocate parameters until they are evaluated), so
planning a 7B model costs no weight memory. ``sanitize()`` runs first on unevaluated
placeholders of the source tensors: an entry it passes through is copied from its source;
an entry it computes is produced, when written, by running ``sanitize()`` again on the real
tensors of that entry's layer only (:class:`_CombinedGroup`), so at most one layer's inputs
(e.g. its experts) are in memory at a time.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig
from mlx_specstream.loading import extras_from_model
from mlx_specstream.models import TESTED_FAMILIES, build_model, model_classes
from mlx_specstream.streams import SpecStreamModel

from .errors import ConversionError, name_list
from .tensors import TensorRef

EXTRA_PREFIXES = ("stream_embeddings", "stream_init.", "pruning.", "stream_lora.")
BASE_PREFIX = "model."  # Hugging Face's base_model_prefix for every supported family
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")

# MLX dtype of a placeholder / computed tensor <-> canonical dtype name (tensors.RAW_DTYPES)
_MX_DTYPES = {
    "float64": mx.float32,  # read as float32 (tensors.to_mx)
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int64": mx.int64,
    "int32": mx.int32,
    "int16": mx.int16,
    "int8": mx.int8,
    "uint8": mx.uint8,
    "bool": mx.bool_,
}
_DTYPE_NAMES = {v: k for k, v in _MX_DTYPES.items() if k != "float64"}


@dataclasses.dataclass
class MappingPlan:
    """base/extras: target name -> source ref, in the runtime's parameter order.

    dropped: source names the family's ``sanitize()`` discards on purpose.
    renamed: source name -> target name where the family's ``sanitize()`` renames a tensor
    or the ``model.`` prefix was missing (checkpoints saved from the bare decoder, e.g. early
    OPT files).
    combined: target name -> the source names its ``sanitize()`` computes it from
    (e.g. Qwen3-MoE's stacked experts); its ref in ``base`` runs that computation.
    skeleton: the lazily built family model (after ``sanitize()``), for planning quantization.
    """

    base: dict[str, TensorRef]
    extras: dict[str, TensorRef]
    dropped: list[str]
    renamed: dict[str, str]
    skeleton: nn.Module
    combined: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def is_extra_name(name: str) -> bool:
    return name.startswith(EXTRA_PREFIXES)


def build_skeleton(config: dict[str, Any]) -> nn.Module:
    """The family model for ``config``, unevaluated; unknown families and configs that lack
    keys mlx-lm's model needs give a clear error."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ConversionError("config.json has no 'model_type'; it must name the architecture (e.g. 'llama').")
    try:
        model_class, args_class = model_classes(config)
    except (ValueError, ImportError) as e:
        detail = str(e).rstrip(".")
        if "Tested families" not in detail:
            detail += f". Tested families: {', '.join(TESTED_FAMILIES)}; other mlx-lm families convert too"
        raise ConversionError(
            f"config.json has model_type {model_type!r}, which mlx-specstream does not support ({detail})."
        ) from e
    if dataclasses.is_dataclass(args_class):
        required = [
            f.name for f in dataclasses.fields(args_class)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if config.get(k) is None]
        if missing:
            raise ConversionError(
                f"config.json lacks {', '.join(missing)}, which the {model_type} model needs "
                f"({args_class.__module__}.{args_class.__name__}). Add the value(s) its training used."
            )
    try:
        return build_model(config)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ConversionError(f"config.json does not describe a valid {model_type} model: {e!r}") from e


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
    src_base = {k: r for k, r in refs.items() if not is_extra_name(k)}
    src_extras = {k: r for k, r in refs.items() if is_extra_name(k)}

    # sanitize first: it may change the model itself (Gemma 3 drops lm_head when tied)
    kept, computed = _sanitized(skeleton, src_base, lambda: build_skeleton(config))
    targets = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    used = set(kept.values()) | {s for ref, sources in computed.values() for s in sources}
    dropped = [k for k in src_base if k not in used]
    base: dict[str, TensorRef] = {}
    renamed, unmapped = {}, []
    for name, src in kept.items():
        if name not in targets and BASE_PREFIX + name in targets and BASE_PREFIX + name not in kept:
            name = BASE_PREFIX + name
        if name != src:
            renamed[src] = name
        if name in targets:
            base[name] = src_base[src]
        else:
            unmapped.append(src)
    for name, (ref, sources) in computed.items():
        if name in targets:
            base[name] = ref
        else:
            unmapped.append(f"{name} (computed by sanitize from {name_list(sources, 3)})")

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
    combined = {k: sources for k, (_, sources) in computed.items()}
    return MappingPlan(ordered, {k: extras[k] for k in extra_shapes}, dropped, renamed, skeleton, combined)


def _placeholder(ref: TensorRef) -> mx.array:
    """An unevaluated array of the tensor's shape and (MLX) dtype: never allocated."""
    return mx.zeros(ref.shape, dtype=_MX_DTYPES.get(ref.dtype, mx.float32))


def _sanitized(
    skeleton: nn.Module, src: dict[str, TensorRef], scratch: Callable[[], nn.Module]
) -> tuple[dict[str, str], dict[str, tuple[TensorRef, list[str]]]]:
    """Run the family's ``sanitize()`` on placeholders of ``src``.

    Returns ``(kept, computed)``: kept target name -> source name for entries sanitize passes
    through unchanged; computed target name -> (a ref that computes it, its source names) for
    entries sanitize computes. ``skeleton`` is sanitized in place, as mlx-lm's loader does;
    ``scratch`` builds a throw-away model for the per-layer runs.
    """
    if not hasattr(skeleton, "sanitize"):
        return {k: k for k in src}, {}
    holders = {k: _placeholder(r) for k, r in src.items()}
    by_id = {id(v): k for k, v in holders.items()}
    kept, computed = {}, {}
    for name, value in skeleton.sanitize(dict(holders)).items():
        if id(value) in by_id:
            kept[name] = by_id[id(value)]
        else:
            computed[name] = value
    if not computed:
        return kept, {}
    return kept, _combined_refs(skeleton, src, holders, by_id, kept, computed, scratch)


def _combined_refs(skeleton, src, holders, by_id, kept, computed, scratch) -> dict[str, tuple[TensorRef, list[str]]]:
    """Find, layer by layer, which source tensors each computed entry comes from.

    sanitize runs again on each layer's placeholders alone (and on the rest, outside any
    layer), first on the layers where the whole run consumed tensors, until every computed
    entry is found; the entries computed there must be exactly those of the whole run, with the
    same shapes and dtypes, else sanitize combines tensors across layers and cannot be streamed.
    """
    groups: dict[str, list[str]] = {}
    for k in src:
        m = _LAYER.match(k)
        groups.setdefault(m.group(1) if m else "", []).append(k)
    passed_through = set(kept.values())
    order = sorted(groups.values(), key=lambda names: all(k in passed_through for k in names))
    family = getattr(skeleton, "model_type", type(skeleton).__module__)
    out: dict[str, tuple[TensorRef, list[str]]] = {}
    for names in order:
        if set(out) >= set(computed):
            break
        result = scratch().sanitize({k: holders[k] for k in names})
        made = {n: v for n, v in result.items() if id(v) not in by_id}
        if not made:
            continue
        passed = {by_id[id(v)] for v in result.values() if id(v) in by_id}
        inputs = [k for k in names if k not in passed]
        group = _CombinedGroup(scratch, {k: src[k] for k in names}, list(made))
        for n, v in made.items():
            if n in out:
                raise _cross_layer(family, n)
            origin = f"computed by the {family} family's sanitize() from {name_list(inputs or names, 3)}"
            ref = TensorRef(tuple(v.shape), _DTYPE_NAMES.get(v.dtype, "float32"), origin, group.reader(n))
            out[n] = (ref, inputs)
    if set(out) != set(computed):
        raise _cross_layer(family, name_list(sorted(set(out) ^ set(computed)), 4))
    for n, value in computed.items():
        ref = out[n][0]
        if ref.shape != tuple(value.shape) or _MX_DTYPES[ref.dtype] != value.dtype:
            raise _cross_layer(family, n)
    return {n: out[n] for n in computed}  # the whole run's order


def _cross_layer(family: str, what: str) -> ConversionError:
    return ConversionError(
        f"The {family} family's sanitize() computes {what} from tensors of more than one layer, which the "
        "converter cannot do one layer at a time; please report this as a bug."
    )


class _CombinedGroup:
    """The entries sanitize computes from one layer's tensors, produced together on first read.

    The first read of any of them reads the layer's tensors, runs sanitize on them and
    evaluates every computed entry; each later read hands one out and forgets it, so the
    memory is freed once all are written. A read after that recomputes.
    """

    def __init__(self, scratch, tensors: dict[str, TensorRef], names: list[str]):
        self.scratch, self.tensors, self.names = scratch, tensors, names
        self.ready: dict[str, mx.array] = {}

    def reader(self, name: str) -> Callable[[], mx.array]:
        return lambda: self.read(name)

    def read(self, name: str) -> mx.array:
        if name not in self.ready:
            result = self.scratch().sanitize({k: r.read() for k, r in self.tensors.items()})
            self.ready = {n: result[n] for n in self.names}
            del result
            mx.eval(list(self.ready.values()))
        return self.ready.pop(name)


def _mapping_message(config, spec, unmapped, missing, wrong) -> str:
    lines = [f"The checkpoint does not match its config.json ({config.get('model_type')} model):"]
    if unmapped:
        lines.append(f"  unmapped source tensors ({len(unmapped)}): {name_list(unmapped)}")
    if missing:
        lines.append(f"  missing target tensors ({len(missing)}): {name_list(missing)}")
    if wrong:
        lines.append(f"  shape mismatches ({len(wrong)}): {name_list(wrong)}")
    if any(k.endswith((".experts.gate_up_proj", ".experts.down_proj")) for k in unmapped):
        lines.append("  (experts.gate_up_proj / experts.down_proj is transformers 5's in-memory fused expert layout; "
                     "save the model with save_pretrained, which writes one tensor per expert as mlx-lm reads them)")
    if any(is_extra_name(k) for k in unmapped + missing):
        block = "none" if spec is None else spec.to_dict()
        lines.append(f"  (stream extras are checked against the '{CONFIG_KEY}' block: {block})")
    lines.append("Check that config.json belongs to these weights (layer count, sizes, tied embeddings).")
    return "\n".join(lines)
