"""The wrapper drives mlx-lm's own model: its logits, its cache semantics (sliding windows
included) and its greedy tokens are mlx-lm's, for every tested family."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_specstream.cache import make_cache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.family import TokenPositions, TokenRoPE, UnsupportedFamily
from mlx_specstream.generate import generate_step
from mlx_specstream.streams import AR_PLAN, prefill_plan
from mlx_specstream.testing import FAMILIES, random_model, tiny_config

TOKENS = [3, 9, 27, 81, 243, 17, 51, 153, 200, 88, 14, 42, 7, 99, 120, 5, 66, 31, 250, 11, 2, 190, 73, 8]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_mlx_lm_model(family):
    """Prefill past gemma3's window (8), then single steps through our cache: mlx-lm's own
    model with its own caches (rotating ones for sliding layers) gives the same logits."""
    model = random_model(tiny_config(family), SpecStreamConfig(num_streams=2, num_msa_layers=2), seed=5)
    tokens = mx.array([TOKENS])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(model.base(tokens)), atol=1e-4)

    theirs = make_prompt_cache(model.base)
    ours = make_cache(model.num_layers)
    first = 14
    want = model.base(tokens[:, :first], cache=theirs)[0, -1]
    got = model.forward(tokens[:, :first], ours, prefill_plan(first, 0), streams=False).logits[-1]
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4)
    for c in ours:
        c.commit(None, first)
    for i in range(first, len(TOKENS)):
        want = model.base(tokens[:, i : i + 1], cache=theirs)[0, -1]
        got = model.forward(tokens[:, i : i + 1], ours, AR_PLAN, streams=False).logits[-1]
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, err_msg=f"step {i}")
        for c in ours:
            c.commit(None, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_and_speculative_greedy_equal_mlx_lm_generate(family):
    """200 tokens: mlx-lm's generate_step, our plain decoding and our speculative decoding
    (random streams) give the same greedy tokens (gemma3: 25 windows of 8)."""
    model = random_model(tiny_config(family), SpecStreamConfig(num_streams=3, num_msa_layers=2), seed=1)
    prompt = mx.array([5, 17, 3, 44, 12], dtype=mx.int32)
    n = 200
    theirs = [int(t) for t, _ in zip(
        (tok for tok, _ in mlx_lm_generate_step(prompt, model.base, max_tokens=n, sampler=lambda x: mx.argmax(x, -1))),
        range(n),
    )]
    plain = [t for s in generate_step(model, prompt, max_tokens=n, speculate=False) for t in s.tokens][:n]
    spec = [t for s in generate_step(model, prompt, max_tokens=n, tree="2,1,1") for t in s.tokens][:n]
    assert plain == theirs, f"first mismatch at {next(i for i, (a, b) in enumerate(zip(plain, theirs)) if a != b)}"
    assert spec == theirs


def test_token_rope_rotates_each_token_by_its_own_position():
    """Per-token positions through the family's own RoPE module equal one call per token."""
    model = random_model(tiny_config("llama"), None, seed=2)
    rope = model.base.layers[0].self_attn.rope
    assert isinstance(rope, TokenRoPE)
    x = mx.random.normal((1, 4, 5, 16), key=mx.random.key(0))
    positions = mx.array([7, 8, 8, 9, 30])
    got = rope(x, offset=TokenPositions(positions))
    want = mx.concatenate([rope.rope(x[:, :, i : i + 1], offset=int(p)) for i, p in enumerate(positions.tolist())], axis=2)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6)


def test_gemma_embedding_scale_found_by_probe():
    model = random_model(tiny_config("gemma3_text"), None, seed=0)
    assert model.family.embed_scale is not None and float(model.family.embed_scale) == 8.0  # sqrt(64)
    assert model.family.windows == (8, None, 8, None)
    plain = random_model(tiny_config("llama"), None, seed=0)
    assert plain.family.embed_scale is None and plain.family.windows == (None,) * 4


def test_family_check_refuses_a_forward_it_cannot_reproduce():
    model = random_model(tiny_config("llama"), None, seed=0)
    model.check_family()
    original = type(model.base).__call__

    class Capped(type(model.base)):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return original(self, inputs, cache, input_embeddings) * 2.0  # a head transform we don't know

    model.base.__class__ = Capped
    with pytest.raises(UnsupportedFamily, match="does not reproduce its own logits"):
        model.check_family()


def test_a_family_with_recurrent_state_decodes_plainly_and_says_why_it_cannot_speculate():
    from mlx_lm.models import mamba

    from mlx_specstream.streams import SpecStreamModel

    args = mamba.ModelArgs(model_type="mamba", vocab_size=64, hidden_size=32, intermediate_size=64, state_size=8,
                           num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=4)
    mx.random.seed(0)
    base = mamba.Model(args)
    model = SpecStreamModel(base, None)
    assert "MambaCache" in model.family.plain_only or "ArraysCache" in model.family.plain_only
    prompt = mx.array([5, 9, 2, 7], dtype=mx.int32)
    ours = [t for s in generate_step(model, prompt, max_tokens=30) for t in s.tokens]
    theirs = [int(t) for t, _ in mlx_lm_generate_step(prompt, base, max_tokens=30, sampler=lambda x: mx.argmax(x, -1))]
    assert ours == theirs and len(ours) == 30
    with pytest.raises(ValueError, match="cannot verify drafts.*mamba"):
        next(generate_step(model, prompt, max_tokens=5, speculate=True))
    with pytest.raises(UnsupportedFamily, match="cannot carry speculative streams"):
        SpecStreamModel(base, SpecStreamConfig(num_streams=2, num_msa_layers=1))


def test_prompt_beyond_the_context_names_both_numbers():
    model = random_model(tiny_config("llama", max_position_embeddings=64), None, seed=0)
    with pytest.raises(ValueError, match=r"Prompt \(60 tokens\) \+ max_tokens \(10\) exceeds the model's context of 64"):
        next(generate_step(model, mx.array(list(range(60)), dtype=mx.int32), max_tokens=10))
    with pytest.warns(UserWarning, match="first 7 tokens were dropped"):
        steps = list(generate_step(model, mx.array(list(range(60)), dtype=mx.int32), max_tokens=10,
                                   truncate_prompt=True))
    kept = [t for s in generate_step(model, mx.array(list(range(7, 60)), dtype=mx.int32), max_tokens=10) for t in s.tokens]
    assert [t for s in steps for t in s.tokens] == kept
