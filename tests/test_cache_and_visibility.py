"""Cache compaction against a full recomputation, and multi-stream attention visibility."""

import mlx.core as mx
import numpy as np
import pytest
from _support import chain, markov_model

from mlx_specstream.cache import KVCache, make_cache
from mlx_specstream.config import PruningConfig, SpecStreamConfig
from mlx_specstream.streams import prefill_plan
from mlx_specstream.testing import FAMILIES, random_model, tiny_config


def test_commit_gathers_accepted_entries():
    cache = KVCache()
    k = mx.arange(2 * 5 * 3, dtype=mx.float32).reshape(1, 2, 5, 3)
    cache.update_and_fetch(k[:, :, :2], k[:, :, :2])
    cache.commit(None, 2)
    keys, _ = cache.update_and_fetch(k[:, :, 2:], k[:, :, 2:])
    np.testing.assert_array_equal(np.array(keys[..., :5, :]), np.array(k))  # the whole buffer comes back
    cache.commit([0, 2])  # keep new entries 0 and 2 (absolute 2 and 4)
    assert cache.offset == 4
    got = np.array(cache.keys[..., :4, :])
    np.testing.assert_array_equal(got, np.array(k[:, :, [0, 1, 2, 4]]))


def test_buffer_grows_in_quanta_not_per_step():
    from mlx_specstream.cache import QUANTUM
    from mlx_specstream.generate import generate_step

    model, perm = markov_model("llama")
    cache: list = []
    prompt = chain(perm, 1, 4)
    sizes = []
    for _ in generate_step(model, mx.array(prompt), max_tokens=300, tree="2,2,1", cache=cache):
        sizes.append(cache[0].keys.shape[2])
        assert all(c.keys.shape[2] == sizes[-1] for c in cache)  # every layer the same size
        # just past what the step in flight may need: 4 levels of advance + 11 nodes x (1 + 3 streams)
        assert sizes[-1] % QUANTUM == 0 and sizes[-1] - cache[0].offset < QUANTUM + 4 + 44
    assert sizes == sorted(sizes) and len(set(sizes)) <= 300 // QUANTUM + 2  # a few sizes, not one per step


@pytest.mark.parametrize("family", ["llama", "opt", "phi"])
def test_committed_cache_equals_recomputation(family):
    model, perm = markov_model(family)
    prompt = chain(perm, 5, 6)
    cache: list = []
    from mlx_specstream.generate import generate_step

    steps = list(generate_step(model, mx.array(prompt), max_tokens=80, tree="2,2,1", cache=cache))
    assert sum(s.accepted for s in steps) > 0
    tokens = prompt + [t for s in steps for t in s.tokens]
    committed = cache[0].offset
    assert committed == len(tokens) - 1  # the last emitted token is the next root, not yet cached
    ref = make_cache(model.num_layers)
    model.forward(mx.array(tokens[:committed])[None], ref, prefill_plan(committed, 0), streams=False)
    for got, want in zip(cache, ref):
        np.testing.assert_allclose(
            np.array(got.keys[..., :committed, :]), np.array(want.keys[..., :committed, :]), atol=1e-4
        )
        np.testing.assert_allclose(
            np.array(got.values[..., :committed, :]), np.array(want.values[..., :committed, :]), atol=1e-4
        )


def _model(family):
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2, pruning=PruningConfig(rank=4))
    return random_model(tiny_config(family), spec, seed=7)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_visibility(family):
    model = _model(family)
    g, h = model.num_streams, model.base.args.hidden_size
    tokens = mx.array([[3, 9, 27, 81, 243, 17, 51]])
    t = tokens.shape[1]
    main, streams, prune = model.all_logits(tokens)

    # later positions: changing tokens after position 3 leaves positions <= 3 untouched
    changed = mx.array([[3, 9, 27, 81, 5, 6, 7]])
    main2, streams2, prune2 = model.all_logits(changed)
    np.testing.assert_allclose(np.array(main2[:, :4]), np.array(main[:, :4]), atol=1e-5)
    np.testing.assert_allclose(np.array(streams2[:, :4]), np.array(streams[:, :4]), atol=1e-5)
    np.testing.assert_allclose(np.array(prune2[:, :4]), np.array(prune[:, :4]), atol=1e-5)

    # streams of another position: perturb every stream of position 2
    noise = np.random.default_rng(0).normal(0, 3.0, (g, h)).astype(np.float32)  # not constant: LayerNorm removes that
    delta = np.zeros((1, t, g, h), np.float32)
    delta[0, 2] = noise
    main3, streams3, _ = model.all_logits(tokens, mx.array(delta))
    np.testing.assert_allclose(np.array(main3), np.array(main), atol=1e-5)  # main ignores streams
    others = [i for i in range(t) if i != 2]
    np.testing.assert_allclose(np.array(streams3[:, others]), np.array(streams[:, others]), atol=1e-5)
    assert float(mx.abs(streams3[:, 2] - streams[:, 2]).max()) > 1e-3  # the perturbation is real

    # higher streams: perturbing stream j=2 of position 4 leaves stream 1 there unchanged
    delta = np.zeros((1, t, g, h), np.float32)
    delta[0, 4, 1] = noise[1]
    _, streams4, _ = model.all_logits(tokens, mx.array(delta))
    np.testing.assert_allclose(np.array(streams4[:, 4, 0]), np.array(streams[:, 4, 0]), atol=1e-5)
    assert float(mx.abs(streams4[:, 4, 1:] - streams[:, 4, 1:]).max()) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_step_matches_sequential_recomputation(family):
    """Every tree node's main and stream logits equal a plain (reference) pass over its own
    root-to-node path (gemma3, smollm3: the prefix plus the tree reaches past their window of 8)."""
    model = _model(family)
    from mlx_specstream.streams import tree_plan
    from mlx_specstream.tree import parse_tree_spec

    prefix = [11, 22, 33, 44, 55, 66, 77, 88, 99]
    tree = parse_tree_spec("2,2")
    nodes = mx.array([7, 8, 9, 10, 11, 12, 13], dtype=mx.int32)  # root + 2 + 4 drafts
    cache = make_cache(model.num_layers)
    model.forward(mx.array(prefix)[None], cache, prefill_plan(len(prefix), 0), streams=False)
    for c in cache:
        c.commit(None, len(prefix))
    out = model.forward(nodes[None], cache, tree_plan(tree, model.num_streams))
    paths = out.plan.paths
    for i in range(tree.size):
        path = [int(nodes[j]) for j in paths[i, : tree.depth[i] + 1]]
        ref = model(mx.array([prefix + path]))[0, -1]
        np.testing.assert_allclose(np.array(out.logits[i]), np.array(ref), atol=1e-4)
        # the node's streams (the first g = tree depth of them run) equal the reference pass's
        g = out.stream_hidden.shape[1]
        ref_streams = model.all_logits(mx.array([prefix + path]))[1][0, -1, :g]
        np.testing.assert_allclose(np.array(model.stream_logits(out.stream_hidden[i])), np.array(ref_streams),
                                   atol=1e-4)
