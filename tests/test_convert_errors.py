"""Bad inputs fail through ``specstream convert`` with one clear line, a non-zero exit code
and no output left behind; a failure mid-write leaves nothing (or the old model) either."""

from __future__ import annotations

import json
import pickle

import pytest
from test_convert_fixtures import copy_checkpoint, leftovers, run_cli, safetensors_torch, tiny_checkpoint, torch

from mlx_specstream.convert import ConversionError, convert
from mlx_specstream.convert import pipeline


@pytest.fixture
def src(tmp_path):
    return copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "src")


def _fails(capsys, tmp_path, src, *extra, match: str) -> str:
    capsys.readouterr()  # drop the fixtures' output
    code = run_cli(["--hf-path", str(src), "--mlx-path", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert leftovers(tmp_path, "out") == []
    return err


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_refused_and_never_executed(capsys, tmp_path, src):
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.ones(2)}, src / "pytorch_model.bin")
    # Swap the pickle inside the valid zip for one that calls os.system.
    import zipfile

    path = src / "pytorch_model.bin"
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in entries if n.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"model.embed_tokens.weight": _Evil(marker)}, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    err = _fails(capsys, tmp_path, src, match="posix.system")
    assert "nothing was executed" in err
    assert not marker.exists()


def test_truncated_safetensors(capsys, tmp_path, src):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _fails(capsys, tmp_path, src, match="truncated")


def test_missing_shard(capsys, tmp_path):
    src = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "src", "sharded")
    (src / "model-00002-of-00002.safetensors").unlink()
    _fails(capsys, tmp_path, src, match="model-00002-of-00002.safetensors is missing")


def test_wrong_shapes_listed(capsys, tmp_path, src):
    _edit_config(src, intermediate_size=48)
    err = _fails(capsys, tmp_path, src, match="shape mismatches (12)")
    assert "model.layers.0.mlp.up_proj.weight (64, 32) (expected (48, 32))" in err


def test_wrong_stream_block_listed(capsys, tmp_path, src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["speculative_streaming"]["num_streams"] = 4
    (src / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, tmp_path, src, match="stream_embeddings (3, 32) (expected (4, 32))")


def test_unmapped_and_missing_tensors_listed(capsys, tmp_path, src):
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.mystery.weight"] = torch.ones(3)
    del tensors["model.norm.weight"]
    safetensors_torch.save_file(tensors, str(src / "model.safetensors"))
    err = _fails(capsys, tmp_path, src, match="unmapped source tensors (1): model.layers.0.mystery.weight")
    assert "missing target tensors (1): model.norm.weight" in err


def test_unknown_model_type(capsys, tmp_path, src):
    _edit_config(src, model_type="not_a_model")  # every family mlx-lm has converts; this one it lacks
    _fails(capsys, tmp_path, src, match="model_type 'not_a_model', which mlx-specstream does not support")


def test_config_lacking_keys_the_family_needs(capsys, tmp_path, src):
    _edit_config(src, model_type="gpt_neox")  # an mlx-lm family, but a llama config lacks its keys
    _fails(capsys, tmp_path, src, match="config.json lacks layer_norm_eps, rotary_emb_base, rotary_pct")


def test_existing_destination_refused_without_force(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    code = run_cli(["--hf-path", str(src), "--mlx-path", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "already exists; pass --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run_cli(["--hf-path", str(src), "--mlx-path", str(out), "--force"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path, "out") == ["out"]


def test_bad_options(capsys, tmp_path, src):
    _fails(capsys, tmp_path, src, "--dtype", "float8", match="dtype must be one of")
    _fails(capsys, tmp_path, src, "-q", "--q-bits", "3", match="q_bits in (4, 8)")


def test_destination_inside_source_refused(tmp_path, src):
    with pytest.raises(ConversionError, match="would overwrite the source"):
        convert(src, src, force=True)
    assert (src / "model.safetensors").is_file()


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_while_writing_leaves_nothing(monkeypatch, tmp_path, src, exc, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("previous model")
    calls = []
    real = pipeline._produce

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_produce", failing)
    with pytest.raises(type(exc)):
        convert(src, out, force=True, max_shard_size=4096)
    if existing:
        assert [p.name for p in out.iterdir()] == ["old.txt"]
        assert leftovers(tmp_path, "out") == ["out"]
    else:
        assert leftovers(tmp_path, "out") == []
