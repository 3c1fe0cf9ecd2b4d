"""PyTorch fine-tuning recipe for Speculative Streaming checkpoints (the ``train`` extra).

Public API:

* :class:`SpecStreamLM` - streams on a Hugging Face causal LM; the float32 reference.
* :func:`run_training` / :class:`TrainArgs` / :class:`TrainResult` - the recipe.
* :mod:`.tiny` - tiny random models and checkpoints for tests.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "mlx_specstream.train needs PyTorch; install the extra: pip install -e '.[train]'"
    ) from e

from .loop import TrainArgs, TrainResult, evaluate, run_training
from .model import SpecStreamLM, SpecStreamOutput, StreamHidden

__all__ = ["SpecStreamLM", "SpecStreamOutput", "StreamHidden", "TrainArgs", "TrainResult", "evaluate",
           "run_training"]
