"""Model classes: mlx-lm's own for every family it has, ours (in mlx-lm's model-file shape)
for a family it lacks.

A model directory's ``model_type`` picks the class exactly as mlx-lm picks it
(``mlx_lm.models.<model_type>``, with mlx-lm's own remapping, e.g. mistral -> llama), so a
converted directory loads in mlx-lm too. OPT, the paper's family, is the one family mlx-lm
lacks: :mod:`.opt` is written in mlx-lm's model-file interface (``ModelArgs``, ``Model``,
``layers``, ``sanitize``) and plugs in the same way.
"""

from __future__ import annotations

import importlib
from typing import Any

import mlx.nn as nn

# model_type -> module of this package, for families mlx-lm does not have
OWN_FAMILIES = {"opt": "opt"}

# Families tested end to end (PyTorch training -> convert -> generate, speculative == plain).
# Any other family mlx-lm runs whose attention follows its standard cache/rope protocol
# loads and speculates too; the wrapper checks it reproduces the model's own logits.
TESTED_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "phi", "phi3", "olmo2", "smollm3", "opt",
)


def model_classes(config: dict[str, Any]) -> tuple[type, type]:
    """``(Model, ModelArgs)`` for a Hugging Face config dict, chosen as mlx-lm chooses them."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError("config.json has no 'model_type'; it must name the architecture (e.g. 'llama').")
    if model_type in OWN_FAMILIES:
        module = importlib.import_module(f"{__name__}.{OWN_FAMILIES[model_type]}")
        return module.Model, module.ModelArgs
    from mlx_lm.utils import _get_classes  # mlx-lm's own choice, remapping included

    try:
        return _get_classes(config)
    except ValueError:
        raise ValueError(
            f"Unsupported model_type {model_type!r}: mlx-lm has no model of that type. Tested families: "
            f"{', '.join(TESTED_FAMILIES)}; other mlx-lm families load too."
        ) from None


def build_model(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised model (mlx-lm's class for the family) for a Hugging Face config dict."""
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))
