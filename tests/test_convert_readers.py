"""Tensor readers: safetensors and torch.save zip pickles read exactly, without torch."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
from test_convert_fixtures import safetensors_torch, torch

import mlx.core as mx

from mlx_specstream.convert.errors import ConversionError
from mlx_specstream.convert.safetensors_io import safetensors_refs
from mlx_specstream.convert.torch_pickle import torch_bin_refs


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": base,
        "transposed": torch.randn(5, 6, generator=g).t(),  # non-contiguous strides
        "view_with_offset": base[2:],  # shares base's storage at an offset
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "i64": torch.arange(5),
        "flags": torch.tensor([True, False, True]),
        "param": torch.nn.Parameter(torch.randn(4, generator=g)),
        "scalar": torch.tensor(3.5),
    }


def _numpy(v: mx.array) -> np.ndarray:
    return np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)


def _expected(t) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    if t.dtype == torch.float64:
        return t.float().numpy()  # the reader narrows float64 to float32
    return t.numpy()


def test_torch_zip_reader_matches_torch_load(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "w.bin")
    refs = torch_bin_refs(tmp_path / "w.bin")
    assert set(refs) == set(sd)
    for name, t in sd.items():
        assert refs[name].shape == tuple(t.shape), name
        got = _numpy(refs[name].read())
        assert got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, _expected(t), err_msg=name)
    assert refs["bf16"].read().dtype == mx.bfloat16
    assert refs["f16"].read().dtype == mx.float16


def test_safetensors_reader_matches_safetensors(tmp_path):
    sd = {k: v.detach().contiguous() for k, v in _state_dict().items() if k != "view_with_offset"}
    safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
    refs = safetensors_refs(tmp_path / "w.safetensors")
    for name, t in sd.items():
        np.testing.assert_array_equal(_numpy(refs[name].read()), _expected(t), err_msg=name)
    assert refs["bf16"].read().dtype == mx.bfloat16


def test_truncated_safetensors_named_in_error(tmp_path):
    safetensors_torch.save_file({"w": torch.ones(64, 64)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-100])
    with pytest.raises(ConversionError, match="truncated"):
        safetensors_refs(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(data[:5])
    with pytest.raises(ConversionError, match="not a valid safetensors file"):
        safetensors_refs(tmp_path / "w.safetensors")


def test_legacy_torch_format_refused(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(ConversionError, match="legacy"):
        torch_bin_refs(tmp_path / "old.bin")


def _zip_with_pickle(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["os.system", "reduce", "builtins.eval", "nested"])
def test_pickle_globals_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = b"\x80\x02cos\nsystem\nX" + _len(f"touch {marker}") + b"\x85R."
    elif how == "reduce":
        payload = pickle.dumps({"w": _Evil(marker)}, protocol=2)  # pickles as posix.system
    elif how == "builtins.eval":
        payload = b"\x80\x02cbuiltins\neval\nX" + _len(f"open('{marker}', 'w')") + b"\x85R."
    else:  # a legitimate-looking state dict hiding the call in a value
        payload = pickle.dumps({"w": [1, _Evil(marker)]}, protocol=2)
    _zip_with_pickle(tmp_path / "evil.bin", payload)
    with pytest.raises(ConversionError, match=r"Refusing to load .*'(os|posix|builtins)\.(system|eval)'"):
        torch_bin_refs(tmp_path / "evil.bin")
    assert not marker.exists()


def _len(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(4, "little") + raw


def test_non_state_dict_pickle_refused(tmp_path):
    _zip_with_pickle(tmp_path / "list.bin", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ConversionError, match="flat state dict"):
        torch_bin_refs(tmp_path / "list.bin")


def test_truncated_storage_refused(tmp_path):
    torch.save({"w": torch.ones(32, 32)}, tmp_path / "w.bin")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "w.bin") as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:100] if info.filename.endswith("data/0") else data)
    (tmp_path / "cut.bin").write_bytes(buf.getvalue())
    with pytest.raises(ConversionError, match="corrupt"):
        torch_bin_refs(tmp_path / "cut.bin")
