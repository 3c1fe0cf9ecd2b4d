"""Training at scale, the arithmetic: the decomposed multi-stream attention and the chunked loss
equal the dense ``[L, L]`` reference (float32, 1e-5) -- values and gradients -- on a sample of
families (llama, qwen3, gemma3_text and phi3 with sliding windows, opt), with padding and
skipped prompt streams. Memory at T = 2,048: ``test_train_scale_memory.py``.

The dense path lives here only, as :func:`dense_forward_hidden` / :func:`dense_loss`: today's
trainer never builds it.
"""

import contextlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from mlx_specstream.config import PruningConfig, SpecStreamConfig, StreamLoRAConfig  # noqa: E402
from mlx_specstream.train import SpecStreamLM, layout  # noqa: E402
from mlx_specstream.train.backbone import DEFAULT_ATTENTION_TARGETS  # noqa: E402
from mlx_specstream.train.layout import IGNORE_INDEX  # noqa: E402
from mlx_specstream.train.loss import specstream_loss, stream_names  # noqa: E402
from mlx_specstream.train.model import StreamHidden  # noqa: E402
from mlx_specstream.train.tiny import tiny_hf_model  # noqa: E402

torch.set_num_threads(2)
VOCAB = 259
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- the dense reference (the trainer before the decomposition) -----------------------------

def dense_forward_hidden(model, input_ids, attention_mask=None, stream_start=0):
    """Every MSA layer on all ``L = T + n·γ`` rows with the dense ``[B, 1, L, L]`` mask of
    :func:`layout.msa_mask`: the reference the decomposition must reproduce."""
    bb, gamma = model.backbone, model.spec.num_streams
    B, T = input_ids.shape
    valid = (attention_mask.bool() if attention_mask is not None
             else torch.ones(B, T, dtype=torch.bool))
    pos = layout.default_positions(valid)
    x = bb.embed(input_ids, pos)
    lower = range(model.msa_start)
    masks = bb.layer_masks(layout.main_mask(valid), pos, T, x.dtype, lower)
    pe = bb.position_embeddings(x, pos)
    for i in lower:
        x = bb.run_layer(i, x, masks, pe, pos)
    M = x
    prune = model.pruning(M.detach()) if hasattr(model, "pruning") else None
    n = T - stream_start
    Ms = M[:, stream_start:]
    f = model.stream_init(Ms) if hasattr(model, "stream_init") else Ms
    S = f[:, :, None, :] + model.stream_embeddings
    x = torch.cat([M, S.reshape(B, n * gamma, -1)], 1)
    pos_all = layout.msa_positions(pos, gamma, stream_start)
    upper = range(model.msa_start, bb.num_layers)
    masks = bb.layer_masks(layout.msa_mask(valid, gamma, stream_start), pos_all, T, x.dtype, upper)
    pe = bb.position_embeddings(x, pos_all, frozen=True)
    lora = getattr(model, "stream_lora", None)
    with (lora.streams_after(T, x.shape[1]) if lora is not None else contextlib.nullcontext()):
        for i in upper:
            x = bb.run_layer(i, x, masks, pe, pos_all)
    return StreamHidden(main=x[:, :T], streams=x[:, T:].reshape(B, n, gamma, -1), prune=prune,
                        stream_start=stream_start)


def dense_loss(model, hidden, targets, prune_loss_weight=0.1):
    """DESIGN.md rule 10 with all logits of each term at once (no chunks)."""
    weights = model.spec.weights()
    loss = 0.0
    for j, name in enumerate(stream_names(model.spec.num_streams, hidden.prune is not None)):
        if name == "prune":
            h, t, w, detach = hidden.prune, targets[..., 0], prune_loss_weight, True
        elif j == 0:
            h, t, w, detach = hidden.main, targets[..., 0], weights[0], False
        else:
            h, t, w, detach = hidden.streams[:, :, j - 1], targets[:, hidden.stream_start:, j], weights[j], False
        sel = t != IGNORE_INDEX
        logits = model.head(h[sel], detach_weights=detach).float()
        loss = loss + w * F.cross_entropy(logits, t[sel], reduction="sum") / sel.sum().clamp(min=1)
    return loss


# ---- models --------------------------------------------------------------------------------

