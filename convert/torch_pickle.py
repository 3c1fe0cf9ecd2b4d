"""Read PyTorch ``.bin`` checkpoints without importing torch and without running pickle code.

``torch.save`` writes a zip: ``<name>/data.pkl`` (the pickled state dict), one raw entry per
storage under ``<name>/data/<key>``, and ``<name>/byteorder``. The pickle rebuilds each
tensor as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` where the
storage is a persistent id ``('storage', torch.FloatStorage, key, location, numel)``.

A restricted unpickler maps exactly those globals (plus ``collections.OrderedDict``) to
inert local stand-ins and refuses every other global *before* anything is called, naming
it: a malicious pickle (``os.system``, ``builtins.eval``, ...) fails to load and its code
never runs. Tensors are then read from their storage entries with numpy (dtype, offset,
stride), one at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConversionError
from .tensors import RAW_DTYPES, TensorRef, to_mx

_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise ConversionError(f"Malformed tensor record: storage is {type(storage).__name__}, not a storage.")
    return _Tensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data  # an nn.Parameter is its tensor for our purposes


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise ConversionError(
            f"Refusing to load {self.path}: its pickle refers to the Python global "
            f"'{module}.{name}', which a tensor checkpoint never needs (only tensor-rebuild and "
            "storage globals are allowed; nothing was executed). If you trust the file, re-save "
            "it as safetensors with PyTorch and convert that."
        )

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        )
        if not ok:
            raise ConversionError(f"{self.path} has an unexpected storage record {pid!r}; re-save it with torch.save.")
        return _Storage(pid[2], pid[1].dtype, pid[4])


def torch_bin_refs(path: str | Path) -> dict[str, TensorRef]:
    """``name -> TensorRef`` for a ``torch.save``'d state dict (zip format), no data read."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ConversionError(
            f"{path} is not a zip-format PyTorch checkpoint (legacy pre-1.6 format, or a truncated "
            "file). Re-save it with torch.save in PyTorch >= 1.6, or as safetensors."
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ConversionError(f"{path} has no single '<name>/data.pkl' entry; it is not a torch.save checkpoint.")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() != b"little":
            raise ConversionError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one.")
        data = zf.read(pkl[0])
        sizes = {n: zf.getinfo(n).file_size for n in names}
    try:
        obj = _RestrictedUnpickler(data, path).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{path} has a corrupt pickle ({e}); re-save or re-download it.") from e
    if not isinstance(obj, dict) or not all(isinstance(v, _Tensor) for v in obj.values()):
        raise ConversionError(
            f"{path} does not hold a flat state dict (name -> tensor). Save model.state_dict() "
            "(e.g. with save_pretrained) and convert that."
        )
    refs = {}
    for name, t in obj.items():
        entry = f"{prefix}data/{t.storage.key}"
        _check_bounds(path, name, t, sizes.get(entry))
        refs[str(name)] = TensorRef(t.size, t.storage.dtype, f"{path}:{entry}", _reader(path, entry, t))
    return refs


def _check_bounds(path: Path, name: str, t: _Tensor, entry_size: int | None) -> None:
    itemsize = RAW_DTYPES[t.storage.dtype].itemsize
    if entry_size is None:
        raise ConversionError(f"{path} lacks the storage of tensor {name!r}; the file is incomplete, re-save it.")
    if entry_size != t.storage.numel * itemsize:
        raise ConversionError(
            f"Storage of {name!r} in {path} has {entry_size} bytes, expected {t.storage.numel * itemsize}; "
            "the file is corrupt, re-save it."
        )
    if len(t.size) != len(t.stride):
        raise ConversionError(f"Tensor {name!r} in {path} has size {t.size} but stride {t.stride}.")
    if math.prod(t.size) == 0:
        return
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride))
    if t.offset < 0 or any(st < 0 for st in t.stride) or last >= t.storage.numel:
        raise ConversionError(f"Tensor {name!r} in {path} reaches outside its storage; the file is corrupt.")


def _reader(path: Path, entry: str, t: _Tensor):
    def read():
        raw_dtype = RAW_DTYPES[t.storage.dtype]
        with zipfile.ZipFile(path) as zf:
            flat = np.frombuffer(zf.read(entry), dtype=raw_dtype)
        strides = tuple(s * raw_dtype.itemsize for s in t.stride)
        view = np.lib.stride_tricks.as_strided(flat[t.offset :], shape=t.size, strides=strides, writeable=False)
        return to_mx(view.copy(order="C"), t.storage.dtype)  # ascontiguousarray would make 0-d 1-d

    return read
