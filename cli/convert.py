"""``specstream convert``: a PyTorch / Hugging Face checkpoint -> an MLX model directory."""

from __future__ import annotations

import re
from typing import Optional

import typer
from typing_extensions import Annotated

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not m or m[2] not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB.")
    return int(float(m[1]) * _UNITS[m[2]])


def convert(
    hf_path: Annotated[str, typer.Option("--hf-path", help="Checkpoint directory, PEFT adapter directory, or Hub repo id.")],
    mlx_path: Annotated[str, typer.Option("--mlx-path", help="Output directory (must not exist unless --force).")],
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help="float32 | float16 | bfloat16 for float tensors (default: keep the checkpoint's).",
                     show_default=False),
    ] = None,
    quantize: Annotated[bool, typer.Option("--quantize", "-q", help="Quantize linear/embedding layers (MLX affine).")] = False,
    q_bits: Annotated[int, typer.Option("--q-bits", help="Bits per weight when quantizing: 4 or 8.")] = 4,
    q_group_size: Annotated[int, typer.Option("--q-group-size", help="Quantization group size: 32, 64 or 128.")] = 64,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --mlx-path.")] = False,
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="Base model for a PEFT adapter (default: the adapter's base_model_name_or_path).",
                     show_default=False),
    ] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weight file before sharding.")] = "5GiB",
) -> None:
    """Convert a fine-tuned checkpoint (safetensors or .bin, optionally a LoRA adapter) to MLX.

    Example: specstream convert --hf-path ./my-finetune --mlx-path ./my-finetune-mlx -q --q-bits 8
    """
    from mlx_specstream.cli.common import stderr_is_tty
    from mlx_specstream.convert import convert as run_convert

    result = run_convert(
        hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
        force=force, base_path=base, max_shard_size=parse_size(max_shard_size), progress=stderr_is_tty(),
    )
    typer.echo(result.summary())
