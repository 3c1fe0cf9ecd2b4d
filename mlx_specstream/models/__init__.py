"""Model families, one file each, selected by config.json's ``model_type``."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.nn as nn

# model_type -> module name in this package. Variants share code, not copies.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "phi": "phi",
    "opt": "opt",
}


def family_module(model_type: str):
    if model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported model_type {model_type!r}. Supported: {', '.join(sorted(FAMILIES))}."
        )
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised family model for a Hugging Face config dict."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no 'model_type'; it must name the architecture (e.g. 'llama').")
    module = family_module(model_type)
    return module.Model(module.ModelArgs.from_dict(config))
