"""OPT in mlx-lm's model-file interface: parity with Hugging Face, KV cache, mlx-lm generation."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models.cache import KVCache, make_prompt_cache  # noqa: E402

from mlx_specstream.models.opt import Model, ModelArgs  # noqa: E402

BASE = dict(
    vocab_size=260,
    hidden_size=64,
    num_hidden_layers=4,
    ffn_dim=128,
    num_attention_heads=4,
    max_position_embeddings=128,
    dropout=0.0,
    attention_dropout=0.0,
)

CASES = {
    # pre-LN, no projections (opt-125m and larger)
    "pre_ln": dict(),
    # pre-LN with project_in / project_out
    "proj32": dict(word_embed_proj_dim=32),
    # post-LN with projections and no final LayerNorm (opt-350m)
    "post_ln_proj32": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
    # untied head, final LayerNorm removed, another activation
    "untied_gelu": dict(tie_word_embeddings=False, _remove_final_layer_norm=True, activation_function="gelu"),
}

IDS = [3, 17, 255, 42, 0, 99, 7, 7, 128, 64, 1, 200]  # 12 tokens


def _hf_model(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.OPTConfig(**BASE, **overrides)
    hf = transformers.OPTForCausalLM(config).float().eval()
    # OPT's init (std 0.02, unit LayerNorms) gives nearly flat logits; use larger random
    # weights everywhere, LayerNorms included, so the comparison has something to compare.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            base = 1.0 if "layer_norm.weight" in name else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return hf


def _mlx_model(hf, strip_prefix: bool = False) -> Model:
    config = hf.config.to_dict()
    model = Model(ModelArgs.from_dict(config))
    weights = {k: mx.array(v.detach().numpy()) for k, v in hf.state_dict().items()}
    if strip_prefix:  # checkpoints saved from OPTModel have "decoder.*" keys
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    hf = _hf_model(CASES[request.param])
    return hf, _mlx_model(hf)


def _hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits.numpy()


def test_structure_and_names(pair):
    hf, model = pair
    args = model.args
    assert model.model_type == "opt"
    assert len(model.layers) == args.num_hidden_layers
    assert model.max_positions == args.max_position_embeddings == 128
    dec = model.model.decoder
    assert dec.embed_positions.weight.shape == (128 + 2, args.hidden_size)
    assert ("project_in" in dec) == (args.word_embed_proj_dim != args.hidden_size)
    assert ("final_layer_norm" in dec) == (args.do_layer_norm_before and not args._remove_final_layer_norm)
    assert ("lm_head" in model) == (not args.tie_word_embeddings)


def test_logits_match_hugging_face(pair):
    hf, model = pair
    ours = np.array(model(mx.array([IDS])))
    ref = _hf_logits(hf, IDS)
    assert ours.shape == ref.shape == (1, len(IDS), 260)
    assert np.abs(ref).max() > 0.5  # not trivially flat
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_sanitize_accepts_keys_without_model_prefix():
    hf = _hf_model(CASES["proj32"], seed=1)
    model = _mlx_model(hf, strip_prefix=True)
    np.testing.assert_allclose(np.array(model(mx.array([IDS]))), _hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_incremental_decoding_matches_full_sequence(pair):
    _, model = pair
    full = model(mx.array([IDS]))
    cache = make_prompt_cache(model)
    assert all(isinstance(c, KVCache) for c in cache)
    steps = [model(mx.array([IDS[:7]]), cache=cache)]
    for t in range(7, len(IDS)):
        steps.append(model(mx.array([IDS[t : t + 1]]), cache=cache))
    assert cache[0].offset == len(IDS)
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-5, rtol=0)


def test_mlx_lm_generate_step_greedy_matches_full_sequence_loop(pair):
    _, model = pair
    prompt = IDS[:5]
    n = 20
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1))
    got = [int(tok) for tok, _logprobs in steps]
    assert len(got) == n
    seq = list(prompt)
    for _ in range(n):
        logits = model(mx.array([seq]))[0, -1]
        seq.append(int(mx.argmax(logits)))
    assert got == seq[len(prompt) :]


def test_embed_with_non_consecutive_positions(pair):
    _, model = pair
    dec = model.model.decoder
    tokens = mx.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    positions = mx.array([3, 3, 10, 127])  # shared and skipped positions, the last usable one
    got = model.embed(tokens, positions)
    tok = dec.embed_tokens(tokens)
    if "project_in" in dec:
        tok = dec.project_in(tok)
    want = tok + dec.embed_positions.weight[positions + 2][None]
    assert got.shape == (2, 4, model.args.hidden_size)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6, rtol=0)
    # The consecutive case is what __call__ feeds the layers.
    np.testing.assert_allclose(
        np.array(model.embed(tokens, mx.arange(4))),
        np.array(tok + dec.embed_positions.weight[2:6][None]),
        atol=1e-6,
        rtol=0,
    )


def test_head_and_layers_compose_to_call(pair):
    _, model = pair
    tokens = mx.array([IDS])
    h = model.embed(tokens, mx.arange(len(IDS)))
    for layer in model.layers:
        h = layer(h, "causal", None)
    np.testing.assert_allclose(np.array(model.head(h)), np.array(model(tokens)), atol=1e-6, rtol=0)


def test_positions_beyond_table_raise():
    hf = _hf_model(CASES["pre_ln"], seed=2)
    model = _mlx_model(hf)
    cache = make_prompt_cache(model)
    model(mx.array([list(range(120))]), cache=cache)
    with pytest.raises(ValueError, match="learned positions"):
        model(mx.array([list(range(9))]), cache=cache)
