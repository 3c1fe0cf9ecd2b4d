"""Fused q/k/v and gate/up projections: same numbers, same parameters, no extra memory, and a
layer replaced after fusing is used (never a stale fused copy)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from _support import run_tokens
from mlx.utils import tree_flatten

from mlx_specstream import compiled
from mlx_specstream.config import SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.loading import load_model, save_model
from mlx_specstream.models.fused import fused
from mlx_specstream.testing import FAMILIES, random_model, tiny_config, write_tiny_model_dir

SPEC = SpecStreamConfig(num_streams=3, num_msa_layers=2)
PROMPT = [4, 8, 15, 16, 23, 42, 7]


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("family", FAMILIES)  # qwen2/phi: q/k/v biases; qwen3: q/k norms; phi, opt: no gate/up
def test_fused_model_computes_the_same_logits_with_the_same_parameters(family):
    ref = random_model(tiny_config(family), SPEC, seed=5)
    model = random_model(tiny_config(family), SPEC, seed=5)
    before = _params(model)
    groups = (2 if "gate_proj" in model.base.layers[0].mlp else 1) if "mlp" in model.base.layers[0] else 1
    assert model.fuse_projections() == groups * model.num_layers
    assert all(model.fusion_state) and len(model.fusion_state) == groups * model.num_layers
    after = _params(model)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    tokens = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(ref(tokens)), rtol=1e-5, atol=1e-5)
    main_a, streams_a, _ = model.all_logits(tokens)
    main_b, streams_b, _ = ref.all_logits(tokens)
    np.testing.assert_allclose(np.array(streams_a), np.array(streams_b), rtol=1e-5, atol=1e-5)


def test_fusing_adds_no_memory_and_the_layers_read_the_fused_buffer():
    model = random_model(tiny_config("llama", hidden_size=256, intermediate_size=512), SPEC, seed=1)
    mx.clear_cache()
    before = mx.get_active_memory()
    model.fuse_projections()
    mx.clear_cache()
    weights = sum(v.nbytes for _, v in tree_flatten(model.base.layers[0].self_attn.parameters()))
    assert mx.get_active_memory() - before < 0.05 * weights  # views, not copies
    attn = model.base.layers[0].self_attn
    np.testing.assert_array_equal(np.array(attn.k_proj.weight), np.array(fused(attn, "self_attn").weight_t[:, 256:384].T))
    assert not memoryview(attn.k_proj.weight).c_contiguous  # a view into the fused buffer


def test_greedy_speculative_equals_autoregressive_when_fused():
    model = random_model(tiny_config("llama"), SPEC, seed=2)
    plain, _ = run_tokens(model, PROMPT, 40, speculate=False, tree="2,1,1")
    model.fuse_projections()
    ar, _ = run_tokens(model, PROMPT, 40, speculate=False, tree="2,1,1")
    ss, _ = run_tokens(model, PROMPT, 40, tree="2,1,1")
    assert ss == ar
    assert ar == plain  # random weights: no near-ties for the last-bit differences to flip


@pytest.mark.parametrize("compile", [False, True])
def test_replacing_a_layer_after_fusing_falls_back_to_it(compile):
    """A weight loaded after fusing is what the model computes with, compiled steps included."""
    model = random_model(tiny_config("llama"), SPEC, seed=4)
    model.fuse_projections()
    run_tokens(model, PROMPT, 12, speculate=False, compile=compile)  # trace with fusion
    run_tokens(model, PROMPT, 12, compile=compile)
    new = mx.random.normal(model.base.layers[1].self_attn.v_proj.weight.shape) * 0.5
    model.load_weights([("base.model.layers.1.self_attn.v_proj.weight", new)], strict=False)
    assert fused(model.base.layers[1].self_attn, "self_attn") is None
    assert model.fusion_state == ()  # updates unfuse everything

    ref = random_model(tiny_config("llama"), SPEC, seed=4)
    ref.load_weights([("base.model.layers.1.self_attn.v_proj.weight", new)], strict=False)
    for speculate in (False, True):
        got, _ = run_tokens(model, PROMPT, 24, speculate=speculate, compile=compile)
        want, _ = run_tokens(ref, PROMPT, 24, speculate=speculate, compile=compile)
        assert got == want
    compiled.clear()


def test_adapters_and_quantized_layers_are_not_fused():
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2, mode="lossless",
                            stream_lora=StreamLoRAConfig(rank=4, target_modules=("q_proj", "gate_proj")))
    model = random_model(tiny_config("llama"), spec, seed=6)
    model.fuse_projections()
    # the MSA layers' q_proj and gate_proj carry stream-only LoRA: those groups stay separate
    assert model.fusion_state == (True,) * 4  # the two lower layers only

    quant = random_model(tiny_config("llama"), SPEC, seed=6)
    nn.quantize(quant.base, group_size=32, bits=8)
    assert quant.fuse_projections() == 0 and quant.fusion_state == ()

    late = random_model(tiny_config("llama"), SPEC, seed=6)
    late.fuse_projections()
    nn.quantize(late.base, group_size=32, bits=8)  # layers replaced after fusing
    assert late.fusion_state == (False,) * 8
    tokens = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(late(tokens)), np.array(quant(tokens)), rtol=1e-5, atol=1e-5)


def test_fusion_survives_compiled_steps():
    model = random_model(tiny_config("llama"), SPEC, seed=7)
    model.fuse_projections()
    run_tokens(model, PROMPT, 12, speculate=False)
    run_tokens(model, PROMPT, 12)
    assert all(model.fusion_state) and len(model.fusion_state) == 8


def test_load_fuses_and_save_writes_the_usual_weights(tmp_path):
    path = write_tiny_model_dir(tmp_path / "m")
    model, config = load_model(path)
    assert all(model.fusion_state)
    plain, _ = load_model(path, fuse=False)
    assert plain.fusion_state == ()
    out = save_model(model, config, tmp_path / "copy", tokenizer_dir=path)
    again, _ = load_model(out, fuse=False)
    a, b = _params(again), _params(plain)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    tokens = mx.array([PROMPT])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(plain(tokens)), rtol=1e-5, atol=1e-5)


def test_unfused_layers_get_contiguous_weights_back():
    model = random_model(tiny_config("llama"), SPEC, seed=8)
    ref = random_model(tiny_config("llama"), SPEC, seed=8)
    model.fuse_projections()
    model.unfuse_projections()
    assert model.fusion_state == ()
    mlp = model.base.layers[2].mlp
    assert memoryview(mlp.up_proj.weight).c_contiguous and memoryview(mlp.gate_proj.weight).c_contiguous
    tokens = mx.array([PROMPT])
    np.testing.assert_array_equal(np.array(model(tokens)), np.array(ref(tokens)))
