"""Compiled decoding steps: same numbers as eager steps at any buffer size, traces are reused."""

import mlx.core as mx
import numpy as np
import pytest
from _support import chain, markov_model, run_tokens

from mlx_specstream import compiled
from mlx_specstream.cache import buffer_mask, make_cache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.streams import AR_PLAN, chain_plan, prefill_plan, tree_plan
from mlx_specstream.testing import random_model, tiny_config
from mlx_specstream.tree import parse_tree_spec


def test_buffer_mask_worked_example():
    local = mx.array([[True, False], [True, True]])
    got = np.array(buffer_mask(local, 2, 2, 6))
    want = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(got, want)
    # the same with the offset as a device scalar (inside a compiled step)
    np.testing.assert_array_equal(np.array(buffer_mask(local, 2, mx.array(2), 6)), want)
    # no local mask: every new token sees all new tokens
    np.testing.assert_array_equal(np.array(buffer_mask(None, 1, 3, 5)), [[1, 1, 1, 1, 0]])


def _prefilled(model, prompt, capacity):
    cache = make_cache(model.num_layers, capacity)
    model.forward(mx.array(prompt)[None], cache, prefill_plan(len(prompt), 0), streams=False)
    for c in cache:
        c.commit(None, len(prompt))
    return cache


@pytest.mark.parametrize("kind, spec", [("ar", None), ("tree", "2,1,1"), ("tree", "1,1,1"), ("tree", "[[0],[1],[0,0]]"), ("chain", 3)])
def test_compiled_step_equals_eager_step(kind, spec):
    model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=3, num_msa_layers=2), seed=3)
    prompt = [4, 8, 15, 16, 23, 42]
    if kind == "ar":
        plan = AR_PLAN
    elif kind == "chain":
        plan = chain_plan(spec)
    else:
        plan = tree_plan(parse_tree_spec(spec), model.num_streams)
    tokens = mx.array(np.arange(plan.n_main) + 5, dtype=mx.int32)
    outs = []
    for compile, capacity in [(False, 64), (True, 64), (True, 96)]:  # extra buffer room changes nothing
        cache = _prefilled(model, prompt, capacity)
        fn = compiled.step_function(model, kind, plan, SamplingParams(), compile)
        depth, path, bonus, nxt, offset, keys, values = fn(tokens, mx.array(len(prompt)), [c.keys for c in cache],
                                                           [c.values for c in cache])
        info = np.concatenate([np.array(depth)[None], np.array(path), np.array(bonus)])
        outs.append((info, np.array(nxt), offset.item(), [np.array(k) for k in keys]))
    ref = outs[0]
    depth = int(ref[0][0])
    assert depth == 0 or kind != "ar"
    assert ref[2] == len(prompt) + depth + 1  # the next step's offset, on the device
    for info, nxt, offset, keys in outs[1:]:
        np.testing.assert_array_equal(info, ref[0])
        np.testing.assert_array_equal(nxt, ref[1])
        assert offset == ref[2]
        for got, want in zip(keys, ref[3]):
            np.testing.assert_allclose(got[..., :32, :], want[..., :32, :], atol=1e-5)


@pytest.mark.parametrize("temp", [0.0, 0.8])
@pytest.mark.parametrize("speculate", [True, False])
def test_compiled_pipelined_generation_equals_eager(temp, speculate):
    model, perm = markov_model("llama")
    prompt = chain(perm, 3, 5)
    sampling = SamplingParams(temp=temp)
    for tree in ("2,2,1", "1,1,1"):  # a tree, and a chain (its commit is a no-op)
        results = []
        for compile, pipeline in [(True, True), (True, False), (False, False)]:
            mx.random.seed(11)
            ids, steps = run_tokens(model, prompt, 90, tree=tree, sampling=sampling, compile=compile,
                                    pipeline=pipeline, speculate=speculate)
            results.append((ids, [s.accepted for s in steps]))
        assert results[0] == results[1] == results[2]
    assert len(results[0][0]) == 90
    if speculate:
        assert sum(results[0][1]) > 0  # drafts were accepted: the commit path ran


def test_pipelined_generation_stopped_early_leaves_a_consistent_cache():
    from mlx_specstream.generate import generate_step

    model, perm = markov_model("llama")
    prompt = chain(perm, 4, 5)
    cache: list = []
    gen = generate_step(model, mx.array(prompt), max_tokens=200, tree="2,1", cache=cache, pipeline=True)
    got = [t for _, s in zip(range(6), gen) for t in s.tokens]
    gen.close()  # one step is still in flight
    committed = cache[0].offset
    assert committed == len(prompt) + len(got) - 1
    ref = make_cache(model.num_layers)
    all_tokens = prompt + got
    model.forward(mx.array(all_tokens[:committed])[None], ref, prefill_plan(committed, 0), streams=False)
    for c, r in zip(cache, ref):
        np.testing.assert_allclose(np.array(c.keys[..., :committed, :]), np.array(r.keys[..., :committed, :]),
                                   atol=1e-4)


def test_traces_are_reused_across_generations():
    model, perm = markov_model("llama")
    prompt = chain(perm, 2, 5)
    run_tokens(model, prompt, 60, tree="2,1")
    table = compiled._model_table(model)
    before = dict(table)
    run_tokens(model, chain(perm, 9, 6), 60, tree="2,1")  # similar length: the same buffer sizes
    assert set(table) == set(before)
    assert all(table[k] is before[k] for k in before)


def test_table_keeps_a_bounded_number_of_models():
    import gc
    import weakref

    compiled.clear()
    refs = []
    for seed in range(compiled.MAX_MODELS + 2):
        model = random_model(tiny_config("llama"), SpecStreamConfig(num_streams=2, num_msa_layers=1), seed=seed)
        run_tokens(model, [1, 2, 3], 4)
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    alive = [r() is not None for r in refs]
    assert alive == [False] * 2 + [True] * compiled.MAX_MODELS  # the oldest were released
    compiled.clear()
    gc.collect()
    assert not any(r() is not None for r in refs)
