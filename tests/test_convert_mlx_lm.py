"""The base part of a converted directory is an ordinary mlx-lm model: ``mlx_lm.load`` reads
it (ignoring the stream extras file and the config block) and its logits match PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest
from test_convert_fixtures import reference_logits, tiny_checkpoint

import mlx.core as mx

from mlx_specstream.convert import convert
from mlx_specstream.loading import load_model

mlx_lm = pytest.importorskip("mlx_lm")

IDS = np.random.default_rng(2).integers(0, 259, size=(1, 12))


@pytest.mark.parametrize("variant", ["llama", "qwen2", "phi"])
def test_mlx_lm_loads_converted_base(variant, tmp_path):
    src = tiny_checkpoint(variant)
    convert(src, tmp_path / "out", max_shard_size=30_000)  # sharded: mlx-lm must glob every shard
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    model, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    assert tokenizer.encode("hi")[-2:] == [104, 105]
    got = np.array(model(mx.array(IDS))[0])
    main, _, _ = reference_logits(src, IDS)
    np.testing.assert_allclose(got, main, atol=1e-4, rtol=0)


def test_mlx_lm_loads_quantized_output_like_the_runtime(tmp_path):
    src = tiny_checkpoint("llama")
    convert(src, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    model, _ = mlx_lm.load(str(tmp_path / "q8"))
    ours, _ = load_model(tmp_path / "q8")
    np.testing.assert_allclose(
        np.array(model(mx.array(IDS))[0]), np.array(ours.all_logits(mx.array(IDS))[0][0]), atol=1e-5, rtol=0
    )
