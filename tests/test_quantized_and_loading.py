"""Quantized models in both modes, directory round trips, and loading errors."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _support import run_tokens

from mlx_specstream import load, load_model, save_model
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.testing import random_model, tiny_config, write_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny", "qwen2")


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 64)])
def test_quantized_runs_both_modes_and_reports_mismatch(bits, group, tmp_path, capsys):
    config = tiny_config("llama", hidden_size=128, intermediate_size=256)
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2)
    model = random_model(config, spec, seed=5)
    ref, _ = run_tokens(model, [1, 2, 3, 4], 100, speculate=False)
    nn.quantize(model.base, group_size=group, bits=bits)  # as mlx-lm quantizes a model
    emb = model.stream_embeddings
    assert emb.dtype == mx.float32  # stream extras stay in float
    q_ar, _ = run_tokens(model, [1, 2, 3, 4], 100, speculate=False)
    q_ss, _ = run_tokens(model, [1, 2, 3, 4], 100, tree="2,2,1")
    assert q_ss == q_ar  # lossless with respect to the quantized weights themselves
    mismatch = np.mean(np.array(q_ar) != np.array(ref))
    with capsys.disabled():
        print(f"\n[{bits}-bit g{group}] greedy mismatch rate vs float32: {mismatch:.2%}")
    # a quantized directory records its quantization and loads back
    out = save_model(model, config, tmp_path / "q", quantization={"bits": bits, "group_size": group})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"bits": bits, "group_size": group}
    loaded, _ = load_model(out)
    assert run_tokens(loaded, [1, 2, 3, 4], 100, tree="2,2,1")[0] == q_ar


def test_save_load_round_trip_identical(tiny_dir):
    model, tok = load(tiny_dir)
    tokens = mx.array([[5, 6, 7, 8]])
    a = model.all_logits(tokens)
    again, _ = load(tiny_dir)
    b = again.all_logits(tokens)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    assert tok.decode(tok.encode("héllo")) .endswith("héllo")


def test_plain_directory_loads_autoregressive_only(tmp_path):
    path = write_tiny_model_dir(tmp_path / "plain", "phi", spec=None)
    model, tok = load(path)
    assert model.num_streams == 0
    assert not (path / "speculative_streams.safetensors").exists()
    ids, steps = run_tokens(model, [1, 2], 20)
    assert len(ids) == 20 and all(s.accepted == 0 for s in steps)


def test_a_newer_versions_block_keys_load_with_a_warning_and_change_no_token(tiny_dir, tmp_path):
    """Generation reads a model directory whose block has keys this version does not know (a
    newer version's): it warns and ignores them, with the same tokens; training and conversion
    (``from_dict``'s default) still refuse them."""
    model, _ = load(tiny_dir)
    want = run_tokens(model, [1, 2, 3], 30, tree="2,1")[0]
    d = _copy(tiny_dir, tmp_path / "newer")
    cfg = json.loads((d / "config.json").read_text())
    cfg["speculative_streaming"]["draft_temperature"] = 0.7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"does not know: \['draft_temperature'\].*output is unchanged"):
        newer, _ = load(d)
    assert run_tokens(newer, [1, 2, 3], 30, tree="2,1")[0] == want
    with pytest.raises(ValueError, match=r"Unknown keys in 'speculative_streaming' block: \['draft_temperature'\]"):
        SpecStreamConfig.from_dict(cfg["speculative_streaming"])
    with pytest.raises(ValueError, match="unknown must be"):
        SpecStreamConfig.from_dict({}, unknown="ignore")


def test_existing_directory_not_overwritten(tiny_dir):
    with pytest.raises(FileExistsError, match="already exists"):
        write_tiny_model_dir(tiny_dir)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loading_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")
    d = _copy(tiny_dir, tmp_path / "no_extras")
    (d / "speculative_streams.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="speculative_streams.safetensors is missing"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "bad_type")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "not_a_model"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Unsupported model_type 'not_a_model'"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "no_weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No model.*safetensors"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match the model config.*Expected shape"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "incomplete")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not describe a qwen2 model.*num_attention_heads"):
        load(d)
    d = _copy(tiny_dir, tmp_path / "deep")
    model, tok = load(d)
    from mlx_specstream import generate

    with pytest.raises(ValueError, match="only 3 speculative streams"):
        generate(model, tok, "hi", tree="2,2,2,2")
    d = _copy(tiny_dir, tmp_path / "msa")
    cfg = json.loads((d / "config.json").read_text())
    cfg["speculative_streaming"]["num_msa_layers"] = 9
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="exceeds the model's 4 layers"):
        load(d)
