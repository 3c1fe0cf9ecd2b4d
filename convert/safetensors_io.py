"""Read safetensors files tensor by tensor, validating the header against the file size.

Format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``name -> {dtype, shape, data_offsets: [begin, end]}`` plus optional ``__metadata__``),
then the data; offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .errors import ConversionError
from .tensors import RAW_DTYPES, TensorRef, to_mx

# safetensors dtype code -> canonical name
_CODES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_MAX_HEADER = 100 * 2**20  # the format's own limit


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict without ``__metadata__``, byte offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"it has only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, f"its header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n


def safetensors_refs(path: str | Path) -> dict[str, TensorRef]:
    """``name -> TensorRef`` for every tensor of one safetensors file (no data read)."""
    path = Path(path)
    header, start = read_header(path)
    data_size = path.stat().st_size - start
    refs = {}
    for name, info in header.items():
        code = info.get("dtype") if isinstance(info, dict) else None
        if code not in _CODES:
            raise ConversionError(
                f"Tensor {name!r} in {path} has dtype {code!r}, which the converter does not read "
                f"(supported: {', '.join(_CODES)}). Re-save the checkpoint in float16/bfloat16/float32."
            )
        dtype, shape = _CODES[code], tuple(int(d) for d in info.get("shape", ()))
        begin, end = (int(x) for x in info.get("data_offsets", (0, -1)))
        expected = math.prod(shape) * RAW_DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise _corrupt(path, f"tensor {name!r} spans bytes [{begin}, {end}) but {shape} {dtype} needs {expected}")
        if end > data_size:
            raise _corrupt(
                path,
                f"tensor {name!r} ends at data byte {end} but the file holds only {data_size} bytes "
                "of data (truncated download or interrupted save?)",
            )
        refs[name] = TensorRef(shape, dtype, str(path), _reader(path, start + begin, shape, dtype))
    return refs


def _reader(path: Path, offset: int, shape: tuple[int, ...], dtype: str):
    def read():
        raw_dtype = RAW_DTYPES[dtype]
        with open(path, "rb") as f:
            f.seek(offset)
            buf = f.read(math.prod(shape) * raw_dtype.itemsize)
        return to_mx(np.frombuffer(buf, dtype=raw_dtype).reshape(shape), dtype)

    return read


def _corrupt(path: Path, why: str) -> ConversionError:
    return ConversionError(
        f"{path} is not a valid safetensors file: {why}. Re-download or re-save the checkpoint."
    )
