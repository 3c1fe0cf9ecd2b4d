"""Convert fine-tuned PyTorch / Hugging Face checkpoints into MLX model directories.

``convert(hf_path, mlx_path, ...)`` is the whole API; ``specstream convert`` is a thin CLI
over it. Modules, in pipeline order: ``source`` (local dir or Hub id), ``inventory`` +
``safetensors_io`` + ``torch_pickle`` (tensor readers), ``peft`` (LoRA merge), ``mapping``
(strict name/shape check against the runtime), ``quantize``, ``writer`` (atomic output),
``pipeline`` (the orchestration).
"""

from .errors import ConversionError
from .pipeline import ConversionResult, convert

__all__ = ["ConversionError", "ConversionResult", "convert"]
