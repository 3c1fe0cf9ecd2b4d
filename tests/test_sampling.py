"""Sampling is lossless in distribution (DESIGN.md rule 9), checked with chi-square tests."""

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.generate import generate_step
from mlx_specstream.sampling import SamplingParams, processed_logprobs
from mlx_specstream.testing import random_model, tiny_config

VOCAB = 12
N = 1000
# Per-check significance level. About ten p-values are checked per run, each with a fixed seed, so
# a change in how many random draws the generator makes reshuffles them all; at 1e-4 a correct
# sampler fails with probability ~1e-3, while the biased sampler below scores below 1e-6.
ALPHA = 1e-4
PROMPT = mx.array([3, 1, 4], dtype=mx.int32)


@pytest.fixture(scope="module")
def model():
    spec = SpecStreamConfig(num_streams=3, num_msa_layers=2)
    m = random_model(tiny_config("llama", vocab_size=VOCAB, hidden_size=32), spec, seed=11)
    # flatten the logits a little so several tokens carry mass at every position
    m.base.lm_head.weight = m.base.lm_head.weight * 0.5
    return m


def _samples(model, speculate, params, n, seed):
    mx.random.seed(seed)
    out = np.zeros((n, 4), dtype=np.int64)
    accepted = 0
    for i in range(n):
        toks = []
        for step in generate_step(model, PROMPT, max_tokens=4, sampling=params, tree="3,2", speculate=speculate):
            toks.extend(step.tokens)
            accepted += step.accepted
        out[i] = toks[:4]
    return out, accepted


def _exact_first_two(model, params):
    """Exact P(x1) and P(x2) of plain autoregressive sampling."""
    logits = model(PROMPT[None])[0, -1:]
    p1 = np.exp(np.array(processed_logprobs(logits, params)))[0]
    p2 = np.zeros(VOCAB)
    for tok in range(VOCAB):
        if p1[tok] == 0:
            continue
        seq = mx.concatenate([PROMPT, mx.array([tok], dtype=mx.int32)])[None]
        cond = np.exp(np.array(processed_logprobs(model(seq)[0, -1:], params)))[0]
        p2 += p1[tok] * cond
    return p1, p2


def _gof(counts, probs):
    probs = probs.astype(np.float64) / probs.sum()
    keep = probs * counts.sum() >= 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * counts.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()  # exact totals, as scipy requires
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temp=1.0), SamplingParams(temp=0.8, top_p=0.9, top_k=6, min_p=0.02)],
    ids=["plain", "processed"],
)
def test_speculative_sampling_matches_autoregressive(model, params):
    ss, accepted = _samples(model, True, params, N, seed=1)
    assert accepted > N // 4  # drafts were accepted often enough to matter
    p1, p2 = _exact_first_two(model, params)
    for pos, probs in ((0, p1), (1, p2)):
        counts = np.bincount(ss[:, pos], minlength=VOCAB)
        assert _gof(counts, probs) > ALPHA, (pos, counts, probs)
        assert counts[probs == 0].sum() == 0  # truncated tokens never appear
    if params.top_k == 0:
        return  # later positions: compared against plain sampling once, with processing on
    ar, _ = _samples(model, False, params, N, seed=2)
    for pos in (2, 3):
        table = np.stack([np.bincount(ar[:, pos], minlength=VOCAB), np.bincount(ss[:, pos], minlength=VOCAB)])
        table = table[:, table.sum(0) > 0]
        assert stats.chi2_contingency(table).pvalue > ALPHA, table


def test_chi_square_detects_a_biased_sampler(model):
    """The statistical check has power: always accepting the top draft is caught."""
    params = SamplingParams(temp=1.0)
    p1, p2 = _exact_first_two(model, params)
    mx.random.seed(3)
    biased = []
    for _ in range(N // 2):
        steps = list(generate_step(model, PROMPT, max_tokens=2, sampling=SamplingParams(), tree="3,2"))
        biased.append([t for s in steps for t in s.tokens][1])
    counts = np.bincount(np.array(biased), minlength=VOCAB)
    assert _gof(counts, p2) < 1e-6


def test_processed_distribution_rules():
    logits = mx.log(mx.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = np.exp(np.array(processed_logprobs(logits, SamplingParams(temp=1.0, top_p=0.7))))[0]
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)
    p = np.exp(np.array(processed_logprobs(logits, SamplingParams(temp=1.0, top_k=2))))[0]
    np.testing.assert_allclose(p, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], atol=1e-6)
    p = np.exp(np.array(processed_logprobs(logits, SamplingParams(temp=1.0, min_p=0.25))))[0]
    np.testing.assert_allclose(p, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=1e-6)


@pytest.mark.parametrize("kw, msg", [({"temp": -1}, "temp"), ({"top_p": 0}, "top_p"), ({"min_p": 1.5}, "min_p")])
def test_bad_sampling_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()
