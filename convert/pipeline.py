"""``convert()``: a Hugging Face / PyTorch checkpoint (optionally a PEFT adapter on a base)
-> an MLX model directory in the project's checkpoint convention.

Steps: resolve the source; index its tensors without reading them; merge a LoRA adapter
lazily; map every tensor strictly onto the runtime's parameters; plan output shards; then
read, cast, (quantize) and write one tensor at a time into a staged directory that is
renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE, spec_config_from

from .errors import ConversionError, name_list
from .hf_config import mlx_lm_config, output_config, source_config, window_notes
from .inventory import weight_refs
from .mapping import MappingPlan, is_extra_name, plan_mapping
from .peft import base_model_of, is_adapter_dir, merge_adapter
from .quantize import BITS, GROUP_SIZES, QuantPlan, QuantReport, plan_quantization, quantize_weight
from .safetensors_io import safetensors_refs
from .source import resolve_source, tokenizer_files
from .tensors import OUTPUT_DTYPES, RAW_DTYPES, TensorRef, output_dtype
from .writer import (
    DEFAULT_MAX_SHARD_BYTES,
    check_destination,
    plan_shards,
    shard_file_names,
    staged_directory,
    write_index,
)

_METADATA = {"format": "mlx"}


@dataclasses.dataclass
class ConversionResult:
    """What a conversion wrote. ``quantization`` holds the per-kind error report when quantized."""

    path: Path
    weight_files: list[str]
    tensors: int
    total_bytes: int
    extras: list[str]
    dropped: list[str]
    renamed: dict[str, str]
    merged: list[str]
    quantization: Optional[QuantReport] = None
    retune: Optional[str] = None  # why the output should be tuned again (see _tuning_for)
    combined: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # target -> its sources
    notes: list[str] = dataclasses.field(default_factory=list)  # how mlx-lm's model differs, if at all

    def summary(self) -> str:
        lines = [
            f"Wrote {self.path}: {self.tensors} base tensors ({self.total_bytes / 2**20:.1f} MiB) in "
            f"{len(self.weight_files)} file(s), {len(self.extras)} stream extras."
        ]
        if self.merged:
            lines.append(f"Merged a LoRA adapter into {len(self.merged)} tensors.")
        if self.dropped:
            lines.append(f"Dropped by the family's sanitize (rotary buffers, tied head): {name_list(self.dropped, 6)}.")
        if self.renamed:
            first = next(iter(self.renamed.items()))
            lines.append(f"Renamed {len(self.renamed)} tensors as the family names them (e.g. {first[0]} -> {first[1]}).")
        if self.combined:
            sources = sum(len(v) for v in self.combined.values())
            lines.append(f"Combined {sources} tensors into {len(self.combined)} as the family's sanitize does "
                         f"(e.g. {next(iter(self.combined))}).")
        lines.extend(f"Note: {note}" for note in self.notes)
        if self.quantization is not None and not self.quantization.kinds:
            lines.append(
                f"Nothing was quantized: no layer's input width divides by the group size "
                f"{self.quantization.group_size}; try a smaller --q-group-size."
            )
        elif self.quantization is not None:
            lines.append(self.quantization.table())
        if self.retune:
            lines.append(self.retune)
        return "\n".join(lines)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    force: bool = False,
    *,
    base_path: Optional[str | Path] = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> ConversionResult:
    """Convert a checkpoint directory (or Hub repo id) into an MLX model directory.

    hf_path: a Hugging Face model directory (safetensors, sharded or not, or PyTorch ``.bin``;
        with the ``speculative_streaming`` block and ``speculative_streams.safetensors`` when
        it has streams), a PEFT LoRA adapter directory (merged into its base: shared mode),
        or a Hub repo id of either.
    mlx_path: output directory; refused if it exists unless ``force``.
    dtype: float32 | float16 | bfloat16 for floating tensors; None keeps each tensor's dtype.
    quantize, q_bits (4 | 8), q_group_size (32 | 64 | 128): MLX affine quantization of the
        base linear/embedding layers (extras stay in float).
    base_path: the base model for an adapter directory (default: its
        ``base_model_name_or_path``).
    max_shard_size: bytes per output weight file before sharding.
    """
    _check_args(dtype, quantize, q_bits, q_group_size, max_shard_size)
    src = resolve_source(hf_path)
    adapter = is_adapter_dir(src)
    if base_path is not None and not adapter:
        raise ConversionError(f"base_path (--base) applies to PEFT adapter directories only; {src} has no adapter_config.json.")
    base_dir = _adapter_base(src, base_path) if adapter else src
    dst = Path(mlx_path).expanduser()
    check_destination(dst, force, [src, base_dir])

    config = source_config(base_dir, src if adapter else None)
    try:
        spec = spec_config_from(config)
        if spec is not None:
            spec.validate(num_layers=config.get("num_hidden_layers"))
    except (TypeError, ValueError) as e:
        raise ConversionError(f"The '{CONFIG_KEY}' block of config.json is invalid: {e}") from e
    refs, _ = weight_refs(base_dir)
    merged: list[str] = []
    if adapter:
        if spec is not None and spec.mode == "lossless":
            raise ConversionError(
                f"{src} is a LoRA adapter on the main model, but the config block says mode='lossless' "
                "(main stream untouched). Shared mode merges adapters; lossless keeps stream-only LoRA in "
                f"{EXTRAS_FILE}. Fix the block's mode or drop the adapter."
            )
        refs, merged = merge_adapter(refs, src)
    refs = _with_extras(refs, src, base_dir)
    config, notes = mlx_lm_config(config, [k for k in refs if not is_extra_name(k)])
    plan = plan_mapping(config, refs, spec)
    notes += window_notes(config, plan.skeleton)
    spec, retune = _tuning_for(spec, _weights_change(plan, dtype, quantize, q_bits), dst)

    qplan = plan_quantization(plan.skeleton, q_bits, q_group_size) if quantize else None
    report = QuantReport(q_bits, q_group_size) if quantize else None
    with staged_directory(dst, force) as tmp:
        files, total = _write_base(tmp, plan, dtype, qplan, report, max_shard_size, progress)
        if plan.extras:
            extras = {k: _cast(r.read(), output_dtype(r, dtype)) for k, r in plan.extras.items()}
            mx.save_safetensors(str(tmp / EXTRAS_FILE), extras, metadata=_METADATA)
        out_config = output_config(config, spec, dtype, qplan.config if qplan is not None else None)
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        for name, path in tokenizer_files(*([src, base_dir] if adapter else [src])).items():
            shutil.copy2(path, tmp / name)
    return ConversionResult(
        dst.resolve(), files, len(plan.base), total, list(plan.extras), plan.dropped, plan.renamed, merged, report,
        retune, plan.combined, notes,
    )


def _weights_change(plan: MappingPlan, dtype, quantize: bool, bits) -> Optional[str]:
    """How the output's base weights differ from the source's ("4-bit", "float16"), else None."""
    if quantize:
        return f"{bits}-bit"
    if dtype is not None and any(output_dtype(r, dtype) != output_dtype(r, None) for r in plan.base.values()):
        return dtype
    return None


def _tuning_for(spec, change: Optional[str], dst: Path):
    """The block to write and a note, when the source was tuned but the weights change.

    ``specstream tune`` measured its tree and its ``speculate`` verdict on the source's
    weights: on a CPU a 4-bit tree step costs more against a plain step than a float32 one
    (quantized matmuls are not batched over tokens), so that verdict does not describe the
    output. ``speculate`` and ``tuned_on`` are dropped (the output speculates by default, as
    an untuned model does); ``default_tree`` stays as the starting tree; the note says to tune.
    """
    if spec is None or change is None or (spec.default_tree is None and spec.speculate is None):
        return spec, None
    notes = []
    if spec.default_tree is not None:
        notes.append(f"The source's default_tree {spec.default_tree!r} was chosen for its own weights, not "
                     f"{change} ones; it is kept as a starting point.")
    if spec.speculate is not None or spec.tuned_on is not None:
        verdict = "plain decoding" if spec.speculate is False else "speculation"
        where = f" on {spec.tuned_on}" if spec.tuned_on else ""
        notes.append(f"The source's tuned verdict ({verdict}{where}) does not describe {change} weights and was "
                     "not carried over.")
        spec = dataclasses.replace(spec, speculate=None, tuned_on=None)
    notes.append(f"Run `specstream tune --model {dst}` on the device you decode on.")
    return spec, " ".join(notes)


def _check_args(dtype, quantize, bits, group_size, max_shard_size) -> None:
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)} (or None to keep), got {dtype!r}.")
    if quantize and (bits not in BITS or group_size not in GROUP_SIZES):
        raise ConversionError(
            f"Quantization needs q_bits in {BITS} and q_group_size in {GROUP_SIZES}; got {bits} and {group_size}."
        )
    if max_shard_size < 1:
        raise ConversionError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}.")


def _adapter_base(src: Path, base_path) -> Path:
    base = base_path if base_path is not None else base_model_of(src)
    if not base:
        raise ConversionError(
            f"{src} is a PEFT adapter whose adapter_config.json names no base model; pass the base "
            "model directory with --base (base_path=...)."
        )
    return resolve_source(base)


def _with_extras(refs: dict[str, TensorRef], src: Path, base_dir: Path) -> dict[str, TensorRef]:
    """Add the tensors of ``speculative_streams.safetensors`` (the adapter's, else the base's)."""
    for d in (src, base_dir):
        if (d / EXTRAS_FILE).is_file():
            extras = safetensors_refs(d / EXTRAS_FILE)
            both = sorted(set(extras) & set(refs))
            if both:
                raise ConversionError(f"Tensors {name_list(both)} are in both the weights and {d / EXTRAS_FILE}; keep one copy.")
            bad = sorted(k for k in extras if not is_extra_name(k))
            if bad:
                raise ConversionError(
                    f"{d / EXTRAS_FILE} holds {name_list(bad)}, which are not stream extras "
                    "(stream_embeddings, stream_init.*, pruning.*, stream_lora.*)."
                )
            return {**refs, **extras}
    return refs


def _write_base(tmp, plan: MappingPlan, dtype, qplan: Optional[QuantPlan], report, max_shard_size,
                progress) -> tuple[list[str], int]:
    from tqdm import tqdm

    sizes = {name: _out_bytes(name, ref, dtype, qplan) for name, ref in plan.base.items()}
    shards = plan_shards(sizes, max_shard_size)
    files = shard_file_names(len(shards))
    weight_map: dict[str, str] = {}
    with tqdm(total=len(plan.base), desc="Converting", unit="tensor", disable=not progress) as bar:
        for names, file in zip(shards, files):
            arrays: dict[str, mx.array] = {}
            for name in names:
                arrays.update(_produce(name, plan.base[name], dtype, qplan, report))
                bar.update(1)
            weight_map.update({k: file for k in arrays})
            mx.save_safetensors(str(tmp / file), arrays, metadata=_METADATA)
            del arrays
            mx.clear_cache()
    total = sum(sizes.values())
    if len(files) > 1:
        write_index(tmp, weight_map, total)
    if qplan is not None and set(weight_map) != set(qplan.shapes):
        raise AssertionError(f"quantized output names differ from mlx-lm's: {set(weight_map) ^ set(qplan.shapes)}")
    return files, total


def _out_bytes(name: str, ref: TensorRef, dtype, qplan: Optional[QuantPlan]) -> int:
    out = output_dtype(ref, dtype)
    itemsize = out.size if out is not None else RAW_DTYPES[ref.dtype].itemsize
    if qplan is None or qplan.params_of(name) is None:
        return ref.numel * itemsize
    stem = name[: -len("weight")]
    packed = qplan.shapes[name]
    groups = qplan.shapes[stem + "scales"]
    return math.prod(packed) * 4 + 2 * math.prod(groups) * itemsize


def _produce(name: str, ref: TensorRef, dtype, qplan: Optional[QuantPlan], report) -> dict[str, mx.array]:
    """Read one tensor and return the output arrays it becomes (evaluated)."""
    value = ref.read()
    cast = _cast(value, output_dtype(ref, dtype))
    params = qplan.params_of(name) if qplan is not None else None
    if params is None:
        mx.eval(cast)
        return {name: cast}
    if params.get("mode", "affine") != "affine":
        raise ConversionError(f"{name}: the family asks for {params['mode']} quantization; only affine is supported.")
    packed = quantize_weight(cast, params["bits"], params["group_size"])
    mx.eval(*packed)
    report.add(name, value, packed, params["bits"], params["group_size"])
    stem = name[: -len("weight")]
    out = {name: packed[0], stem + "scales": packed[1], stem + "biases": packed[2]}
    for k, v in out.items():
        assert tuple(v.shape) == qplan.shapes[k], (k, v.shape, qplan.shapes[k])
    return out


def _cast(value: mx.array, dtype) -> mx.array:
    return value if dtype is None or value.dtype == dtype else value.astype(dtype)
