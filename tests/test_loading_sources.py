"""Where models come from: a hub id through the local Hugging Face cache, an mlx-lm style
checkpoint without streams (quantized), and streams attached to another copy of their base."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_specstream import load
from mlx_specstream.cli.main import main
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.loading import save_model
from mlx_specstream.lookup import PromptLookup
from mlx_specstream.testing import random_model, write_tiny_model_dir

SPEC = SpecStreamConfig(num_streams=3, num_msa_layers=2, default_tree="2,1,1")


def _tokens(model, prompt, n=60, **kwargs):
    return [t for s in generate_step(model, mx.array(prompt, dtype=mx.int32), max_tokens=n, **kwargs) for t in s.tokens][:n]


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache folder holding ``org/tiny`` (as huggingface_hub lays it out)."""
    cache = tmp_path / "hf"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    write_tiny_model_dir(snapshot, "qwen2", spec=SPEC)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_id_loads_from_the_local_cache(hub_cache, capsys):
    model, tok = load("org/tiny")
    reference, _ = load(hub_cache)
    assert model.num_streams == 3
    assert _tokens(model, [5, 6, 7]) == _tokens(reference, [5, 6, 7])
    assert main(["generate", "--model", "org/tiny", "--prompt", "hi", "--max-tokens", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generation_tokens"] >= 1


def test_missing_hub_id_offline_is_one_clear_error(hub_cache, capsys):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor in the Hugging Face cache"):
        load("org/absent")
    assert main(["generate", "--model", "org/absent", "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "HF_HUB_OFFLINE" in err[0]


def _quantized_plain_copy(streams_dir, dst):
    """A 4-bit copy of the streams model's base with no streams: an mlx-community-style checkpoint."""
    config = json.loads((streams_dir / "config.json").read_text())
    config.pop("speculative_streaming")
    model, _ = load(streams_dir)
    plain = random_model(config, None)
    plain.base.load_weights([(k, v) for k, v in _base_weights(model)], strict=True)
    nn.quantize(plain.base, group_size=32, bits=4)
    save_model(plain, config, dst, tokenizer_dir=streams_dir, quantization={"bits": 4, "group_size": 32})
    return dst


def _base_weights(model):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(model.base.parameters())]


def test_streams_attach_to_a_quantized_copy_of_their_base(tmp_path):
    streams_dir = write_tiny_model_dir(tmp_path / "float", "llama", spec=SPEC, hidden_size=64)
    q_dir = _quantized_plain_copy(streams_dir, tmp_path / "q4")

    plain, _ = load(q_dir)  # runs without streams, plainly and with prompt lookup
    assert plain.num_streams == 0
    prompt = [9, 8, 7, 9, 8, 7, 9, 8]
    ar = _tokens(plain, prompt)
    assert _tokens(plain, prompt, drafter=PromptLookup(3)) == ar

    attached, _ = load(q_dir, streams=streams_dir)
    source, _ = load(streams_dir)
    assert attached.num_streams == 3 and attached.spec.default_tree == "2,1,1"
    np.testing.assert_array_equal(np.array(attached.stream_embeddings), np.array(source.stream_embeddings))
    assert "QuantizedLinear" in type(attached.base.layers[0].self_attn.q_proj).__name__
    assert _tokens(attached, prompt, speculate=False) == ar  # the quantized base's own output ...
    assert _tokens(attached, prompt) == ar  # ... which speculation keeps


def test_streams_of_another_base_are_refused(tmp_path):
    streams_dir = write_tiny_model_dir(tmp_path / "a", "llama", spec=SPEC)
    other = write_tiny_model_dir(tmp_path / "b", "llama", spec=None, hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match="trained on another base.*hidden_size 64 vs 32"):
        load(other, streams=streams_dir)
    no_streams = shutil.copytree(other, tmp_path / "c")
    with pytest.raises(ValueError, match="no 'speculative_streaming' block"):
        load(streams_dir, streams=no_streams)
