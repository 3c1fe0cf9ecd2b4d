"""Converted models reproduce the trainer's PyTorch reference, per family.

float32: main, stream and pruning logits within 1e-4 (absolute). Lower precisions, bounded
relative to the largest reference logit |z|max (the tiny random models have |z|max ~ 0.2-0.8;
observed worst cases in brackets):

=========  ==========================  ===========
setting    bound on max |Δlogit|       observed
=========  ==========================  ===========
float16    4e-3  x |z|max              1.0e-3
bfloat16   3e-2  x |z|max              7e-3
8-bit g32  4e-2  x |z|max              1.1e-2
4-bit g32  0.5   x |z|max              0.19
=========  ==========================  ===========

Speculative greedy decoding of a converted model equals its autoregressive greedy decoding.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from test_convert_fixtures import reference_logits, tiny_checkpoint

import mlx.core as mx

from mlx_specstream.convert import convert
from mlx_specstream.generate import generate_step
from mlx_specstream.loading import load_model

VARIANTS = ("llama", "mistral", "qwen2", "qwen3", "phi", "opt", "opt_project")
# families on mlx-lm's classes with their own quirks: Llama 3 rope scaling, MoE blocks, sliding
# windows (8) with local/global rope bases, fused qkv/gate_up with LongRoPE, post-norms, NoPE
MORE = ("llama3", "qwen3_moe", "gemma3_text", "phi3", "olmo2", "smollm3")
IDS = np.random.default_rng(0).integers(0, 259, size=(1, 12))
# past every window, and past phi3's 16 original positions: transformers then takes LongRoPE's
# long factors, which mlx-lm's SuScaledRoPE always uses
IDS_LONG = np.random.default_rng(1).integers(0, 259, size=(1, 24))
LOW_PRECISION = {
    "float16": (dict(dtype="float16"), 4e-3),
    "bfloat16": (dict(dtype="bfloat16"), 3e-2),
    "q8": (dict(quantize=True, q_bits=8, q_group_size=32), 4e-2),
    "q4": (dict(quantize=True, q_bits=4, q_group_size=32), 0.5),
}


@functools.lru_cache(maxsize=None)
def _reference(variant: str, mode: str):
    return reference_logits(tiny_checkpoint(variant, mode), IDS)


def _mlx_logits(path):
    model, _ = load_model(path)
    outs = model.all_logits(mx.array(IDS))
    return [np.array(o[0].astype(mx.float32)) for o in outs]  # batch row 0


@pytest.mark.parametrize(
    "variant,mode", [(v, "shared") for v in VARIANTS] + [("llama", "lossless"), ("qwen3", "lossless"), ("opt", "lossless")]
)
def test_float32_logits_match_pytorch(variant, mode, tmp_path):
    convert(tiny_checkpoint(variant, mode), tmp_path / "mlx")
    for name, got, want in zip(("main", "stream", "pruning"), _mlx_logits(tmp_path / "mlx"), _reference(variant, mode)):
        assert got.shape == want.shape, name
        assert np.abs(want).max() > 0.05, f"{name} logits are trivially small"
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{variant} {name} logits")


@pytest.mark.parametrize("variant,mode", [(v, "shared") for v in MORE] + [("gemma3_text", "lossless")])
def test_more_families_float32_logits_match_pytorch(variant, mode, tmp_path):
    """Trained in PyTorch on transformers' model, converted, run on mlx-lm's model class."""
    convert(tiny_checkpoint(variant, mode), tmp_path / "mlx")
    want = reference_logits(tiny_checkpoint(variant, mode), IDS_LONG)
    model, _ = load_model(tmp_path / "mlx")
    got = [np.array(o[0].astype(mx.float32)) for o in model.all_logits(mx.array(IDS_LONG))]
    for name, g, w in zip(("main", "stream", "pruning"), got, want):
        assert g.shape == w.shape, name
        assert np.abs(w).max() > 0.05, f"{name} logits are trivially small"
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4, err_msg=f"{variant} {name} logits")
    prompt = mx.array(IDS_LONG[0, :6])
    spec = [t for s in generate_step(model, prompt, max_tokens=40, tree="3,2,1") for t in s.tokens][:40]
    ar = [t for s in generate_step(model, prompt, max_tokens=40, speculate=False) for t in s.tokens][:40]
    assert spec == ar


@pytest.mark.parametrize("variant", ["llama", "qwen3", "phi", "opt"])
def test_low_precision_within_documented_bounds(variant, tmp_path):
    want = _reference(variant, "shared")
    scale = max(np.abs(w).max() for w in want)
    for setting, (kwargs, bound) in LOW_PRECISION.items():
        result = convert(tiny_checkpoint(variant, "shared"), tmp_path / setting, **kwargs)
        for name, got, ref in zip(("main", "stream", "pruning"), _mlx_logits(tmp_path / setting), want):
            err = np.abs(got - ref).max()
            assert err <= bound * scale, f"{variant} {setting} {name}: {err:.2e} > {bound} x {scale:.2f}"
        if kwargs.get("quantize"):
            report = result.quantization
            assert {"self_attn.q_proj", "embed_tokens"} <= set(report.kinds), report.table()
            assert all(k.max_rel < (0.01 if kwargs["q_bits"] == 8 else 0.2) for k in report.kinds.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_speculative_greedy_equals_autoregressive(variant, tmp_path):
    convert(tiny_checkpoint(variant, "shared"), tmp_path / "mlx")
    model, _ = load_model(tmp_path / "mlx")
    prompt = mx.array(IDS[0, :6])
    spec = [t for s in generate_step(model, prompt, max_tokens=20, tree="3,2,1") for t in s.tokens]
    ar = [t for s in generate_step(model, prompt, max_tokens=20, speculate=False) for t in s.tokens]
    assert len(spec) >= 20
    assert spec[:20] == ar[:20]
