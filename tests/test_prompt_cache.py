"""Chunked prefill and prompt-cache reuse change nothing but the work done."""

import mlx.core as mx
import pytest

from mlx_specstream import make_prompt_cache, stream_generate
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.testing import random_model, tiny_config

SPEC = SpecStreamConfig(num_streams=3, num_msa_layers=2)
PROMPT = [(7 * i + 3) % 250 for i in range(30)]


def _run(model, prompt, n=40, **kwargs):
    steps = generate_step(model, mx.array(prompt, dtype=mx.int32), max_tokens=n, **kwargs)
    return [t for s in steps for t in s.tokens][:n]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3: windows of 8 across chunk borders
def test_chunked_prefill_gives_the_same_tokens(family):
    model = random_model(tiny_config(family), SPEC, seed=3)
    for speculate in (False, True):
        whole = _run(model, PROMPT, speculate=speculate)
        for step in (1, 4, 29, 30):
            assert _run(model, PROMPT, speculate=speculate, prefill_step_size=step) == whole, (speculate, step)


@pytest.mark.parametrize("speculate", [False, True])
def test_a_prompt_cache_reuses_the_shared_prefix_and_keeps_the_output(speculate):
    model = random_model(tiny_config("llama"), SPEC, seed=4)
    cache = make_prompt_cache(model)
    first = _run(model, PROMPT, speculate=speculate, prompt_cache=cache)
    assert first == _run(model, PROMPT, speculate=speculate)
    assert cache.reused == 0 and cache.tokens == (PROMPT + first)[: len(cache.tokens)]
    assert len(cache.tokens) >= len(PROMPT) + len(first) - 5  # all but the last step's tokens

    follow_up = PROMPT + first + [11, 12, 13]  # the next turn: the conversation so far, then new text
    second = _run(model, follow_up, speculate=speculate, prompt_cache=cache)
    assert len(PROMPT) + len(first) - 5 <= cache.reused <= len(PROMPT) + len(first)
    assert second == _run(model, follow_up, speculate=speculate)

    other = [99, 98] + PROMPT  # no shared prefix: everything is prefilled again
    assert _run(model, other, speculate=speculate, prompt_cache=cache) == _run(model, other, speculate=speculate)
    assert cache.reused == 0


def test_a_generation_stopped_early_leaves_a_consistent_cache():
    model = random_model(tiny_config("qwen3"), SPEC, seed=5)
    cache = make_prompt_cache(model)
    steps = generate_step(model, mx.array(PROMPT, dtype=mx.int32), max_tokens=100, prompt_cache=cache)
    seen = [t for _, s in zip(range(4), steps) for t in s.tokens]
    steps.close()
    assert cache.tokens == (PROMPT + seen)[: len(cache.tokens)] and len(cache.tokens) >= len(PROMPT)
    follow_up = cache.tokens + [5, 6]
    assert _run(model, follow_up, prompt_cache=cache) == _run(model, follow_up)
    assert cache.reused == len(follow_up) - 2


def test_stream_generate_reports_the_cached_prompt_tokens(tmp_path):
    from mlx_specstream import load
    from mlx_specstream.testing import write_tiny_model_dir

    model, tok = load(write_tiny_model_dir(tmp_path / "m", "llama", spec=SPEC))
    cache = make_prompt_cache(model)
    ids = list(tok.encode("hello there"))
    last = list(stream_generate(model, tok, ids, max_tokens=8, prompt_cache=cache))[-1]
    assert last.cached_prompt_tokens == 0
    again = list(stream_generate(model, tok, ids + [65, 66], max_tokens=8, prompt_cache=cache))[-1]
    assert again.cached_prompt_tokens == len(ids) and again.prompt_tokens == len(ids) + 2


def test_a_chat_second_turn_prefills_only_the_new_tokens(tmp_path):
    """As `specstream chat` runs it: one prompt cache for the conversation."""
    from mlx_specstream import load
    from mlx_specstream.cli.chat import ChatSession
    from mlx_specstream.testing import write_tiny_model_dir

    model, tok = load(write_tiny_model_dir(tmp_path / "m", "llama", spec=SPEC))
    cache = make_prompt_cache(model)
    session = ChatSession(tok, lambda ids, **p: stream_generate(model, tok, ids, prompt_cache=cache, **p),
                          context=4096, max_tokens=12)
    first_ids, _ = session.fit("hello")
    list(session.reply("hello"))
    assert session.last.cached_prompt_tokens == 0
    second_ids, _ = session.fit("and again")
    list(session.reply("and again"))
    shared = next(i for i, (a, b) in enumerate(zip(first_ids + [None], second_ids)) if a != b)
    assert session.last.cached_prompt_tokens >= shared  # the whole first prompt, and some of the reply
    assert session.last.prompt_tokens - session.last.cached_prompt_tokens < len(second_ids) - len(first_ids) + 1
