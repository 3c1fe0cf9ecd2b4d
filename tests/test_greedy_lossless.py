"""Speculative greedy output == autoregressive greedy output, token for token (DESIGN.md rule 9)."""

import mlx.core as mx
import numpy as np
import pytest
from _support import chain, markov_model, run_tokens

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig
from mlx_specstream.testing import FAMILIES, random_model, tiny_config

PROMPTS = [[5, 17, 3], [200, 1, 1, 9, 44, 12, 7]]

SETTINGS = [  # (num_streams, msa_layers, tree, pruning threshold)
    (1, 1, "3", None),
    (3, 2, "2,2,1", None),
    (4, 4, "4,2,2,1", None),
    (3, 2, "[[0],[1],[0,0],[0,0,0],[1,0]]", None),
    (3, 1, "3,2,1", 0.02),
]


# every family meets two settings and every setting two families (keeps the suite fast)
CASES = [(f, *SETTINGS[(i + k) % len(SETTINGS)]) for i, f in enumerate(FAMILIES) for k in (0, 2)]


@pytest.mark.parametrize("family, streams, msa, tree, prune", CASES)
def test_random_streams_greedy_equal(family, streams, msa, tree, prune):
    spec = SpecStreamConfig(
        num_streams=streams,
        num_msa_layers=msa,
        pruning=PruningConfig(rank=4, threshold=prune) if prune else None,
    )
    model = random_model(tiny_config(family), spec, seed=streams + msa)
    for prompt in PROMPTS:
        ar, _ = run_tokens(model, prompt, 200, speculate=False)
        ss, steps = run_tokens(model, prompt, 200, tree=tree)
        assert len(ar) == 200
        assert ss == ar, f"first mismatch at {next(i for i, (a, b) in enumerate(zip(ar, ss)) if a != b)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_streams_accept_and_stay_lossless(family):
    model, perm = markov_model(family)
    total_steps = total_tokens = 0
    for start, tree in [(3, "2,2,1"), (11, "3,1,1"), (14, "[[0],[1],[0,0],[0,1],[0,0,0]]")]:
        prompt = chain(perm, start, 6)
        ar, _ = run_tokens(model, prompt, 200, speculate=False)
        ss, steps = run_tokens(model, prompt, 200, tree=tree)
        assert ss == ar
        decode = steps[1:]
        total_steps += len(decode)
        total_tokens += sum(len(s.tokens) for s in decode)
    # the accept path really ran: well over one token per forward pass
    assert total_tokens / total_steps > 1.25, total_tokens / total_steps


def test_trained_streams_with_pruning_lossless():
    model, perm = markov_model("llama", pruning=True)
    prompt = chain(perm, 7, 5)
    ar, _ = run_tokens(model, prompt, 200, speculate=False)
    for threshold in (0.0, 0.05, 0.5):
        ss, steps = run_tokens(model, prompt, 200, tree="3,2,1", prune_threshold=threshold)
        assert ss == ar
    assert sum(s.accepted for s in steps) > 0


def test_lossless_mode_stream_lora_keeps_main_stream():
    spec = SpecStreamConfig(
        num_streams=2, num_msa_layers=2, mode="lossless",
        stream_lora=StreamLoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
    )
    config = tiny_config("llama")
    model = random_model(config, spec, seed=3)
    plain = random_model(config, None, seed=3)
    assert len(model.stream_lora_modules()) == 2 * 3
    tokens = mx.array([[4, 8, 15, 16, 23, 42]])
    main, streams, _ = model.all_logits(tokens)
    np.testing.assert_allclose(np.array(main), np.array(plain(tokens)), atol=1e-5)
    # the LoRA does act on streams
    for m in model.stream_lora_modules().values():
        m.lora_b = mx.zeros_like(m.lora_b)
    _, streams0, _ = model.all_logits(tokens)
    assert float(mx.abs(streams - streams0).max()) > 1e-3
    ar, _ = run_tokens(model, [1, 2, 3], 120, speculate=False)
    ss, _ = run_tokens(model, [1, 2, 3], 120, tree="2,2")
    assert ss == ar


def test_prompt_lookup_drafts_verified_losslessly():
    from mlx_specstream.lookup import PromptLookup

    assert PromptLookup(3).propose([1, 2, 3, 9, 1, 2]) == [3, 9, 1]
    assert PromptLookup(3).propose([1, 2, 3]) == []
    model, perm = markov_model("llama")
    prompt = chain(perm, 3, 30)  # the chain repeats, so lookup finds continuations
    ar, _ = run_tokens(model, prompt, 200, speculate=False)
    pl, steps = run_tokens(model, prompt, 200, drafter=PromptLookup(4))
    assert pl == ar
    assert sum(s.accepted for s in steps) > 20
