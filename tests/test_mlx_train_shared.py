"""The MLX trainer, shared mode: LoRA shared by main stream and streams. Its chunked gradients
equal the whole-sequence loss's; a run lowers both losses, fuses LoRA into the saved base and
writes a directory whose speculative greedy output equals its plain greedy output."""

from __future__ import annotations

import pytest
from test_mlx_train import _batch, _write_data, assert_chunked_equals_whole_sequence, four_bit_base

import mlx.core as mx

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.loading import load_model
from mlx_specstream.mlx_train import Options, count_targets, train
from mlx_specstream.mlx_train.shared import attach_shared_lora, freeze_for_shared
from mlx_specstream.testing import random_model, tiny_config, write_tiny_model_dir


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_shared_gradients_equal_whole_sequence_loss(family):
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2, mode="shared", stream_init="linear", stream_init_rank=4)
    model = random_model(tiny_config(family, vocab_size=64), spec, seed=3)
    assert attach_shared_lora(model, 4, 8.0, None, seed=0) == 4 * 4  # q, k, v, o of every layer
    for _, module in model.base.named_modules():  # non-zero b, so every LoRA factor gets a gradient
        if "lora_b" in module:
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    freeze_for_shared(model)
    ids, labels = _batch(20)
    counts = count_targets([labels], model.num_streams, False)
    assert_chunked_equals_whole_sequence(
        model, ids, labels, counts,
        (Options(chunk_size=4, prefill_chunk=8), Options(chunk_size=7, head_rows=9, grad_checkpoint=True)))


def test_shared_run_trains_both_streams_and_fuses_lora(tmp_path):
    from mlx_specstream import load

    base = write_tiny_model_dir(tmp_path / "base", "llama", spec=None, hidden_size=32, num_hidden_layers=3)
    data = _write_data(tmp_path / "train.jsonl")
    result = train(base, data, tmp_path / "out", mode="shared", streams=2, msa_layers=2, lora_rank=4, epochs=4,
                   lr=1e-2, batch_size=4, eval_examples=4, progress=False, pruning_rank=4)
    first, last = result.metrics["initial_eval"], result.metrics["eval"]
    for name in ("main", "stream1", "stream2"):
        assert last[f"{name}.loss"] < first[f"{name}.loss"] - 0.5, name
    weights = mx.load(str(result.output_dir / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    model, _ = load(str(result.output_dir))
    plain, _ = load_model(base)
    tokens = mx.array([[5, 9, 33, 97, 98, 32, 99]])
    assert not mx.allclose(model(tokens), plain(tokens), atol=1e-3).item()  # the main stream was fine-tuned
    prompt = mx.array([48, 58, 32, 97, 98, 32], dtype=mx.int32)
    spec_ids = [t for s in generate_step(model, prompt, max_tokens=30, tree="2,1") for t in s.tokens][:30]
    ar = [t for s in generate_step(model, prompt, max_tokens=30, speculate=False) for t in s.tokens][:30]
    assert spec_ids == ar


def test_shared_mode_refuses_a_quantized_base_and_full_fine_tuning(tmp_path):
    base = four_bit_base(tmp_path, 2)
    data = _write_data(tmp_path / "train.jsonl", n=8)
    with pytest.raises(ValueError, match="float base"):
        train(base, data, tmp_path / "out", mode="shared", streams=2, msa_layers=1, progress=False)
    with pytest.raises(ValueError, match="lora-rank"):
        train(base, data, tmp_path / "out", mode="shared", lora_rank=0, progress=False)
