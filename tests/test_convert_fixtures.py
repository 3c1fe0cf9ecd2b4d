"""Helpers shared by the converter tests (no tests here): tiny source checkpoints in every
input format, the PyTorch reference, and a CLI runner.

Source checkpoints come from the trainer's ``mlx_specstream.train.tiny`` (random HF models
with streams and a pruning adapter trained a few steps), cached per variant for the session.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the train extra
safetensors_torch = pytest.importorskip("safetensors.torch")

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig  # noqa: E402

_CACHE = Path(tempfile.mkdtemp(prefix="specstream-convert-tests-"))
atexit.register(shutil.rmtree, _CACHE, True)


def spec_for(variant: str, mode: str = "shared") -> SpecStreamConfig:
    """Streams + pruning adapter; lossless adds stream-only LoRA; llama uses the linear stream init."""
    lora = StreamLoRAConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")) if mode == "lossless" else None
    linear = variant == "llama"
    return SpecStreamConfig(
        num_streams=3, num_msa_layers=2, mode=mode, pruning=PruningConfig(rank=4), stream_lora=lora,
        stream_init="linear" if linear else "identity", stream_init_rank=4 if linear else None,
    )


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(variant: str, mode: str = "shared", plain: bool = False) -> Path:
    """A trainer-written checkpoint directory (cached; treat as read-only)."""
    from mlx_specstream.train.tiny import save_tiny_checkpoint

    path = _CACHE / f"{variant}-{mode}{'-plain' if plain else ''}"
    return save_tiny_checkpoint(variant, path, None if plain else spec_for(variant, mode), seed=1)


def copy_checkpoint(src: Path, dst: Path, fmt: str = "safetensors") -> Path:
    """Copy a checkpoint, re-saving its base weights as ``safetensors`` (as is), ``sharded``
    (two safetensors shards + index) or ``bin`` (a torch.save'd ``pytorch_model.bin``)."""
    shutil.copytree(src, dst)
    if fmt == "safetensors":
        return dst
    tensors = safetensors_torch.load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = list(tensors)
    if fmt == "sharded":
        half = len(names) // 2
        files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
        for file, part in files.items():
            safetensors_torch.save_file({k: tensors[k] for k in part}, str(dst / file))
        weight_map = {k: f for f, part in files.items() for k in part}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif fmt == "bin":
        torch.save(tensors, dst / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return dst


def reference_logits(src: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trainer's float32 PyTorch model: main ``[T, V]``, streams ``[T, γ, V]``, pruning ``[T, V]``."""
    from mlx_specstream.train.model import SpecStreamLM

    model = SpecStreamLM.from_pretrained(src).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids))
    return out.main_logits[0].numpy(), out.stream_logits[0].numpy(), out.prune_logits[0].numpy()


def output_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a converted directory (base and extras), as float32/uint32 numpy."""
    import mlx.core as mx

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        for k, v in mx.load(str(f)).items():
            out[k] = np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a failed conversion to ``parent/name`` left behind (the target or a staging dir)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def run_cli(args: list[str]) -> int:
    """Run ``specstream convert ARGS`` in-process with the real error handling; returns the exit code."""
    import typer

    from mlx_specstream.cli import common
    from mlx_specstream.cli import main as cli_main
    from mlx_specstream.cli.convert import convert

    if any(name == "convert" for name, *_ in cli_main.COMMANDS):
        return cli_main.main(["convert", *args])
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    app.command("convert")(convert)
    return common.run_app(app, ["convert", *args])
