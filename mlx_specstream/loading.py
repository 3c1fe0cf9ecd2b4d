"""Load and save model directories per the checkpoint convention (DESIGN.md).

A directory holds config.json (with an optional ``speculative_streaming`` block and an
optional ``quantization`` entry), base weights in ``model*.safetensors`` under Hugging Face
names, the extras in ``speculative_streams.safetensors``, and tokenizer files.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import CONFIG_KEY, EXTRAS_FILE, read_config, spec_config_from
from .hub import hub_snapshot, looks_like_hub_id
from .models import model_classes
from .streams import SpecStreamModel

PathLike = Union[str, Path]
DEMO_DIR = Path(__file__).parent / "demo"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def default_model_path() -> Path:
    if not (DEMO_DIR / "config.json").is_file():
        raise FileNotFoundError(
            "No bundled demo model in this installation; pass --model DIR (a converted model directory)."
        )
    return DEMO_DIR


def resolve_model_path(path: Optional[PathLike]) -> Path:
    """A model directory: the bundled demo (None), a local path, or a Hugging Face hub id
    (:mod:`.hub`: the local cache first)."""
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_hub_id(str(path)):
            return hub_snapshot(str(path))
        raise FileNotFoundError(
            f"Model directory {p} does not exist; pass a converted model directory or a Hugging Face repo id "
            "(org/name)."
        )
    if not p.is_dir():
        raise NotADirectoryError(f"{p} is a file; pass the model directory that contains config.json.")
    return p


def extras_to_module_names(model: SpecStreamModel, extras: dict[str, mx.array]) -> dict[str, mx.array]:
    """Canonical extras names (config.py) -> this model's parameter names."""
    layer_prefix = layers_prefix(model)
    out = {}
    for k, v in extras.items():
        if k.startswith("stream_lora."):
            _, idx, rest = k.split(".", 2)
            path, leaf = rest.rsplit(".", 1)
            out[f"base.{layer_prefix}.{idx}.{path}.{leaf}"] = v
        else:
            out[k] = v
    return out


def extras_from_model(model: SpecStreamModel) -> dict[str, mx.array]:
    """This model's extra parameters under the canonical names of the checkpoint convention."""
    out = {}
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        if not k.startswith("base."):
            out[k] = v
    for name, module in model.stream_lora_modules().items():
        out[f"stream_lora.{name}.lora_a"] = module.lora_a
        out[f"stream_lora.{name}.lora_b"] = module.lora_b
    return out


def layers_prefix(model: SpecStreamModel) -> str:
    """Where the decoder layers sit in the base model's tree (``model.layers``, ...)."""
    first = model.base.layers[0]
    for name, module in model.base.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0]
    raise AssertionError("decoder layers not found in the model tree")


