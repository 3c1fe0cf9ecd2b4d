"""Exps through ``power`` (models/fastmath.py) compute the same functions as MLX's native ops,
gradients included, and a model gives the same logits and greedy text either way."""

import platform

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.models import fastmath
from mlx_specstream.testing import random_model, tiny_config

from _support import run_tokens


@pytest.fixture
def pow_exp(monkeypatch):
    monkeypatch.setenv(fastmath.ENV, "1")


def test_the_switch_follows_the_host_unless_overridden(monkeypatch):
    monkeypatch.delenv(fastmath.ENV, raising=False)
    x86_cpu = platform.machine().lower() in ("x86_64", "amd64") and mx.default_device() == mx.cpu
    assert fastmath.pow_exp_enabled() == x86_cpu
    monkeypatch.setenv(fastmath.ENV, "0")
    assert not fastmath.pow_exp_enabled()
    monkeypatch.setenv(fastmath.ENV, "1")
    assert fastmath.pow_exp_enabled()


def test_exp_matches_float64_as_closely_as_mlx_exp(pow_exp):
    x = np.linspace(-87.0, 30.0, 200_001, dtype=np.float32)
    ref = np.exp(x.astype(np.float64))
    ours = np.array(fastmath.exp(mx.array(x))).astype(np.float64)
    native = np.array(mx.exp(mx.array(x))).astype(np.float64)
    err_ours = np.max(np.abs(ours - ref) / ref)
    err_native = np.max(np.abs(native - ref) / ref)
    assert err_ours < 5e-6  # both round x * log2(e) to float32 first: a few ulps at |x| ~ 80
    assert err_ours < 2 * err_native + 1e-6
    assert float(fastmath.exp(mx.array(-np.inf))) == 0.0


@pytest.mark.parametrize("ours, native", [
    (fastmath.silu, nn.silu),
    (fastmath.sigmoid, mx.sigmoid),
    (fastmath.gelu_tanh, nn.gelu_approx),
    (fastmath.quick_gelu, nn.gelu_fast_approx),
])
def test_activations_and_their_gradients_match_native_ones(pow_exp, ours, native):
    x = mx.concatenate([mx.random.normal((4000,), key=mx.random.key(0)) * 5,
                        mx.array([-1e4, -200.0, -90.0, -0.0, 0.0, 90.0, 200.0, 1e4])])
    np.testing.assert_allclose(np.array(ours(x)), np.array(native(x)), rtol=2e-6, atol=2e-6)
    g_ours = np.array(mx.grad(lambda z: ours(z).sum())(x))
    g_native = np.array(mx.grad(lambda z: native(z).sum())(x))
    assert np.isfinite(g_ours).all()  # no inf / inf where exp(-z) overflows
    np.testing.assert_allclose(g_ours, g_native, rtol=2e-6, atol=2e-6)


def test_softmax_matches_native_with_masked_entries(pow_exp):
    s = mx.random.normal((3, 5, 40), key=mx.random.key(1)) * 8
    s = mx.where(mx.random.uniform(shape=s.shape, key=mx.random.key(2)) < 0.3, -mx.inf, s)
    s[..., 0] = 1.0  # every row keeps at least one entry
    np.testing.assert_allclose(np.array(fastmath.softmax(s)), np.array(mx.softmax(s, axis=-1)), atol=1e-6)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (6, 1)])
def test_attention_matches_the_fused_kernel(pow_exp, hq, hkv):
    keys = mx.random.split(mx.random.key(3), 4)
    s, n, d = 5, 32, 16
    q = mx.random.normal((1, hq, s, d), key=keys[0])
    k = mx.random.normal((1, hkv, n, d), key=keys[1])
    v = mx.random.normal((1, hkv, n, d), key=keys[2])
    mask = mx.random.uniform(shape=(s, n), key=keys[3]) < 0.6
    mask[:, 0] = True
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
    for m, r in ((mask, ref), (None, mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5))):
        out = fastmath.scaled_dot_product_attention(q, k, v, d**-0.5, m)
        assert out.shape == r.shape
        np.testing.assert_allclose(np.array(out), np.array(r), atol=2e-6)


@pytest.mark.parametrize("family", ["llama", "phi"])
def test_a_model_gives_the_same_logits_and_greedy_text_either_way(monkeypatch, family):
    spec = SpecStreamConfig(num_streams=2, num_msa_layers=1)
    model = random_model(tiny_config(family), spec, seed=4)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(fastmath.ENV, flag)
        main, streams, _ = model.all_logits(tokens)
        ids, _ = run_tokens(model, [3, 1, 4, 1], 24, tree="2,1", compile=False)
        out[flag] = (np.array(main), np.array(streams), ids)
    np.testing.assert_allclose(out["1"][0], out["0"][0], atol=1e-5)
    np.testing.assert_allclose(out["1"][1], out["0"][1], atol=1e-5)
    assert out["1"][2] == out["0"][2]
