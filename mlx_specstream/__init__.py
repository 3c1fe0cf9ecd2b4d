"""Speculative Streaming for MLX: fast generation from one fine-tuned model, no draft model."""

from .config import SpecStreamConfig
from .generate import GenerationResponse, PromptCache, generate, make_prompt_cache, stream_generate
from .loading import load, load_model, save_model
from .streams import SpecStreamModel

__version__ = "0.1.0"

__all__ = [
    "GenerationResponse",
    "PromptCache",
    "SpecStreamConfig",
    "SpecStreamModel",
    "generate",
    "load",
    "load_model",
    "make_prompt_cache",
    "save_model",
    "stream_generate",
]
