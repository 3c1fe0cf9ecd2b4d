"""Atomic directories, resumable checkpoints and the final model directory (MLX trainer).

As the PyTorch trainer (``mlx_specstream.train.checkpoint``): a directory is written under a
hidden temporary name and renamed into place when complete, so an interrupted run never
leaves a half-written checkpoint or output. Resume checkpoints live in
``{checkpoint_dir}/step-{N:08d}/``: ``trainable.safetensors`` (every trainable parameter by
its name in the model), ``optimizer.safetensors`` (the optimizer's state tree,
flattened) and ``state.json`` (step, fingerprint, history).

The output is a model directory :func:`mlx_specstream.load` reads: the source directory's
files (base weights, quantized or not, tokenizer) hard-linked (copied where links fail)
unchanged, ``config.json`` with the run's ``speculative_streaming`` block and
``prompt_template``, ``speculative_streams.safetensors``, and the run's records.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE, read_config
from mlx_specstream.datasets import PROMPT_TEMPLATE_KEY
from mlx_specstream.loading import extras_from_model
from mlx_specstream.streams import SpecStreamModel

CHECKPOINT_PREFIX = "step-"
RUN_RECORDS = ("training_args.json", "train_metrics.json", "train_log.jsonl")


@contextlib.contextmanager
def atomic_directory(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = [p for p in Path(checkpoint_dir).iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def save_checkpoint(checkpoint_dir: Path, step: int, model: SpecStreamModel, optimizer, state: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write ``step-{step}`` atomically, then delete all but the newest ``keep`` checkpoints."""
    final = Path(checkpoint_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_directory(final, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        opt_state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, sort_keys=True) + "\n")
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: SpecStreamModel, optimizer) -> dict[str, Any]:
    """Restore a checkpoint of :func:`save_checkpoint` into ``model`` and ``optimizer`` (whose
    state must be initialised for the model's trainable parameters); returns its state.json."""
    path = Path(path)
    tensors = mx.load(str(path / "trainable.safetensors"))
    own = dict(tree_flatten(model.trainable_parameters()))
    wrong = sorted(set(tensors) ^ set(own)) + sorted(k for k in set(tensors) & set(own)
                                                      if tensors[k].shape != own[k].shape)
    if wrong:
        raise ValueError(f"Checkpoint {path} does not match this model's trainable parameters (e.g. {wrong[:8]}); "
                         "resume with the same arguments it was trained with.")
    model.load_weights(list(tensors.items()), strict=False)
    saved = mx.load(str(path / "optimizer.safetensors"))
    current = {k for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    if set(saved) != current:
        raise ValueError(f"Checkpoint {path}: the optimizer state does not match this run's; resume with the "
                         "same arguments it was trained with.")
    for k, v in saved.items():
        _set_leaf(optimizer.state, k.split("."), v)
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / "state.json").read_text())


def _set_leaf(tree, parts: list[str], value: mx.array) -> None:
    for p in parts[:-1]:
        tree = tree[int(p)] if isinstance(tree, list) else tree[p]
    if isinstance(tree, list):
        tree[int(parts[-1])] = value
    else:
        tree[parts[-1]] = value


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors.index.json") or (name.startswith("model") and name.endswith(".safetensors"))


def write_model_dir(out_dir: Path, source_dir: Path, model: SpecStreamModel, prompt_template: Optional[str],
                    records: dict[str, str], *, overwrite: bool, new_base: bool = False) -> Path:
    """The final model directory (see the module docstring), written atomically. ``records``:
    file name -> text (training_args.json, train_metrics.json, train_log.jsonl). ``new_base``
    (shared mode): write the model's own base weights instead of linking the source's."""
    source_dir = Path(source_dir)
    config = read_config(source_dir)
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        for src in sorted(source_dir.iterdir()):
            if src.is_file() and src.name not in ("config.json", EXTRAS_FILE, *RUN_RECORDS) and not (
                    new_base and _is_weights(src.name)):
                _link_or_copy(src, tmp / src.name)
        if new_base:
            weights = {k.replace(".base.", "."): v for k, v in tree_flatten(model.base.parameters())
                       if ".lora_" not in k}
            mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        config.pop(CONFIG_KEY, None)
        if model.num_streams:
            config[CONFIG_KEY] = model.spec.to_dict()
            mx.save_safetensors(str(tmp / EXTRAS_FILE), extras_from_model(model), metadata={"format": "mlx"})
        config[PROMPT_TEMPLATE_KEY] = prompt_template
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in records.items():
            (tmp / name).write_text(text)
    return Path(out_dir)