def make(variant, gamma=3, msa=2, mode="shared", seed=0, **overrides):
    hf = tiny_hf_model(variant, seed=seed, **overrides)
    family = hf.config.model_type
    spec = SpecStreamConfig(
        num_streams=gamma, num_msa_layers=msa, mode=mode, stream_init="linear", stream_init_rank=4,
        pruning=PruningConfig(rank=4),
        stream_lora=StreamLoRAConfig(rank=4, alpha=8.0, target_modules=DEFAULT_ATTENTION_TARGETS[family])
        if mode == "lossless" else None)
    model = SpecStreamLM(hf, spec, seed=seed)
    if mode == "lossless":
        hf.requires_grad_(False)
    with torch.no_grad():  # non-zero adapters, as after training
        for name, p in model.named_parameters():
            if name.startswith(("stream_init.up", "pruning.up")) or name.endswith("lora_b"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def ids(B=2, T=24, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), grads(model)


# Families: llama (GQA), qwen3 (q/k norms, head_dim 16), gemma3_text (window 8 on 3 of 4 layers,
# two rope tables), phi3 (fused qkv, window 10 on every layer), opt (learned positions, pre-scaled q).
FAMILIES = [("llama", {}), ("qwen3", {}), ("gemma3_text", {}), ("phi3", {"sliding_window": 10}), ("opt", {})]


@pytest.mark.parametrize("variant,overrides", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_decomposed_msa_equals_the_dense_reference(variant, overrides):
    model = make(variant, msa=3, mode="lossless" if variant in ("qwen3", "opt") else "shared", **overrides)
    x = ids(T=24)
    valid = torch.ones(2, 24, dtype=torch.long)
    valid[1, 19:] = 0  # right padding
    labels = x.masked_fill(valid == 0, IGNORE_INDEX)
    labels[:, :6] = IGNORE_INDEX  # a prompt: streams start at position 6 - 1 - γ = 2
    targets = layout.stream_targets(labels, 3)
    start = layout.first_stream_target(targets)
    assert start == 2
    for grad_checkpoint in (False, True):
        new = model.forward_hidden(x, valid, stream_start=start, grad_checkpoint=grad_checkpoint)
        ref = dense_forward_hidden(model, x, valid, stream_start=start)
        ok = valid.bool()
        torch.testing.assert_close(new.main[ok], ref.main[ok], **TOL)
        torch.testing.assert_close(new.streams[ok[:, start:]], ref.streams[ok[:, start:]], **TOL)

    # loss and gradients: decomposed attention + chunked loss (4 rows per chunk) vs dense + one chunk
    got_loss, got = loss_and_grads(model, lambda: specstream_loss(
        model, model.forward_hidden(x, valid, stream_start=start), targets, chunk_elements=4 * VOCAB)[0])
    want_loss, want = loss_and_grads(model, lambda: dense_loss(
        model, dense_forward_hidden(model, x, valid, stream_start=start), targets))
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got.keys() == want.keys() and len(got) > 3
    hidden = model.forward_hidden(x, valid, stream_start=start)
    chunked = specstream_loss(model, hidden, targets, chunk_elements=4 * VOCAB)
    chunked[0].backward()  # the recomputation must not count accuracy again
    whole = specstream_loss(model, hidden, targets, chunk_elements=1 << 30)[1]
    assert chunked[1].keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(chunked[1][k], whole[k], **TOL, msg=k)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=name)


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_left_padding_uses_masks_and_still_matches(variant):
    """Left padding is not hidden by causality alone: both parts take explicit masks then."""
    model = make(variant, gamma=2).eval()
    x = ids(T=20, seed=2)
    valid = torch.ones(2, 20, dtype=torch.long)
    valid[0, :5] = 0
    ok = valid.bool()
    with torch.no_grad():
        new, ref = model.forward_hidden(x, valid), dense_forward_hidden(model, x, valid)
    torch.testing.assert_close(new.main[ok], ref.main[ok], **TOL)
    torch.testing.assert_close(new.streams[ok], ref.streams[ok], **TOL)


def test_eager_attention_matches_the_dense_reference():
    model = make("llama", gamma=4).eval()
    model.hf.config._attn_implementation = "eager"
    x = ids(T=16, seed=3)
    with torch.no_grad():
        new, ref = model.forward_hidden(x), dense_forward_hidden(model, x)
    torch.testing.assert_close(new.main, ref.main, **TOL)
    torch.testing.assert_close(new.streams, ref.streams, **TOL)


def test_stream_attention_on_its_own_against_a_dense_softmax():
    """stream_attention alone, random q/k/v with GQA, start > 0, scale != 1/sqrt(D)."""
    from mlx_specstream.train.attention import MSAPlan, stream_attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, gamma, start, D = 2, 4, 2, 7, 3, 2, 8
    n = T - start
    L = T + n * gamma
    q = torch.randn(B, H, L, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    pos = layout.default_positions(valid)
    plan = MSAPlan(n_main=T, num_streams=gamma, start=start, valid=valid, positions=pos, main_masks={},
                   base_implementation="sdpa", causal_only=True, max_position=T - 1)
    got = stream_attention(q[:, :, T:], k, v, plan, scaling=0.3)  # [B, n·γ, H, D]
    allowed = layout.msa_mask(valid, gamma, start)[:, :, T:]  # stream rows of the dense mask
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q[:, :, T:] @ kk.transpose(-1, -2)) * 0.3
    want = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv
    torch.testing.assert_close(got, want.transpose(1, 2), **TOL)


@pytest.mark.parametrize("use_bias", [True, False])
def test_lower_right_causal_attention_both_ways(use_bias):
    """PyTorch's lower-right bias (CUDA's way) and zero queries in front (elsewhere) both equal an
    explicit lower-right mask."""
    from mlx_specstream.train.attention import lower_right_causal_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 9, 9))
    got = lower_right_causal_attention(q, k, v, scale=0.4, use_bias=use_bias)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(9 - 5)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("variant", ["llama", "gemma3_text"])
def test_bfloat16_decomposition_is_as_accurate_as_dense_bfloat16(variant):
    """Under bfloat16 autocast (bf16 weights), the decomposition's error against the float32
    reference is no larger than the dense path's in the same precision (the score slots carry
    the within-node scores as hi + lo parts)."""
    model = make(variant, gamma=4).eval()
    x = ids(T=32)
    with torch.no_grad():
        ref = dense_forward_hidden(model, x)
        model.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new, dense = model.forward_hidden(x), dense_forward_hidden(model, x)
    err = (new.streams.float() - ref.streams).abs().max()
    dense_err = (dense.streams.float() - ref.streams).abs().max()
    assert err <= 1.5 * dense_err + 1e-3, (err, dense_err)