def load_model(
    path: PathLike, dtype: Optional[str] = None, streams: Optional[PathLike] = None
) -> tuple[SpecStreamModel, dict[str, Any]]:
    """Build the model of a directory and load its weights; returns (model, config).

    The base is loaded exactly as mlx-lm loads it (its class for the ``model_type``, its
    ``sanitize``, its quantization); the stream extras are attached on top. ``streams``: a
    model directory (or hub id) whose streams to attach instead of the base's own, e.g. the
    streams trained on a float copy of this base, on its 4-bit copy; the two must be the same
    base (family, layers, width, vocabulary).
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = Path(path)
    config = read_config(path)
    extras_dir = path
    if streams is not None:
        extras_dir = resolve_model_path(streams)
        config = {**config, CONFIG_KEY: _streams_block(extras_dir, config)}
    spec = spec_config_from(config, unknown="warn")  # a newer version's keys: ignored, with a warning
    model_classes(config)  # an unknown model_type: our message, before mlx-lm's
    if not glob.glob(str(path / "model*.safetensors")):
        raise FileNotFoundError(
            f"No model*.safetensors weights in {path}. Convert the checkpoint first "
            "(specstream convert --hf-path SRC --mlx-path DST)."
        )
    try:
        base, _ = mlx_lm_load_model(path, get_model_classes=model_classes)
    except TypeError as e:  # the family's ModelArgs lacks a field config.json does not give
        raise ValueError(
            f"config.json of {path} does not describe a {config['model_type']} model mlx-lm can build: {e}"
        ) from e
    except ValueError as e:
        raise ValueError(f"Weights in {path} do not match the model config: {e}") from e
    except RuntimeError as e:  # mlx's error for an unreadable safetensors file
        raise ValueError(f"Could not read the weights in {path}: {e}. A file may be truncated; re-convert it.") from e
    model = SpecStreamModel(base, spec)
    if spec is not None and spec.num_streams > 0:
        extras_file = extras_dir / EXTRAS_FILE
        if not extras_file.is_file():
            raise FileNotFoundError(
                f"config.json of {extras_dir} has a '{CONFIG_KEY}' block but {EXTRAS_FILE} is missing; "
                "re-convert the checkpoint with its stream extras."
            )
        model.attach_stream_lora()
        extras = extras_to_module_names(model, mx.load(str(extras_file)))
        expected = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("base.") or ".lora_" in k}
        _load_strict_subset(model, extras, expected, f"Stream extras in {extras_file}")
    if dtype is not None:
        cast_model(model, dtype)
    mx.eval(model.parameters())
    model.check_family()
    model.eval()
    model.config = config  # plain dict (prompt template, ids); not a parameter
    return model, config


SAME_BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")


def _streams_block(streams_dir: Path, base_config: dict[str, Any]) -> dict[str, Any]:
    """The ``speculative_streaming`` block of ``streams_dir``, after checking it was trained on
    the same base as ``base_config`` describes (dtype and quantization may differ)."""
    other = read_config(streams_dir)
    block = other.get(CONFIG_KEY)
    if not block:
        raise ValueError(f"{streams_dir} has no '{CONFIG_KEY}' block in config.json: it carries no streams to attach.")
    differ = [f"{k} {other.get(k)!r} vs {base_config.get(k)!r}" for k in SAME_BASE_KEYS
              if other.get(k) != base_config.get(k)]
    if differ:
        raise ValueError(
            f"The streams in {streams_dir} were trained on another base than this model ({'; '.join(differ)}); "
            "attach streams trained on a copy of this base."
        )
    # a tuned verdict was measured with the other copy's weights: keep only its tree
    return {k: v for k, v in block.items() if k not in ("speculate", "tuned_on")}


def _load_strict_subset(model: nn.Module, weights: dict, expected: dict, what: str) -> None:
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} do not match the config block: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}."
        )
    model.load_weights(list(weights.items()), strict=False)


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def cast_model(model: nn.Module, dtype: str) -> None:
    """Cast floating-point parameters (not quantized integers/scales) to ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    target = DTYPES[dtype]
    params = [(k, v.astype(target)) for k, v in tree_flatten(model.parameters())
              if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases"))]
    model.load_weights(params, strict=False)


def load_tokenizer(path: PathLike, config: Optional[dict[str, Any]] = None):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, EOS ids, chat template)."""
    from mlx_lm.tokenizer_utils import load as load_tok

    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FileNotFoundError(f"No tokenizer files in {path} (tokenizer.json or tokenizer.model).")
    eos = (config or {}).get("eos_token_id")
    return load_tok(path, eos_token_ids=eos)


def load(path: Optional[PathLike] = None, dtype: Optional[str] = None, streams: Optional[PathLike] = None):
    """Load ``(model, tokenizer)`` from a model directory or Hugging Face hub id (the bundled
    demo model by default); ``streams``: attach another directory's streams (:func:`load_model`)."""
    from .host import prepare_for_decoding

    path = resolve_model_path(path)
    model, config = load_model(path, dtype=dtype, streams=streams)
    tokenizer = load_tokenizer(path, config)
    prepare_for_decoding()
    return model, tokenizer


def save_model(
    model: SpecStreamModel,
    config: dict[str, Any],
    path: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    force: bool = False,
    quantization: Optional[dict[str, int]] = None,
) -> Path:
    """Write a model directory atomically: a temporary sibling, then a rename.

    An existing ``path`` is refused unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; choose another path or pass force=True (--force).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = dict(config)
        if model.spec is not None:
            config[CONFIG_KEY] = model.spec.to_dict()
        if quantization:
            config["quantization"] = dict(quantization)
        base = dict(tree_flatten(model.base.parameters()))
        base = {k.replace(".base.", "."): v for k, v in base.items() if ".lora_" not in k}
        mx.save_safetensors(str(tmp / "model.safetensors"), base, metadata={"format": "mlx"})
        if model.num_streams:
            mx.save_safetensors(str(tmp / EXTRAS_FILE), extras_from_model(model), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
