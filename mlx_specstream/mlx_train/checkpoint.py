"""Resumable checkpoints and the final model directory of the MLX trainer, each written
atomically (:func:`mlx_specstream.train_common.files.atomic_directory`), so an interrupted
run never leaves a half-written checkpoint or output. Resume checkpoints live in
``{checkpoint_dir}/step-{N:08d}/``: ``trainable.safetensors`` (every trainable parameter by
its name in the model), ``optimizer.safetensors`` (the optimizer's state tree,
flattened) and ``state.json`` (step, fingerprint, history).

The output is a model directory :func:`mlx_specstream.load` reads: the source directory's
files (base weights, quantized or not, tokenizer) hard-linked (copied where links fail)
unchanged, ``config.json`` with the run's ``speculative_streaming`` block and
``prompt_template``, ``speculative_streams.safetensors``, and the run's records.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_specstream.config import CONFIG_KEY, EXTRAS_FILE, read_config
from mlx_specstream.datasets import PROMPT_TEMPLATE_KEY
from mlx_specstream.loading import extras_from_model
from mlx_specstream.streams import SpecStreamModel
from mlx_specstream.train_common.files import RUN_RECORDS, atomic_directory, checkpoint_path, keep_newest, write_state


def save_checkpoint(checkpoint_dir: Path, step: int, model: SpecStreamModel, optimizer, state: dict[str, Any],
                    *, keep: int = 2) -> Path:
    """Write ``step-{step}`` atomically, then delete all but the newest ``keep`` checkpoints."""
    final = checkpoint_path(checkpoint_dir, step)
    with atomic_directory(final, overwrite=True) as tmp:
        mx.save_safetensors(str(tmp / "trainable.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        opt_state = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        write_state(tmp, state, step)
    keep_newest(checkpoint_dir, keep)
    return final


def load_trainable(path: Path, model: SpecStreamModel) -> None:
    """Load a checkpoint's ``trainable.safetensors`` into ``model``, whose trainable parameters
    must be exactly the checkpoint's (names and shapes)."""
    path = Path(path)
    tensors = mx.load(str(path / "trainable.safetensors"))
    own = dict(tree_flatten(model.trainable_parameters()))
    wrong = sorted(set(tensors) ^ set(own)) + sorted(k for k in set(tensors) & set(own)
                                                      if tensors[k].shape != own[k].shape)
    if wrong:
        raise ValueError(f"Checkpoint {path} does not match this model's trainable parameters (e.g. {wrong[:8]}); "
                         "use the same arguments it was trained with.")
    model.load_weights(list(tensors.items()), strict=False)


def load_checkpoint(path: Path, model: SpecStreamModel, optimizer) -> dict[str, Any]:
    """Restore a checkpoint of :func:`save_checkpoint` into ``model`` and ``optimizer`` (whose
    state must be initialised for the model's trainable parameters); returns its state.json."""
    path = Path(path)
    load_trainable(path, model)
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
