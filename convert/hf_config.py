"""config.json in and out: read the source's (an adapter's block wins), write the output's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig, read_config

from .errors import ConversionError


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


def output_config(config, spec: Optional[SpecStreamConfig], dtype, bits, group_size) -> dict[str, Any]:
    """config.json of the output: the block normalised, rope keys mlx-lm reads, dtype and
    the ``quantization`` entry (mlx-lm's format, also copied to ``quantization_config``)."""
    out = _with_top_level_rope(dict(config))
    if spec is not None:
        out[CONFIG_KEY] = spec.to_dict()
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in out:
                out[key] = dtype
    if bits is not None:
        out["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
        out["quantization_config"] = dict(out["quantization"])  # mlx-lm writes both
    return out


def _with_top_level_rope(config: dict[str, Any]) -> dict[str, Any]:
    """Copy transformers-5 ``rope_parameters`` to the top-level keys mlx-lm reads.

    transformers >= 5 moves ``rope_theta``, ``partial_rotary_factor`` and the rope scaling
    into ``rope_parameters``; mlx-lm (and older transformers) read them at the top level and
    would silently fall back to their defaults. The values are copied, so both agree.
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return config
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in params and config.get(key) is None:
            config[key] = params[key]
    if params.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        config["rope_scaling"] = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    return config
