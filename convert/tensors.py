"""Checkpoint tensors described without reading their data, and the dtypes we understand.

Readers (safetensors, PyTorch zip pickles, PEFT merges) hand out :class:`TensorRef` objects:
shape, dtype and a ``read()`` that loads just that tensor. The converter plans the whole
output from refs, then reads one tensor at a time, so memory stays near one output shard.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import mlx.core as mx
import numpy as np

# canonical dtype name -> numpy dtype of the raw bytes (bfloat16 travels as uint16 bits)
RAW_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
OUTPUT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint: metadata now, data on ``read()``.

    shape: the tensor's shape; dtype: a key of :data:`RAW_DTYPES`; origin: the file (and
    entry) it comes from, for error messages; read: loads it as an ``mx.array`` of ``shape``.
    """

    shape: tuple[int, ...]
    dtype: str
    origin: str
    read: Callable[[], mx.array] = dataclasses.field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * RAW_DTYPES[self.dtype].itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def to_mx(raw: np.ndarray, dtype: str) -> mx.array:
    """Raw little-endian numpy data of canonical ``dtype`` -> ``mx.array``.

    float64 becomes float32 (MLX computes in at most float32 on every back-end).
    """
    if dtype == "bfloat16":
        return mx.array(raw.view(np.uint16)).view(mx.bfloat16)
    if dtype == "float64":
        return mx.array(raw.astype(np.float32))
    return mx.array(raw)


def output_dtype(ref: TensorRef, requested: str | None) -> mx.Dtype | None:
    """The MLX dtype a tensor is written in: floats get ``requested`` (or keep their own,
    float64 -> float32); integer tensors keep theirs (None = no cast)."""
    if not ref.is_float:
        return None
    if requested is not None:
        return OUTPUT_DTYPES[requested]
    return OUTPUT_DTYPES.get(ref.dtype, mx.float32)
