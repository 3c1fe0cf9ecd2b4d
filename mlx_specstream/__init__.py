"""Speculative Streaming for MLX: fast generation from one fine-tuned model, no draft model."""

from .config import SpecStreamConfig
from .generate import GenerationResponse, generate, stream_generate
from .loading import load, load_model, save_model
from .streams import SpecStreamModel

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "SpecStreamConfig",
    "SpecStreamModel",
    "generate",
    "load",
    "load_model",
    "save_model",
    "stream_generate",
]
